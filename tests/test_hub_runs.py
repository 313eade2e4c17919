"""Runs that push to the Hub and resume from it, end to end: `python -m robotrain` against the
local Hub emulator, checked with the real huggingface_hub client."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import TINY, assert_one_line_error
from tests.test_resume import assert_same_final_state

RUN = [*TINY, "steps=30", "checkpoint.every=10"]
# A resumed run keeps pushing to the run's repo; these resumes must leave the shared repo alone.
NO_PUSH = ["hub.push_checkpoints=false", "hub.push_final=false"]


@pytest.fixture
def hub_cli(cli, hub):
    cli.env.update(hub.env)
    return cli


def repo_state(hub, repo: str) -> dict:
    return hub.run_json(f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        refs = api.list_repo_refs({repo!r})
        info = api.repo_info({repo!r})
        print(json.dumps({{
            "files": sorted(api.list_repo_files({repo!r})),
            "tags": {{t.name: t.target_commit for t in refs.tags}},
            "private": info.private,
            "tag_files": {{t.name: sorted(api.list_repo_files({repo!r}, revision=t.target_commit))
                          for t in refs.tags}},
        }}))
    """)


@pytest.fixture(scope="module")
def pushed(module_cli, hub, tmp_path_factory):
    """A 30-step run that pushed checkpoints 10, 20, 30 and its final model to a private repo."""
    module_cli.env.update(hub.env)
    run_dir = tmp_path_factory.mktemp("pushed")
    repo = "user/pushed-e2e"
    done = module_cli.run(*RUN, f"hub.repo_id={repo}", "hub.push_checkpoints=true", "hub.private=true",
                          f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    return repo, run_dir, done


def test_every_checkpoint_is_pushed_as_a_tagged_commit(hub, pushed):
    repo, run_dir, _ = pushed
    state = repo_state(hub, repo)
    assert set(state["tags"]) == {"000010", "000020", "000030"}
    for step in ("000010", "000020", "000030"):
        local = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints" / step).rglob("*") if p.is_file())
        assert local and set(local) <= set(state["tag_files"][step])
    assert state["private"] is True


def test_final_model_and_card_go_to_the_repo_root(hub, pushed):
    repo, _, done = pushed
    files = repo_state(hub, repo)["files"]
    for name in ("config.json", "model.safetensors", "train_config.json", "README.md",
                 "policy_preprocessor.json", "policy_postprocessor.json"):
        assert name in files
    card = hub.run_python(f"""
        from huggingface_hub import hf_hub_download
        print(open(hf_hub_download({repo!r}, "README.md")).read())
    """).stdout
    assert "mlp" in card and "robotrain/synthetic_reach" in card and f"resume=hub:{repo}" in card
    assert f"continue anywhere with resume=hub:{repo}" in done.stdout


def test_rerunning_into_the_same_repo_reuses_it(hub_cli, hub, pushed, tmp_path):
    repo, _, _ = pushed
    done = hub_cli.run(*TINY, "steps=5", f"hub.repo_id={repo}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    state = repo_state(hub, repo)
    assert state["private"] is True and "000010" in state["tags"]


def test_resume_from_hub_step_is_bit_exact_and_downloads_one_checkpoint(hub_cli, hub, pushed, tmp_path):
    repo, run_dir, _ = pushed
    mark = hub.mark()
    target = tmp_path / "resumed"
    done = hub_cli.run(*RUN, *NO_PUSH, f"hydra.run.dir={target}", f"resume=hub:{repo}@20")
    assert done.returncode == 0, done.stderr
    assert_same_final_state(run_dir, target, step=30)
    downloads = hub.downloads(since=mark, repo=repo)
    assert downloads and all(d["file"].startswith("checkpoints/000020/") for d in downloads)
    checkpoint_bytes = sum(p.stat().st_size for p in (run_dir / "checkpoints" / "000020").rglob("*") if p.is_file())
    assert sum(d["bytes_sent"] for d in downloads) <= 1.05 * checkpoint_bytes


def test_resume_from_hub_latest_continues_like_a_local_resume(hub_cli, hub, pushed, tmp_path):
    repo, run_dir, _ = pushed
    local, remote = tmp_path / "local", tmp_path / "remote"
    shutil.copytree(run_dir / "checkpoints" / "000030", local / "checkpoints" / "000030")
    assert hub_cli.run(*RUN, *NO_PUSH, "steps=40", f"hydra.run.dir={local}", "resume=auto").returncode == 0
    done = hub_cli.run(*RUN, *NO_PUSH, "steps=40", f"hydra.run.dir={remote}", f"resume=hub:{repo}")
    assert done.returncode == 0, done.stderr
    assert_same_final_state(local, remote, step=40)


def test_pretrained_revision_loads_that_tagged_checkpoint(hub, pushed):
    repo, run_dir, _ = pushed
    same = hub.run_json(f"""
        import json, torch
        from safetensors.torch import load_file
        from robotrain import pretrained
        path = pretrained.local_folders({repo!r}, "10")[0]
        ours = load_file(str(path / "model.safetensors"))
        local = load_file({str(run_dir / "checkpoints" / "000010" / "pretrained_model" / "model.safetensors")!r})
        print(json.dumps(all(torch.equal(ours[k], local[k]) for k in local)))
    """)
    assert same is True


def test_a_503_on_a_commit_is_retried(hub_cli, hub, hub_repo, tmp_path):
    hub.fail_commits(n_th=1, status=503, times=1)
    done = hub_cli.run(*TINY, "steps=10", "checkpoint.every=5", f"hub.repo_id={hub_repo}",
                       "hub.push_checkpoints=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert set(repo_state(hub, hub_repo)["tags"]) == {"000005", "000010"}


def test_a_permanent_push_failure_warns_and_training_still_finishes(hub_cli, hub, hub_repo, tmp_path):
    hub.fail_commits(n_th=1, status=500, times=None)
    run_dir = tmp_path / "run"
    done = hub_cli.run(*TINY, "steps=10", "checkpoint.every=5", "checkpoint.keep_last=1", f"hub.repo_id={hub_repo}",
                       "hub.push_checkpoints=true", "hub.max_retries=1", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    assert "not pushed:  000005, 000010, final" in done.stdout
    # keep_last=1 would have deleted 000005, but it never reached the Hub, so it stays.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["000005", "000010"]
    hub.clear_faults()
    assert repo_state(hub, hub_repo)["tags"] == {}


def test_token_is_never_written_to_the_run_or_the_repo(hub_cli, hub, pushed):
    repo, run_dir, done = pushed
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert hub.token.encode() not in path.read_bytes(), path
    assert hub.token not in done.stdout + done.stderr
    card = hub.run_python(f"""
        from huggingface_hub import hf_hub_download
        print(open(hf_hub_download({repo!r}, "README.md")).read())
        print(open(hf_hub_download({repo!r}, "train_config.json")).read())
    """).stdout
    assert hub.token not in card


BAD_HUB_INPUTS = {
    "malformed repo id": (["hub.repo_id=not a repo"], "hub.repo_id 'not a repo' is not a Hub repo id"),
    "repo not found": (["resume=hub:user/no-such-repo"], "not found"),
    "step not found": (["resume=hub:user/pushed-e2e@999"], "999"),
}


@pytest.mark.parametrize("case", sorted(BAD_HUB_INPUTS))
def test_bad_hub_input_is_one_line_before_training(hub_cli, pushed, tmp_path, case):
    overrides, expected = BAD_HUB_INPUTS[case]
    done = hub_cli.run(*RUN, f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    assert_one_line_error(done, expected)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_repo_without_checkpoints_is_a_one_line_error(hub_cli, hub, hub_repo, tmp_path):
    hub.run_python(f"from huggingface_hub import create_repo; create_repo({hub_repo!r})")
    done = hub_cli.run(*RUN, f"hydra.run.dir={tmp_path / 'run'}", f"resume=hub:{hub_repo}")
    assert_one_line_error(done, "no checkpoints")
