"""What a policy computes from the global batch, not from this process's share of it.

DDP and FSDP average the processes' gradients. That average is the gradient of the global
batch's loss only if each process's loss is its share of one global quantity. Two things in a
policy's loss would otherwise depend on how the global batch is split, and come from here:

- Training noise (diffusion noise and timesteps, flow-matching noise and times, ACT's latent
  sample, a random crop offset). Inside `step(...)`, which the training loop opens around each
  forward pass, every process seeds one generator from (seed, step), draws the numbers for the
  whole global batch and keeps its own rows: process `r` of `n`, with `b` samples each, keeps
  rows `[r*b, (r+1)*b)`, the rows its samples hold in the global batch (`GlobalBatchSampler`
  cuts it the same way). A resumed run draws the same numbers without saved state: they are a
  function of (seed, step).
- Masked means (a loss averaged over the action steps that are not padding): the count of
  valid entries is summed over processes (`masked_mean`).

So a single process with a global batch of 8, two processes with 4 each, and one process
accumulating two micro-batches of 4 compute the same update, up to float reduction order (for
masked means under accumulation, through the weights `masked_mean` records). Outside `step(...)` (inference, a user calling a loss by
hand) draws come from the global torch RNG, as in LeRobot, and means are local. Dropout is not
covered: each process keeps its own RNG for it (seeded per process by the training loop).

Evaluation has the same need across episodes: inside `per_sample(generators)` row `i` of every
draw comes from `generators[i]`, so an episode's noise (diffusion, flow matching) is a function of
its own seed, whatever the other episodes evaluated beside it in one batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class _Step:
    seed: int
    rank: int
    """This micro-batch's place among all of the step's: `micro * num_processes + process rank`."""
    shares: int
    """Micro-batches in the step, over all processes: `micro_steps * num_processes`."""
    num_processes: int
    generators: dict[torch.device, torch.Generator] = field(default_factory=dict)
    weight: torch.Tensor | float = 1.0
    """What this micro-batch weighs in the step's loss: the global count of its first masked mean
    (see `masked_mean`), else 1."""

    def generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device not in self.generators:
            self.generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self.generators[device]


@dataclass
class _PerSample:
    generators: list[torch.Generator]
    """One CPU generator per row of the batch."""


_current: ContextVar[_Step | _PerSample | None] = ContextVar("robotrain_global_batch_step", default=None)


@contextmanager
def step(seed: int, step: int, rank: int = 0, num_processes: int = 1, micro: int = 0,
         micro_steps: int = 1) -> Iterator[_Step]:
    """Draws inside come from (seed, step), the same rows for a sample on any number of processes
    and micro-batches: micro-batch `micro` of `micro_steps` (gradient accumulation) on process
    `rank` holds rows `[(micro * num_processes + rank) * b, ... + b)` of the step's global batch."""
    mixed = int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1)
    share = _Step(mixed, micro * num_processes + rank, micro_steps * num_processes, num_processes)
    token = _current.set(share)
    try:
        yield share
    finally:
        _current.reset(token)


@contextmanager
def per_sample(generators: list[torch.Generator]) -> Iterator[None]:
    """Draws inside take row `i` from `generators[i]` (CPU generators; the rows are moved to the
    device), so that a row's numbers do not depend on the batch it is drawn in."""
    token = _current.set(_PerSample(list(generators)))
    try:
        yield
    finally:
        _current.reset(token)


def sample_generators() -> list[torch.Generator] | None:
    """The per-row generators of the enclosing `per_sample`, else None: for a library that draws
    itself but takes one generator per row (diffusers' schedulers)."""
    current = _current.get()
    return current.generators if isinstance(current, _PerSample) else None


def randn(shape: tuple[int, ...], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal samples; `shape[0]` is this process's batch."""
    return _draw(torch.randn, shape, device, dtype=dtype)


def rand(shape: tuple[int, ...], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform [0, 1) samples; `shape[0]` is this process's batch."""
    return _draw(torch.rand, shape, device, dtype=dtype)


def randint(high: int, shape: tuple[int, ...], device) -> torch.Tensor:
    """Integers in [0, high); `shape[0]` is this process's batch."""
    return _draw(partial(torch.randint, 0, high), shape, device)


def beta(alpha: float, beta: float, size: int, device) -> torch.Tensor:
    """Beta(alpha, beta) samples (size,), drawn on the CPU as LeRobot's openpi policies draw them
    (`torch.distributions.Beta(...).sample`, the same numbers from the same global RNG state), then
    moved to `device`."""
    concentration = torch.tensor([alpha, beta], dtype=torch.float32)

    def sample(shape, generator=None, device=None):
        return torch._sample_dirichlet(concentration.expand(*shape, 2), generator=generator)[..., 0]

    return _draw(sample, (size,), "cpu").to(device)


def _draw(sample, shape: tuple[int, ...], device, **kwargs) -> torch.Tensor:
    current = _current.get()
    if current is None:
        return sample(shape, device=device, **kwargs)
    if isinstance(current, _PerSample):
        if shape[0] != len(current.generators):
            raise ValueError(f"a batch of {shape[0]} rows drawn with {len(current.generators)} generators")
        rows = [sample((1, *shape[1:]), generator=g, **kwargs) for g in current.generators]
        return torch.cat(rows).to(device)
    full = sample((shape[0] * current.shares, *shape[1:]), generator=current.generator(device),
                  device=device, **kwargs)
    return full[current.rank * shape[0]: (current.rank + 1) * shape[0]]


def shared_randint(high: int) -> int:
    """One integer in [0, high) for the whole global batch (e.g. a crop offset for every sample)."""
    current = _current.get()
    generator = current.generator(torch.device("cpu")) if isinstance(current, _Step) else None
    return int(torch.randint(0, high, (1,), generator=generator).item())


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the entries `valid` (broadcast to its shape) marks, over the global
    batch: inside `step(...)` each process returns its part of the global sum over the global
    count, times the number of processes, so that the processes' average is the global mean.
    With gradient accumulation each micro-batch's mean is over its own global count, which it
    records as its weight: the training loop weighs the micro-batches' gradients by their counts,
    so that the step's gradient is that of the whole batch's mean (for a loss that is one masked
    mean; the first one a forward computes sets the weight)."""
    valid = valid.expand_as(values)
    total, count = (values * valid).sum(), valid.sum()
    current = _current.get()
    if not isinstance(current, _Step):
        return total / count.clamp(min=1)
    if current.num_processes > 1:
        count = count.detach().clone()
        dist.all_reduce(count)
    if isinstance(current.weight, float):
        current.weight = count.detach()
    if current.num_processes == 1:
        return total / count.clamp(min=1)
    return total / count.clamp(min=1) * current.num_processes
