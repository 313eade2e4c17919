"""How a run's processes hold the model: `Replicated` (one process, or DDP: each holds all of
it) or `Sharded` (FSDP2: parameters, gradients and optimizer state split over the processes).

The training loop holds one `Strategy` (`make(cfg.distributed.strategy)`) and asks it at the
four points where the two differ: before the optimizer exists (`prepare`), after it and any
resume (`wrap`), when a checkpoint is written (`checkpoint_model`) and when the main process
evaluates alone (`evaluation_model`). A strategy joins by subclassing and registering in
`STRATEGIES`; `distributed.strategy` accepts its name and the test matrix runs it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from robotrain.errors import UserError

log = logging.getLogger("robotrain")

#: What writes a policy's pretrained_model/ folder: (folder, full state dict or None) -> None.
Writer = Callable[..., None]


class Strategy:
    """The points where strategies differ; see `Replicated` and `Sharded`."""

    name: str

    def prepare(self, policy, accelerator):
        """The policy as the optimizer must see it."""
        raise NotImplementedError

    def wrap(self, policy, optimizer, accelerator):
        """(policy, optimizer) ready for training, after any resume has loaded into them."""
        raise NotImplementedError

    def load_sharded_state(self, policy, optimizer, checkpoint_dir: Path) -> bool:
        """Load the checkpoint's sharded model and optimizer state (FSDP's `training_state/dcp/`,
        resharded onto this world) if it has one; returns whether it had. Every process calls it."""
        from robotrain import fsdp

        folder = _sharded_state(checkpoint_dir)
        if not folder.is_dir():
            return False
        fsdp.load_sharded(policy, optimizer, folder)
        return True

    def checkpoint_model(self, model, optimizer, writer: Writer, stage: Callable[[], Path]):
        """What the main process writes for the model: (pretrained_model writer, the optimizer to
        save as safetensors or None, whether the step folder was staged). Every process calls it;
        `stage()` (every process calls it, or none) makes the staging step folder and returns it."""
        raise NotImplementedError

    def evaluation_model(self, model, is_main: bool):
        """The model the main process evaluates alone (None on the others); every process calls it."""
        raise NotImplementedError


class Replicated(Strategy):
    """One process, or DDP through accelerate: every process holds the whole model. A sharded
    checkpoint resumes here too (torch.distributed.checkpoint loads it into a whole model)."""

    name = "ddp"

    def prepare(self, policy, accelerator):
        return policy

    def wrap(self, policy, optimizer, accelerator):
        return accelerator.prepare(policy, optimizer)

    def checkpoint_model(self, model, optimizer, writer: Writer, stage: Callable[[], Path]):
        return writer, optimizer, False

    def evaluation_model(self, model, is_main: bool):
        return model if is_main else None


class Sharded(Strategy):
    """FSDP2: each process holds a shard; checkpoints hold the shards and the consolidated model."""

    name = "fsdp"

    def prepare(self, policy, accelerator):
        from robotrain import fsdp

        fsdp.shard(policy.to(accelerator.device), accelerator.device)
        log.info("FSDP: %d of %d parameter tensors sharded as DTensors over %d processes",
                 fsdp.sharded_count(policy), len(list(policy.parameters())), accelerator.num_processes)
        return policy

    def wrap(self, policy, optimizer, accelerator):
        return policy, optimizer  # sharded already; accelerate would wrap it in DDP

    def load_sharded_state(self, policy, optimizer, checkpoint_dir: Path) -> bool:
        if not _sharded_state(checkpoint_dir).is_dir():
            raise UserError(f"{checkpoint_dir} was saved without FSDP; resume it with distributed.strategy=ddp")
        return super().load_sharded_state(policy, optimizer, checkpoint_dir)

    def checkpoint_model(self, model, optimizer, writer: Writer, stage: Callable[[], Path]):
        from functools import partial

        from robotrain import checkpoint_layout as layout, fsdp

        full = fsdp.full_state_dict(model)
        staging = stage()  # every process writes its shard there, then the main process publishes it
        fsdp.save_sharded(model, optimizer, staging / layout.TRAINING_STATE / fsdp.DCP_FOLDER)
        return partial(writer, state_dict=full), None, True

    def evaluation_model(self, model, is_main: bool):
        from robotrain import fsdp

        full = fsdp.full_state_dict(model)  # every process gathers; the main one evaluates a copy
        return fsdp.unsharded_copy(model, full) if is_main else None


def _sharded_state(checkpoint_dir: Path) -> Path:
    """Where a checkpoint keeps FSDP's sharded model and optimizer state."""
    from robotrain import checkpoint_layout as layout, fsdp

    return Path(checkpoint_dir) / layout.TRAINING_STATE / fsdp.DCP_FOLDER


#: `distributed.strategy` values.
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Replicated, Sharded)}


def make(name: str) -> Strategy:
    return STRATEGIES[name]()
