"""Real checkpoints of a tiny model, written and read by `robotrain.checkpoint.CheckpointManager`
with the parts a training run registers, without a training run (Hub and kill -9 tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from robotrain import checkpoint, checkpoint_layout as layout
from robotrain.data.sampler import DataPosition, EpisodeAwareSampler


class Weights(checkpoint.Part):
    """pretrained_model/: config.json (with `extra` in it), model.safetensors, train_config.json."""

    def __init__(self, model: torch.nn.Module, train_config: dict, extra: dict | None = None):
        self.model, self.train_config, self.extra = model, train_config, extra or {}

    def state_dict(self) -> dict:
        return {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}

    def write(self, folder: Path, state: dict) -> None:
        pretrained = folder / layout.PRETRAINED
        (pretrained / "config.json").write_text(json.dumps({"type": "mlp", **self.extra}))
        save_file(state, str(pretrained / "model.safetensors"))
        (pretrained / layout.TRAIN_CONFIG).write_text(json.dumps(self.train_config))

    def read(self, folder: Path) -> dict:
        return checkpoint.load_safetensors(folder / layout.PRETRAINED / "model.safetensors")

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class Tiny:
    """A linear model, its AdamW and schedule, and a manager for them in `checkpoints_dir`."""

    def __init__(self, checkpoints_dir: Path, *, size: int = 2, total_steps: int = 30, train_config: dict | None = None,
                 extra: dict | None = None):
        self.model = torch.nn.Linear(size, size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.weights = Weights(self.model, train_config or {}, extra)
        self.position = DataPosition(EpisodeAwareSampler([0], [100], seed=0), batch_size=2)
        self.manager = checkpoint.CheckpointManager(checkpoints_dir, total_steps, self.position, fsync=False)
        self.manager.register({
            "model": self.weights,
            "optimizer": checkpoint.OptimizerState(self.optimizer),
            "scheduler": checkpoint.Json(self.scheduler, f"{layout.TRAINING_STATE}/{layout.SCHEDULER_STATE}"),
            "rng": checkpoint.RngStates(checkpoint.World()),
        })

    def train_step(self) -> None:
        self.model(torch.ones(1, self.model.in_features)).sum().backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
