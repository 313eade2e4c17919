"""The process world: who this process is among the run's processes, and where they meet.

A run has one process, or several started by torchrun, `accelerate launch`, a multi-task
SLURM job, or robotrain itself (`distributed.processes=N` runs torchrun for you). Inside a
SLURM job with several tasks, rank and world come from SLURM's variables and are handed to
torch.distributed / accelerate as the variables `torchrun` would set (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, NODE_RANK), so the same code runs
under all of them. On GPUs the processes talk over NCCL, on CPUs over gloo.

Several processes end with barrier -> destroy_process_group -> `os._exit`: gloo processes
that leave through interpreter shutdown abort now and then (measured: ~10 % of runs).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

from robotrain import preemption

_PORT_BASE, _PORT_SPAN = 20000, 20000


def first_host(nodelist: str) -> str:
    """The first hostname of a SLURM node list: `node[03-05,7],gpu1` -> `node03`."""
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def world_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun-style variables for this SLURM task; empty outside SLURM or for one task.

    The rendezvous port is derived from the job id, so every task of the job agrees on it
    without talking, and two jobs sharing a node rarely collide."""
    if "SLURM_JOB_ID" not in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    nodes = int(environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", "1")))
    world = int(environ["SLURM_NTASKS"])
    job_id = int(environ.get("SLURM_ARRAY_JOB_ID", environ["SLURM_JOB_ID"])) + int(environ.get("SLURM_ARRAY_TASK_ID", 0))
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(world // max(nodes, 1)),
        "NODE_RANK": environ.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": first_host(environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "127.0.0.1"))),
        "MASTER_PORT": str(_PORT_BASE + job_id % _PORT_SPAN),
    }


def launched() -> bool:
    """True inside a multi-process launch (torchrun, accelerate launch, SLURM tasks)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_local(processes: int, overrides: Sequence[str], run_dir: Path) -> int:
    """Run this command again as `processes` processes under torchrun; returns their exit code.

    Every process gets the same run dir (a timestamped default would differ per process).
    SIGTERM/SIGUSR2 sent to this process are passed on, so preemption still saves."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "robotrain", *[o for o in overrides if not o.startswith("hydra.run.dir=")],
            f"hydra.run.dir={Path(run_dir).resolve()}"]
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)), **os.environ}
    child = subprocess.Popen(argv, env=env)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in preemption.SIGNALS}
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def make_accelerator():
    """accelerate's Accelerator for this world. On CPU it must be told so, or it silently
    runs every process as an independent rank 0."""
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)


def broadcast(accelerator, value: Any) -> Any:
    """`value` as the main process has it, on every process."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. a preemption signal that reached
    one process a step before the others: they must all stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def exit_process(code: int) -> NoReturn:
    """Leave a multi-process run without the crashes gloo shows at interpreter shutdown."""
    import torch.distributed as dist

    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(code)
