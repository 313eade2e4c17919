"""A small MLP policy: state + pooled image features -> an action chunk.

Meant as the fast default: it learns the embedded reach task on a laptop CPU in well
under a minute, and exercises everything the big policies do (normalization, chunking,
checkpoints) without their cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robotrain import global_batch
from robotrain.errors import UserError
from robotrain.policies.base import Policy, PolicyConfig


@dataclass
class MLPConfig(PolicyConfig):
    """The MLP policy."""

    type: str = "mlp"
    """Policy type."""
    hidden_dim: int = 256
    """Width of the hidden layers."""
    num_layers: int = 2
    """Number of hidden layers."""
    image_pool: int = 8
    """Images are average-pooled to image_pool x image_pool before the MLP."""
    dropout: float = 0.0
    """Dropout after each hidden layer."""
    loss: str = "l1"
    """Regression loss on normalized actions: l1 or mse."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_dim <= 0 or self.num_layers <= 0 or self.image_pool <= 0:
            raise UserError("policy.hidden_dim, policy.num_layers and policy.image_pool must be > 0")
        if self.loss not in ("l1", "mse"):
            raise UserError(f"policy.loss must be 'l1' or 'mse', got {self.loss!r}")


class MLPPolicy(Policy):
    name = "mlp"
    config_class = MLPConfig

    def __init__(self, config: MLPConfig, stats):
        super().__init__(config, stats)
        inputs = config.input_features
        self.image_keys = list(config.image_features)
        self.vector_keys = [k for k, ft in inputs.items() if ft["type"] in ("STATE", "ENV")]
        self.action_dim = config.output_features["action"]["shape"][0]
        in_dim = sum(math.prod(inputs[k]["shape"]) for k in self.vector_keys)
        in_dim += sum(inputs[k]["shape"][0] * config.image_pool**2 for k in self.image_keys)
        layers: list[nn.Module] = []
        for _ in range(config.num_layers):
            layers += [nn.Linear(in_dim, config.hidden_dim), nn.GELU(), nn.Dropout(config.dropout)]
            in_dim = config.hidden_dim
        layers.append(nn.Linear(in_dim, config.chunk_size * self.action_dim))
        self.net = nn.Sequential(*layers)

    def _features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [batch[k].flatten(1) for k in self.vector_keys]
        pool = self.config.image_pool
        parts += [F.adaptive_avg_pool2d(batch[k], pool).flatten(1) for k in self.image_keys]
        return torch.cat(parts, dim=1)

    def predict_chunk(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.net(self._features(batch))
        return out.view(-1, self.config.chunk_size, self.action_dim)

    def compute_loss(self, batch):
        pred = self.predict_chunk(batch)
        target = batch["action"]
        loss_fn = F.l1_loss if self.config.loss == "l1" else F.mse_loss
        per_elem = loss_fn(pred, target, reduction="none")
        # Targets past the episode end are padding copies of the last frame: ignore them.
        valid = ~batch["action_is_pad"].unsqueeze(-1)
        return global_batch.masked_mean(per_elem, valid), self._per_sample_loss(per_elem, valid)
