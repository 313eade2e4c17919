"""Preemption: SIGTERM or SIGUSR2 make a run save at the next step boundary and exit with 75."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.conftest import TINY


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_saves_at_the_next_step_and_exits_for_requeue(cli, tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = cli.popen(*TINY, "steps=100000", "checkpoint.every=0", f"hydra.run.dir={run_dir}")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 75, stderr
    saved = [p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1
    step = json.loads((saved[0] / "training_state" / "training_step.json").read_text())["step"]
    assert 5 <= step < 100000
    assert f"stopped by {sig.name} at step {step}" in stderr


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(cli, tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    proc = cli.popen(*TINY, "steps=100000", "checkpoint.every=0", "distributed.processes=2", f"hydra.run.dir={run_dir}")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    rank_1 = next(p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1")
    rank_1.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 75, stderr
    saved = [p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1  # both processes saved the same step (a mismatch would hang or fail the collective)
    step = json.loads((saved[0] / "training_state" / "training_step.json").read_text())["step"]
    assert f"stopped by a preemption signal to another process at step {step}" in stderr
