"""Mixed precision: the policy's forward pass under autocast, weights and optimizer in float32.

    precision=fp32   everything in float32 (the default)
    precision=bf16   autocast to bfloat16 on CPU or GPU: matmuls and convolutions run in bf16,
                     reductions and the loss stay float32; no loss scaling is needed
    precision=fp16   autocast to float16 with dynamic loss scaling (a GPU only: CPU autocast has
                     no float16 matmuls worth having); the scaler's state is a checkpoint part

The autocast region is applied by the training loop around the forward pass itself, not by
`accelerator.prepare` (which FSDP runs bypass), so it takes effect under every strategy.
Parameters, gradients, optimizer state and checkpoints stay float32 (LeRobot's F32 layout).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from robotrain.config import PRECISIONS
from robotrain.errors import UserError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Where the fp16 loss scaler's state lives in a checkpoint.
SCALER_STATE = "grad_scaler.json"
#: Device types fp16 is offered on. CPU autocast does run float16, slowly and with no gain over
#: bf16, so CPU users are sent to bf16; the test suite adds "cpu" here to run the loss-scaling
#: path (scaled backward, unscale before clipping, the scaler's checkpoint part).
FP16_DEVICES: tuple[str, ...] = ("cuda",)


class Precision:
    """Autocast and (fp16) loss scaling for one run on `device`."""

    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        if name == "fp16" and device.type not in FP16_DEVICES:
            raise UserError("precision=fp16 needs a GPU (float16 autocast with loss scaling is a CUDA feature); "
                            "on CPU use precision=bf16")
        self.name, self.device = name, device
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward pass's precision."""
        if self.name == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=_DTYPES[self.name]):
            yield

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """What to call backward on: the loss, scaled under fp16."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring fp16 gradients back to their true scale (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; under fp16 skipped when gradients overflowed, and the scale updated."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint without a loss scale (saved under fp32/bf16) starts from the initial one."""
        if state is not None:
            self.scaler.load_state_dict(state)
