"""Submit runs somewhere else: a SLURM cluster (`slurm.py`, via submitit) or Hugging Face
Jobs (`hf_jobs.py`). Sweep points that stay local run in-process (`local.py`).

Every remote run executes the same command a user would type, with the same task
overrides plus `job.target=local`, so the job trains exactly what was asked here:

    python -m robotrain <overrides> job.target=local hydra.run.dir=<its run dir> resume=auto

`resume=auto` (unless the user gave a resume spec) makes a requeued job continue from its
last checkpoint in its own, stable run dir. Nothing is downloaded on the submitting machine:
a `resume=hub:…` spec travels in the overrides and the job downloads.

Each backend's `submit(points, job)` returns one `Handle` per point: its id, a log follower,
`wait()` and `cancel()`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from robotrain.config import JobConfig, LocalJob, parse_job
from robotrain.dispatch.job import Handle, Outcome, Point, with_resume_auto
from robotrain.errors import UserError

__all__ = ["Handle", "Outcome", "Point", "RemoteRun", "launch_sweep", "run_remote", "submit", "with_resume_auto"]

log = logging.getLogger("robotrain")


def submit(points: Sequence[Point], job: JobConfig) -> list[Handle]:
    if job.target == "slurm":
        from robotrain.dispatch import slurm

        return slurm.submit(points, job)
    if job.target == "hf":
        from robotrain.dispatch import hf_jobs

        return hf_jobs.submit(points, job)
    raise UserError(f"job.target={job.target} is not a remote target")


@dataclass
class RemoteRun:
    """What a dispatched single run reports to the CLI."""

    handle: Handle
    outcome: Outcome | None = None
    detached: bool = False


def run_remote(job: JobConfig, overrides: Sequence[str], run_dir: Path) -> RemoteRun:
    """Submit one run; follow its logs to the end, or return at once with `job.detach`.
    Ctrl-C while following detaches: the job goes on, and how to reach it is printed."""
    point = Point(list(overrides), run_dir.resolve() if job.shares_run_dir else None, name="robotrain")
    (handle,) = submit([point], job)
    try:  # from here on Ctrl-C only detaches: the job exists
        print(f"robotrain: submitted {job.target} job {handle.job_id}", flush=True)
        if job.detach:
            print(f"  {handle.hints()}", flush=True)
            return RemoteRun(handle, detached=True)
        for line in handle.follow():
            print(line, flush=True)
        return RemoteRun(handle, outcome=handle.wait())
    except KeyboardInterrupt:
        print(f"\nrobotrain: detached from job {handle.job_id}; it keeps running.\n  {handle.hints()}",
              file=sys.stderr, flush=True)
        return RemoteRun(handle, detached=True)


# -- sweeps (called by the Hydra launcher plugin) ----------------------------------------


def launch_sweep(hydra_context, task_function, config, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list:
    """Run a Hydra sweep: local points in turn in-process, remote points submitted per target
    at once (SLURM: one job array). Returns Hydra `JobReturn`s in the sweep's order."""
    from hydra.core.utils import configure_log, setup_globals

    from robotrain.dispatch import local

    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    common = set(job_overrides[0]).intersection(*job_overrides) if job_overrides else set()
    base_job = _job_config(config, initial_job_idx, [])
    planned = [_plan(hydra_context, config, list(o), initial_job_idx + i, sweep_dir, common, base_job)
               for i, o in enumerate(job_overrides)]
    results: dict[int, Any] = {}
    local_points = [(p.index, p.overrides) for p, job, _ in planned if not job.is_remote]
    for ret, (idx, _) in zip(local.run_in_process(hydra_context, task_function, config, local_points), local_points):
        results[idx] = ret
    groups: dict[str, list] = {}
    for entry in planned:
        if entry[1].is_remote:
            groups.setdefault(repr(entry[1]), []).append(entry)
    for group in groups.values():
        results.update(_run_group(group))
    return [results[p.index] for p, _, _ in planned]


def _plan(hydra_context, config, overrides: list[str], idx: int, sweep_dir: Path, common: set[str],
          base_job: JobConfig):
    """(Point, its JobConfig, its composed config or None) for sweep point `idx`.

    Composing a point's config costs as much as composing the primary one, and Hydra's
    sweeper has just done it for every point to validate the sweep. When what varies across
    the points cannot change where or how a point runs (no swept `job` key, the default
    `${hydra.job.num}` subdir), its job and run dir follow from the primary config, which
    already holds the overrides common to all points, and the point is not composed again."""
    from omegaconf import OmegaConf, open_dict

    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
    swept = [o for o in overrides if o not in common]
    if subdir == "${hydra.job.num}" and not any(_sets_prefix(o, "job") for o in swept):
        job, sweep_config, name = base_job, None, str(config.hydra.job.name)
        run_dir = sweep_dir / str(idx)
    else:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        job, name = _job_config(sweep_config, idx, overrides), str(sweep_config.hydra.job.name)
        run_dir = sweep_dir / str(sweep_config.hydra.sweep.subdir)
    # One name for all points: a SLURM array has one job name (its tasks are <id>_<index>).
    return Point(overrides, run_dir if job.shares_run_dir else None, index=idx, name=name), job, sweep_config


def _sets_prefix(override: str, prefix: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
    return key == prefix or key.startswith(prefix + ".")


def _job_config(config, idx: int, overrides: list[str]) -> JobConfig:
    """The typed `job` node; an app without one (e.g. Hydra's launcher test suite) runs locally."""
    if "job" not in config:
        return LocalJob()
    try:
        return parse_job(config.job)
    except UserError as err:
        raise UserError(f"sweep point #{idx} ({' '.join(overrides)}): {err}") from None


def _run_group(group: list) -> dict[int, Any]:
    """Submit one target's points together; wait for them unless job.detach."""
    from hydra.core.utils import JobReturn, JobStatus

    points, job = [p for p, _, _ in group], group[0][1]
    handles = submit(points, job)
    ids = ", ".join(h.job_id for h in handles)
    print(f"robotrain: submitted {len(handles)} {job.target} job(s): {ids}", flush=True)
    results = {}
    for handle, (point, _, sweep_config) in zip(handles, group):
        outcome = Outcome(ok=True, value={"job_id": handle.job_id}) if job.detach else handle.wait()
        value = outcome.return_value if outcome.ok and not job.detach else outcome.value
        ret = JobReturn(overrides=point.overrides, cfg=sweep_config, hydra_cfg=None,
                        working_dir=str(point.run_dir or handle.job_id), task_name=point.name,
                        status=JobStatus.COMPLETED if outcome.ok else JobStatus.FAILED,
                        _return_value=value if outcome.ok else outcome.error)
        if not outcome.ok:
            log.error("job %s (%s) failed: %s", handle.job_id, " ".join(point.overrides), outcome.error)
        results[point.index] = ret
    if job.detach and handles:
        print(f"  {handles[0].hints()}", flush=True)
    return results
