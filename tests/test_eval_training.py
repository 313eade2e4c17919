"""Evaluation in PushT while training (robotrain.eval.background): the checkpoint of each
evaluation step is rolled out in a worker process while the run goes on, its results are
logged at their step when they arrive, the last one is awaited, no process of a DDP run waits,
and a run killed with an evaluation in flight evaluates that step again on resume."""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from tests.conftest import make_cli
from tests.sim_policies import TINY_FIELDS, write_pusht_like_dataset

pytest.importorskip("gym_pusht", reason="needs the sim extra: pip install 'robotrain[sim]'")

TINY_ACT = ["policy=act", *(f"policy.{k}={'null' if v is None else v}" for k, v in TINY_FIELDS["act"].items())]


@pytest.fixture(scope="module")
def pusht_run(tmp_path_factory, robotrain_cache):
    root = write_pusht_like_dataset(tmp_path_factory.mktemp("pusht") / "pusht_like")
    cli = make_cli(robotrain_cache, tmp_path_factory.mktemp("cwd"))
    args = ["dataset=local", "dataset.repo_id=robotrain_tests/pusht_like", f"dataset.root={root}", *TINY_ACT,
            "env=pusht", "batch_size=8", "log_every=1"]
    return cli, args


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_evaluated_beside_training(run_dir, steps: list[int]) -> None:
    rows = lines(run_dir)
    evals = {r["step"]: (i, r) for i, r in enumerate(rows) if "eval/pc_success" in r}
    assert sorted(evals) == steps
    for step in steps[:-1]:  # the last step's evaluation is awaited after the last step
        i, row = evals[step]
        started = (run_dir / "eval" / f"step_{step:06d}" / "spec.json").stat().st_mtime
        later = [r for r in rows[:i] if "loss" in r and r["step"] > step]
        assert later, f"the evaluation of step {step} was logged before training went on"
        # Training steps were logged between the worker's start and its result's arrival.
        assert [r for r in later if started <= r["time"] <= row["time"]], f"nothing trained beside step {step}'s"


@pytest.mark.parametrize("processes", [2])  # one process runs the same code on the main process
def test_evaluations_run_beside_training_and_land_at_their_step(pusht_run, tmp_path, processes):
    cli, args = pusht_run
    done = cli.run(*args, "steps=30", "eval.every=10", "eval.episodes=2", "env.max_steps=100",
                   f"distributed.processes={processes}", f"hydra.run.dir={tmp_path}", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_evaluated_beside_training(tmp_path, [0, 10, 20, 30])  # 0: the untrained weights (eval.at_start)
    for step in (10, 20, 30):
        info = json.loads((tmp_path / "eval" / f"step_{step:06d}" / "eval_info.json").read_text())
        assert info["overall"]["n_episodes"] == 2 and [e["seed"] for e in info["per_episode"]] == [1000, 1001]
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["evals"]) == {"0", "10", "20", "30"} and result["return_value"] == 0.0
    assert (tmp_path / "eval" / "untrained" / "pretrained_model" / "model.safetensors").is_file()
    assert "eval at step 30 (trained) in env=pusht" in done.stdout + done.stderr


@pytest.mark.parametrize("processes", [2])
def test_a_run_killed_with_an_evaluation_in_flight_evaluates_that_step_on_resume(pusht_run, tmp_path, processes):
    cli, args = pusht_run
    run = [*args, "steps=30", "eval.every=10", "eval.episodes=2", "env.max_steps=300", "eval.at_start=false",
           f"distributed.processes={processes}", f"hydra.run.dir={tmp_path}"]
    first = cli.popen(*run)
    spec = tmp_path / "eval" / "step_000010" / "spec.json"
    deadline = time.monotonic() + 300
    while not spec.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert spec.exists(), first.communicate()[1][-3000:]
    time.sleep(1.0)
    # A lost node: the launcher and every trainer at once (torchrun puts each in a session of its own);
    # the evaluation worker gets SIGTERM from the kernel when its trainer dies.
    trainers = [p for p in psutil.Process(first.pid).children(recursive=True)
                if "robotrain.eval.worker" not in " ".join(p.cmdline())]
    for process in [psutil.Process(first.pid), *trainers]:
        process.send_signal(signal.SIGKILL)
    first.communicate()
    time.sleep(3.0)  # the worker got SIGTERM with its trainer: it writes nothing more
    assert not (spec.parent / "eval_info.json").exists()

    done = cli.run(*run, "resume=auto", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = lines(tmp_path)
    assert sorted(r["step"] for r in rows if "eval/pc_success" in r) == [10, 20, 30]
    assert (spec.parent / "logged").exists()
