"""SLURM through submitit: one job per run, one job array per sweep.

Each job runs `TrainingJob`, which starts `python -m robotrain …` as a child process and
waits for it. Preemption and time limits use submitit's own checkpoint/requeue support:
SLURM signals the job's processes (USR2, `--signal` set by submitit); the training child
saves at its next step boundary and exits; submitit calls `TrainingJob.checkpoint`, which
waits for that save and hands submitit the same run with `resume=auto`, and submitit
requeues the job. The requeued job finds the checkpoint in the run's own run dir.

In a job with several tasks, each task's child gets torchrun-style world variables
(`robotrain.distributed.world_env_from_slurm`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from robotrain.config import SlurmJob
from robotrain.dispatch.job import Outcome, Point, with_resume_auto
from robotrain.errors import UserError

#: How long `checkpoint` waits for the training child to save after the preemption signal.
SAVE_GRACE_S = 60.0


class TrainingJob:
    """The callable a SLURM job runs (pickled by submitit): train one run in a child process."""

    def __init__(self, env: dict[str, str] | None = None):
        self.env = dict(env or {})
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {"env": self.env, "_child": None}  # a live child process never travels

    def __call__(self, argv: list[str], run_dir: str) -> dict:
        from robotrain.distributed import world_env_from_slurm

        env = {**os.environ, **self.env, **world_env_from_slurm(os.environ)}
        self._child = subprocess.Popen([sys.executable, "-m", "robotrain", *argv], env=env)
        code = self._child.wait()
        if code != 0:
            raise RuntimeError(f"python -m robotrain exited with status {code}; its output is in this job's log")
        result = Path(run_dir) / "result.json"
        return json.loads(result.read_text()) if result.is_file() else {}

    def checkpoint(self, argv: list[str], run_dir: str):
        """Called by submitit on preemption/timeout: let the child save, then requeue with resume=auto."""
        import submitit

        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGUSR2)  # usually already delivered by SLURM; a second one is harmless
            try:
                child.wait(timeout=SAVE_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
        return submitit.helpers.DelayedSubmission(TrainingJob(self.env), with_resume_auto(argv), run_dir)


class SlurmHandle:
    """One submitted SLURM job (or one task of an array)."""

    def __init__(self, job, point: Point):
        self.job, self.point = job, point
        self.job_id = str(job.job_id)

    def follow(self, poll_s: float = 1.0) -> Iterator[str]:
        path, offset, pending = Path(self.job.paths.stdout), 0, ""
        while True:
            done = self.job.done()
            if path.is_file():
                with open(path, "r", errors="replace") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
                *lines, pending = (pending + chunk).split("\n")
                yield from lines
            if done:
                if pending:
                    yield pending
                return
            time.sleep(poll_s)

    def wait(self) -> Outcome:
        try:  # a job with several tasks returns one result per task; the main process's comes first
            return Outcome(ok=True, value=self.job.results()[0])
        except Exception as err:  # submitit re-raises the job's failure here
            return Outcome(ok=False, error=err)

    def cancel(self) -> None:
        self.job.cancel(check=False)

    def hints(self) -> str:
        return f"follow: tail -f {self.job.paths.stdout} · status: squeue -j {self.job_id} · cancel: scancel {self.job_id}"


def submit(points: Sequence[Point], job: SlurmJob) -> list[SlurmHandle]:
    """Submit `points` as one job (one point) or one job array (several)."""
    import submitit

    if shutil.which("sbatch") is None:
        raise UserError("job=slurm needs SLURM's sbatch on PATH: submit from a login node of the cluster")
    _check_secrets(job)
    executor = submitit.AutoExecutor(folder=_folder(points, job), cluster="slurm",
                                     slurm_max_num_timeout=job.max_num_timeout)
    executor.update_parameters(**_parameters(job, points[0].name))
    runner = TrainingJob(job.env)
    argvs = [p.argv() for p in points]
    run_dirs = [str(p.run_dir) for p in points]
    if len(points) == 1:
        jobs = [executor.submit(runner, argvs[0], run_dirs[0])]
    else:
        jobs = executor.map_array(runner, argvs, run_dirs)
    return [SlurmHandle(j, p) for j, p in zip(jobs, points)]


def _folder(points: Sequence[Point], job: SlurmJob) -> str:
    if job.submitit_folder:
        return job.submitit_folder
    base = points[0].run_dir if len(points) == 1 else points[0].run_dir.parent
    return str(Path(base) / ".submitit" / "%j")


def _parameters(job: SlurmJob, name: str) -> dict:
    """SlurmJob -> submitit's parameter names (as hydra-submitit-launcher maps them)."""
    params = {
        "name": name, "timeout_min": job.slurm_timeout_min, "nodes": job.nodes,
        "tasks_per_node": job.tasks_per_node, "gpus_per_node": job.gpus_per_node,
        "cpus_per_task": job.cpus_per_task, "mem_gb": job.mem_gb, "stderr_to_stdout": True,
        "slurm_partition": job.partition, "slurm_account": job.account, "slurm_qos": job.qos,
        "slurm_constraint": job.constraint, "slurm_array_parallelism": job.array_parallelism,
        "slurm_comment": ",".join(job.tags) or None,
        "slurm_additional_parameters": dict(job.additional_parameters) or None,
        "slurm_setup": list(job.setup) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def _check_secrets(job: SlurmJob) -> None:
    """SLURM jobs inherit this shell's environment, so a secret only has to be set here."""
    missing = [name for name in job.secrets if name not in os.environ]
    if missing:
        raise UserError(f"job.secrets names {missing[0]}, which is not set in this shell; export it first")
