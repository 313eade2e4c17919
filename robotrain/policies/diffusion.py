"""Diffusion Policy ("Diffusion Policy: Visuomotor Policy Learning via Action Diffusion",
Chi et al. 2023), as LeRobot 0.4.4 builds it, so that checkpoints load both ways.

The network is LeRobot's `DiffusionModel` module for module: `diffusion.rgb_encoder` (a
ResNet-18 trunk with GroupNorm, spatial-softmax keypoints `pool` and a linear `out`) encodes
each camera frame; state, image features (and environment state) of the last `n_obs_steps`
frames form the global condition of `diffusion.unet`, a 1-D convolutional U-Net with FiLM
residual blocks that denoises a `horizon`-long action trajectory. `model.safetensors` keys
and shapes equal LeRobot's exactly (tests/data/lerobot_keys/diffusion*_keys.json) and
`config.json` has exactly LeRobot's keys in LeRobot's order.

Noise schedules are diffusers' `DDPMScheduler` / `DDIMScheduler` (`noise_scheduler_type`),
constructed with the same arguments LeRobot passes; they hold no weights.

Randomness: training draws the noise, the timesteps and the random crop offsets through
`robotrain.global_batch` (a function of seed and step, the same for a sample however the
global batch is split over processes). As in torchvision's `RandomCrop` (which LeRobot uses),
one crop offset is drawn per call and applied to the whole (global) batch. Inference draws the initial noise (and
DDPM's per-step noise) from the global torch RNG as well.

Acting: `select_action` takes single-frame observations, keeps the last `n_obs_steps` of
them (the first is repeated to fill the history after `reset()`), and every
`n_action_steps` calls denoises a new trajectory and queues its actions from the current
frame on, like LeRobot's `DiffusionPolicy.select_action`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from robotrain import global_batch
from robotrain.errors import UserError
from robotrain.policies.base import Policy, PolicyConfig
from robotrain.policies.resnet import ResNet18

log = logging.getLogger("robotrain")

OBS_STATE = "observation.state"
OBS_ENV_STATE = "observation.environment_state"
OBS_IMAGES = "observation.images"  # all cameras stacked: (B, n_obs_steps, n_cameras, C, H, W)
ACTION = "action"

_BETA_SCHEDULES = {
    "DDPM": ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"),
    "DDIM": ("linear", "scaled_linear", "squaredcos_cap_v2"),
}

#: config.json fields after `pretrained_path`, in LeRobot 0.4.4's order.
_LEROBOT_FIELDS = (
    "horizon", "n_action_steps", "normalization_mapping", "drop_n_last_frames", "vision_backbone",
    "resize_shape", "crop_ratio", "crop_shape", "crop_is_random", "pretrained_backbone_weights",
    "use_group_norm", "spatial_softmax_num_keypoints", "use_separate_rgb_encoder_per_camera", "down_dims",
    "kernel_size", "n_groups", "diffusion_step_embed_dim", "use_film_scale_modulation",
    "noise_scheduler_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
    "prediction_type", "clip_sample", "clip_sample_range", "num_inference_steps", "compile_model",
    "compile_mode", "do_mask_loss_for_padding", "optimizer_lr", "optimizer_betas", "optimizer_eps",
    "optimizer_weight_decay", "scheduler_name", "scheduler_warmup_steps",
)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _pair(value: Any) -> bool:
    return value is not None and len(value) == 2 and all(isinstance(d, int) and d > 0 for d in value)


@dataclass
class DiffusionConfig(PolicyConfig):
    """Diffusion Policy; field names and defaults are LeRobot 0.4.4's (PushT, one camera)."""

    type: str = "diffusion"
    """Policy type."""
    n_obs_steps: int = 2
    """Observation frames (the current one and those before it) that condition each prediction."""
    chunk_size: int = 8
    """Derived, always n_action_steps: the length of `predict_action_chunk`'s output (not in LeRobot's config.json)."""
    horizon: int = 16
    """Length of the denoised action trajectory, counted from the oldest observed frame."""
    n_action_steps: int = 8
    """Actions executed per prediction, from the current frame on; at most horizon - n_obs_steps + 1."""
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"}
    )
    """Normalization per feature type: MEAN_STD, MIN_MAX or IDENTITY (actions must land in [-1, 1] for clip_sample)."""
    drop_n_last_frames: int = 7
    """Never draw the last N frames of each episode (the sampler drops max of this and sampler.drop_n_last_frames)."""
    vision_backbone: str = "resnet18"
    """Image backbone (torchvision name); robotrain builds resnet18."""
    resize_shape: Optional[list[int]] = None
    """(H, W) images are resized to (bilinear, antialiased) before cropping; null: no resize."""
    crop_ratio: float = 1.0
    """In (0, 1]: with resize_shape, crop_shape = resize_shape * crop_ratio; 1.0: no crop after a resize."""
    crop_shape: Optional[list[int]] = None
    """(H, W) crop taken from each image (random in training if crop_is_random, centered in eval); null: none."""
    crop_is_random: bool = True
    """Random crop position in training (one per batch, from the torch RNG); false: center crop always."""
    pretrained_backbone_weights: Optional[str] = None
    """torchvision weights name for the backbone; robotrain never downloads them (load a pretrained policy instead)."""
    use_group_norm: bool = True
    """Replace the backbone's BatchNorm by GroupNorm with channels // 16 groups."""
    spatial_softmax_num_keypoints: int = 32
    """Keypoints of the spatial softmax pooling; image features are 2 * this per camera."""
    use_separate_rgb_encoder_per_camera: bool = False
    """One image encoder per camera instead of one shared encoder."""
    down_dims: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    """Channels of each U-Net stage; the trajectory is halved in length between stages."""
    kernel_size: int = 5
    """Kernel size of the U-Net's 1-D convolutions (odd)."""
    n_groups: int = 8
    """GroupNorm groups in the U-Net's convolution blocks."""
    diffusion_step_embed_dim: int = 128
    """Width of the diffusion-timestep embedding."""
    use_film_scale_modulation: bool = True
    """FiLM conditioning modulates scale as well as bias."""
    noise_scheduler_type: str = "DDPM"
    """Noise scheduler: DDPM or DDIM (diffusers' DDPMScheduler / DDIMScheduler)."""
    num_train_timesteps: int = 100
    """Diffusion steps of the forward (noising) process."""
    beta_schedule: str = "squaredcos_cap_v2"
    """Beta schedule, as diffusers names them."""
    beta_start: float = 0.0001
    """First beta (linear and scaled_linear schedules)."""
    beta_end: float = 0.02
    """Last beta (linear and scaled_linear schedules)."""
    prediction_type: str = "epsilon"
    """What the U-Net predicts: epsilon (the noise) or sample (the clean trajectory)."""
    clip_sample: bool = True
    """Clip the predicted clean trajectory to [-clip_sample_range, clip_sample_range] at each denoising step."""
    clip_sample_range: float = 1.0
    """Range of clip_sample."""
    num_inference_steps: Optional[int] = None
    """Denoising steps when acting (evenly spaced); null: num_train_timesteps."""
    compile_model: bool = False
    """torch.compile the U-Net in place (state dict keys unchanged)."""
    compile_mode: str = "reduce-overhead"
    """torch.compile mode when compile_model is true."""
    do_mask_loss_for_padding: bool = False
    """Zero the loss on actions past the episode end (the original implementation does not)."""
    gradient_checkpointing: bool = False
    """Recompute the U-Net's residual blocks in the backward pass instead of keeping their activations."""

    # A training setting: config.json keeps the key set LeRobot 0.4.4 and 0.6.1 both load.
    robotrain_fields: ClassVar[tuple[str, ...]] = (*PolicyConfig.robotrain_fields, "gradient_checkpointing")
    optimizer_lr: float = 1e-4
    """LeRobot's optimizer preset, kept for config.json; robotrain trains with optim.*."""
    optimizer_betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    """LeRobot's optimizer preset (Adam betas); robotrain uses optim.betas."""
    optimizer_eps: float = 1e-8
    """LeRobot's optimizer preset (Adam eps); robotrain uses optim.eps."""
    optimizer_weight_decay: float = 1e-6
    """LeRobot's optimizer preset (weight decay); robotrain uses optim.weight_decay."""
    scheduler_name: str = "cosine"
    """LeRobot's LR-schedule preset; robotrain uses the scheduler group."""
    scheduler_warmup_steps: int = 500
    """LeRobot's LR-schedule preset (warmup); robotrain uses scheduler.warmup_steps."""

    def __post_init__(self) -> None:
        self.chunk_size = self.n_action_steps
        super().__post_init__()
        _require(self.n_obs_steps >= 1, f"policy.n_obs_steps must be >= 1, got {self.n_obs_steps}")
        _require(self.horizon >= 1, f"policy.horizon must be >= 1, got {self.horizon}")
        _require(
            self.n_action_steps <= self.horizon - self.n_obs_steps + 1,
            f"policy.n_action_steps must be <= horizon - n_obs_steps + 1 = {self.horizon - self.n_obs_steps + 1}, "
            f"got {self.n_action_steps}; raise policy.horizon or lower policy.n_action_steps",
        )
        _require(self.drop_n_last_frames >= 0, f"policy.drop_n_last_frames must be >= 0, got {self.drop_n_last_frames}")
        _require(self.vision_backbone == "resnet18",
                 f"policy.vision_backbone must be resnet18 (the backbone robotrain builds), "
                 f"got {self.vision_backbone!r}")
        _require(self.prediction_type in ("epsilon", "sample"),
                 f"policy.prediction_type must be 'epsilon' or 'sample', got {self.prediction_type!r}")
        _require(self.noise_scheduler_type in _BETA_SCHEDULES,
                 f"policy.noise_scheduler_type must be DDPM or DDIM, got {self.noise_scheduler_type!r}")
        schedules = _BETA_SCHEDULES[self.noise_scheduler_type]
        _require(self.beta_schedule in schedules,
                 f"policy.beta_schedule must be one of {', '.join(schedules)} for {self.noise_scheduler_type}, "
                 f"got {self.beta_schedule!r}")
        _require(self.num_train_timesteps >= 1,
                 f"policy.num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        _require(
            self.num_inference_steps is None or 1 <= self.num_inference_steps <= self.num_train_timesteps,
            f"policy.num_inference_steps must be null or in [1, num_train_timesteps={self.num_train_timesteps}], "
            f"got {self.num_inference_steps}",
        )
        _require(self.resize_shape is None or _pair(self.resize_shape),
                 f"policy.resize_shape must be null or [H, W] of positive integers, got {self.resize_shape}")
        _require(0 < self.crop_ratio <= 1.0, f"policy.crop_ratio must be in (0, 1], got {self.crop_ratio}")
        if self.resize_shape is not None:  # LeRobot: the crop derives from the resize
            self.crop_shape = (
                [int(self.resize_shape[0] * self.crop_ratio), int(self.resize_shape[1] * self.crop_ratio)]
                if self.crop_ratio < 1.0 else None
            )
        _require(self.crop_shape is None or _pair(self.crop_shape),
                 f"policy.crop_shape must be null or [H, W] of positive integers, got {self.crop_shape}")
        _require(not (self.pretrained_backbone_weights and self.use_group_norm),
                 "policy.pretrained_backbone_weights cannot be combined with use_group_norm=true "
                 "(GroupNorm would discard the pretrained BatchNorm statistics); set one of them off")
        _require(len(self.down_dims) >= 1 and all(d > 0 for d in self.down_dims),
                 f"policy.down_dims must be a non-empty list of positive integers, got {list(self.down_dims)}")
        _require(self.n_groups >= 1 and all(d % self.n_groups == 0 for d in self.down_dims),
                 f"policy.down_dims {list(self.down_dims)} must all be multiples of policy.n_groups={self.n_groups}")
        _require(self.down_dims[0] % 8 == 0,
                 f"policy.down_dims[0]={self.down_dims[0]} must be a multiple of 8 "
                 "(the U-Net's final block has 8 groups, as LeRobot's)")
        factor = 2 ** len(self.down_dims)  # LeRobot's check (the U-Net halves it len(down_dims) - 1 times)
        _require(self.horizon % factor == 0,
                 f"policy.horizon={self.horizon} must be a multiple of 2**len(down_dims) = {factor} "
                 f"for down_dims={list(self.down_dims)}")
        _require(self.kernel_size >= 1 and self.kernel_size % 2 == 1,
                 f"policy.kernel_size must be a positive odd number, got {self.kernel_size}")
        _require(self.diffusion_step_embed_dim >= 4 and self.diffusion_step_embed_dim % 2 == 0,
                 f"policy.diffusion_step_embed_dim must be even and >= 4, got {self.diffusion_step_embed_dim}")
        _require(self.spatial_softmax_num_keypoints >= 1,
                 f"policy.spatial_softmax_num_keypoints must be >= 1, got {self.spatial_softmax_num_keypoints}")
        _require(self.clip_sample_range > 0, f"policy.clip_sample_range must be > 0, got {self.clip_sample_range}")

    @property
    def observation_delta_indices(self) -> list[int]:
        return list(range(1 - self.n_obs_steps, 1))

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(1 - self.n_obs_steps, 1 - self.n_obs_steps + self.horizon))

    def to_lerobot_dict(self) -> dict[str, Any]:
        """LeRobot's config.json: exactly its keys, in its order (no chunk_size)."""
        body = super().to_lerobot_dict()
        head = {key: body[key] for key in body if key != "chunk_size" and key not in _LEROBOT_FIELDS}
        return {**head, **{key: body[key] for key in _LEROBOT_FIELDS}}

    # -- features (LeRobot's PreTrainedConfig properties and DiffusionConfig.validate_features)
    @property
    def env_state_feature(self) -> Optional[dict]:
        ft = (self.input_features or {}).get(OBS_ENV_STATE)
        return ft if ft is not None and ft["type"] == "ENV" else None

    def validate_features(self) -> None:
        inputs = self.input_features or {}
        _require(inputs.get(OBS_STATE, {}).get("type") == "STATE",
                 f"the diffusion policy needs a STATE input {OBS_STATE!r}; the inputs are {list(inputs)}")
        _require(ACTION in (self.output_features or {}),
                 f"the diffusion policy needs an output {ACTION!r}; the outputs are {list(self.output_features or {})}")
        _require(bool(self.image_features) or self.env_state_feature is not None,
                 f"the diffusion policy needs a camera or {OBS_ENV_STATE!r} among its inputs {list(inputs)}")
        shapes = {tuple(ft["shape"]) for ft in self.image_features.values()}
        _require(len(shapes) <= 1,
                 f"all camera images must have one shape for the diffusion policy, got {sorted(shapes)}")
        if self.resize_shape is None and self.crop_shape is not None and shapes:
            _, h, w = next(iter(shapes))
            _require(self.crop_shape[0] <= h and self.crop_shape[1] <= w,
                     f"policy.crop_shape={list(self.crop_shape)} does not fit the {h}x{w} images; "
                     f"use at most [{h}, {w}] or null")


# -- the model: LeRobot's module tree (keys under `diffusion.`) --------------------------------


def make_noise_scheduler(config: DiffusionConfig):
    """diffusers' DDPMScheduler or DDIMScheduler, configured as LeRobot configures it."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    cls = DDPMScheduler if config.noise_scheduler_type == "DDPM" else DDIMScheduler
    return cls(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        clip_sample=config.clip_sample,
        clip_sample_range=config.clip_sample_range,
        prediction_type=config.prediction_type,
    )


class DiffusionModel(nn.Module):
    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        global_cond_dim = config.input_features[OBS_STATE]["shape"][0]
        num_images = len(config.image_features)
        if num_images:
            if config.use_separate_rgb_encoder_per_camera:
                encoders = [DiffusionRgbEncoder(config) for _ in range(num_images)]
                self.rgb_encoder = nn.ModuleList(encoders)
                global_cond_dim += encoders[0].feature_dim * num_images
            else:
                self.rgb_encoder = DiffusionRgbEncoder(config)
                global_cond_dim += self.rgb_encoder.feature_dim * num_images
        if config.env_state_feature is not None:
            global_cond_dim += config.env_state_feature["shape"][0]
        self.unet = DiffusionConditionalUnet1d(config, global_cond_dim=global_cond_dim * config.n_obs_steps)
        if config.compile_model:
            self.unet.compile(mode=config.compile_mode)  # in place: keys stay `unet.*`
        self.noise_scheduler = make_noise_scheduler(config)
        self.num_inference_steps = config.num_inference_steps or config.num_train_timesteps

    def conditional_sample(self, batch_size: int, global_cond: Tensor, noise: Tensor | None = None) -> Tensor:
        param = next(self.parameters())
        action_dim = self.config.output_features[ACTION]["shape"][0]
        sample = noise if noise is not None else global_batch.randn(
            (batch_size, self.config.horizon, action_dim), param.device, param.dtype)
        self.noise_scheduler.set_timesteps(self.num_inference_steps)
        generators = global_batch.sample_generators()  # None: the global RNG, as LeRobot
        for t in self.noise_scheduler.timesteps:
            model_output = self.unet(sample, torch.full(sample.shape[:1], t, dtype=torch.long, device=sample.device),
                                     global_cond=global_cond)
            sample = self.noise_scheduler.step(model_output, t, sample, generator=generators).prev_sample
        return sample

    def _prepare_global_conditioning(self, batch: dict[str, Tensor]) -> Tensor:
        """State, image features and environment state of each observed frame -> (B, global_cond_dim)."""
        batch_size, n_obs_steps = batch[OBS_STATE].shape[:2]
        feats = [batch[OBS_STATE]]
        if self.config.image_features:
            images = batch[OBS_IMAGES]  # (B, S, N, C, H, W)
            if self.config.use_separate_rgb_encoder_per_camera:
                per_camera = images.permute(2, 0, 1, 3, 4, 5).flatten(1, 2)  # (N, B*S, C, H, W)
                encoded = torch.cat([enc(x) for enc, x in zip(self.rgb_encoder, per_camera, strict=True)])
                # (N*B*S, D) -> (B, S, N*D)
                img = encoded.view(len(per_camera), batch_size, n_obs_steps, -1).permute(1, 2, 0, 3)
            else:
                encoded = self.rgb_encoder(images.flatten(0, 2))  # (B*S*N, D)
                img = encoded.view(batch_size, n_obs_steps, images.shape[2], -1)
            feats.append(img.flatten(2))
        if self.config.env_state_feature is not None:
            feats.append(batch[OBS_ENV_STATE])
        return torch.cat(feats, dim=-1).flatten(start_dim=1)

    def generate_actions(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Normalized actions (B, n_action_steps, A) from the current frame on, given
        `n_obs_steps` frames of observations (B, n_obs_steps, ...)."""
        batch_size, n_obs_steps = batch[OBS_STATE].shape[:2]
        actions = self.conditional_sample(batch_size, self._prepare_global_conditioning(batch), noise=noise)
        start = n_obs_steps - 1
        return actions[:, start: start + self.config.n_action_steps]

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """DDPM training loss per entry (B, horizon, A): noise the action trajectory at a random
        timestep, regress epsilon (or the clean sample) with MSE; the loss is its mean."""
        global_cond = self._prepare_global_conditioning(batch)
        trajectory = batch[ACTION]
        eps = global_batch.randn(trajectory.shape, trajectory.device)
        timesteps = global_batch.randint(self.noise_scheduler.config.num_train_timesteps, (trajectory.shape[0],),
                                         trajectory.device).long()
        noisy = self.noise_scheduler.add_noise(trajectory, eps, timesteps)
        pred = self.unet(noisy, timesteps, global_cond=global_cond)
        target = eps if self.config.prediction_type == "epsilon" else trajectory
        loss = F.mse_loss(pred, target, reduction="none")
        if self.config.do_mask_loss_for_padding:
            loss = loss * (~batch["action_is_pad"]).unsqueeze(-1)
        return loss


class SpatialSoftmax(nn.Module):
    """Keypoints as the softmax-weighted mean pixel position of each (1x1-conv projected) channel."""

    def __init__(self, input_shape: tuple[int, int, int], num_kp: int | None = None):
        super().__init__()
        self._in_c, self._in_h, self._in_w = input_shape
        if num_kp is not None:
            self.nets = nn.Conv2d(self._in_c, num_kp, kernel_size=1)
            self._out_c = num_kp
        else:
            self.nets = None
            self._out_c = self._in_c
        # numpy's linspace, as LeRobot (torch.linspace differs in the last bits)
        pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, self._in_w), np.linspace(-1.0, 1.0, self._in_h))
        pos_x = torch.from_numpy(pos_x.reshape(self._in_h * self._in_w, 1)).float()
        pos_y = torch.from_numpy(pos_y.reshape(self._in_h * self._in_w, 1)).float()
        self.register_buffer("pos_grid", torch.cat([pos_x, pos_y], dim=1))

    def forward(self, features: Tensor) -> Tensor:
        if self.nets is not None:
            features = self.nets(features)
        attention = F.softmax(features.reshape(-1, self._in_h * self._in_w), dim=-1)
        return (attention @ self.pos_grid).view(-1, self._out_c, 2)


class DiffusionRgbEncoder(nn.Module):
    """(B, C, H, W) image in normalized units -> (B, 2 * keypoints) feature: optional resize
    and crop, ResNet-18 trunk, spatial softmax, linear + ReLU."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.resize_shape = tuple(config.resize_shape) if config.resize_shape is not None else None
        self.crop_shape = tuple(config.crop_shape) if config.crop_shape is not None else None
        self.crop_is_random = config.crop_is_random
        if config.pretrained_backbone_weights:
            log.warning("policy.pretrained_backbone_weights=%s: robotrain does not download torchvision weights; "
                        "the backbone starts from random init unless a checkpoint is loaded",
                        config.pretrained_backbone_weights)
        resnet = ResNet18("group_norm" if config.use_group_norm else "batch_norm")
        self.backbone = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool and fc
        channels, *hw = next(iter(config.image_features.values()))["shape"]
        hw = self.crop_shape or self.resize_shape or tuple(hw)
        with torch.no_grad():
            feature_map = self.backbone(torch.zeros(1, channels, *hw)).shape[1:]
        self.pool = SpatialSoftmax(tuple(feature_map), num_kp=config.spatial_softmax_num_keypoints)
        self.feature_dim = config.spatial_softmax_num_keypoints * 2
        self.out = nn.Linear(config.spatial_softmax_num_keypoints * 2, self.feature_dim)
        self.relu = nn.ReLU()

    def _crop(self, x: Tensor) -> Tensor:
        """torchvision's RandomCrop (one offset per call) / CenterCrop."""
        (h, w), (th, tw) = x.shape[-2:], self.crop_shape
        if self.training and self.crop_is_random:
            if h == th and w == tw:
                return x
            top, left = global_batch.shared_randint(h - th + 1), global_batch.shared_randint(w - tw + 1)
        else:
            top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return x[..., top: top + th, left: left + tw]

    def forward(self, x: Tensor) -> Tensor:
        if self.resize_shape is not None:  # torchvision's Resize on tensors
            x = F.interpolate(x, size=self.resize_shape, mode="bilinear", align_corners=False, antialias=True)
        if self.crop_shape is not None:
            x = self._crop(x)
        x = torch.flatten(self.pool(self.backbone(x)), start_dim=1)
        return self.relu(self.out(x))


class DiffusionSinusoidalPosEmb(nn.Module):
    """1-D sinusoidal embedding of the diffusion timestep."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        half_dim = self.dim // 2
        emb = math.log(10000) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, device=x.device) * -emb)
        emb = x.unsqueeze(-1) * emb.unsqueeze(0)
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class DiffusionConv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, inp_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(inp_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DiffusionConditionalResidualBlock1d(nn.Module):
    """Two conv blocks with FiLM conditioning between them, plus a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int = 3,
                 n_groups: int = 8, use_film_scale_modulation: bool = False):
        super().__init__()
        self.use_film_scale_modulation = use_film_scale_modulation
        self.out_channels = out_channels
        self.conv1 = DiffusionConv1dBlock(in_channels, out_channels, kernel_size, n_groups=n_groups)
        cond_channels = out_channels * 2 if use_film_scale_modulation else out_channels
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, cond_channels))
        self.conv2 = DiffusionConv1dBlock(out_channels, out_channels, kernel_size, n_groups=n_groups)
        self.residual_conv = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        out = self.conv1(x)
        cond_embed = self.cond_encoder(cond).unsqueeze(-1)
        if self.use_film_scale_modulation:
            out = cond_embed[:, : self.out_channels] * out + cond_embed[:, self.out_channels:]
        else:
            out = out + cond_embed
        out = self.conv2(out)
        return out + self.residual_conv(x)


class DiffusionConditionalUnet1d(nn.Module):
    """1-D convolutional U-Net over the trajectory's time axis, FiLM-conditioned on the
    timestep embedding and the global observation condition."""

    def __init__(self, config: DiffusionConfig, global_cond_dim: int):
        super().__init__()
        self.config = config
        embed = config.diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            DiffusionSinusoidalPosEmb(embed), nn.Linear(embed, embed * 4), nn.Mish(), nn.Linear(embed * 4, embed),
        )
        cond_dim = embed + global_cond_dim
        action_dim = config.output_features[ACTION]["shape"][0]
        dims = list(config.down_dims)
        in_out = [(action_dim, dims[0])] + list(zip(dims[:-1], dims[1:]))
        block = dict(cond_dim=cond_dim, kernel_size=config.kernel_size, n_groups=config.n_groups,
                     use_film_scale_modulation=config.use_film_scale_modulation)
        self.down_modules = nn.ModuleList([])
        for ind, (dim_in, dim_out) in enumerate(in_out):
            is_last = ind >= len(in_out) - 1
            self.down_modules.append(nn.ModuleList([
                DiffusionConditionalResidualBlock1d(dim_in, dim_out, **block),
                DiffusionConditionalResidualBlock1d(dim_out, dim_out, **block),
                nn.Conv1d(dim_out, dim_out, 3, 2, 1) if not is_last else nn.Identity(),
            ]))
        self.mid_modules = nn.ModuleList([
            DiffusionConditionalResidualBlock1d(dims[-1], dims[-1], **block),
            DiffusionConditionalResidualBlock1d(dims[-1], dims[-1], **block),
        ])
        self.up_modules = nn.ModuleList([])
        for ind, (dim_out, dim_in) in enumerate(reversed(in_out[1:])):
            is_last = ind >= len(in_out) - 1
            self.up_modules.append(nn.ModuleList([
                DiffusionConditionalResidualBlock1d(dim_in * 2, dim_out, **block),  # with the skip connection
                DiffusionConditionalResidualBlock1d(dim_out, dim_out, **block),
                nn.ConvTranspose1d(dim_out, dim_out, 4, 2, 1) if not is_last else nn.Identity(),
            ]))
        self.final_conv = nn.Sequential(
            DiffusionConv1dBlock(dims[0], dims[0], kernel_size=config.kernel_size),
            nn.Conv1d(dims[0], action_dim, 1),
        )

    def forward(self, x: Tensor, timestep: Tensor, global_cond: Tensor | None = None) -> Tensor:
        """(B, T, A) noisy trajectory, (B,) timesteps, (B, global_cond_dim) -> (B, T, A)."""
        x = x.transpose(1, 2)
        feature = self.diffusion_step_encoder(timestep)
        if global_cond is not None:
            feature = torch.cat([feature, global_cond], dim=-1)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()

        def block(module: nn.Module, x: Tensor) -> Tensor:  # LeRobot 0.6.1 recomputes exactly these
            return checkpoint(module, x, feature, use_reentrant=False) if recompute else module(x, feature)

        skips: list[Tensor] = []
        for resnet, resnet2, downsample in self.down_modules:
            x = block(resnet2, block(resnet, x))
            skips.append(x)
            x = downsample(x)
        for mid in self.mid_modules:
            x = block(mid, x)
        for resnet, resnet2, upsample in self.up_modules:
            x = torch.cat((x, skips.pop()), dim=1)
            x = upsample(block(resnet2, block(resnet, x)))
        return self.final_conv(x).transpose(1, 2)


# -- the policy ------------------------------------------------------------------------------


class DiffusionPolicy(Policy):
    """LeRobot's DiffusionPolicy: `state_dict()` keys are `diffusion.rgb_encoder.*` and
    `diffusion.unet.*` (plus the spatial-softmax `pos_grid` buffer), exactly as LeRobot's."""

    name = "diffusion"
    config_class = DiffusionConfig

    def peft_defaults(self) -> dict:
        """Adapters on the denoising U-Net's residual-block convolutions and their FiLM
        conditioning; the image encoder's output projection and the U-Net's final convolution
        are trained in full."""
        return {"target_modules": r"diffusion\.unet\..*\.(conv1\.block\.0|conv2\.block\.0|cond_encoder\.1)",
                "modules_to_save": ["diffusion.rgb_encoder.out", "diffusion.unet.final_conv.1"]}

    def __init__(self, config: DiffusionConfig, stats):
        super().__init__(config, stats)
        config.validate_features()
        self.diffusion = DiffusionModel(config)
        self._obs_queues: dict[str, deque[Tensor]] = {}
        self.reset()

    def _history_keys(self) -> list[str]:
        keys = [OBS_STATE]
        if self.config.image_features:
            keys.append(OBS_IMAGES)
        if self.config.env_state_feature is not None:
            keys.append(OBS_ENV_STATE)
        return keys

    def reset(self) -> None:
        """Forget queued actions and the observation history (call at every episode start)."""
        super().reset()
        self._obs_queues = {key: deque(maxlen=self.config.n_obs_steps) for key in self._history_keys()}

    def _with_stacked_images(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add `observation.images`: every camera stacked on dim -4, a frame axis added when the
        observations have none (n_obs_steps == 1)."""
        if not self.config.image_features:
            return batch
        batch = dict(batch)
        images = [batch[key] for key in self.config.image_features]
        if images[0].dim() == 4:
            images = [img.unsqueeze(1) for img in images]
        batch[OBS_IMAGES] = torch.stack(images, dim=-4)
        return batch

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        batch = self._with_stacked_images(batch)
        n_obs, horizon = batch[OBS_STATE].shape[1], batch[ACTION].shape[1]
        if n_obs != self.config.n_obs_steps or horizon != self.config.horizon:
            raise UserError(f"the diffusion policy expects {self.config.n_obs_steps} observation frames and "
                            f"{self.config.horizon} actions per sample, got {n_obs} and {horizon}; build the dataset "
                            "with the policy's delta_timestamps")
        loss = self.diffusion.compute_loss(batch)
        return loss.mean(), self._per_sample_loss(loss)

    def predict_chunk(self, batch: dict[str, Tensor]) -> Tensor:
        """Normalized actions (B, n_action_steps, A) from the current frame on. Observations
        carry `n_obs_steps` frames (B, n_obs_steps, ...), or one frame (B, ...), which then
        stands for the whole history (as at an episode start)."""
        frames = {key: batch[key] for key in self.config.input_features}
        if frames[OBS_STATE].dim() == 2:
            n = self.config.n_obs_steps
            frames = {key: v.unsqueeze(1).expand(-1, n, *v.shape[1:]) for key, v in frames.items()}
        frames = self._with_stacked_images(frames)
        return self.diffusion.generate_actions({key: frames[key] for key in self._history_keys()})

    @torch.no_grad()
    def select_action(self, observation: dict[str, Tensor]) -> Tensor:
        """Next action (B, action_dim) for single-frame observations (B, ...), keeping the last
        `n_obs_steps` frames; a new trajectory is denoised every `n_action_steps` calls."""
        state = observation.get(OBS_STATE)
        if state is None or state.dim() != 2:
            raise UserError(f"select_action takes one frame per call: {OBS_STATE!r} of shape (B, state_dim), got "
                            f"{None if state is None else tuple(state.shape)}")
        frame = self._with_stacked_images(self._normalize({k: observation[k] for k in self.config.input_features},
                                                          with_targets=False))
        for key, queue in self._obs_queues.items():
            value = frame[key].squeeze(1) if key == OBS_IMAGES else frame[key]
            if len(queue) < queue.maxlen:  # an episode start: the first frame fills the history
                queue.extend([value] * (queue.maxlen - len(queue)))
            else:
                queue.append(value)
        if not self._queue:
            history = {key: torch.stack(list(queue), dim=1) for key, queue in self._obs_queues.items()}
            actions = self.diffusion.generate_actions(history)
            self._queue.extend(self.normalizer.unnormalize(ACTION, actions).transpose(0, 1))
        return self._queue.popleft()
