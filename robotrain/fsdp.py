"""FSDP2: parameters, gradients and optimizer state sharded across processes.

robotrain applies `torch.distributed.fsdp.fully_shard` itself rather than through
accelerate, whose CPU path silently falls back to DDP (see shared notes): every leaf module
with parameters becomes its own FSDP unit, then the policy as a whole. Parameters are then
DTensors sharded on dim 0 over a 1-D device mesh (CPU: gloo; GPU: NCCL).

Checkpoints keep LeRobot's layout: `pretrained_model/model.safetensors` holds the
consolidated weights (gathered on the main process), and `training_state/dcp/` holds the
sharded model and optimizer state written by torch.distributed.checkpoint, which reshards
on load, so a run saved with N processes resumes with M.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

#: Subfolder of training_state/ holding the sharded state.
DCP_FOLDER = "dcp"


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (a plain `python -m robotrain`)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def shard(policy: nn.Module, device: torch.device) -> nn.Module:
    """Shard `policy` in place across all processes; returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in list(policy.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)) and not list(module.children()):
            fully_shard(module, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return policy


def sharded_count(policy: nn.Module) -> int:
    """How many parameter tensors are DTensors sharded on dim 0 (a check that FSDP really applies)."""
    from torch.distributed.tensor import DTensor, Shard

    return sum(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in policy.parameters())


def full_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated weights on the main process (empty elsewhere); every process must call it.
    Cloned, because the gathered tensors can share storage with live training state."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(policy, options=options)
    return {k: v.detach().clone() for k, v in state.items()}


def save_sharded(policy: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shard of model and optimizer state into `folder` (collective)."""
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def load_sharded(policy: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore model and optimizer from `folder`, resharded onto this world (collective)."""
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def unsharded_copy(model: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) copy of a sharded policy with the gathered weights `full`, for work
    that only the main process does (simulator evaluation): a sharded forward would need
    every process to join its all-gathers."""
    import copy

    from robotrain import peft

    base = model.get_base_model() if peft.is_adapted(model) else model
    fresh = type(base)(base.config, base.stats)
    if peft.is_adapted(model):
        from peft import get_peft_model

        fresh = get_peft_model(fresh, copy.deepcopy(model.peft_config["default"]))
    fresh.load_state_dict(full, strict=True)
    return fresh
