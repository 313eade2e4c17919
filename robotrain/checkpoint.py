"""Checkpoints in LeRobot's layout, saved atomically.

    <run_dir>/checkpoints/<step:06d>/
        pretrained_model/  config.json model.safetensors train_config.json + processor files
        training_state/    training_step.json optimizer_state.safetensors
                           optimizer_param_groups.json scheduler_state.json
                           rng_state.safetensors sampler_state.json
    <run_dir>/checkpoints/last -> <step:06d>

A save builds the whole folder under a hidden temporary name, flushes it (fsync), renames it
to its step and then swaps the `last` symlink. A crash at any instant leaves every existing
step folder intact and never a half-written folder with a step's name. `latest()` picks the
highest complete step folder, so it needs `last` only as LeRobot's convenience pointer.

Only safetensors and JSON are ever read back: loading a checkpoint runs no pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robotrain.checkpoint_layout import (
    PRETRAINED, TMP_PREFIX, TRAINING_STATE, read_json, rng_file_name, step_folder_name, step_folders,
)
from robotrain.errors import UserError
from robotrain.fsutil import fsync_dir, fsync_tree

# -- saving ---------------------------------------------------------------------------


def staging_path(checkpoints_dir: Path, step: int, total_steps: int) -> Path:
    """Where checkpoint `step` is built before it is published: the same path on every process,
    so that all of them can write their shards of a sharded (FSDP) checkpoint into it."""
    return Path(checkpoints_dir) / f"{TMP_PREFIX}{step_folder_name(step, total_steps)}"


def prepare_staging(staging: Path) -> None:
    """Clear leftovers of killed saves and create `staging` (main process, before the shards)."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(staging.parent)
    (staging / TRAINING_STATE).mkdir(parents=True)


def save(
    checkpoints_dir: Path,
    *,
    step: int,
    total_steps: int,
    save_pretrained,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_config: dict,
    training_step: dict,
    sampler_state: dict,
    fsync: bool = True,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
    staged: bool = False,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; returns its folder.

    `save_pretrained(folder)` writes the policy's pretrained_model/ files; it is a callable
    so that wrapped (DDP/FSDP/PEFT) models decide how their weights are gathered.
    `rng_states` holds every process's RNG state (rank 0's goes to LeRobot's
    rng_state.safetensors, rank r's to rng_state_rank<r>.safetensors); default: this process's.
    `extra_state` adds JSON files to training_state/, by file name (e.g. the tracker's tracker.json).
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / step_folder_name(step, total_steps)
    tmp = staging_path(checkpoints_dir, step, total_steps)
    if not staged:  # a sharded save has prepared it and written its shards already
        prepare_staging(tmp)
    pretrained, state = tmp / PRETRAINED, tmp / TRAINING_STATE
    pretrained.mkdir()
    save_pretrained(pretrained)
    _write_json(pretrained / "train_config.json", train_config)
    _write_json(state / "training_step.json", {"step": step, **training_step})
    if optimizer is not None:  # None: the optimizer state is in the sharded training_state/dcp/
        _save_optimizer(state, optimizer)
    _write_json(state / "scheduler_state.json", scheduler.state_dict())
    for rank, states in enumerate(rng_states or [rng_state()]):
        save_file(states, str(state / rng_file_name(rank)))
    _write_json(state / "sampler_state.json", sampler_state)
    for name, data in (extra_state or {}).items():
        _write_json(state / name, data)
    if fsync:
        fsync_tree(tmp)
    _publish(tmp, final, fsync)
    _point_last(checkpoints_dir, final.name, fsync)
    return final


def _publish(tmp: Path, final: Path, fsync: bool) -> None:
    # A folder with this step's name can exist only if an earlier run reached this step and
    # crashed before it could move on; the new one replaces it.
    if final.exists():
        doomed = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.rename(final, doomed)
        os.rename(tmp, final)
        shutil.rmtree(doomed)
    else:
        os.rename(tmp, final)
    if fsync:
        fsync_dir(final.parent)


def _point_last(checkpoints_dir: Path, name: str, fsync: bool) -> None:
    link = checkpoints_dir / "last"
    tmp_link = checkpoints_dir / f"{TMP_PREFIX}last-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.symlink(name, tmp_link)  # relative, so the run dir can be moved or uploaded
    os.replace(tmp_link, link)
    if fsync:
        fsync_dir(checkpoints_dir)


def _remove_stale_temporaries(checkpoints_dir: Path) -> None:
    """Leftovers of saves killed midway (one writer per run dir, so none is live)."""
    for path in checkpoints_dir.glob(f"{TMP_PREFIX}*"):
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))


def _save_optimizer(state_dir: Path, optimizer: torch.optim.Optimizer) -> None:
    """LeRobot's form: tensors flattened as `state/<param>/<name>`, groups as JSON."""
    sd = optimizer.state_dict()
    flat = {
        f"state/{idx}/{name}": value.detach().contiguous() if torch.is_tensor(value) else torch.tensor(value)
        for idx, per_param in sd["state"].items()
        for name, value in per_param.items()
    }
    save_file(flat, str(state_dir / "optimizer_state.safetensors"))
    _write_json(state_dir / "optimizer_param_groups.json", sd["param_groups"])


def rng_state() -> dict[str, torch.Tensor]:
    """Python, NumPy and torch RNG states under LeRobot's keys.

    NumPy's cached gaussian is kept as float64 (LeRobot uses float32, which is lossy)."""
    py_version, py_state, _ = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "py_rng_version": torch.tensor([py_version], dtype=torch.int64),
        "py_rng_state": torch.tensor(py_state, dtype=torch.int64),
        "np_rng_state_values": torch.tensor(np_keys.astype(np.int64)),
        "np_rng_state_index": torch.tensor([np_pos], dtype=torch.int64),
        "np_rng_has_gauss": torch.tensor([np_has_gauss], dtype=torch.int64),
        "np_rng_cached_gaussian": torch.tensor([np_gauss], dtype=torch.float64),
        "torch_rng_state": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    random.setstate((int(state["py_rng_version"].item()), tuple(state["py_rng_state"].tolist()), None))
    np.random.set_state((
        "MT19937",
        state["np_rng_state_values"].numpy().astype(np.uint32),
        int(state["np_rng_state_index"].item()),
        int(state["np_rng_has_gauss"].item()),
        float(state["np_rng_cached_gaussian"].item()),
    ))
    torch.set_rng_state(state["torch_rng_state"])
    if "torch_cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda_rng_state"])


# -- loading --------------------------------------------------------------------------


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` with a one-line error for a missing or corrupt file."""
    if not Path(path).is_file():
        raise UserError(f"{path} is missing: that checkpoint is incomplete; resume from another step")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path} is corrupt ({reason}); delete that checkpoint folder or resume from another step") from None


def load_model_weights(model: torch.nn.Module, pretrained_dir: Path) -> None:
    """Load `model.safetensors` strictly; a mismatch is a one-line error, not a traceback."""
    state = load_safetensors(Path(pretrained_dir) / "model.safetensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"the weights in {pretrained_dir} do not fit this policy ({detail}); "
            "resume with the policy config the checkpoint was trained with"
        ) from None


def load_training_state(
    checkpoint_dir: Path,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> dict:
    """Restore optimizer, scheduler and this process's RNG; returns training_step.json plus
    `sampler_state` and `rng_restored` (False when the checkpoint has no state for `rank`,
    e.g. after growing the number of processes). `optimizer=None` leaves the optimizer to the
    caller (sharded FSDP state is restored with torch.distributed.checkpoint).

    Everything is read and checked before anything is restored, so a bad checkpoint
    leaves the live objects untouched."""
    state_dir = Path(checkpoint_dir) / TRAINING_STATE
    training_step = read_json(state_dir / "training_step.json")
    optimizer_sd = _read_optimizer(state_dir, optimizer) if optimizer is not None else None
    scheduler_sd = read_json(state_dir / "scheduler_state.json")
    rng_path = state_dir / rng_file_name(rank)
    rng = load_safetensors(rng_path) if rank == 0 or rng_path.is_file() else None
    sampler_state = read_json(state_dir / "sampler_state.json")
    if optimizer_sd is not None:
        optimizer.load_state_dict(optimizer_sd)
    scheduler.load_state_dict(scheduler_sd)
    if rng is not None:
        set_rng_state(rng)
    return {**training_step, "sampler_state": sampler_state, "rng_restored": rng is not None}


def _read_optimizer(state_dir: Path, optimizer: torch.optim.Optimizer) -> dict:
    flat = load_safetensors(state_dir / "optimizer_state.safetensors")
    groups = read_json(state_dir / "optimizer_param_groups.json")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = tensor
    saved = sum(len(g["params"]) for g in groups)
    live = sum(len(g["params"]) for g in optimizer.param_groups)
    if saved != live or len(groups) != len(optimizer.param_groups):
        raise UserError(
            f"checkpoint optimizer covers {saved} parameters in {len(groups)} groups but the model has "
            f"{live} in {len(optimizer.param_groups)}; resume with the policy config the checkpoint was trained with"
        )
    return {"state": state, "param_groups": groups}


def prune(checkpoints_dir: Path, keep_last: int, protect: frozenset[str] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep_last` step folders, never one named in `protect`
    (e.g. still waiting to be uploaded). Returns what was deleted."""
    if keep_last <= 0:
        return []
    doomed = [p for p in step_folders(checkpoints_dir)[:-keep_last] if p.name not in protect]
    for path in doomed:
        # Rename first so a crash mid-delete cannot leave a partial folder with a step's name.
        trash = path.with_name(f"{TMP_PREFIX}pruned-{path.name}")
        os.rename(path, trash)
        shutil.rmtree(trash)
    return doomed
