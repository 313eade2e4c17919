"""Image augmentation with LeRobot's names and defaults (`dataset.image_transforms`), in torch on
the training device, on the batch — no torchvision.

    dataset.image_transforms.enable=true              # LeRobot's six transforms, up to 3 per image
    dataset.image_transforms.max_num_transforms=2
    dataset.image_transforms.random_order=true
    dataset.image_transforms.tfs.affine.weight=0      # leave one out
    dataset.image_transforms.tfs.hue.kwargs.hue=[-0.1,0.1]

As in LeRobot, each camera image of a sample draws `max_num_transforms` of the transforms with
positive weight (without replacement, with probability proportional to the weights), applies
them in the order of `tfs` (or a random order), each with its parameter drawn uniformly from
its range; the frames of a camera's history get the same draw. Types: `ColorJitter` (one of
brightness, contrast, saturation, hue), `SharpnessJitter`, `RandomAffine` (degrees, translate;
nearest-pixel, zero fill), `Identity`.

Determinism: a sample's draws are a pure function of (seed, its global sample position,
camera), so a resumed run augments exactly as the uninterrupted one, any number of processes
augment a sample alike, and no RNG state is saved. Training batches only; evaluation sees
the camera as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from robotrain.errors import UserError

@dataclass
class _Transform:
    name: str
    weight: float
    draw: Callable[[torch.Generator], dict]
    apply: Callable[..., torch.Tensor]


class Augmentation:
    """The configured transforms, applied to a batch's camera frames (floats in [0, 1])."""

    def __init__(self, cfg, seed: int, camera_keys: Sequence[str]):
        self.seed, self.camera_keys = seed, list(camera_keys)
        self.random_order = cfg.random_order
        self.transforms = [_make(name, tf.type, tf.kwargs, tf.weight) for name, tf in cfg.tfs.items() if tf.weight > 0]
        self.count = min(cfg.max_num_transforms, len(self.transforms))
        self.weights = torch.tensor([t.weight for t in self.transforms], dtype=torch.float64)

    def __call__(self, batch: dict[str, Any], positions: Sequence[int]) -> dict[str, Any]:
        """`batch` with each camera's frames augmented; `positions`: each row's global sample position."""
        if self.count == 0:
            return batch
        out = dict(batch)
        for camera, key in enumerate(self.camera_keys):
            if key in batch:
                out[key] = torch.stack([self.augment(frames, self.generator(int(p), camera))
                                        for frames, p in zip(batch[key], positions)])
        return out

    def generator(self, position: int, camera: int) -> torch.Generator:
        mixed = np.random.SeedSequence([self.seed, position, camera]).generate_state(1, np.uint64)[0] >> 1
        return torch.Generator().manual_seed(int(mixed))

    def augment(self, frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One camera of one sample, (C, H, W) or (T, C, H, W): the same draw for every frame."""
        chosen = torch.multinomial(self.weights, self.count, replacement=False, generator=generator)
        order = chosen if self.random_order else chosen.sort().values
        for index in order.tolist():
            transform = self.transforms[index]
            frames = transform.apply(frames, **transform.draw(generator))
        return frames


def for_training(cfg, seed: int, camera_keys: Sequence[str], position, rank: int, preview_dir: Path | None):
    """What augments a training micro-batch on the device, `(batch, step, micro) -> batch`, or
    None when `cfg` (dataset.image_transforms) is off or there is no camera: each sample by its
    global position (`position`: the run's `DataPosition`), so that resumes and any split of
    the global batch augment it alike. With `preview_dir` (the main process's run dir) the
    first batch before and after is saved there as augmentations.png."""
    if not cfg.enable or not camera_keys:
        return None
    augment = Augmentation(cfg, seed, camera_keys)
    preview = [preview_dir]

    def apply(batch: dict, step: int, micro: int) -> dict:
        augmented = augment(batch, position.rows(step, micro, rank).tolist())
        if preview[0] is not None:
            save_preview(preview[0] / "augmentations.png", batch, augmented, camera_keys)
            preview[0] = None
        return augmented

    return apply


def _uniform(bounds: Sequence[float], generator: torch.Generator) -> float:
    low, high = float(bounds[0]), float(bounds[1])
    return low + (high - low) * torch.rand(1, generator=generator, dtype=torch.float64).item()


def _range(value, name: str, centered: bool = False) -> tuple[float, float]:
    """LeRobot's ranges: [low, high], or a single number v meaning [1 - v, 1 + v] (centered: [-v, v])."""
    if isinstance(value, (int, float)):
        v = float(value)
        return (-v, v) if centered else (max(0.0, 1.0 - v), 1.0 + v)
    if len(value) != 2 or float(value[0]) > float(value[1]):
        raise UserError(f"image transform {name}: expected [low, high], got {list(value)}")
    return float(value[0]), float(value[1])


def _make(name: str, type_: str, kwargs: dict[str, Any], weight: float) -> _Transform:
    """The transform `type_` (checked by robotrain.config) with its parameter ranges."""
    if type_ == "Identity":
        return _Transform(name, weight, lambda g: {}, lambda x: x)
    if type_ == "SharpnessJitter":
        bounds = _range(kwargs["sharpness"], name)
        return _Transform(name, weight, lambda g: {"factor": _uniform(bounds, g)}, adjust_sharpness)
    if type_ == "RandomAffine":
        degrees = _range(kwargs.get("degrees", 0.0), name, centered=True)
        translate = [float(t) for t in kwargs.get("translate", (0.0, 0.0))]
        return _Transform(name, weight, lambda g: {"angle": _uniform(degrees, g),
                                                   "shift": (_uniform((-translate[0], translate[0]), g),
                                                             _uniform((-translate[1], translate[1]), g))}, affine)
    (kind, value), = kwargs.items()
    bounds = _range(value, name, centered=kind == "hue")
    return _Transform(name, weight, lambda g: {"factor": _uniform(bounds, g)}, COLOR[kind])


# -- kernels on (..., C, H, W) floats in [0, 1], as torchvision's functional ones ------------------


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :])


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: float) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x * factor).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(x, _gray(x), factor)


def adjust_hue(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Rotate the hue by `factor` of a turn (in [-0.5, 0.5])."""
    r, g, b = x.unbind(-3)
    high, low = x.max(dim=-3).values, x.min(dim=-3).values
    chroma = high - low
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma == 0, torch.zeros_like(hue), hue) / 6.0
    hue = (hue + factor) % 1.0
    sat = torch.where(high == 0, torch.zeros_like(high), chroma / torch.where(high == 0, torch.ones_like(high), high))
    return _hsv_to_rgb(hue, sat, high)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.long() % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [torch.zeros_like(v) for _ in range(3)]
    for index, channels in enumerate(choices):
        mask = sector == index
        for c in range(3):
            out[c] = torch.where(mask, channels[c], out[c])
    return torch.stack(out, dim=-3).clamp(0.0, 1.0)


def adjust_sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with a smoothed copy (3x3 kernel, centre 5, border pixels kept), as torchvision."""
    shape = x.shape
    flat = x.reshape(-1, 1, *shape[-2:])
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13.0
    smooth = flat.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(flat, kernel[None, None])
    return _blend(x, smooth.reshape(shape), factor)


def affine(x: torch.Tensor, angle: float, shift: tuple[float, float]) -> torch.Tensor:
    """Rotate by `angle` degrees about the centre and shift by `shift` (fractions of width,
    height), nearest pixel, zeros outside."""
    shape = x.shape
    flat = x.reshape(-1, *shape[-3:])
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid maps output to input coordinates in [-1, 1]: the inverse of the wanted motion.
    matrix = torch.tensor([[cos, sin, -2 * shift[0]], [-sin, cos, -2 * shift[1]]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(matrix.expand(flat.shape[0], 2, 3), list(flat.shape), align_corners=False)
    return F.grid_sample(flat, grid, mode="nearest", padding_mode="zeros", align_corners=False).reshape(shape)


COLOR = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
         "hue": adjust_hue}


def save_preview(path: Path, batch: dict[str, Any], augmented: dict[str, Any], camera_keys: Sequence[str],
                 rows: int = 8) -> None:
    """A PNG for a person: per sample (row), each camera's last frame before and after."""
    from PIL import Image

    tiles = []
    for key in camera_keys:
        for frames in (batch[key], augmented[key]):
            last = frames[:rows, -1] if frames.dim() == 5 else frames[:rows]
            tiles.append(torch.cat(list(last), dim=-2))  # samples stacked vertically
    grid = torch.cat(tiles, dim=-1).clamp(0, 1)
    pixels = (grid.permute(1, 2, 0).cpu().float().numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
