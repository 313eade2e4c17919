"""`job=slurm` on a real single-node SLURM cluster: single runs followed or detached, sweeps
as one job array, preemption -> requeue -> bit-exact resume, and a 2-task job's world."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.test_resume import assert_same_final_state

pytestmark = pytest.mark.slurm


@pytest.fixture
def slurm_cli(cli, slurm):
    return cli


def job_ids(stdout: str) -> list[str]:
    match = re.search(r"submitted \d+ slurm job\(s\): (.+)$", stdout, re.M) or \
        re.search(r"submitted slurm job (\S+)", stdout)
    assert match, stdout
    return [j.strip() for j in match.group(1).split(",")]


def test_single_run_is_followed_until_it_ends(slurm_cli, tmp_path):
    run_dir = tmp_path / "run"
    done = slurm_cli.run("job=slurm", *TINY, "steps=5", f"hydra.run.dir={run_dir}", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mlp trained to step 5" in done.stdout  # the job's log, streamed here
    assert done.stdout.strip().splitlines()[-1].endswith("finished")
    assert (run_dir / "checkpoints" / "000005" / "pretrained_model" / "model.safetensors").is_file()


def test_detached_run_returns_at_once_and_runs_to_the_end(slurm_cli, slurm, tmp_path):
    run_dir = tmp_path / "run"
    done = slurm_cli.run("job=slurm", "job.detach=true", *TINY, "steps=5", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    (job_id,) = job_ids(done.stdout)
    assert f"scancel {job_id}" in done.stdout and "tail -f" in done.stdout
    assert slurm.wait_state(job_id, {"COMPLETED"}, timeout=180) == "COMPLETED"
    assert json.loads((run_dir / "result.json").read_text())["step"] == 5


def test_sweep_is_one_job_array_with_a_run_dir_per_point(slurm_cli, slurm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = slurm_cli.run("-m", "job=slurm", *TINY, "steps=4", "seed=0,1,2", "optim.lr=1e-3,3e-4",
                         f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = job_ids(done.stdout)
    assert len(ids) == 6 and len({i.split("_")[0] for i in ids}) == 1  # one array
    assert [i.split("_")[1] for i in ids] == [str(k) for k in range(6)]
    for k, (seed, lr) in enumerate([(s, lr) for s in (0, 1, 2) for lr in (1e-3, 3e-4)]):
        config = json.loads((sweep_dir / str(k) / "checkpoints" / "000004" / "pretrained_model" /
                             "train_config.json").read_text())
        assert (config["seed"], config["optim"]["lr"]) == (seed, lr)


def test_sweep_results_come_back_in_order(slurm, tmp_path, robotrain_cache, monkeypatch, hydra_sweep_runner):
    from robotrain.config import conf_dir, register_configs
    from robotrain.help import register_resolvers

    monkeypatch.setenv("ROBOTRAIN_CACHE", str(robotrain_cache))
    register_configs()
    register_resolvers(conf_dir())
    sweep = hydra_sweep_runner(
        calling_file=None, calling_module="robotrain", task_function=lambda cfg: None, config_path=str(conf_dir()),
        config_name="config", overrides=["job=slurm", *TINY, "steps=3", "eval.enabled=true", "eval.episodes=4",
                                         "eval.at_start=false", "seed=0,1,2"],
        temp_dir=tmp_path,
    )
    with sweep:  # the runner deletes the sweep dir when the block ends
        returns = sweep.returns[0]
        assert [r.overrides[-1] for r in returns] == ["seed=0", "seed=1", "seed=2"]
        for ret in returns:
            assert 0.0 <= ret.return_value <= 1.0
            result = json.loads((Path(ret.working_dir) / "result.json").read_text())
            assert result["return_value"] == ret.return_value


PREEMPT_RUN = [*TINY, "steps=400", "checkpoint.every=100", "batch_size=32"]


@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes_bit_exactly(slurm_cli, slurm, tmp_path):
    reference = tmp_path / "reference"
    assert slurm_cli.run(*PREEMPT_RUN, f"hydra.run.dir={reference}").returncode == 0
    run_dir = tmp_path / "run"
    # timeout_min >= 30 so that submitit counts the USR2 as a preemption, not a timeout.
    done = slurm_cli.run("job=slurm", "job.detach=true", "job.timeout_min=30", *PREEMPT_RUN,
                         f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    (job_id,) = job_ids(done.stdout)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.stat().st_size > 0):
        assert time.monotonic() < deadline, slurm.diagnose(job_id)
        time.sleep(0.05)
    slurm.scancel(job_id, signal="USR2")
    assert slurm.wait_state(job_id, {"COMPLETED"}, timeout=300) == "COMPLETED", slurm.diagnose(job_id)
    log = "\n".join(p.read_text() for p in (run_dir / ".submitit").rglob("*_log.out"))
    assert log.count("Starting with JobEnvironment") == 2, log  # it ran, was requeued, ran again
    assert "stopped by SIGUSR2" in log and "resumed from" in log, log
    assert_same_final_state(reference, run_dir)


TWO_TASKS = textwrap.dedent("""
    import json, os, sys
    import submitit

    def world():
        import torch, torch.distributed as dist
        from robotrain.distributed import world_env_from_slurm
        os.environ.update(world_env_from_slurm(os.environ))
        dist.init_process_group("gloo")
        value = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(value)
        out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": value.item()}
        dist.barrier()
        dist.destroy_process_group()
        return out

    executor = submitit.AutoExecutor(folder=sys.argv[1], cluster="slurm")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=10, cpus_per_task=1)
    job = executor.submit(world)
    print(json.dumps(job.results()))
""")


def test_two_tasks_on_one_node_form_one_torch_distributed_world(slurm, tmp_path):
    script = tmp_path / "two_tasks.py"
    script.write_text(TWO_TASKS)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "%j")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)


def test_remote_dispatch_downloads_nothing_on_the_submitting_machine(slurm_cli, slurm, hub, tmp_path):
    slurm_cli.env.update(hub.env)
    mark = hub.mark()
    done = slurm_cli.run("job=slurm", "job.detach=true", "+job.additional_parameters.begin=now+600", *TINY,
                         "resume=hub:user/pushed-e2e@10", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    (job_id,) = job_ids(done.stdout)
    try:
        assert hub.downloads(since=mark) == []
        assert not (tmp_path / "run" / "checkpoints").exists()
        assert slurm.squeue(job_id)  # still held by --begin: the job has not run either
    finally:
        slurm.scancel(job_id)


def test_a_job_with_two_tasks_trains_as_two_processes(slurm_cli, tmp_path):
    run_dir = tmp_path / "run"
    done = slurm_cli.run("job=slurm", "job.tasks_per_node=2", *TINY, "steps=4", f"hydra.run.dir={run_dir}", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.loads((run_dir / "checkpoints" / "000004" / "training_state" / "training_step.json").read_text())
    assert info["num_processes"] == 2 and info["global_batch_size"] == 16
    assert done.stdout.strip().splitlines()[-1].endswith("finished")
