"""Smoke tests of the `slurm` fixture (tests/slurm_fixtures.py) against the real single-node cluster:
submitit submit / map_array, and preemption (USR2 -> checkpoint -> requeue -> resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

# pytest imports this file as the top-level module `test_slurm_cluster` (tests/ has no __init__.py), which a
# SLURM job cannot import: pickle this module's functions and classes by value so that jobs can run them.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(a: int, b: int) -> dict:
    return {"sum": a + b, "job_id": os.environ.get("SLURM_JOB_ID")}


def square(x: int) -> dict:
    return {"square": x * x, "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
            "task_id": os.environ.get("SLURM_ARRAY_TASK_ID")}


def sleep(seconds: float) -> None:
    time.sleep(seconds)


class Counter:
    """Counts to `total`, a step every `step_s`, logging progress to a file. On preemption (USR2) submitit calls
    `checkpoint`, pickles the DelayedSubmission (with `self.progress`), requeues the job and exits; the
    second run resumes from that pickle."""

    def __init__(self, log: str, step_s: float = 0.5):
        self.log, self.step_s, self.progress, self.starts = log, step_s, 0, 0

    def _write(self, event: str) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps({"event": event, "progress": self.progress, "starts": self.starts}) + "\n")

    def __call__(self, total: int) -> dict:
        self.starts += 1
        self._write("start")
        while self.progress < total:
            time.sleep(self.step_s)
            self.progress += 1
            self._write("step")
        return {"progress": self.progress, "starts": self.starts, "restarts": os.environ.get("SLURM_RESTART_COUNT")}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def read_events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)
    return value


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_submit_runs_function_on_slurm(slurm, tmp_path):
    executor = submitit.AutoExecutor(slurm.submitit_folder(tmp_path))
    assert executor.cluster == "slurm"  # srun is on PATH once the cluster is installed
    executor.update_parameters(slurm_partition=slurm.partition, timeout_min=5)
    job = executor.submit(add, 2, 3)
    assert job.result() == {"sum": 5, "job_id": job.job_id}
    assert slurm.wait_state(job.job_id, "COMPLETED", timeout=30) == "COMPLETED"
    assert slurm.sacct_state(job.job_id) == "COMPLETED"
    assert slurm.squeue(job.job_id) == {}  # no longer queued
    assert Path(str(job.paths.result_pickle)).parent == tmp_path / job.job_id


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_map_array_is_one_array_job(slurm, tmp_path):
    executor = slurm.executor(slurm.submitit_folder(tmp_path), timeout_min=5, slurm_array_parallelism=4)
    jobs = executor.map_array(square, range(4))
    master = jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in jobs] == [f"{master}_{i}" for i in range(4)]
    results = [job.result() for job in jobs]
    assert [r["square"] for r in results] == [0, 1, 4, 9]  # in order
    assert {r["array_job_id"] for r in results} == {master}
    assert [r["task_id"] for r in results] == ["0", "1", "2", "3"]
    for job in jobs:
        slurm.wait_state(job.job_id, "COMPLETED", timeout=30)
    assert slurm.sacct_states(master) == {f"{master}_{i}": "COMPLETED" for i in range(4)}
    assert slurm.sacct_state(master) == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_usr2_checkpoints_requeues_and_resumes(slurm, tmp_path):
    log = tmp_path / "counter.jsonl"
    total = 8  # 0.4 s a step: USR2 comes at step 2 with ~2 s to spare; the requeue itself takes ~12 s
    # timeout_min=30: submitit asks for --signal=USR2@90; a short timeout_min would send USR2 by itself and
    # count every USR2 as a timeout (see tests/slurm/README.md).
    executor = slurm.executor(slurm.submitit_folder(tmp_path), timeout_min=30)
    job = executor.submit(Counter(str(log), step_s=0.4), total)
    try:
        wait_for(lambda: any(e["progress"] >= 2 for e in read_events(log)), 60, "the job's second step")
        slurm.scancel(job.job_id, signal="USR2")  # what submitit sees when slurm preempts the job
        # the job requeues itself and waits (PENDING, reason BeginTime) for ~cred_expire before it runs again
        slurm.wait_state(job.job_id, {"PENDING", "REQUEUED"}, timeout=20)
        assert slurm.squeue(job.job_id) == {job.job_id: "PENDING"}
        result = job.result()
    except BaseException:
        slurm.scancel(job.job_id)  # leave no job behind on the shared cluster
        raise
    starts = [e for e in read_events(log) if e["event"] == "start"]
    assert len(starts) == 2, starts
    assert starts[0]["progress"] == 0 and starts[1]["progress"] >= 2  # resumed from the checkpoint
    assert starts[1]["progress"] < total  # ... taken while it was still running
    assert result == {"progress": total, "starts": 2, "restarts": "1"}
    assert slurm.wait_state(job.job_id, "COMPLETED", timeout=30) == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_requeue_and_scancel(slurm, tmp_path):
    """`scontrol requeue` puts a running job back in the queue (slurm kills it: no checkpoint); scancel ends it."""
    job = slurm.executor(slurm.submitit_folder(tmp_path), timeout_min=30).submit(sleep, 120)
    try:
        assert slurm.wait_state(job.job_id, "RUNNING", timeout=30) == "RUNNING"
        slurm.requeue(job.job_id)
        assert slurm.wait_state(job.job_id, "PENDING", timeout=30) == "PENDING"  # after KillWait (5 s)
        assert "Restarts=1" in subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True,
                                              text=True, check=True).stdout
    finally:
        slurm.scancel(job.job_id)
    assert slurm.wait_state(job.job_id, "CANCELLED", timeout=30) == "CANCELLED"
    assert slurm.squeue(job.job_id) == {}


@pytest.mark.timeout(60)
def test_local_cluster_runs_without_slurm(tmp_path):
    """cluster="local" runs the job in a local subprocess, SLURM installed or not."""
    executor = submitit.AutoExecutor(tmp_path / "%j", cluster="local")
    executor.update_parameters(timeout_min=5)
    job = executor.submit(add, 1, 2)
    assert job.result() == {"sum": 3, "job_id": os.environ.get("SLURM_JOB_ID")}  # not a new SLURM job
