"""FSDP2: parameters, gradients and optimizer state sharded across processes.

robotrain applies `torch.distributed.fsdp.fully_shard` itself rather than through
accelerate, which on CPU silently drops its FSDP plugin and runs DDP: every leaf module
with parameters becomes its own FSDP unit, then the policy as a whole. Parameters are then
DTensors sharded on dim 0 over a 1-D device mesh (CPU: gloo; GPU: NCCL).

Checkpoints keep LeRobot's layout: `pretrained_model/model.safetensors` holds the
consolidated weights (gathered on the main process), and `training_state/dcp/` holds the
sharded model and optimizer state written by torch.distributed.checkpoint, which reshards
on load, so a run saved with N processes resumes with M.

The shards are written with DCP's safetensors storage (one `shard-<rank>-….safetensors` per
process, each tensor's offset in the full one in its header) and the optimizer's param groups
as JSON, rather than DCP's default pickled `.metadata` + `.distcp`: only safetensors and JSON
are ever read back, so a sharded checkpoint resumes from the Hub like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from robotrain.checkpoint_layout import read_json
from robotrain.errors import UserError

#: Subfolder of training_state/ holding the sharded state.
DCP_FOLDER = "dcp"
#: The optimizer's param groups (hyperparameters and parameter names) inside DCP_FOLDER.
PARAM_GROUPS = "optimizer_param_groups.json"


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (a plain `python -m robotrain`)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def shard(policy: nn.Module, device: torch.device) -> nn.Module:
    """Shard `policy` in place across all processes; returns it. Every leaf module with
    parameters is a unit, and so is each module of `_WHOLE_UNITS` with all it contains; the
    modules the policy reads outside their forward (`Policy.fsdp_gathered_with_policy`) are
    held by the policy's own unit. `fully_shard` moves each unit's parameters and buffers to the
    mesh's device as it shards them, so a GPU never holds the whole model at once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    with_policy, units = _gathered_with_policy(policy), set()
    for name, module in list(policy.named_modules())[1:]:
        if name in with_policy or _inside(name, units):
            continue
        leaf_with_parameters = any(True for _ in module.parameters(recurse=False)) and not list(module.children())
        if isinstance(module, _WHOLE_UNITS) or leaf_with_parameters:
            fully_shard(module, mesh=mesh)
            units.add(name)
    fully_shard(policy, mesh=mesh)
    return policy


#: Modules whose forward reads their children's parameters directly (`nn.MultiheadAttention`
#: uses `out_proj.weight` in `F.multi_head_attention_forward`): sharded as one unit.
_WHOLE_UNITS = (nn.MultiheadAttention,)


def _inside(name: str, units: set[str]) -> bool:
    """Whether module `name` lies inside one of `units` (a parent's name is a dotted prefix)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in units for i in range(1, len(parts)))


def _gathered_with_policy(policy: nn.Module) -> set[str]:
    """`fsdp_gathered_with_policy` of the policy, also when PEFT wraps it (names gain a prefix)."""
    from robotrain.peft import base_policy

    base = base_policy(policy)
    names = set(getattr(base, "fsdp_gathered_with_policy", ()))
    if base is policy:
        return names
    prefix = next(n for n, m in policy.named_modules() if m is base)
    return {f"{prefix}.{n}" for n in names}


def sharded_count(policy: nn.Module) -> int:
    """How many parameter tensors are DTensors sharded on dim 0 (a check that FSDP really applies)."""
    from torch.distributed.tensor import DTensor, Shard

    return sum(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in policy.parameters())


def parameter_bytes(policy: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this process holds, bytes of the whole model's parameters)."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in policy.parameters():
        total += p.numel() * p.element_size()
        local += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
    return local, total


def full_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated weights on the main process (empty elsewhere); every process must call it.
    Cloned, because the gathered tensors can share storage with live training state."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(policy, options=options)
    return {k: v.detach().clone() for k, v in state.items()}


def save_sharded(policy: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shard of model and optimizer state into `folder` (collective)."""
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    writer = HuggingFaceStorageWriter(str(folder), save_distributed=True)
    dcp.save({"model": model_sd, "optim": optim_sd["state"]}, storage_writer=writer)
    if dist.get_rank() == 0:
        (Path(folder) / PARAM_GROUPS).write_text(json.dumps(optim_sd["param_groups"], indent=2))


def load_sharded(policy: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore model and optimizer from `folder`, resharded onto this world (collective)."""
    model_sd, optim_sd = get_state_dict(policy, optimizer)  # the live shards, to be filled in place
    groups = _read_param_groups(Path(folder), optim_sd["param_groups"])
    check_shards(Path(folder))
    state = {"model": model_sd, "optim": optim_sd["state"]}
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))
    except CheckpointException as err:
        raise UserError(f"the sharded state in {folder} does not load ({_first_failure(err)}); "
                        "resume with the policy config it was trained with, or from another step") from None
    set_state_dict(policy, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": groups})


def _read_param_groups(folder: Path, live: list[dict]) -> list[dict]:
    groups = read_json(folder / PARAM_GROUPS)
    if [g["params"] for g in groups] != [g["params"] for g in live]:
        raise UserError(f"the optimizer in {folder} covers other parameters than this policy's; "
                        "resume with the policy config the checkpoint was trained with")
    return groups


def check_shards(folder: Path) -> None:
    """A one-line error for missing or corrupt shards, before DCP logs a traceback on reading them."""
    from safetensors import SafetensorError, safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{folder} holds no shards: that checkpoint is incomplete; resume from another step")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{shard} is corrupt ({err}); delete that checkpoint folder or resume from another step") from None


def _first_failure(err: CheckpointException) -> str:
    """The first failing rank's exception, on one line (DCP's own message holds every traceback)."""
    first = next((exc for exc, _trace in err.failures.values()), err)
    return (" ".join(str(first).split()) or type(first).__name__)[:200]
