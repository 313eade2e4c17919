"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from robotrain.config import OptimConfig, SchedulerConfig


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(
        trainable, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay (or flat), as a multiplier of the peak lr.

    The multiplier depends on `total_steps`, so a resumed run keeps the same schedule
    only if it keeps `steps`; raising `steps` on resume stretches the remaining decay."""
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
