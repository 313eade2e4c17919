"""End to end: `python -m robotrain` learns the embedded task offline, and says where its
run and checkpoints are."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY


def eval_lines(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["eval/success_rate"] for line in lines if "eval/success_rate" in line}


@pytest.mark.slow
def test_default_run_learns_the_embedded_task(cli, tmp_path):
    """The default command, with fewer steps so the test stays short: trained >= 0.8, untrained < 0.2."""
    run_dir = tmp_path / "run"
    done = cli.run("steps=800", f"hydra.run.dir={run_dir}", timeout=600)
    assert done.returncode == 0, done.stderr
    success = eval_lines(run_dir)
    assert success[0] < 0.2 and success[800] >= 0.8, success
    assert f"step 0: {success[0]:.2f}, step 800: {success[800]:.2f}" in done.stdout


def test_run_prints_where_the_run_and_checkpoints_are(cli, tmp_path):
    run_dir = tmp_path / "run"
    done = cli.run(*TINY, "steps=10", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    assert f"run dir:     {run_dir}" in done.stdout
    assert f"checkpoint:  {run_dir / 'checkpoints' / '000010'}" in done.stdout


def test_metrics_are_written_as_json_lines(cli, tmp_path):
    run_dir = tmp_path / "run"
    done = cli.run(*TINY, "steps=10", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10]
    for key in ("loss", "lr", "grad_norm", "steps_per_s", "samples_per_s", "data_wait_frac", "peak_memory_mb"):
        assert key in lines[0]


def test_log_lines_replace_the_progress_bar_when_not_on_a_terminal(cli, tmp_path):
    done = cli.run(*TINY, "steps=10", f"hydra.run.dir={tmp_path / 'run'}")
    assert "step 5/10" in done.stdout and "step 10/10" in done.stdout
    assert "\r" not in done.stderr  # no bar redraws in a log file


def test_feistel_sampler_trains(cli, tmp_path):
    done = cli.run(*TINY, "steps=6", "sampler=feistel", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    state = json.loads((tmp_path / "run" / "checkpoints" / "000006" / "training_state" / "sampler_state.json").read_text())
    assert state["permutation"] == "feistel"


def test_a_terminal_gets_a_progress_bar_with_loss_and_eta(cli, tmp_path):
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "robotrain", *TINY, "steps=40", f"hydra.run.dir={tmp_path / 'run'}"],
                            stdin=follower, stdout=follower, stderr=follower, env=cli.env, cwd=tmp_path)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=120)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "40/40" in text and "step/s" in text and "loss=" in text and "\r" in text
    assert "step 5/40  loss" not in text  # no per-window log lines on a terminal
