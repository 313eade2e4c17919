"""Resume is bit-exact: an interrupted run, resumed, ends with exactly the weights,
optimizer state and RNG state of the same run left alone."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import TINY, assert_same_tensors, load_tensors

STEPS = 400
# batch 32 makes a step take a few ms, so a kill after the first checkpoint lands mid-run.
RUN = [*TINY, f"steps={STEPS}", "checkpoint.every=100", "batch_size=32"]
STATE_FILES = (
    "pretrained_model/model.safetensors",
    "training_state/optimizer_state.safetensors",
    "training_state/rng_state.safetensors",
)


def final_state(run_dir: Path, step: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    folder = run_dir / "checkpoints" / f"{step:06d}"
    return {name: load_tensors(folder / name) for name in STATE_FILES}


def assert_same_final_state(a: Path, b: Path, step: int = STEPS) -> None:
    sa, sb = final_state(a, step), final_state(b, step)
    for name in STATE_FILES:
        assert_same_tensors(sa[name], sb[name])
    scheduler = "training_state/scheduler_state.json"
    folder = f"checkpoints/{step:06d}"
    assert json.loads((a / folder / scheduler).read_text()) == json.loads((b / folder / scheduler).read_text())


def wait_for(predicate, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(module_cli, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = module_cli.run(*RUN, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    return run_dir


def resume_auto(cli, run_dir: Path, *extra: str):
    done = cli.run(*RUN, f"hydra.run.dir={run_dir}", "resume=auto", *extra)
    assert done.returncode == 0, done.stderr
    return done


def kill_after_first_checkpoint(cli, run: list[str], run_dir: Path, steps: int, first: int = 100) -> None:
    """Start `run` in `run_dir` and SIGKILL it once checkpoint `first` exists, before step `steps`."""
    proc = cli.popen(*run, f"hydra.run.dir={run_dir}")
    wait_for(lambda: (run_dir / "checkpoints" / f"{first:06d}").is_dir() or proc.poll() is not None,
             what="first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / "checkpoints" / f"{steps:06d}").exists()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_sigkill_is_bit_exact(cli, reference, tmp_path, num_workers):
    run_dir = tmp_path / "run"
    kill_after_first_checkpoint(cli, [*RUN, f"num_workers={num_workers}"], run_dir, STEPS)
    resume_auto(cli, run_dir, f"num_workers={num_workers}")
    assert_same_final_state(reference, run_dir)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_sigterm_at_a_random_step_is_bit_exact(cli, reference, tmp_path, num_workers):
    run_dir = tmp_path / "run"
    proc = cli.popen(*RUN, f"num_workers={num_workers}", f"hydra.run.dir={run_dir}")
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0 or proc.poll() is not None, what="training")
    time.sleep(random.uniform(0, 0.5))  # a random moment, not synchronisation
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and int(saved[-1]) < STEPS, saved
    assert "resume=auto" in stderr

    resume_auto(cli, run_dir, f"num_workers={num_workers}")
    assert_same_final_state(reference, run_dir)


def copy_checkpoint(reference: Path, step: int, run_dir: Path) -> Path:
    target = run_dir / "checkpoints" / f"{step:06d}"
    shutil.copytree(reference / "checkpoints" / f"{step:06d}", target)
    return target


def test_resume_from_a_checkpoint_folder_path_is_bit_exact(cli, reference, tmp_path):
    done = cli.run(*RUN, f"hydra.run.dir={tmp_path / 'run'}", f"resume={reference / 'checkpoints' / '000200'}")
    assert done.returncode == 0, done.stderr
    assert_same_final_state(reference, tmp_path / "run")


def test_resume_from_a_perturbed_checkpoint_does_not_end_equal(cli, reference, tmp_path):
    """Guards the tests above: they can fail."""
    run_dir = tmp_path / "run"
    folder = copy_checkpoint(reference, 200, run_dir)
    weights = load_tensors(folder / "pretrained_model" / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-6
    save_file(weights, str(folder / "pretrained_model" / "model.safetensors"))

    resume_auto(cli, run_dir)
    ours = final_state(run_dir)["pretrained_model/model.safetensors"]
    theirs = final_state(reference)["pretrained_model/model.safetensors"]
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)


def test_resume_with_more_steps_extends_the_run(cli, reference, tmp_path):
    run_dir = tmp_path / "run"
    copy_checkpoint(reference, STEPS, run_dir)
    resume_auto(cli, run_dir, f"steps={STEPS + 50}")
    last = run_dir / "checkpoints" / f"{STEPS + 50:06d}"
    assert json.loads((last / "training_state" / "training_step.json").read_text())["step"] == STEPS + 50
    config = json.loads((last / "pretrained_model" / "train_config.json").read_text())
    assert config["steps"] == STEPS + 50


def test_resume_auto_without_checkpoint_starts_fresh(cli, tmp_path):
    done = cli.run(*TINY, "steps=10", f"hydra.run.dir={tmp_path / 'run'}", "resume=auto")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "checkpoints" / "000010").is_dir()


def test_resume_applies_overrides_on_top_of_the_saved_config(cli, reference, tmp_path):
    run_dir = tmp_path / "run"
    copy_checkpoint(reference, 200, run_dir)
    # Only the overrides typed now change the saved config: batch_size=32 from RUN is not retyped.
    done = cli.run(f"hydra.run.dir={run_dir}", "resume=auto", "log_every=7", f"steps={STEPS}")
    assert done.returncode == 0, done.stderr
    config = json.loads((run_dir / "checkpoints" / f"{STEPS:06d}" / "pretrained_model" / "train_config.json").read_text())
    assert config["log_every"] == 7 and config["batch_size"] == 32
    assert_same_final_state(reference, run_dir)


def test_resume_takes_the_job_node_from_this_command(tmp_path):
    """Where a run executes is the resuming command's choice; and a job node saved with one flat schema
    for every target (robotrain before per-target job schemas) must not block the resume."""
    from omegaconf import OmegaConf

    from robotrain import checkpoint_layout as layout
    from robotrain import resume
    from robotrain.config import LocalJob, parse

    saved = {"policy": {"type": "mlp"}, "dataset": {"repo_id": "robotrain/synthetic_reach", "root": None},
             "steps": 20, "resume": {"allow_changes": False},
             "job": {"target": "local", "image": None, "flavor": "cpu-basic", "partition": None, "nodes": 1}}
    pretrained = tmp_path / "000010" / layout.PRETRAINED
    pretrained.mkdir(parents=True)
    (pretrained / layout.TRAIN_CONFIG).write_text(json.dumps(saved))
    composed = OmegaConf.create({**saved, "job": OmegaConf.structured(LocalJob)})
    merged = resume.merged_config(resume.ResumePoint(tmp_path / "000010", 10), composed, [])
    assert type(parse(merged).job) is LocalJob
