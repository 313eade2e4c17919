"""A run's checkpoints: its stateful parts, saved and loaded together, atomically, in LeRobot's
layout (`robotrain.checkpoint_layout`).

    manager = CheckpointManager(run_dir / "checkpoints", total_steps, position, world)
    manager.register(parallel.checkpoint_parts(model, optimizer, ...))   # model (+ shards), optimizer
    manager.register({"scheduler": Json(scheduler, "training_state/scheduler_state.json"), ...})
    manager.load(folder)      # resume: every part's files read and checked, then each part loaded
    manager.save(step)        # every process; the main process publishes the step folder

A part (`Part`) is a run's stateful object — it has `state_dict()` / `load_state_dict()` — and
where that state lives in a step folder (`write` / `read`). The data position
(`robotrain.data.sampler.DataPosition`) is the one part every run has: it knows the step.
Adding a part (EMA weights, say) means writing its `Part` and registering it; nothing here
changes.

A save builds the whole folder under a hidden temporary name (`staging_path`, the same on
every process, so that sharded state can be written into it by each), flushes it (fsync),
renames it to its step and then swaps the `last` symlink. A crash at any instant leaves every
existing step folder intact and never a half-written folder with a step's name;
`checkpoint_layout.latest` picks the highest complete step folder.

Only safetensors and JSON are ever read back: loading a checkpoint runs no pickle.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robotrain.checkpoint_layout import (
    LAST, OPTIMIZER_PARAM_GROUPS, OPTIMIZER_STATE, PRETRAINED, SAMPLER_STATE, TMP_PREFIX, TRAINING_STATE,
    TRAINING_STEP, read_json, rng_file_name, step_folder_name, step_folders,
)
from robotrain.errors import UserError
from robotrain.fsutil import fsync_dir, fsync_tree

log = logging.getLogger("robotrain")


class World:
    """The processes of a run, as a checkpoint sees them: one process unless an `Accelerator`
    says otherwise (tests and tools save without one)."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.size = accelerator.num_processes if accelerator is not None else 1
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order, on every process."""
        if self.size == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])


class Part:
    """A stateful piece of a run and where its state lives in a step folder.

    `state_dict` runs on every process (it may gather); `write` on the main process only,
    unless `collective` (sharded state: every process writes its shard). `read` runs on every
    process and raises a one-line `UserError` for a missing or corrupt file; `check` refuses
    a state that does not fit the live object; both run for every part before any part's
    `load_state_dict`, so a bad checkpoint changes nothing."""

    collective = False

    def state_dict(self) -> Any:
        raise NotImplementedError

    def load_state_dict(self, state: Any) -> None:
        raise NotImplementedError

    def write(self, folder: Path, state: Any) -> None:
        raise NotImplementedError

    def read(self, folder: Path) -> Any:
        raise NotImplementedError

    def check(self, state: Any) -> None:
        """Raise a `UserError` if `state` cannot be loaded into the live object."""


class JsonFiles(Part):
    """An object whose `state_dict()` maps names to JSON data, one file per name:
    `files` maps each name to its path in the step folder. `optional` files may be absent
    (state None: nothing written; absent on load: None)."""

    def __init__(self, obj, files: Mapping[str, str], optional: bool = False):
        self.obj, self.files, self.optional = obj, dict(files), optional

    def state_dict(self) -> dict[str, Any]:
        return self._filed(self.obj.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obj.load_state_dict(self._own(state))

    def check(self, state: dict[str, Any]) -> None:
        if hasattr(self.obj, "check_state_dict"):
            self.obj.check_state_dict(self._own(state))

    def _filed(self, own: Any) -> dict[str, Any]:
        """The object's state as {name: what its file holds}."""
        return own

    def _own(self, filed: dict[str, Any]) -> Any:
        """What the object's `load_state_dict` takes, from {name: what its file holds}."""
        return filed

    def write(self, folder: Path, state: dict[str, Any]) -> None:
        for name, path in self.files.items():
            if state.get(name) is not None or not self.optional:
                _write_json(folder / path, state[name])

    def read(self, folder: Path) -> dict[str, Any]:
        return {name: None if self.optional and not (folder / path).is_file() else read_json(folder / path)
                for name, path in self.files.items()}


class Json(JsonFiles):
    """An object whose whole `state_dict()` is one JSON file (a scheduler's, say)."""

    def __init__(self, obj, path: str, optional: bool = False):
        super().__init__(obj, {"state": path}, optional)

    def _filed(self, own: Any) -> dict[str, Any]:
        return {"state": own}

    def _own(self, filed: dict[str, Any]) -> Any:
        return filed["state"]


class OptimizerState(Part):
    """An optimizer in LeRobot's form: tensors flattened as `state/<param>/<name>` in
    optimizer_state.safetensors, param groups in optimizer_param_groups.json."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def write(self, folder: Path, state: dict) -> None:
        flat = {
            f"state/{idx}/{name}": value.detach().contiguous() if torch.is_tensor(value) else torch.tensor(value)
            for idx, per_param in state["state"].items()
            for name, value in per_param.items()
        }
        save_file(flat, str(folder / TRAINING_STATE / OPTIMIZER_STATE))
        _write_json(folder / TRAINING_STATE / OPTIMIZER_PARAM_GROUPS, state["param_groups"])

    def read(self, folder: Path) -> dict:
        flat = load_safetensors(folder / TRAINING_STATE / OPTIMIZER_STATE)
        groups = read_json(folder / TRAINING_STATE / OPTIMIZER_PARAM_GROUPS)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = tensor
        return {"state": state, "param_groups": groups}

    def check(self, state: dict) -> None:
        groups = state["param_groups"]
        saved = sum(len(g["params"]) for g in groups)
        live = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if saved != live or len(groups) != len(self.optimizer.param_groups):
            raise UserError(
                f"checkpoint optimizer covers {saved} parameters in {len(groups)} groups but the model has "
                f"{live} in {len(self.optimizer.param_groups)}; resume with the policy config the checkpoint was trained with"
            )

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class RngStates(Part):
    """Every process's Python, NumPy and torch RNG: rank 0's in LeRobot's rng_state.safetensors,
    rank r's in rng_state_rank<r>.safetensors. A process the checkpoint had no state for (the
    run grew) keeps its fresh RNG, with a warning."""

    def __init__(self, world: World):
        self.world = world

    def state_dict(self) -> list[dict[str, torch.Tensor]]:
        return self.world.gather(rng_state())

    def write(self, folder: Path, state: list[dict[str, torch.Tensor]]) -> None:
        for rank, tensors in enumerate(state):
            save_file(tensors, str(folder / TRAINING_STATE / rng_file_name(rank)))

    def read(self, folder: Path) -> tuple[dict[str, torch.Tensor] | None, int]:
        """(this process's state or None, how many processes the checkpoint has states for)."""
        path = folder / TRAINING_STATE / rng_file_name(self.world.rank)
        saved = len(list((folder / TRAINING_STATE).glob("rng_state*.safetensors")))
        return (load_safetensors(path) if self.world.rank == 0 or path.is_file() else None), saved

    def load_state_dict(self, state: tuple[dict[str, torch.Tensor] | None, int]) -> None:
        tensors, saved = state
        if tensors is None:
            log.warning("the checkpoint has no RNG state for process %d (it had %d processes): that process's "
                        "random draws (dropout, noise) start fresh", self.world.rank, saved)
            return
        set_rng_state(tensors)


class CheckpointManager:
    """Saves and loads every registered part of a run; see the module docstring."""

    def __init__(self, checkpoints_dir: Path, total_steps: int, position, world: World | None = None, *,
                 fsync: bool = True, keep_last: int = 0):
        """`position`: the run's `DataPosition` (its step and sample position), the part "data"."""
        self.dir, self.total_steps, self.position = Path(checkpoints_dir), total_steps, position
        self.world, self.fsync, self.keep_last = world or World(), fsync, keep_last
        data = {"training_step": f"{TRAINING_STATE}/{TRAINING_STEP}", "sampler": f"{TRAINING_STATE}/{SAMPLER_STATE}"}
        self.parts: dict[str, Part] = {"data": JsonFiles(position, data)}
        self.last: Path | None = None

    def register(self, parts: Mapping[str, Part]) -> None:
        for name, part in parts.items():
            if name in self.parts:
                raise ValueError(f"checkpoint part {name!r} is registered already")
            self.parts[name] = part

    def load(self, folder: Path) -> None:
        """Resume every part from step folder `folder` (every process)."""
        folder = Path(folder)
        states = {name: part.read(folder) for name, part in self.parts.items()}
        for name, part in self.parts.items():
            part.check(states[name])
        for name, part in self.parts.items():
            part.load_state_dict(states[name])
        log.info("resumed from %s at step %d (sample %d)", folder, self.position.step, self.position.sample_position)

    def save(self, step: int, protect: frozenset[str] = frozenset()) -> Path | None:
        """Checkpoint `step` (every process calls it); returns the published folder on the main
        process, None on the others. Old step folders beyond `keep_last` are pruned, except
        those named in `protect` (still waiting to be uploaded, say)."""
        self.position.step = step
        states = {name: part.state_dict() for name, part in self.parts.items()}
        staging = staging_path(self.dir, step, self.total_steps)
        if self.world.is_main:
            prepare_staging(staging)
        self.world.barrier()
        for name, part in self.parts.items():
            if part.collective:
                part.write(staging, states[name])
        if self.world.is_main:
            for name, part in self.parts.items():
                if not part.collective:
                    part.write(staging, states[name])
            self.last = publish(staging, self.dir / step_folder_name(step, self.total_steps), self.fsync)
            prune(self.dir, self.keep_last, protect)
        self.world.barrier()  # nobody trains on while the checkpoint is written
        return self.last if self.world.is_main else None


    def save_weights(self, folder: Path) -> Path | None:
        """Write the model part alone (`<folder>/pretrained_model/`, every process calls it), for
        weights no checkpoint holds: the untrained policy a run evaluates before its first step.
        Returns `folder` on the main process, None on the others."""
        part = self.parts["model"]
        state = part.state_dict()  # gathered from every process's shard under FSDP
        if self.world.is_main:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            part.write(folder, state)
        self.world.barrier()
        return folder if self.world.is_main else None


# -- the step folder on disk ------------------------------------------------------------


def staging_path(checkpoints_dir: Path, step: int, total_steps: int) -> Path:
    """Where checkpoint `step` is built before it is published: the same path on every process,
    so that all of them can write their shards of a sharded (FSDP) checkpoint into it."""
    return Path(checkpoints_dir) / f"{TMP_PREFIX}{step_folder_name(step, total_steps)}"


def prepare_staging(staging: Path) -> None:
    """Clear leftovers of killed saves and create `staging` (main process, before the shards)."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(staging.parent)
    (staging / TRAINING_STATE).mkdir(parents=True)
    (staging / PRETRAINED).mkdir()


def publish(staging: Path, final: Path, fsync: bool = True) -> Path:
    """Flush `staging`, rename it to `final` and point `last` at it; returns `final`."""
    if fsync:
        fsync_tree(staging)
    # A folder with this step's name can exist only if an earlier run reached this step and
    # crashed before it could move on; the new one replaces it.
    if final.exists():
        doomed = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.rename(final, doomed)
        os.rename(staging, final)
        shutil.rmtree(doomed)
    else:
        os.rename(staging, final)
    if fsync:
        fsync_dir(final.parent)
    _point_last(final.parent, final.name, fsync)
    return final


def _point_last(checkpoints_dir: Path, name: str, fsync: bool) -> None:
    link = checkpoints_dir / LAST
    tmp_link = checkpoints_dir / f"{TMP_PREFIX}{LAST}-{os.getpid()}"
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


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))


# -- reading ------------------------------------------------------------------------------


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
    """Load `model.safetensors` strictly, after the model's own key fixes for files LeRobot
    loads (`upgrade_state_dict`, if it has one); a mismatch is a one-line error, not a traceback."""
    state = load_safetensors(Path(pretrained_dir) / "model.safetensors")
    upgrade = getattr(model, "upgrade_state_dict", None)
    load_weights_strictly(model, upgrade(state) if upgrade is not None else state, pretrained_dir)


def load_weights_strictly(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"the weights in {source} do not fit this policy ({detail}); "
            "resume with the policy config the checkpoint was trained with"
        ) from None


# -- RNG ----------------------------------------------------------------------------------


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
