"""The checkpoint parts that hold a policy and its optimizer (see `robotrain.checkpoint`), as
the strategies (`robotrain.strategy`) save and load them:

- `ModelWeights`: pretrained_model/ (the policy's files, or an adapter's, and train_config.json);
- `WholeOptimizer`: LeRobot's optimizer files, for a model every process holds whole; it also
  loads a sharded checkpoint's state (an FSDP run resumed on one process or under DDP);
- `ShardedState`: training_state/dcp/, FSDP's sharded model and optimizer state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from robotrain import checkpoint_layout as layout
from robotrain.checkpoint import OptimizerState, Part
from robotrain.errors import UserError


class ModelWeights(Part):
    """pretrained_model/: the policy's files (its weights, or an adapter's) and train_config.json.
    `gather` gives the consolidated weights (every process calls it); `loads=False` when another
    part (FSDP's shards) restores the weights on resume."""

    def __init__(self, model, train_config: dict, gather: Callable | None = None, loads: bool = True,
                 published: Callable | None = None):
        """`published`: a context in which the model holds the weights to publish (the EMA
        averages, `robotrain.ema`); the raw weights are then some other part's to keep."""
        self.model, self.train_config, self.loads, self.published = model, train_config, loads, published
        self.gather = gather or (lambda model: model.state_dict())

    def state_dict(self) -> dict:
        if self.published is None:
            return self.gather(self.model)
        with self.published():  # copies: the model holds its own weights again when this returns
            return {name: tensor.detach().clone() for name, tensor in self.gather(self.model).items()}

    def write(self, folder: Path, state: dict) -> None:
        from robotrain import peft

        peft.pretrained_writer(self.model)(folder / layout.PRETRAINED, state_dict=state)
        (folder / layout.PRETRAINED / layout.TRAIN_CONFIG).write_text(json.dumps(self.train_config, indent=2))

    def read(self, folder: Path) -> tuple[dict, Path] | None:
        """(the weights, the folder they came from, for messages); None when `loads` is off."""
        from robotrain import peft

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


class WholeOptimizer(OptimizerState):
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
    from robotrain import fsdp

    return Path(checkpoint_dir) / layout.TRAINING_STATE / fsdp.DCP_FOLDER
