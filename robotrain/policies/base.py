"""What every policy shares: its config, normalization, action queueing and the
LeRobot `pretrained_model/` folder.

A policy folder is exactly what LeRobot writes (README.md, "Checkpoints", shows the whole checkpoint):

    config.json                     the policy config, `"type"` first (LeRobot's draccus form)
    model.safetensors               `state_dict()`, nothing else (no normalization stats)
    policy_preprocessor.json        LeRobot's processor pipeline, whose normalizer step points at
    policy_preprocessor_step_3_normalizer_processor.safetensors     `<feature>.<stat>` tensors
    policy_postprocessor.json       ... and the unnormalizer step for actions
    policy_postprocessor_step_0_unnormalizer_processor.safetensors

Normalization is done inside the policy here (inputs and targets in `forward`, inputs in
and actions out in `select_action`), with stats held outside the state dict so that
`model.safetensors` keys equal LeRobot's.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, Union

import numpy as np
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn

from robotrain.errors import UserError

FeatureSpec = dict[str, Any]  # {"type": "STATE"|"VISUAL"|"ENV"|"ACTION", "shape": [...]}

#: LeRobot's normalization modes; the quantile modes map [low, high] quantiles to [-1, 1].
NORMALIZATION_MODES = ("MEAN_STD", "MIN_MAX", "IDENTITY", "QUANTILES", "QUANTILE10")
_QUANTILE_STATS = {"QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}
#: Placeholders for robotrain's standard steps in `Policy.processor_steps`.
NORMALIZER, UNNORMALIZER, DEVICE = "normalizer", "unnormalizer", "device"
#: A processor step: LeRobot's step dict, or one of the placeholders above.
StepSpec = Union[dict[str, Any], str]
_EPS = 1e-8


@dataclass
class PolicyConfig:
    """Fields every policy has, named as in LeRobot's `PreTrainedConfig`."""

    type: str = ""
    """Policy type; selects the class (set by the conf/policy/*.yaml file)."""
    n_obs_steps: int = 1
    """Observation frames the policy sees per prediction."""
    input_features: Optional[dict[str, Any]] = None
    """Inputs `{key: {type, shape}}`; unset: inferred from the dataset."""
    output_features: Optional[dict[str, Any]] = None
    """Outputs `{key: {type, shape}}`; unset: inferred from the dataset."""
    chunk_size: int = 10
    """Actions predicted per forward pass."""
    n_action_steps: int = 5
    """Actions of each predicted chunk executed before predicting again."""
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "MEAN_STD", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    """Normalization per feature type: MEAN_STD, MIN_MAX, IDENTITY, QUANTILES (q01-q99) or QUANTILE10 (q10-q90)."""
    pretrained_path: Optional[str] = None
    """Start from these weights: a local folder or a Hub repo id."""
    pretrained_revision: Optional[str] = None
    """Hub revision (step, tag, branch or sha) of pretrained_path."""

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise UserError(f"policy.chunk_size must be > 0, got {self.chunk_size}")
        if not 0 < self.n_action_steps <= self.chunk_size:
            raise UserError(
                f"policy.n_action_steps must be in [1, chunk_size={self.chunk_size}], got {self.n_action_steps}"
            )
        for kind, mode in self.normalization_mapping.items():
            if mode not in NORMALIZATION_MODES:
                raise UserError(f"policy.normalization_mapping.{kind} must be one of {', '.join(NORMALIZATION_MODES)}, "
                                f"got {mode!r}")

    #: robotrain's own fields, left out of config.json: LeRobot's config parser refuses unknown keys.
    robotrain_fields: ClassVar[tuple[str, ...]] = ("pretrained_revision",)

    @classmethod
    def fields_from_folder(cls, directory: Path) -> dict[str, Any]:
        """Robotrain fields a pretrained_model/ folder keeps outside config.json (which LeRobot
        must parse), e.g. in its processor files; none by default."""
        return {}

    def to_lerobot_dict(self) -> dict[str, Any]:
        """config.json content in LeRobot's order: `type`, PreTrainedConfig's fields (features,
        then device... license, pretrained_path), then the policy's own fields."""
        body = asdict(self)
        for name in self.robotrain_fields:
            body.pop(name)
        head = {key: body.pop(key) for key in ("type", "n_obs_steps", "input_features", "output_features")}
        head.update({"device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": False,
                     "repo_id": None, "private": None, "tags": None, "license": None,
                     "pretrained_path": body.pop("pretrained_path")})
        return {**head, **body}

    @property
    def image_features(self) -> dict[str, FeatureSpec]:
        """The VISUAL inputs, in feature order (LeRobot's PreTrainedConfig.image_features)."""
        return {k: ft for k, ft in (self.input_features or {}).items() if ft["type"] == "VISUAL"}

    def image_resize(self) -> tuple[int, int] | None:
        """(width, height) every camera is resized to, with padding (`resize_with_pad`), before the
        model sees it; None: images are used at the dataset's size. A mixture may then mix camera sizes."""
        return None

    @property
    def observation_delta_indices(self) -> list[int] | None:
        """Frame offsets of the observations a sample holds (None: the current frame only).
        A policy with an observation history (n_obs_steps > 1) returns e.g. [-1, 0]."""
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        """Frame offsets of the action targets, relative to the observed frame."""
        return list(range(self.chunk_size))

    def delta_timestamps(self, fps: int) -> dict[str, list[float]]:
        """LeRobot's `delta_timestamps` for this policy: what each sample holds, in seconds."""
        deltas = {key: [i / fps for i in self.action_delta_indices] for key in self.output_features or {"action": 0}}
        if self.observation_delta_indices is not None:
            for key in self.input_features or {}:
                deltas[key] = [i / fps for i in self.observation_delta_indices]
        return deltas


def resize_with_pad(img: torch.Tensor, width: int, height: int, pad_value: float = -1) -> torch.Tensor:
    """Resize (B, C, H, W) to fit (height, width) keeping aspect ratio, padding left and top (LeRobot's
    SmolVLA and pi0); an image of that size already comes back unchanged."""
    cur_height, cur_width = img.shape[2:]
    ratio = max(cur_width / width, cur_height / height)
    resized_height, resized_width = int(cur_height / ratio), int(cur_width / ratio)
    img = F.interpolate(img, size=(resized_height, resized_width), mode="bilinear", align_corners=False)
    pad_height, pad_width = max(0, int(height - resized_height)), max(0, int(width - resized_width))
    return F.pad(img, (pad_width, 0, pad_height, 0), value=pad_value)


#: The metrics entry in which a policy's forward reports each sample's loss, (B,) detached, when
#: `Policy.reports_per_sample_loss`: the training loop averages it per mixture member
#: (`member_loss/<k>` in metrics.jsonl).
PER_SAMPLE_LOSS = "per_sample_loss"


def per_sample_mean(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean of `values` (B, ...) over the entries `valid` marks (all if None), detached."""
    values = values.detach()
    dims = tuple(range(1, values.dim()))
    if valid is None:
        return values.mean(dim=dims) if dims else values
    valid = valid.expand_as(values)
    return (values * valid).sum(dim=dims) / valid.sum(dim=dims).clamp(min=1)


def features_from_dataset(meta_features: dict[str, dict]) -> tuple[dict, dict]:
    """LeRobot's `dataset_to_policy_features`: info.json features -> (inputs, outputs)."""
    inputs: dict[str, FeatureSpec] = {}
    outputs: dict[str, FeatureSpec] = {}
    for key, ft in meta_features.items():
        shape = list(ft["shape"])
        if ft["dtype"] in ("image", "video"):
            if shape[-1] in (1, 3, 4):  # stored (H, W, C); policies see (C, H, W)
                shape = [shape[2], shape[0], shape[1]]
            inputs[key] = {"type": "VISUAL", "shape": shape}
        elif key == "observation.environment_state":
            inputs[key] = {"type": "ENV", "shape": shape}
        elif key.startswith("observation"):
            inputs[key] = {"type": "STATE", "shape": shape}
        elif key == "action":
            outputs[key] = {"type": "ACTION", "shape": shape}
    return inputs, outputs


class Normalizer:
    """Maps features to and from the normalized space with dataset stats.

    Stats are plain tensors, not buffers, so they never appear in `state_dict()`; they are
    saved in LeRobot's processor files instead.
    """

    def __init__(self, stats: dict[str, dict[str, torch.Tensor]], features: dict[str, FeatureSpec],
                 mapping: dict[str, str]):
        self.stats = stats
        self.modes = {key: mapping.get(ft["type"], "IDENTITY") for key, ft in features.items()}
        for key, mode in self.modes.items():
            needed = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), **_QUANTILE_STATS}.get(mode, ())
            missing = [s for s in needed if s not in stats.get(key, {})]
            if missing:
                raise UserError(f"dataset stats lack {missing} for {key!r}; regenerate meta/stats.json for the dataset")

    def _shape(self, key: str, value: torch.Tensor, stat: str) -> torch.Tensor:
        return self.stats[key][stat].to(device=value.device, dtype=value.dtype)

    def normalize(self, key: str, value: torch.Tensor) -> torch.Tensor:
        mode = self.modes.get(key, "IDENTITY")
        if mode == "MEAN_STD":
            return (value - self._shape(key, value, "mean")) / (self._shape(key, value, "std") + _EPS)
        if mode == "MIN_MAX":
            lo, hi = self._shape(key, value, "min"), self._shape(key, value, "max")
            return 2 * (value - lo) / (hi - lo + _EPS) - 1
        if mode in _QUANTILE_STATS:
            lo, span = self._quantile_range(key, value, mode)
            return 2.0 * (value - lo) / span - 1.0
        return value

    def _quantile_range(self, key: str, value: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(low quantile, high - low) as LeRobot's QUANTILES/QUANTILE10: a zero span becomes eps."""
        low, high = (self._shape(key, value, stat) for stat in _QUANTILE_STATS[mode])
        span = high - low
        return low, torch.where(span == 0, torch.tensor(_EPS, device=value.device, dtype=value.dtype), span)

    def unnormalize(self, key: str, value: torch.Tensor) -> torch.Tensor:
        mode = self.modes.get(key, "IDENTITY")
        if mode == "MEAN_STD":
            return value * (self._shape(key, value, "std") + _EPS) + self._shape(key, value, "mean")
        if mode == "MIN_MAX":
            lo, hi = self._shape(key, value, "min"), self._shape(key, value, "max")
            return (value + 1) / 2 * (hi - lo + _EPS) + lo
        if mode in _QUANTILE_STATS:
            lo, span = self._quantile_range(key, value, mode)
            return (value + 1.0) * span / 2.0 + lo
        return value


def stats_to_tensors(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        key: {name: torch.as_tensor(np.asarray(v, dtype=np.float32)) for name, v in per.items()}
        for key, per in stats.items()
    }


class Policy(nn.Module):
    """Base class: subclasses set `name` and `config_class` and implement
    `compute_loss(batch) -> (loss, metrics)` and `predict_chunk(batch) -> (B, chunk, A)`,
    both on normalized tensors."""

    name: ClassVar[str]
    config_class: ClassVar[type[PolicyConfig]]
    #: Modules whose parameters the policy reads outside their own `forward` (e.g. an embedding's
    #: `.weight` used as a learned table). FSDP gathers a module's parameters only around its
    #: forward, so these are not sharded as units of their own: the policy's unit holds them,
    #: gathered for its whole forward and backward. Names as in `named_modules()`.
    fsdp_gathered_with_policy: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PolicyConfig, stats: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        if not config.input_features or not config.output_features:
            raise UserError("policy input/output features are unset; build policies with robotrain.policies.make")
        self.config = config
        self.stats = stats
        features = {**config.input_features, **config.output_features}
        self.normalizer = Normalizer(stats, features, config.normalization_mapping)
        self._queue: deque[torch.Tensor] = deque()
        self._stats_bytes: bytes | None = None

    #: Report each sample's loss in the forward's metrics (`PER_SAMPLE_LOSS`): the training loop
    #: turns it on for a mixture of datasets (per-member losses); off, it costs nothing.
    reports_per_sample_loss: bool = False
    #: Inputs a batch may lack (VLAs: a camera the robot does not have is absent, and the policy
    #: fills its place); for other policies every input is required.
    inputs_may_be_absent: bool = False

    # -- training ---------------------------------------------------------------------
    def _per_sample_loss(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{PER_SAMPLE_LOSS: each sample's mean of `values` over `valid`} when reported, else {}."""
        return {PER_SAMPLE_LOSS: per_sample_mean(values, valid)} if self.reports_per_sample_loss else {}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics): metrics are detached tensors, 0-d but for `PER_SAMPLE_LOSS` (B,), so
        reading them is the caller's sync."""
        return self.compute_loss(self._normalize(batch, with_targets=True))

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def predict_chunk(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _normalize(self, batch: dict[str, Any], with_targets: bool) -> dict[str, Any]:
        keys = list(self.config.input_features) + (list(self.config.output_features) if with_targets else [])
        out = dict(batch)
        for key in keys:
            if key in batch or not self.inputs_may_be_absent:
                out[key] = self.normalizer.normalize(key, batch[key])
        return out

    def peft_defaults(self) -> dict[str, Any]:
        """Which modules `peft=lora|loha|lokr` adapts (`target_modules`: names, a regex or
        `all-linear`) and which it trains in full (`modules_to_save`) for this policy."""
        return {"target_modules": "all-linear", "modules_to_save": []}

    # -- acting -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget queued actions (call at the start of every episode)."""
        self._queue.clear()

    @torch.no_grad()
    def predict_action_chunk(self, observation: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalized action chunk (B, chunk_size, action_dim) for a batch of observations."""
        chunk = self.predict_chunk(self._normalize(observation, with_targets=False))
        return self.normalizer.unnormalize("action", chunk)

    @torch.no_grad()
    def select_action(self, observation: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next action (B, action_dim): predicts a chunk when the queue is empty and executes
        its first `n_action_steps` actions one call at a time, like LeRobot."""
        if not self._queue:
            chunk = self.predict_action_chunk(observation)[:, : self.config.n_action_steps]
            self._queue.extend(chunk.transpose(0, 1))
        return self._queue.popleft()

    # -- LeRobot pretrained_model/ folder -----------------------------------------------
    def save_pretrained(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """config.json, the processor files and model.safetensors (`state_dict`, default: this policy's)."""
        self.save_metadata(directory)
        tensors = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(Path(directory) / "model.safetensors"))

    def save_metadata(self, directory: Path) -> None:
        """Everything of the folder but the weights: config.json and the processor files (a PEFT
        checkpoint stores adapter weights beside them)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_lerobot_dict(), indent=4))
        if self._stats_bytes is None:  # stats never change during a run: serialize them once
            self._stats_bytes = stats_file_bytes(self.stats)
        write_processor_files(directory, self.config, self._stats_bytes, *self.processor_steps())

    def preprocessor_steps(self) -> list[dict[str, Any]]:
        """This policy's own steps of LeRobot's preprocessor pipeline, between batching and the
        device step (SmolVLA: its tokenizer); none by default."""
        return []

    def processor_steps(self) -> tuple[list[StepSpec], list[StepSpec]]:
        """LeRobot's (preprocessor, postprocessor) steps after its rename and to_batch steps, in
        order: step dicts, with `NORMALIZER`/`UNNORMALIZER` and `DEVICE` where those go.
        Default: `preprocessor_steps()`, device, normalizer; then unnormalizer, device."""
        return [*self.preprocessor_steps(), DEVICE, NORMALIZER], [UNNORMALIZER, DEVICE]


def stats_file_bytes(stats: dict[str, dict[str, torch.Tensor]]) -> bytes:
    """The normalizer's safetensors file: `<feature>.<stat>` tensors, float32."""
    flat = {f"{key}.{name}": t.float().reshape(-1) if t.dim() == 0 else t.float().contiguous()
            for key, per in stats.items() for name, t in per.items()}
    return safetensors.torch.save(flat)


def write_processor_files(directory: Path, config: PolicyConfig, stats_bytes: bytes,
                          pre: Sequence[StepSpec] = (DEVICE, NORMALIZER),
                          post: Sequence[StepSpec] = (UNNORMALIZER, DEVICE)) -> None:
    """LeRobot's policy_{pre,post}processor.json and their stats files (`stats_file_bytes`).
    `pre` and `post` are the steps after rename and to_batch (`Policy.processor_steps`); a stats
    file is named after the index of its step in the pipeline."""
    norm_map = dict(config.normalization_mapping)
    standard = {
        DEVICE: {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
        NORMALIZER: {"registry_name": "normalizer_processor", "config": {
            "eps": _EPS, "features": {**config.input_features, **config.output_features}, "norm_map": norm_map}},
        UNNORMALIZER: {"registry_name": "unnormalizer_processor", "config": {
            "eps": _EPS, "features": dict(config.output_features), "norm_map": norm_map}},
    }

    def pipeline(name: str, first: list[dict[str, Any]], steps: Sequence[StepSpec]) -> dict[str, Any]:
        out = list(first)
        for step in steps:
            if isinstance(step, str):
                step = dict(standard[step])
                if step["registry_name"] != "device_processor":
                    step["state_file"] = f"{name}_step_{len(out)}_{step['registry_name']}.safetensors"
                    (directory / step["state_file"]).write_bytes(stats_bytes)
            out.append(step)
        return {"name": name, "steps": out}

    batching = [{"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
                {"registry_name": "to_batch_processor", "config": {}}]
    pre_pipeline = pipeline("policy_preprocessor", batching, pre)
    post_pipeline = pipeline("policy_postprocessor", [], post)
    (directory / "policy_preprocessor.json").write_text(json.dumps(pre_pipeline, indent=2))
    (directory / "policy_postprocessor.json").write_text(json.dumps(post_pipeline, indent=2))


def read_processor_stats(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Stats from the normalizer step named in policy_preprocessor.json."""
    pipeline = json.loads((Path(directory) / "policy_preprocessor.json").read_text())
    files = [s["state_file"] for s in pipeline["steps"] if s.get("registry_name") == "normalizer_processor"]
    if not files:
        raise UserError(f"{directory}/policy_preprocessor.json has no normalizer_processor step")
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(Path(directory) / files[0])).items():
        key, stat = name.rsplit(".", 1)
        stats.setdefault(key, {})[stat] = tensor
    return stats
