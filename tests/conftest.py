"""Shared fixtures: an isolated environment for `python -m robotrain` subprocesses, and
small run configurations that finish in seconds on a 2-core CPU."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest_plugins = ["tests.hub_fixtures", "tests.slurm_fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: A run of a few seconds: a small synthetic dataset, no simulator evaluation.
TINY = [
    "dataset.synthetic.num_episodes=20",
    "batch_size=8",
    "eval.enabled=false",
    "log_every=5",
    "scheduler.warmup_steps=5",
]


@dataclass
class Cli:
    """Runs `python -m robotrain` in a child process with an isolated cache and no network."""

    env: dict[str, str]
    cwd: Path

    def run(self, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "robotrain", *args],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs,
        )

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "robotrain", *args],
            cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
        )


@pytest.fixture(scope="session")
def robotrain_cache(tmp_path_factory) -> Path:
    """One dataset cache per test session, shared by every run (generation happens once per spec)."""
    return tmp_path_factory.mktemp("robotrain-cache")


def make_cli(cache: Path, cwd: Path) -> Cli:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.update({
        "ROBOTRAIN_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return Cli(env=env, cwd=cwd)


@pytest.fixture
def cli(robotrain_cache, tmp_path) -> Cli:
    return make_cli(robotrain_cache, tmp_path)


@pytest.fixture(scope="module")
def module_cli(robotrain_cache, tmp_path_factory) -> Cli:
    return make_cli(robotrain_cache, tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="session")
def trained_run(robotrain_cache, tmp_path_factory) -> Path:
    """A finished TINY 20-step run with checkpoints at 10 and 20; tests read or copy it, never change it."""
    run_dir = tmp_path_factory.mktemp("trained")
    cli = make_cli(robotrain_cache, tmp_path_factory.mktemp("cli"))
    done = cli.run(*TINY, "steps=20", "checkpoint.every=10", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    return run_dir


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def tree_digest(root: Path) -> str:
    """A hash of every file's path and bytes under `root` (symlinks by target)."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def sitecustomize(tmp_path: Path, *sources: str) -> dict[str, str]:
    """Environment (PYTHONPATH) whose Python processes, every rank of a run too, first run
    `sources` as their sitecustomize module."""
    folder = tmp_path / "inject"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text("\n".join(sources))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line_error(done: subprocess.CompletedProcess, expected: str) -> str:
    """`done` exited 2 with robotrain's one-line error, and nothing else, on stderr, naming `expected`;
    returns that line."""
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("robotrain: error: ") and expected in lines[0], lines[0]
    return lines[0]


def loss_and_gradients(policy, batch: dict, watched: torch.nn.Module) -> tuple[torch.Tensor, dict, int]:
    """One training forward and backward of `policy` on `batch` (its noise drawn from a fixed
    (seed, step)): (loss, gradients by parameter name, how many times `watched` ran)."""
    from robotrain import global_batch

    calls = []
    hook = watched.register_forward_hook(lambda *_: calls.append(1))
    policy.train()
    try:
        with global_batch.step(0, 0):
            loss, _ = policy(batch)
        loss.backward()
    finally:
        hook.remove()
    grads = {name: p.grad.detach().clone() for name, p in policy.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


def assert_close_gradients(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, worst
