"""How a run's processes hold the model: `Replicated` (one process, or DDP: each holds all of
it) or `Sharded` (FSDP2: parameters, gradients and optimizer state split over the processes).

The training loop holds one `Strategy` (`make(cfg.distributed.strategy)`) and asks it at the
points where the two differ: before the optimizer exists (`prepare`), after it and any resume
(`wrap`), whether a micro-batch's gradients are reduced (`syncing`, gradient accumulation),
and what a checkpoint holds of the model and optimizer (`checkpoint_parts`; evaluations read
checkpoints, in a process of their own). A strategy joins by subclassing and registering
in `STRATEGIES`; `distributed.strategy` accepts its name and the test matrix runs it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from robotrain.checkpoint import Part


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

    def syncing(self, policy, accelerator, sync: bool):
        """A context for one micro-batch's forward and backward: `sync=False` keeps its gradients
        local (accumulated, not yet reduced across processes); the step's last micro-batch syncs."""
        raise NotImplementedError

    def checkpoint_parts(self, model, optimizer, train_config: dict, published=None) -> dict[str, Part]:
        """The checkpoint parts holding the model (full or adapter, with `train_config`) and the
        optimizer, as this strategy saves and loads them (see `robotrain.checkpoint`);
        `published`: see `robotrain.model_state.ModelWeights`."""
        raise NotImplementedError


class Replicated(Strategy):
    """One process, or DDP through accelerate: every process holds the whole model. A sharded
    checkpoint resumes here too (torch.distributed.checkpoint loads it into a whole model)."""

    name = "ddp"

    def prepare(self, policy, accelerator):
        return policy

    def wrap(self, policy, optimizer, accelerator):
        return accelerator.prepare(policy, optimizer)

    def syncing(self, policy, accelerator, sync: bool):
        return contextlib.nullcontext() if sync else accelerator.no_sync(policy)  # DDP's no_sync

    def checkpoint_parts(self, model, optimizer, train_config: dict, published=None) -> dict[str, Part]:
        from robotrain.model_state import ModelWeights, WholeOptimizer

        return {"model": ModelWeights(model, train_config, published=published),
                "optimizer": WholeOptimizer(model, optimizer)}


class Sharded(Strategy):
    """FSDP2: each process holds a shard; checkpoints hold the shards and the consolidated model."""

    name = "fsdp"

    def prepare(self, policy, accelerator):
        from robotrain import fsdp

        fsdp.shard(policy, accelerator.device)  # each unit moves to the device as it is sharded
        local, total = fsdp.parameter_bytes(policy)
        log.info("FSDP: %d of %d parameter tensors sharded as DTensors over %d processes; this process holds "
                 "%.2f of the %.2f MB of parameters", fsdp.sharded_count(policy), len(list(policy.parameters())),
                 accelerator.num_processes, local / 2**20, total / 2**20)
        return policy

    def wrap(self, policy, optimizer, accelerator):
        return policy, optimizer  # sharded already; accelerate would wrap it in DDP

    @contextlib.contextmanager
    def syncing(self, policy, accelerator, sync: bool):
        policy.set_requires_gradient_sync(sync)  # FSDP2: reduce-scatter the gradients or keep them
        yield

    def checkpoint_parts(self, model, optimizer, train_config: dict, published=None) -> dict[str, Part]:
        from robotrain import fsdp
        from robotrain.model_state import ModelWeights, ShardedState

        # The shards hold the model too: resuming loads it from them, resharded onto this world.
        return {"model": ModelWeights(model, train_config, gather=fsdp.full_state_dict, loads=False,
                                      published=published),
                "optimizer": ShardedState(model, optimizer)}


#: `distributed.strategy` values.
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Replicated, Sharded)}


def make(name: str) -> Strategy:
    return STRATEGIES[name]()
