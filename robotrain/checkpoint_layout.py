"""Where a checkpoint's files live (LeRobot's layout), and finding complete step folders.

    <run_dir>/checkpoints/<step:06d>/
        pretrained_model/  config.json model.safetensors (or adapter files) train_config.json
                           + the policy's processor files
        training_state/    training_step.json sampler_state.json scheduler_state.json
                           optimizer_state.safetensors optimizer_param_groups.json
                           rng_state.safetensors (+ rng_state_rank<r>.safetensors)
                           [tracker.json] [dcp/: FSDP's sharded model and optimizer]
    <run_dir>/checkpoints/last -> <step:06d>

Torch-free, so that the Hub side (resolving, downloading, the upload child) and the writer
(`robotrain.checkpoint`) share one statement of it without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from robotrain.errors import UserError

CHECKPOINTS = "checkpoints"
PRETRAINED = "pretrained_model"
TRAINING_STATE = "training_state"
LAST = "last"
#: Inside pretrained_model/: the resolved config the run was trained with.
TRAIN_CONFIG = "train_config.json"
#: Inside training_state/.
TRAINING_STEP = "training_step.json"
SAMPLER_STATE = "sampler_state.json"
SCHEDULER_STATE = "scheduler_state.json"
OPTIMIZER_STATE = "optimizer_state.safetensors"
OPTIMIZER_PARAM_GROUPS = "optimizer_param_groups.json"
#: Folders being built or deleted start with this; they are never a step.
TMP_PREFIX = ".tmp-"


def step_folder_name(step: int, total_steps: int) -> str:
    """LeRobot's name: the step zero-padded to max(6, digits of the total)."""
    return f"{step:0{max(6, len(str(total_steps)))}d}"


def rng_file_name(rank: int) -> str:
    """Process `rank`'s RNG file: LeRobot's name for rank 0, a suffixed one for the others."""
    return "rng_state.safetensors" if rank == 0 else f"rng_state_rank{rank}.safetensors"


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a published step folder (the last file a save writes is in place)."""
    return (Path(folder) / TRAINING_STATE / TRAINING_STEP).is_file() and (Path(folder) / PRETRAINED).is_dir()


def step_folders(checkpoints_dir: Path) -> list[Path]:
    """Complete step folders, oldest first."""
    if not Path(checkpoints_dir).is_dir():
        return []
    folders = [p for p in Path(checkpoints_dir).iterdir() if p.name.isdigit() and not p.is_symlink() and p.is_dir()]
    return sorted((p for p in folders if is_complete(p)), key=lambda p: int(p.name))


def latest(checkpoints_dir: Path) -> Path | None:
    """The highest complete step folder, or None."""
    folders = step_folders(checkpoints_dir)
    return folders[-1] if folders else None


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file, or a one-line error naming it when it is missing or corrupt."""
    if not Path(path).is_file():
        raise UserError(f"{path} is missing: that checkpoint is incomplete; resume from another step")
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt (not JSON: {err}); delete that checkpoint folder or resume from another step") from None
