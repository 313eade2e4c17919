"""The process world: who this process is among the run's processes, and where they meet.

A run has one process, or several started by torchrun, `accelerate launch`, a multi-task
SLURM job, or robotrain itself (`distributed.processes=N` runs torchrun for you). Inside a
SLURM job with several tasks, rank and world come from SLURM's variables and are handed to
torch.distributed / accelerate as the variables `torchrun` would set (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, NODE_RANK), so the same code runs
under all of them. On GPUs the processes talk over NCCL, on CPUs over gloo.

Several processes end with barrier -> destroy_process_group -> `os._exit`: gloo processes
that leave through interpreter shutdown abort now and then (measured: ~10 % of runs).

A process that fails leaves at once (`exit_failed`), without the barrier: the others may be
waiting for it in a collective. The first process to fail says why; the others' errors follow
from it (a collective whose peer is gone), so they leave without a word. torchrun then stops
whatever still runs, and `run_agent` keeps its report of the failure off the terminal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

from robotrain import preemption
from robotrain.errors import UserError

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
    argv = [sys.executable, "-c", "from robotrain.distributed import run_agent; run_agent()",
            "--standalone", f"--nproc_per_node={processes}",
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


def run_agent() -> NoReturn:
    """torchrun's command line (`python -c ... <torchrun arguments>`), minus its failure report.

    A failed robotrain process has printed why (once, see `exit_failed`); torchrun would add a
    banner and a traceback of its own per run. Only when no process could say anything (every
    failed one was killed by a signal, e.g. out of memory) is there a line here. Exits 75 when
    every process stopped for a preemption, else with the first failed process's status."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        main()
    except ChildFailedError as failed:
        codes = [failure.exitcode for failure in failed.failures.values()]
        rank, first = failed.get_first_failure()
        if all(code < 0 for code in codes):
            print(f"robotrain: error: process {rank} was killed by {signal.Signals(-first.exitcode).name}"
                  f"{' (out of memory?)' if first.exitcode == -signal.SIGKILL else ''}", file=sys.stderr)
        if all(code == preemption.EXIT_PREEMPTED for code in codes):
            sys.exit(preemption.EXIT_PREEMPTED)
        sys.exit(max(first.exitcode, 1))
    sys.exit(0)


def exit_failed(error: BaseException, what: str, code: int = 1) -> NoReturn:
    """Leave a multi-process run that failed in this process, now. The first process to fail
    prints the traceback and a line naming the process and `what` ran; a process whose error
    came after another's (its collective lost a peer) leaves silently."""
    if _first_to_fail():
        if not isinstance(error, UserError):  # its message is the whole story
            traceback.print_exception(error)
        print(f"robotrain: error: process {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')} "
              f"failed {what}: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _first_to_fail() -> bool:
    """Counts failures in the process group's store (the rendezvous every process shares); true
    for the first. Without a reachable store (no group yet, its host gone), assume first."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    if not (dist.is_available() and dist.is_initialized()):
        return True
    try:
        store = _get_default_store()
        store.set_timeout(timedelta(seconds=5))
        return store.add("robotrain/failed", 1) == 1
    except Exception:  # noqa: BLE001 - the store's host died with its process: nobody else can tell
        return True


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
    one process a step before the others: they must all stop at the same step). Asked every
    step, so it goes over a CPU (gloo) group: on the GPUs' group it would sync the device."""
    if accelerator.num_processes == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, group=_cpu_group())
    return bool(value.item())


def max_over_processes(accelerator, value: float) -> float:
    """The largest `value` any process has (every process calls it, over the CPU group)."""
    if accelerator.num_processes == 1:
        return value
    import torch
    import torch.distributed as dist

    box = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_cpu_group())
    return float(box.item())


def sum_over_processes(accelerator, values):
    """`values` (a CPU float64 tensor) summed over the processes (every process calls it)."""
    if accelerator.num_processes == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values, group=_cpu_group())
    return values


_CPU_GROUP = None


def _cpu_group():
    """The world as a gloo group (the default group when it is gloo already); made on first use,
    which every process reaches at the same point."""
    import torch.distributed as dist

    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CPU_GROUP


def exit_process(code: int) -> NoReturn:
    """Leave a multi-process run without the crashes gloo shows at interpreter shutdown."""
    import torch.distributed as dist

    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(code)
