"""An exponential moving average of the trained weights (`ema.enabled=true`).

After every optimizer step each trained parameter's average moves toward it:

    average = decay_t * average + (1 - decay_t) * weight
    decay_t = min(ema.decay, (1 + n) / (10 + n))    with ema.warmup (n: optimizer steps before this one)
    decay_t = ema.decay                             without

The warm-up is the ramp Diffusion Policy's EMA uses in its TensorFlow form (a young average
follows the weights closely, an old one with `decay`); it depends only on the step, so a
resumed run continues it without extra state. Only trained parameters are averaged: under
PEFT the adapter's, under FSDP each process averages its own shards.

In a checkpoint (`EmaState`, a checkpoint part): training_state/ema_state.safetensors holds the
averages, consolidated, as `ema.<parameter name>`. With `ema.for_eval` (the default) the run
evaluates and publishes the averages — pretrained_model/ and the Hub's final model hold them —
and the raw weights training continues from are in that file too, as `raw.<parameter name>`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from robotrain import checkpoint_layout as layout
from robotrain.checkpoint import Part, load_safetensors
from robotrain.errors import UserError

#: Where the averages (and, with for_eval, the raw weights) live in a checkpoint.
STATE_FILE = "ema_state.safetensors"


class Ema:
    """The averages of `model`'s trained parameters."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            self.averages = {name: p.detach().clone() for name, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.decay_at(step)
        for name, param in self.params.items():
            self.averages[name].mul_(decay).add_(param.detach(), alpha=1 - decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The model holds the averages inside (every process enters it together under FSDP)."""
        raw = {name: param.detach().clone() for name, param in self.params.items()}
        for name, param in self.params.items():
            param.copy_(self.averages[name])
        try:
            yield
        finally:
            for name, param in self.params.items():
                param.copy_(raw[name])


class EmaState(Part):
    """`Ema` as a checkpoint part; `raw=True` (ema.for_eval) also keeps the raw weights, since
    pretrained_model/ then holds the averages."""

    def __init__(self, ema: Ema, raw: bool):
        self.ema, self.raw = ema, raw

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{name}": _whole(tensor) for name, tensor in self.ema.averages.items()}
        if self.raw:
            state.update({f"raw.{name}": _whole(param.detach()) for name, param in self.ema.params.items()})
        return state

    def write(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        save_file(state, str(folder / layout.TRAINING_STATE / STATE_FILE))

    def read(self, folder: Path) -> dict[str, torch.Tensor]:
        path = folder / layout.TRAINING_STATE / STATE_FILE
        if not path.is_file():
            raise UserError(f"{folder} has no {STATE_FILE}: it was saved without ema.enabled; resume it with "
                            "ema.enabled=false (or resume.allow_changes=true to start the average afresh)")
        return load_safetensors(path)

    def check(self, state: dict[str, torch.Tensor]) -> None:
        wanted = {f"ema.{name}" for name in self.ema.params} | ({f"raw.{n}" for n in self.ema.params} if self.raw else set())
        if not wanted <= set(state):
            missing = sorted(wanted - set(state))
            raise UserError(f"the checkpoint's {STATE_FILE} lacks {missing[:3]} ({len(missing)} tensors): it averaged "
                            "other parameters; resume with the policy and peft settings it was trained with")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, param in self.ema.params.items():
            self.ema.averages[name].copy_(_like(state[f"ema.{name}"], param))
            if self.raw:  # pretrained_model/ held the averages: training continues from these
                param.copy_(_like(state[f"raw.{name}"], param))


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor on the CPU (an FSDP shard is gathered: every process calls this)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous().clone()


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` as `param` holds it: on its device, and sharded as it is under FSDP."""
    full = full.to(device=param.device, dtype=param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, param.device_mesh, param.placements)
    return full
