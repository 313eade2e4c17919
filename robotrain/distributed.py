"""The process world: who this process is among the run's processes, and where they meet.

Inside a SLURM job with several tasks, every task is one training process: its rank and
the world come from SLURM's variables and are handed to torch.distributed / accelerate as
the variables `torchrun` would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, NODE_RANK), so the same code runs under torchrun, accelerate
launch and SLURM alike.
"""

from __future__ import annotations

import re
from typing import Mapping

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
