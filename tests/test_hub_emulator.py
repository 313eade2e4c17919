"""The Hub emulator (tests/hub_emulator.py) as the real huggingface_hub client sees it.

Every client call runs in a child process (hub.run_json / hub.popen_python) with the emulator's env:
huggingface_hub reads HF_ENDPOINT and its cache paths once, when first imported, and keeps one shared HTTP
session, so an in-process client would depend on what this pytest session imported before. Each snippet
gets the repo id as sys.argv[1] (REPO) and prints its result as JSON on its last line (out(...)).
"""

from __future__ import annotations

import json
import textwrap
import urllib.request

pytest_plugins = ["tests.hub_fixtures"]

PRELUDE = """\
import json, pathlib, sys, tempfile
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
)
api = HfApi()
REPO = sys.argv[1]

def out(value):
    print(json.dumps(value))

def write_tree(files):
    root = pathlib.Path(tempfile.mkdtemp())
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return str(root)

def error_name(call):
    try:
        call()
    except Exception as err:
        return type(err).__name__
    return None
"""

# Two checkpoints, each in its own commit and tagged; SHAS maps the step (as str) to its commit sha.
SEED = """\
api.create_repo(REPO)
SHAS = {}
for step in (10, 20):
    folder = write_tree({
        "model.safetensors": f"weights-{step}-" * 50,
        "config.json": json.dumps({"step": step}),
        "optim/state.pt": f"optimizer-{step}",
    })
    SHAS[str(step)] = api.upload_folder(
        repo_id=REPO, folder_path=folder, path_in_repo=f"checkpoints/{step:06d}", commit_message=f"step {step}"
    ).oid
    api.create_tag(REPO, tag=f"step-{step}", revision=SHAS[str(step)])
"""

CHECKPOINT_FILES = ["config.json", "model.safetensors", "optim/state.pt"]


def client(hub, repo: str, body: str, *, seed: bool = False, **kwargs):
    """Run `body` with the real client (after SEED when asked); return what it printed with out()."""
    code = PRELUDE + (SEED if seed else "") + textwrap.dedent(body)
    return hub.run_json(code, args=[repo], **kwargs)


def checkpoint(step: int) -> list[str]:
    return [f"checkpoints/{step:06d}/{name}" for name in CHECKPOINT_FILES]


def test_env_points_the_client_at_the_emulator_with_an_isolated_cache(hub, hub_repo):
    seen = client(hub, hub_repo, """
        from huggingface_hub import constants, get_token
        out([constants.ENDPOINT, constants.HF_HUB_CACHE, get_token(), constants.HF_HUB_DISABLE_XET])
    """)
    assert seen == [hub.url, str(hub.hf_home / "hub"), hub.token, True]


def test_create_repo_twice_with_exist_ok_reuses_the_repo_and_keeps_it_private(hub, hub_repo):
    result = client(hub, hub_repo, """
        first = api.create_repo(REPO, private=True)
        sha = api.repo_info(REPO).sha
        second = api.create_repo(REPO, private=False, exist_ok=True)
        info = api.model_info(REPO)
        out({"urls": [first.repo_id, second.repo_id, str(second)], "private": info.private,
             "same_sha": info.sha == sha, "exists": api.repo_exists(REPO)})
    """)
    assert result == {"urls": [hub_repo, hub_repo, f"{hub.url}/{hub_repo}"], "private": True, "same_sha": True,
                      "exists": True}
    assert [e["status"] for e in hub.log(kind="create_repo")] == [200, 409]


def test_create_repo_without_exist_ok_raises_409_when_it_exists(hub, hub_repo):
    status = client(hub, hub_repo, """
        api.create_repo(REPO)
        try:
            api.create_repo(REPO)
        except HfHubHTTPError as err:
            out(err.response.status_code)
    """)
    assert status == 409


def test_list_repo_files_at_a_tag_ignores_later_commits(hub, hub_repo):
    files = client(hub, hub_repo, """
        out({"main": api.list_repo_files(REPO), "tag": api.list_repo_files(REPO, revision="step-10")})
    """, seed=True)
    # Like the Hub, a new repo starts with an "initial commit" holding .gitattributes.
    assert sorted(files["main"]) == sorted([".gitattributes", *checkpoint(10), *checkpoint(20)])
    assert sorted(files["tag"]) == sorted([".gitattributes", *checkpoint(10)])


def test_list_repo_tree_lists_a_folder_recursively_at_a_tag(hub, hub_repo):
    trees = client(hub, hub_repo, """
        def listing(**kwargs):
            return sorted([type(e).__name__, e.path] for e in api.list_repo_tree(REPO, **kwargs))
        out({"flat_main": listing(path_in_repo="checkpoints"),
             "deep_tag": listing(path_in_repo="checkpoints/000010", recursive=True, revision="step-10")})
    """, seed=True)
    assert trees["flat_main"] == [["RepoFolder", "checkpoints/000010"], ["RepoFolder", "checkpoints/000020"]]
    assert trees["deep_tag"] == sorted([["RepoFolder", "checkpoints/000010/optim"],
                                        *(["RepoFile", path] for path in checkpoint(10))])


def test_list_repo_refs_reports_main_and_tags(hub, hub_repo):
    refs = client(hub, hub_repo, """
        refs = api.list_repo_refs(REPO)
        out({"shas": SHAS, "branches": {r.name: r.target_commit for r in refs.branches},
             "tags": {r.name: r.target_commit for r in refs.tags}})
    """, seed=True)
    shas = refs["shas"]
    assert refs["branches"] == {"main": shas["20"]}
    assert refs["tags"] == {"step-10": shas["10"], "step-20": shas["20"]}


def test_list_repo_commits_walks_the_parent_chain_newest_first(hub, hub_repo):
    result = client(hub, hub_repo, """
        commits = api.list_repo_commits(REPO)
        out({"shas": SHAS, "commits": [[c.commit_id, c.title] for c in commits],
             "from_tag": [c.commit_id for c in api.list_repo_commits(REPO, revision="step-10")]})
    """, seed=True)
    shas, commits = result["shas"], result["commits"]
    assert [title for _sha, title in commits] == ["step 20", "step 10", "initial commit"]
    assert [sha for sha, _title in commits[:2]] == [shas["20"], shas["10"]]
    assert result["from_tag"] == [shas["10"], commits[2][0]]


def test_snapshot_download_with_allow_patterns_at_a_tag_fetches_only_that_folder(hub, hub_repo):
    result = client(hub, hub_repo, """
        path = snapshot_download(REPO, revision="step-20", allow_patterns="checkpoints/000010/*")
        root = pathlib.Path(path)
        out({"shas": SHAS, "local": sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()),
             "sizes": {p: api.get_paths_info(REPO, p, revision="step-20")[0].size for p in %r}})
    """ % checkpoint(10), seed=True)
    assert sorted(result["local"]) == sorted(checkpoint(10))
    downloads = hub.downloads(repo=hub_repo)
    # Files are fetched at the commit the tag points to, each once, and only the allowed ones.
    assert sorted(d["file"] for d in downloads) == sorted(checkpoint(10))
    assert {d["revision"] for d in downloads} == {result["shas"]["20"]}
    assert {d["file"]: d["bytes_sent"] for d in downloads} == result["sizes"]


def test_hf_hub_download_at_an_old_sha_or_tag_returns_the_old_content(hub, hub_repo):
    contents = client(hub, hub_repo, """
        api.create_repo(REPO)
        old = api.upload_file(repo_id=REPO, path_or_fileobj=b"version 1", path_in_repo="config.json").oid
        api.create_tag(REPO, tag="v1")
        api.upload_file(repo_id=REPO, path_or_fileobj=b"version 2", path_in_repo="config.json")
        read = lambda rev: pathlib.Path(hf_hub_download(REPO, "config.json", revision=rev)).read_text()
        out({"sha": read(old), "tag": read("v1"), "main": read("main")})
    """)
    assert contents == {"sha": "version 1", "tag": "version 1", "main": "version 2"}


def test_missing_repo_raises_repository_not_found(hub, hub_repo):
    errors = client(hub, hub_repo, """
        out([error_name(lambda: api.repo_info(REPO)),
             error_name(lambda: api.list_repo_files(REPO)),
             error_name(lambda: hf_hub_download(REPO, "config.json"))])
    """)
    assert errors == ["RepositoryNotFoundError"] * 3


def test_missing_revision_raises_revision_not_found(hub, hub_repo):
    errors = client(hub, hub_repo, """
        api.create_repo(REPO)
        out([error_name(lambda: api.repo_info(REPO, revision="no-such-branch")),
             error_name(lambda: api.list_repo_files(REPO, revision="no-such-branch")),
             error_name(lambda: hf_hub_download(REPO, ".gitattributes", revision="no-such-branch"))])
    """)
    assert errors == ["RevisionNotFoundError"] * 3


def test_missing_file_raises_entry_not_found(hub, hub_repo):
    errors = client(hub, hub_repo, """
        api.create_repo(REPO)
        def caught(call):
            try:
                call()
            except EntryNotFoundError:  # the client raises its RemoteEntryNotFoundError subclass
                return "EntryNotFoundError"
            except Exception as err:
                return type(err).__name__
        out([caught(lambda: hf_hub_download(REPO, "missing.json")),
             caught(lambda: list(api.list_repo_tree(REPO, path_in_repo="missing"))),
             caught(lambda: api.create_commit(REPO, [CommitOperationDelete("missing.json")], commit_message="rm"))])
    """)
    assert errors == ["EntryNotFoundError"] * 3


def test_commit_with_a_deletion_removes_the_file(hub, hub_repo):
    files = client(hub, hub_repo, """
        api.create_repo(REPO)
        api.upload_folder(repo_id=REPO, folder_path=write_tree({"a.txt": "a", "b.txt": "b"}))
        api.create_commit(REPO, [CommitOperationDelete("a.txt"), CommitOperationAdd("c.txt", b"c")],
                          commit_message="swap a for c")
        out(api.list_repo_files(REPO))
    """)
    assert sorted(files) == [".gitattributes", "b.txt", "c.txt"]


def test_commit_with_a_stale_parent_commit_is_rejected(hub, hub_repo):
    status = client(hub, hub_repo, """
        api.create_repo(REPO)
        stale = api.repo_info(REPO).sha
        api.upload_file(repo_id=REPO, path_or_fileobj=b"1", path_in_repo="a.txt")
        try:
            api.upload_file(repo_id=REPO, path_or_fileobj=b"2", path_in_repo="a.txt", parent_commit=stale)
        except HfHubHTTPError as err:
            out(err.response.status_code)
    """)
    assert status == 412


def test_uploading_unchanged_files_makes_no_new_commit(hub, hub_repo):
    result = client(hub, hub_repo, """
        api.create_repo(REPO)
        folder = write_tree({"config.json": "{}"})
        first = api.upload_folder(repo_id=REPO, folder_path=folder).oid
        again = api.upload_folder(repo_id=REPO, folder_path=folder).oid
        out([first, again, len(api.list_repo_commits(REPO))])
    """)
    first, again, n_commits = result
    assert again == first and n_commits == 2  # preupload returned the remote oid, so the client skipped it


def test_injected_503_on_the_first_commit_raises_and_a_second_try_succeeds(hub, hub_repo):
    hub.fail_commits(n_th=1, status=503, times=1)
    result = client(hub, hub_repo, """
        api.create_repo(REPO)
        ops = lambda: [CommitOperationAdd("a.txt", b"a")]
        try:
            api.create_commit(REPO, ops(), commit_message="first try")
            status = None
        except HfHubHTTPError as err:
            status = err.response.status_code
        sha = api.create_commit(REPO, ops(), commit_message="second try").oid
        out({"status": status, "sha": sha, "titles": [c.title for c in api.list_repo_commits(REPO)]})
    """)
    assert result["status"] == 503
    assert result["titles"] == ["second try", "initial commit"]
    # create_commit does not retry a 5xx commit by itself: exactly two POSTs reached the server.
    assert [e["status"] for e in hub.log(kind="commit")] == [503, 200]


def test_commit_that_lands_but_loses_its_answer_is_not_duplicated_by_a_retry(hub, hub_repo):
    hub.fail_commits(n_th=1, status=503, times=1, phase="after")
    result = client(hub, hub_repo, """
        api.create_repo(REPO)
        folder = write_tree({"model.safetensors": "weights"})
        try:
            api.upload_folder(repo_id=REPO, folder_path=folder)
        except HfHubHTTPError as err:
            print("first try:", err.response.status_code, file=sys.stderr)
        sha = api.upload_folder(repo_id=REPO, folder_path=folder).oid
        out({"sha": sha, "head": api.repo_info(REPO).sha, "commits": len(api.list_repo_commits(REPO))})
    """)
    # The retry builds new operations, preupload reports the file as already there, and no commit is sent.
    assert result["sha"] == result["head"] and result["commits"] == 2
    assert [e["status"] for e in hub.log(kind="commit")] == [503]


def test_dropped_commit_connection_raises_a_transport_error(hub, hub_repo):
    hub.disconnect("commit", method="POST")
    error = client(hub, hub_repo, """
        api.create_repo(REPO)
        try:
            api.upload_file(repo_id=REPO, path_or_fileobj=b"a", path_in_repo="a.txt")
        except Exception as err:
            out([type(err).__module__.split(".")[0], type(err).__name__, isinstance(err, HfHubHTTPError)])
    """)
    assert error == ["httpx2", "RemoteProtocolError", False]


def test_truncated_download_is_retried_from_scratch_and_completes(hub, hub_repo):
    hub.truncate_downloads(after_bytes=100)
    content = "0123456789" * 100
    result = client(hub, hub_repo, """
        api.create_repo(REPO)
        api.upload_file(repo_id=REPO, path_or_fileobj=%r.encode(), path_in_repo="data.txt")
        out(pathlib.Path(hf_hub_download(REPO, "data.txt")).read_text())
    """ % content)
    assert result == content
    # The client reads in 10 MB chunks, so bytes of a cut-short small file never reach the disk and its
    # retry asks for the whole file again rather than a Range.
    assert [(d["status"], d["bytes_sent"]) for d in hub.downloads(repo=hub_repo)] == [(200, 100), (200, 1000)]


def test_resolve_answers_a_range_request_with_206(hub, hub_repo):
    client(hub, hub_repo, """
        api.create_repo(REPO)
        out(api.upload_file(repo_id=REPO, path_or_fileobj=b"0123456789", path_in_repo="data.txt").oid)
    """)
    request = urllib.request.Request(f"{hub.url}/{hub_repo}/resolve/main/data.txt", headers={"Range": "bytes=3-5"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
        assert (response.status, response.headers["Content-Range"], response.read()) == (206, "bytes 3-5/10", b"345")


def test_private_repo_looks_missing_to_an_anonymous_client(hub, hub_repo):
    seen = client(hub, hub_repo, """
        api.create_repo(REPO, private=True)
        out([error_name(lambda: api.repo_info(REPO, token=False)), api.repo_info(REPO).private])
    """)
    assert seen == ["RepositoryNotFoundError", True]


def test_stalled_commit_does_not_block_a_concurrent_repo_info(hub, hub_repo):
    hub.stall_commits()  # held until release()
    committer = hub.popen_python(PRELUDE + textwrap.dedent("""
        api.create_repo(REPO)
        out(api.upload_file(repo_id=REPO, path_or_fileobj=b"a", path_in_repo="a.txt").oid)
    """), args=[hub_repo])
    try:
        hub.wait_for_stalled(1, timeout=60)
        during = client(hub, hub_repo, "out([api.repo_info(REPO).sha, api.list_repo_files(REPO)])", timeout=60)
        still_stalled = committer.poll() is None
    finally:
        hub.release()
        stdout, stderr = committer.communicate(timeout=60)
    assert still_stalled and during[1] == [".gitattributes"]
    assert committer.returncode == 0, stderr
    new_sha = json.loads(stdout.strip().splitlines()[-1])
    assert new_sha != during[0]
    # The log lists requests as they complete: the repo_info finished before the stalled commit.
    kinds = [e["kind"] for e in hub.log() if e["kind"] in ("repo_info", "commit")]
    assert kinds == ["repo_info", "commit"]
