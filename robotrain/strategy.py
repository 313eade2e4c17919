"""How a run's processes hold the model: `Replicated` (one process, or DDP: each holds all of
it) or `Sharded` (FSDP2: parameters, gradients and optimizer state split over the processes).

The training loop holds one `Strategy` (`make(cfg.distributed.strategy)`) and asks it at the
four points where the two differ: before the optimizer exists (`prepare`), after it and any
resume (`wrap`), what a checkpoint holds of the model and optimizer (`checkpoint_parts`) and
when the main process evaluates alone (`evaluation_model`). A strategy joins by subclassing and registering in
`STRATEGIES`; `distributed.strategy` accepts its name and the test matrix runs it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from robotrain.checkpoint import OptimizerState, Part
from robotrain.errors import UserError

log = logging.getLogger("robotrain")


class Strategy:
    """The points where strategies differ; see `Replicated` and `Sharded`."""

    name: str

    def prepare(self, policy, accelerator):
        """The policy as the optimizer must see it."""
        raise NotImplementedError

    def wrap(self, policy, optimizer, accelerator):
        """(policy, optimizer) ready for training, after any resume has loaded into them."""
        raise NotImplementedError

    def checkpoint_parts(self, model, optimizer, train_config: dict) -> dict[str, Part]:
        """The checkpoint parts holding the model (full or adapter, with `train_config`) and the
        optimizer, as this strategy saves and loads them (see `robotrain.checkpoint`)."""
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

    def checkpoint_parts(self, model, optimizer, train_config: dict) -> dict[str, Part]:
        return {"model": ModelWeights(model, train_config), "optimizer": _ReplicatedOptimizer(model, optimizer)}

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

    def checkpoint_parts(self, model, optimizer, train_config: dict) -> dict[str, Part]:
        from robotrain import fsdp

        # The shards hold the model too: resuming loads it from them, resharded onto this world.
        return {"model": ModelWeights(model, train_config, gather=fsdp.full_state_dict, loads=False),
                "optimizer": ShardedState(model, optimizer)}

    def evaluation_model(self, model, is_main: bool):
        from robotrain import fsdp

        full = fsdp.full_state_dict(model)  # every process gathers; the main one evaluates a copy
        return fsdp.unsharded_copy(model, full) if is_main else None


class ModelWeights(Part):
    """pretrained_model/: the policy's files (its weights, or an adapter's) and train_config.json.
    `gather` gives the consolidated weights (every process calls it); `loads=False` when another
    part (FSDP's shards) restores the weights on resume."""

    def __init__(self, model, train_config: dict, gather: Callable | None = None, loads: bool = True):
        self.model, self.train_config, self.loads = model, train_config, loads
        self.gather = gather or (lambda model: model.state_dict())

    def state_dict(self) -> dict:
        return self.gather(self.model)

    def write(self, folder: Path, state: dict) -> None:
        from robotrain import checkpoint_layout as layout, peft

        peft.pretrained_writer(self.model)(folder / layout.PRETRAINED, state_dict=state)
        (folder / layout.PRETRAINED / layout.TRAIN_CONFIG).write_text(json.dumps(self.train_config, indent=2))

    def read(self, folder: Path) -> tuple[dict, Path] | None:
        """(the weights, the folder they came from, for messages); None when `loads` is off."""
        from robotrain import checkpoint_layout as layout, peft

        if not self.loads:
            return None
        return peft.read_weights(self.model, folder / layout.PRETRAINED), folder / layout.PRETRAINED

    def load_state_dict(self, state: tuple[dict, Path] | None) -> None:
        from robotrain import peft

        if state is not None:
            peft.load_state(self.model, *state)


class ShardedState(Part):
    """training_state/dcp/: FSDP's sharded model and optimizer state, written by every process
    straight from its shards and resharded onto the resuming world by torch.distributed.checkpoint."""

    collective = True

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> None:
        return None  # torch.distributed.checkpoint reads the live shards when writing

    def write(self, folder: Path, state: None) -> None:
        from robotrain import fsdp

        fsdp.save_sharded(self.model, self.optimizer, _sharded_state(folder))

    def read(self, folder: Path) -> Path:
        from robotrain import fsdp

        if not _sharded_state(folder).is_dir():
            raise UserError(f"{folder} was saved without FSDP; resume it with distributed.strategy=ddp")
        fsdp.check_shards(_sharded_state(folder))
        return _sharded_state(folder)

    def load_state_dict(self, state: Path) -> None:
        from robotrain import fsdp

        fsdp.load_sharded(self.model, self.optimizer, state)


class _ReplicatedOptimizer(OptimizerState):
    """LeRobot's optimizer files; from a sharded checkpoint, its shards (model and optimizer),
    loaded whole: an FSDP run resumes on one process or under DDP."""

    def __init__(self, model, optimizer):
        super().__init__(optimizer)
        self.sharded = ShardedState(model, optimizer)

    def read(self, folder: Path):
        return self.sharded.read(folder) if _sharded_state(folder).is_dir() else super().read(folder)

    def check(self, state) -> None:
        if not isinstance(state, Path):
            super().check(state)

    def load_state_dict(self, state) -> None:
        if isinstance(state, Path):
            self.sharded.load_state_dict(state)
        else:
            super().load_state_dict(state)


def _sharded_state(checkpoint_dir: Path) -> Path:
    """Where a checkpoint keeps FSDP's sharded model and optimizer state."""
    from robotrain import checkpoint_layout as layout, fsdp

    return Path(checkpoint_dir) / layout.TRAINING_STATE / fsdp.DCP_FOLDER


#: `distributed.strategy` values.
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Replicated, Sharded)}


def make(name: str) -> Strategy:
    return STRATEGIES[name]()
