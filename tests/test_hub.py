"""robotrain.hub against the Hub emulator: repo creation, background pushes, finding and downloading.

Checkpoint folders are written here with robotrain.checkpoint.save; every call to the Hub runs in a child
process (hub.run_python / hub.popen_python), because huggingface_hub reads HF_ENDPOINT when it is imported.
Each snippet gets the repo id as sys.argv[1] (REPO), further arguments as ARGS, and prints its result as
JSON on its last line (out(...)). The "robotrain" logger writes to the child's stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from robotrain import checkpoint_layout as layout
from tests.hub_emulator import wait_until
from tests.tiny_checkpoints import Tiny

pytest_plugins = ["tests.hub_fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET = "robotrain/synthetic_reach"

PRELUDE = f"""\
import json, logging, pathlib, shutil, sys, time
sys.path.insert(0, {str(REPO_ROOT)!r})
from huggingface_hub import HfApi, hf_hub_download
from robotrain import hub as rhub
from robotrain.errors import UserError

_log = logging.getLogger("robotrain")
_log.addHandler(logging.StreamHandler(sys.stderr))
_log.setLevel(logging.DEBUG)
api = HfApi()
REPO, ARGS = sys.argv[1], sys.argv[2:]

def out(value):
    print(json.dumps(value))

def pusher(**kwargs):
    rhub.ensure_repo(REPO)
    return rhub.CheckpointPusher(REPO, **{{"max_retries": 3, "base_delay_s": 0.01, **kwargs}})

def tags():
    return {{t.name: t.target_commit for t in api.list_repo_refs(REPO).tags}}

def files_at(revision):
    return sorted(api.list_repo_files(REPO, revision=revision))

def user_error(call):
    try:
        call()
    except UserError as err:
        return str(err)
    return None

def children():  # pids of this process's children, zombies included: the pusher's upload process
    import psutil
    return [c.pid for c in psutil.Process().children(recursive=True)]
"""


def run(hub, repo: str, body: str, *args, **kwargs) -> tuple:
    """Run `body` with the real client; returns (what it printed with out(), its stderr)."""
    proc = hub.run_python(PRELUDE + textwrap.dedent(body), args=[repo, *map(str, args)], **kwargs)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"snippet printed nothing; stderr:\n{proc.stderr}"
    return json.loads(lines[-1]), proc.stderr


def save_checkpoint(run_dir: Path, step: int, total_steps: int = 30, *, marker: str = "run") -> Path:
    """A real (tiny) checkpoint in LeRobot's layout, plus a pickle file that must never be downloaded."""
    tiny = Tiny(run_dir / "checkpoints", total_steps=total_steps, extra={"step": step, "marker": marker},
                train_config={"policy": {"type": "mlp"}, "dataset": {"repo_id": DATASET}, "steps": total_steps,
                              "saved_at": step, "marker": marker})
    tiny.train_step()
    folder = tiny.manager.save(step)
    (folder / layout.TRAINING_STATE / "extra.pt").write_bytes(b"\x80\x04 not for download")
    return folder


def local_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# -- a repo pushed to by an interrupted run (checkpoints only), shared by the read-only tests ---------------


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """checkpoints/000010, 000020 and 0000100 (a resume with steps=1e6 pads to 7 digits), each tagged;
    a tag `v1` at the commit of 000020; non-step entries under checkpoints/; no root model."""
    run_dir = tmp_path_factory.mktemp("pushed-run")
    folders = [save_checkpoint(run_dir, 10), save_checkpoint(run_dir, 20),
               save_checkpoint(run_dir, 100, total_steps=1_000_000)]
    repo = "user/pushed-run"
    result, _ = run(hub, repo, """
        p = pusher()
        for arg in ARGS:
            p.submit(pathlib.Path(arg), int(pathlib.Path(arg).name))
        assert p.close(timeout=60) == []
        shas = tags()
        api.create_tag(REPO, tag="v1", revision=shas["000020"])
        api.upload_file(repo_id=REPO, path_or_fileobj=b"{}", path_in_repo="checkpoints/notes/info.json")
        out({"tags": shas, "head": api.repo_info(REPO).sha})
    """, *folders)
    return {"repo": repo, "folders": {f.name: f for f in folders}, **result}


# -- the repo -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("private", [True, False])
def test_repo_is_created_private_or_public_as_configured(hub, hub_repo, private):
    seen, _ = run(hub, hub_repo, """
        rhub.ensure_repo(REPO, private=ARGS[0] == "True")
        out(api.model_info(REPO).private)
    """, private)
    assert seen is private


def test_an_existing_repo_is_reused_not_recreated(hub, hub_repo):
    seen, _ = run(hub, hub_repo, """
        rhub.ensure_repo(REPO, private=True)
        api.upload_file(repo_id=REPO, path_or_fileobj=b"x", path_in_repo="keep.txt")
        sha = api.repo_info(REPO).sha
        rhub.ensure_repo(REPO, private=False)  # a rerun of the same run
        info = api.model_info(REPO)
        out({"private": info.private, "same_sha": info.sha == sha})
    """)
    assert seen == {"private": True, "same_sha": True}
    assert [e["status"] for e in hub.log(kind="create_repo", repo=hub_repo)] == [200, 409]


# -- pushing checkpoints ------------------------------------------------------------------------------------


def test_each_checkpoint_is_one_commit_tagged_with_its_step(hub, hub_repo, tmp_path):
    folders = [save_checkpoint(tmp_path, step) for step in (10, 20, 30)]
    seen, _ = run(hub, hub_repo, """
        p = pusher()
        for arg in ARGS:
            p.submit(pathlib.Path(arg), int(pathlib.Path(arg).name))
        left = p.close(timeout=60)
        commits = [c.title for c in api.list_repo_commits(REPO)]
        out({"left": left, "commits": commits, "tags": tags(),
             "at_tag": {t: files_at(t) for t in tags()},
             "parents": {t: [c.commit_id for c in api.list_repo_commits(REPO, revision=t)][1] for t in tags()}})
    """, *folders)
    assert seen["left"] == []
    assert seen["commits"] == ["Checkpoint 000030 (step 30)", "Checkpoint 000020 (step 20)",
                               "Checkpoint 000010 (step 10)", "initial commit"]
    assert sorted(seen["tags"]) == ["000010", "000020", "000030"]
    for folder in folders:
        expected = [f"checkpoints/{folder.name}/{rel}" for rel in local_files(folder)]
        at_tag = [f for f in seen["at_tag"][folder.name] if f.startswith(f"checkpoints/{folder.name}/")]
        assert at_tag == expected
    # Each tag names the commit that added its own checkpoint: newer checkpoints are not in its tree.
    assert not any(f.startswith("checkpoints/000020") for f in seen["at_tag"]["000010"])
    assert seen["parents"]["000020"] == seen["tags"]["000010"]


def test_a_503_on_the_commit_is_retried_and_the_checkpoint_pushed(hub, hub_repo, tmp_path):
    folder = save_checkpoint(tmp_path, 10)
    hub.fail_commits(n_th=1, status=503, times=1)
    seen, stderr = run(hub, hub_repo, """
        p = pusher()
        p.submit(pathlib.Path(ARGS[0]), 10)
        out({"left": p.close(timeout=60), "tags": sorted(tags())})
    """, folder)
    assert seen == {"left": [], "tags": ["000010"]}
    assert [e["status"] for e in hub.log(kind="commit", repo=hub_repo)] == [503, 200]
    assert "HTTP 503" in stderr and "attempt 2/3" in stderr


def test_a_commit_that_landed_but_lost_its_answer_is_not_duplicated_and_gets_its_tag(hub, hub_repo, tmp_path):
    folder = save_checkpoint(tmp_path, 10)
    hub.fail_commits(n_th=1, status=503, times=1, phase="after")
    seen, _ = run(hub, hub_repo, """
        p = pusher()
        p.submit(pathlib.Path(ARGS[0]), 10)
        left = p.close(timeout=60)
        out({"left": left, "commits": [c.commit_id for c in api.list_repo_commits(REPO)], "tags": tags()})
    """, folder)
    assert seen["left"] == [] and len(seen["commits"]) == 2
    assert seen["tags"] == {"000010": seen["commits"][0]}


def test_a_dropped_connection_is_retried(hub, hub_repo, tmp_path):
    folder = save_checkpoint(tmp_path, 10)
    hub.disconnect("commit", method="POST")
    seen, stderr = run(hub, hub_repo, """
        p = pusher()
        p.submit(pathlib.Path(ARGS[0]), 10)
        out({"left": p.close(timeout=60), "tags": sorted(tags())})
    """, folder)
    assert seen == {"left": [], "tags": ["000010"]}
    assert "RemoteProtocolError" in stderr


def test_a_4xx_other_than_429_is_not_retried_and_the_checkpoint_stays_pending(hub, hub_repo, tmp_path):
    folder = save_checkpoint(tmp_path, 10)
    hub.fail_commits(n_th=1, status=403, times=None)
    seen, stderr = run(hub, hub_repo, """
        p = pusher()
        p.submit(pathlib.Path(ARGS[0]), 10)
        assert p.wait_idle(timeout=60)
        out({"pending": sorted(p.pending()), "left": p.close(timeout=60), "tags": sorted(tags())})
    """, folder)
    assert seen == {"pending": ["000010"], "left": ["000010"], "tags": []}
    assert [e["status"] for e in hub.log(kind="commit", repo=hub_repo)] == [403]
    assert "will not be retried" in stderr


def test_a_checkpoint_whose_retries_ran_out_has_no_tag_and_goes_with_the_next_submit(hub, hub_repo, tmp_path):
    first, second = save_checkpoint(tmp_path, 10), save_checkpoint(tmp_path, 20)
    hub.fail_commits(n_th=1, status=503, times=3)  # = max_retries: every attempt for step 10 fails
    seen, stderr = run(hub, hub_repo, """
        p = pusher()
        p.submit(pathlib.Path(ARGS[0]), 10)
        assert p.wait_idle(timeout=60)
        before = {"pending": sorted(p.pending()), "tags": sorted(tags())}
        p.submit(pathlib.Path(ARGS[1]), 20)  # the fault has cleared by now
        assert p.wait_idle(timeout=60)
        after = {"pending": sorted(p.pending()), "tags": tags()}
        out({"before": before, "after": after, "commits": [c.title for c in api.list_repo_commits(REPO)],
             "at_10": files_at("000010")})
    """, first, second)
    assert seen["before"] == {"pending": ["000010"], "tags": []}
    assert seen["after"]["pending"] == [] and sorted(seen["after"]["tags"]) == ["000010", "000020"]
    # Oldest first: the retried checkpoint is committed before the new one.
    assert seen["commits"][:2] == ["Checkpoint 000020 (step 20)", "Checkpoint 000010 (step 10)"]
    assert f"checkpoints/000010/{layout.PRETRAINED}/model.safetensors" in seen["at_10"]
    assert "failed 3 times" in stderr


def test_a_pending_checkpoint_deleted_locally_is_skipped_with_a_warning(hub, hub_repo, tmp_path):
    first, second = save_checkpoint(tmp_path, 10), save_checkpoint(tmp_path, 20)
    hub.fail_commits(n_th=1, status=503, times=3)
    seen, stderr = run(hub, hub_repo, """
        p = pusher()
        p.submit(pathlib.Path(ARGS[0]), 10)
        assert p.wait_idle(timeout=60)
        shutil.rmtree(ARGS[0])
        p.submit(pathlib.Path(ARGS[1]), 20)
        out({"left": p.close(timeout=60), "tags": sorted(tags())})
    """, first, second)
    assert seen == {"left": [], "tags": ["000020"]}
    assert "checkpoint 000010 was deleted locally" in stderr


STALLED = """
    p = pusher()
    started = time.monotonic()
    p.submit(pathlib.Path(ARGS[0]), 10)
    submit_s = time.monotonic() - started
    sys.stdin.readline()  # the test saw the commit stalled on the Hub
    uploading = sorted(p.pending())
    started = time.monotonic()
    uploaders = children()
    left = p.close(timeout=0.3)
    out({"submit_s": submit_s, "uploading": uploading, "left": left, "close_s": time.monotonic() - started,
         "uploaders": uploaders, "after_close": children()})
"""


def run_with_stalled_commit(hub, repo: str, folder: Path, script: str = STALLED, commits: int = 1) -> tuple:
    """Run `script` with the repo's first commit held until the script reads "go" on stdin; returns
    its last stdout line (JSON) and its stderr once `commits` commits have landed."""
    hub.stall_commits()  # held until release()
    proc = hub.popen_python(PRELUDE + textwrap.dedent(script), args=[repo, str(folder)], stdin=subprocess.PIPE)
    try:
        hub.wait_for_stalled(1, timeout=60)
        stdout, stderr = proc.communicate("go\n", timeout=60)
    finally:
        hub.release()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        # The released commit completes after its client left: let it land before the next test looks.
        wait_until(lambda: len(hub.log(kind="commit", repo=repo)) >= commits, 30, "the released commit to complete")
    assert proc.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def test_submit_returns_at_once_while_a_commit_is_stalled_and_pending_includes_it(hub, hub_repo, tmp_path):
    seen, _ = run_with_stalled_commit(hub, hub_repo, save_checkpoint(tmp_path, 10))
    assert seen["submit_s"] < 0.5
    assert seen["uploading"] == ["000010"]


def test_close_waits_at_most_its_timeout_and_returns_and_logs_what_was_not_pushed(hub, hub_repo, tmp_path):
    folder = save_checkpoint(tmp_path, 10)
    seen, stderr = run_with_stalled_commit(hub, hub_repo, folder)
    assert seen["left"] == ["000010"]
    assert seen["close_s"] < 5
    assert f"hf upload {hub_repo} {folder} checkpoints/000010" in stderr


def test_a_drain_that_runs_out_kills_the_upload_process_and_leaves_no_process_behind(hub, hub_repo, tmp_path):
    seen, _ = run_with_stalled_commit(hub, hub_repo, save_checkpoint(tmp_path, 10))
    assert len(seen["uploaders"]) == 1  # one upload process, stalled in its commit
    assert seen["after_close"] == []  # killed and reaped by close(): no zombie
    assert not psutil.pid_exists(seen["uploaders"][0])  # and no orphan once the pusher's process is gone


def test_the_upload_child_imports_neither_torch_nor_hydra_nor_the_config():
    """The child started as the pusher starts it: what it has imported once it serves a call."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from robotrain.hub.upload import UploadProcess
        uploads = UploadProcess()
        try:
            print(json.dumps(uploads.call(eval, "sorted(__import__('sys').modules)")))
        finally:
            uploads.stop()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = json.loads(done.stdout)
    assert "robotrain.hub.upload" in modules  # the child answered, not this test's process
    assert [m for m in modules if m.split(".")[0] in ("torch", "hydra", "omegaconf") or m == "robotrain.config"] == []


def test_the_upload_process_starts_at_the_first_upload_niced_without_torch_and_close_ends_it(hub, hub_repo,
                                                                                             tmp_path):
    seen, _ = run(hub, hub_repo, """
        import os, psutil
        p = pusher()
        idle = children()
        p.submit(pathlib.Path(ARGS[0]), 10)
        assert p.wait_idle(timeout=60)
        [child] = children()
        maps = pathlib.Path(f"/proc/{child}/maps").read_text()
        niced = psutil.Process(child).nice() == min(os.nice(0) + 10, 19)
        out({"idle": idle, "child": child, "niced": niced, "torch": "torch" in maps,
             "left": p.close(timeout=60), "after_close": children(), "tags": sorted(tags())})
    """, save_checkpoint(tmp_path, 10))
    assert seen["idle"] == []  # a run that pushes nothing starts no process
    assert (seen["niced"], seen["torch"]) == (True, False)
    assert (seen["left"], seen["after_close"], seen["tags"]) == ([], [], ["000010"])
    assert not psutil.pid_exists(seen["child"])


KILLED = """
    import os, signal
    p = pusher()
    p.submit(pathlib.Path(ARGS[0]), 10)
    sys.stdin.readline()  # the test saw the commit stalled on the Hub
    [first] = children()
    os.kill(first, signal.SIGKILL)  # mid-upload
    left = p.close(timeout=60)
    out({"left": left, "tags": tags(), "head": api.repo_info(REPO).sha, "at_tag": files_at("000010"),
         "after_close": children()})
"""


def test_a_killed_upload_process_is_replaced_and_the_checkpoint_still_lands(hub, hub_repo, tmp_path):
    folder = save_checkpoint(tmp_path, 10)
    # Only the first commit is held (its upload process is killed); the retry goes through, and the
    # killed process's commit also lands once released.
    seen, stderr = run_with_stalled_commit(hub, hub_repo, folder, script=KILLED, commits=2)
    assert seen["left"] == [] and seen["after_close"] == []
    assert seen["tags"] == {"000010": seen["head"]}
    assert [f"checkpoints/000010/{rel}" for rel in local_files(folder)] == [
        f for f in seen["at_tag"] if f.startswith("checkpoints/000010/")]
    assert "upload process was killed by SIGKILL" in stderr and "attempt 2/3" in stderr


def test_a_tag_left_by_an_earlier_run_for_the_same_step_moves_to_the_new_commit(hub, hub_repo, tmp_path):
    old = save_checkpoint(tmp_path / "old", 10, marker="old")
    new = save_checkpoint(tmp_path / "new", 10, marker="new")
    seen, _ = run(hub, hub_repo, """
        for arg in ARGS:  # two runs, one after the other, pushing the same step
            p = pusher()
            p.submit(pathlib.Path(arg), 10)
            assert p.close(timeout=60) == []
        config = hf_hub_download(REPO, "checkpoints/000010/pretrained_model/config.json", revision="000010")
        out({"marker": json.loads(pathlib.Path(config).read_text())["marker"],
             "tag_is_head": tags()["000010"] == api.repo_info(REPO).sha})
    """, old, new)
    assert seen == {"marker": "new", "tag_is_head": True}


# -- the final model ----------------------------------------------------------------------------------------


def test_model_card_names_policy_dataset_steps_metrics_and_how_to_load_and_resume():
    from robotrain.hub import model_card

    card = model_card("user/reach", policy_type="act", dataset_repo_id="lerobot/pusht", steps=5000,
                      metrics={"loss": 0.012345, "success_rate": 0.75})
    assert card.startswith("---\n") and "- act\n" in card and "- lerobot/pusht\n" in card
    assert "5000 steps" in card and "| loss | 0.01235 |" in card and "| success_rate | 0.75 |" in card
    assert "python -m robotrain resume=hub:user/reach" in card
    assert 'policy = pretrained.load("user/reach")' in card


def test_push_final_puts_the_model_files_and_card_at_the_root(hub, hub_repo, tmp_path):
    folder = save_checkpoint(tmp_path, 30)
    pretrained = folder / layout.PRETRAINED
    seen, _ = run(hub, hub_repo, """
        p = pusher()
        p.push_final(pathlib.Path(ARGS[0]), "# card for " + REPO, step=30)
        left = p.close(timeout=60)
        card = pathlib.Path(hf_hub_download(REPO, "README.md")).read_text()
        out({"left": left, "files": files_at("main"), "card": card})
    """, pretrained)
    assert seen["left"] == []
    assert seen["files"] == sorted([".gitattributes", "README.md", *local_files(pretrained)])
    assert seen["card"] == f"# card for {hub_repo}"


def test_push_final_removes_root_model_files_of_an_earlier_final_push(hub, hub_repo, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    (full / "model.safetensors").write_bytes(b"weights")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    seen, _ = run(hub, hub_repo, """
        p = pusher()
        api.upload_file(repo_id=REPO, path_or_fileobj=b"{}", path_in_repo="checkpoints/000010/x.json")
        p.push_final(pathlib.Path(ARGS[0]), "card", step=1)
        p.push_final(pathlib.Path(ARGS[1]), "card", step=2)
        assert p.close(timeout=60) == []
        out(files_at("main"))
    """, full, adapter)
    assert seen == [".gitattributes", "README.md", "adapter_model.safetensors", "checkpoints/000010/x.json",
                    "config.json"]


def test_the_token_never_appears_in_logs_or_the_model_card(hub, hub_repo, tmp_path):
    first, second = save_checkpoint(tmp_path, 10), save_checkpoint(tmp_path, 20)
    hub.fail_commits(n_th=1, status=503, times=1)
    hub.fail_commits(n_th=3, status=401, times=None)
    seen, stderr = run(hub, hub_repo, """
        p = pusher()
        card = rhub.model_card(REPO, policy_type="mlp", dataset_repo_id="d/s", steps=20, metrics={"loss": 1.0})
        p.submit(pathlib.Path(ARGS[0]), 10)
        p.submit(pathlib.Path(ARGS[1]), 20)
        p.push_final(pathlib.Path(ARGS[1]) / "pretrained_model", card, step=20)
        out({"left": p.close(timeout=60), "card": card})
    """, first, second)
    assert seen["left"] == ["000020", "final"]  # 401s are not retried
    assert "HTTP 503" in stderr and "HTTP 401" in stderr
    assert hub.token not in stderr and hub.token not in seen["card"]


# -- finding and downloading --------------------------------------------------------------------------------


def test_the_latest_checkpoint_is_the_largest_step_number(hub, pushed):
    seen, _ = run(hub, pushed["repo"], "out([rhub.resolve_checkpoint(REPO), rhub.resolve_checkpoint(REPO, 'v1')])")
    # "0000100" sorts before "000020" as text; `notes` is not a step.
    assert seen == [["0000100", pushed["head"]], ["000020", pushed["tags"]["000020"]]]


def test_resolve_checkpoint_by_step_number_with_or_without_zero_padding(hub, pushed):
    seen, _ = run(hub, pushed["repo"], "out([rhub.resolve_checkpoint(REPO, rev) for rev in ARGS])",
                  "10", "000010", "0010", "100")
    tags = pushed["tags"]
    assert seen == [["000010", tags["000010"]]] * 3 + [["0000100", tags["0000100"]]]


def test_resolve_checkpoint_by_tag_branch_or_sha_is_the_latest_at_that_revision(hub, pushed):
    tags = pushed["tags"]
    seen, _ = run(hub, pushed["repo"], "out([rhub.resolve_checkpoint(REPO, rev) for rev in ARGS])",
                  "v1", tags["000010"], "main")
    assert seen == [["000020", tags["000020"]], ["000010", tags["000010"]], ["0000100", pushed["head"]]]


def test_download_checkpoint_fetches_only_that_checkpoints_safetensors_and_json(hub, pushed, tmp_path):
    since = hub.mark()
    seen, _ = run(hub, pushed["repo"], """
        folder = rhub.download_checkpoint(REPO, "20", pathlib.Path(ARGS[0]))
        from robotrain import checkpoint_layout as layout
        out([str(folder), layout.is_complete(folder)])
    """, tmp_path)
    assert seen == [str(tmp_path / "checkpoints" / "000020"), True]
    local = pushed["folders"]["000020"]
    wanted = [f"checkpoints/000020/{rel}" for rel in local_files(local) if not rel.endswith(".pt")]
    downloads = hub.downloads(since=since, repo=pushed["repo"])
    assert sorted(d["file"] for d in downloads) == wanted
    assert {d["revision"] for d in downloads} == {pushed["tags"]["000020"]}
    assert local_files(tmp_path / "checkpoints" / "000020") == [w.split("/", 2)[2] for w in wanted]


@pytest.fixture(scope="module")
def finished(hub, tmp_path_factory):
    """A run that pushed checkpoint 10 and then its final model (saved at step 30) to the root."""
    run_dir = tmp_path_factory.mktemp("finished-run")
    ckpt, final = save_checkpoint(run_dir, 10), save_checkpoint(run_dir, 30, marker="final")
    repo = "user/finished-run"
    run(hub, repo, """
        p = pusher()
        p.submit(pathlib.Path(ARGS[0]), 10)
        p.push_final(pathlib.Path(ARGS[1]) / "pretrained_model", "card", step=30)
        assert p.close(timeout=60) == []
        out(None)
    """, ckpt, final)
    return repo


def test_download_pretrained_is_the_root_model_or_a_steps_pretrained_model(hub, finished):
    seen, _ = run(hub, finished, """
        folders = [rhub.download_pretrained(REPO), rhub.download_pretrained(REPO, "000010")]
        out([[str(f), json.loads((f / "config.json").read_text())["step"], (f / "model.safetensors").is_file()]
             for f in folders])
    """)
    (root, root_step, root_weights), (step_dir, step, step_weights) = seen
    assert (root_step, root_weights, step, step_weights) == (30, True, 10, True)
    assert step_dir.endswith("checkpoints/000010/pretrained_model") and not root.endswith("pretrained_model")


# -- bad input ----------------------------------------------------------------------------------------------


def assert_one_line(message: str | None, *fragments: str) -> None:
    assert message is not None, "no UserError was raised"
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_malformed_repo_id_is_a_user_error_before_any_request(hub, hub_repo):
    seen, _ = run(hub, hub_repo, """
        out([user_error(lambda: rhub.ensure_repo("not a repo")),
             user_error(lambda: rhub.resolve_checkpoint("user/x--y"))])
    """)
    for message in seen:
        assert_one_line(message, "not a Hub repo id", "user/name")
    assert hub.log() == []


def test_a_missing_token_is_a_user_error_naming_the_login(hub, hub_repo):
    seen, _ = run(hub, hub_repo, "out(user_error(lambda: rhub.ensure_repo(REPO)))", env={"HF_TOKEN": ""})
    assert_one_line(seen, "hf auth login", "HF_TOKEN")


def test_a_refused_token_is_a_user_error_at_start(hub, hub_repo):
    hub.fail("create_repo", status=401, times=None)
    seen, _ = run(hub, hub_repo, "out(user_error(lambda: rhub.ensure_repo(REPO)))")
    assert_one_line(seen, "refused your token", "hf auth login")


def test_a_missing_repo_is_a_user_error(hub, hub_repo):
    seen, _ = run(hub, hub_repo, "out(user_error(lambda: rhub.download_checkpoint(REPO, None, pathlib.Path('x'))))")
    assert_one_line(seen, f"repo {hub_repo} not found")


def test_a_missing_step_or_revision_is_a_user_error(hub, pushed):
    seen, _ = run(hub, pushed["repo"], """
        out([user_error(lambda: rhub.resolve_checkpoint(REPO, "15")),
             user_error(lambda: rhub.resolve_checkpoint(REPO, "no-such-branch"))])
    """)
    assert_one_line(seen[0], "step 15 not found", "000020")
    assert_one_line(seen[1], "revision 'no-such-branch' not found")


def test_a_repo_without_checkpoints_is_a_user_error(hub, hub_repo):
    seen, _ = run(hub, hub_repo, """
        rhub.ensure_repo(REPO)
        out([user_error(lambda: rhub.resolve_checkpoint(REPO)), user_error(lambda: rhub.download_pretrained(REPO))])
    """)
    for message in seen:
        assert_one_line(message, "has no checkpoints")
