"""Config schemas for one training run, and the validation that guards them.

Every group of `conf/` has a dataclass here; Hydra composes the YAML files against
these schemas (registered in Hydra's ConfigStore by `register_configs`), and `parse`
turns the composed `DictConfig` into typed, validated objects. Validation happens in
`__post_init__`, at the bad value, and raises `UserError` with a one-line message that
names the fix.

Policies are the exception to static typing: each policy type has its own config class
(`robotrain.policies`), so `TrainConfig.policy` is `Any` in the schema and `parse` builds
the class named by `policy.type`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from robotrain.errors import UserError

#: The dataset the package generates itself (see `robotrain.data.synthetic`).
SYNTHETIC_REPO_ID = "robotrain/synthetic_reach"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def conf_dir() -> Path:
    """The `conf/` tree: inside the package in a wheel, beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"robotrain's conf/ folder is missing next to {here}; reinstall robotrain")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass
class SyntheticConfig:
    """How the embedded reach task is generated (used when dataset.repo_id is the synthetic one)."""

    num_episodes: int = 1000
    """Episodes the scripted expert records."""
    seed: int = 0
    """Seed of the generator: the same seed always writes the same dataset."""
    image_size: int = 32
    """Side of the square rendered camera image, in pixels."""

    def __post_init__(self) -> None:
        _require(self.num_episodes > 0, f"dataset.synthetic.num_episodes must be > 0, got {self.num_episodes}")
        _require(8 <= self.image_size <= 256, f"dataset.synthetic.image_size must be in [8, 256], got {self.image_size}")


@dataclass
class DatasetConfig:
    """Which LeRobot-format dataset to train on."""

    repo_id: str = MISSING
    """LeRobot repo id (`user/name`); `robotrain/synthetic_reach` generates the embedded task."""
    root: Optional[str] = None
    """Local folder holding the dataset; unset: the robotrain cache (synthetic only)."""
    episodes: Optional[list[int]] = None
    """Train on these episode indices only; unset: all."""
    tolerance_s: float = 1e-4
    """Tolerance when matching `delta_timestamps` to frame times, in seconds."""
    image_cache_mb: float = 2048
    """Keep decoded camera frames in memory up to this size (per process); 0 decodes every read."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Generator settings for the embedded task."""

    @property
    def is_synthetic(self) -> bool:
        return self.repo_id == SYNTHETIC_REPO_ID

    def __post_init__(self) -> None:
        if self.repo_id == MISSING:  # the schema itself; parse() reports a missing value
            return
        _require(
            bool(_REPO_ID.match(self.repo_id)),
            f"dataset.repo_id must look like 'user/name', got {self.repo_id!r}",
        )
        _require(
            self.is_synthetic or self.root is not None,
            f"dataset.root is required for {self.repo_id!r}: pass dataset.root=/path/to/the/dataset",
        )


@dataclass
class SamplerConfig:
    """Order in which frames are drawn (see `robotrain.data.sampler`)."""

    permutation: str = "randperm"
    """`randperm` (uniform, O(frames) per epoch) or `feistel` (O(1) memory and seek)."""
    shuffle: bool = True
    """Shuffle frames each epoch; false: dataset order."""
    drop_n_first_frames: int = 0
    """Never draw the first N frames of each episode."""
    drop_n_last_frames: int = 0
    """Never draw the last N frames of each episode."""

    def __post_init__(self) -> None:
        _require(
            self.permutation in ("randperm", "feistel"),
            f"sampler.permutation must be 'randperm' or 'feistel', got {self.permutation!r}",
        )
        _require(
            self.drop_n_first_frames >= 0 and self.drop_n_last_frames >= 0,
            "sampler.drop_n_first_frames and sampler.drop_n_last_frames must be >= 0",
        )


@dataclass
class OptimConfig:
    """AdamW settings."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 1e-4
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip_norm: float = 10.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2, f"optim.betas must be two numbers, got {list(self.betas)}")
        _require(self.grad_clip_norm >= 0, f"optim.grad_clip_norm must be >= 0, got {self.grad_clip_norm}")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, stepped once per optimizer step."""

    name: str = "cosine"
    """`cosine` (linear warmup then cosine decay) or `constant` (warmup then flat)."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to optim.lr."""
    min_lr_ratio: float = 0.1
    """Cosine decays to optim.lr * min_lr_ratio at the last step."""

    def __post_init__(self) -> None:
        _require(
            self.name in ("cosine", "constant"),
            f"scheduler.name must be 'cosine' or 'constant', got {self.name!r}",
        )
        _require(self.warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning; `none` trains every parameter."""

    method: str = "none"
    """Adapter method; only `none` is available in this version."""

    def __post_init__(self) -> None:
        _require(self.method == "none", f"peft.method {self.method!r} is not available yet; use peft=none")


@dataclass
class JobConfig:
    """Where the run executes."""

    target: str = "local"
    """`local`: train in this process; other targets dispatch the run."""

    def __post_init__(self) -> None:
        _require(self.target == "local", f"job.target {self.target!r} is not available yet; use job=local")

    @property
    def is_remote(self) -> bool:
        return self.target != "local"


@dataclass
class CheckpointConfig:
    """When checkpoints are written under `<run_dir>/checkpoints/`."""

    every: int = 500
    """Save every N steps (the last step is always saved); 0: only the last step."""
    keep_last: int = 0
    """Keep only the newest N step folders; 0 keeps all."""
    fsync: bool = True
    """Flush files to disk before a checkpoint is published (crash-safe; costs a little time)."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        _require(self.keep_last >= 0, f"checkpoint.keep_last must be >= 0, got {self.keep_last}")


@dataclass
class EvalConfig:
    """Rollouts in the embedded simulator (synthetic dataset only)."""

    every: int = 0
    """Evaluate every N steps; 0: only after the last step."""
    at_start: bool = True
    """Also evaluate the untrained policy before the first step (fresh runs only)."""
    episodes: int = 50
    """Episodes per evaluation, run as one batch."""
    max_steps: int = 50
    """Simulator steps before an episode counts as a failure."""
    seed: int = 1000
    """Seed of the evaluation episodes (independent of training randomness)."""
    enabled: bool = True
    """Set false to skip evaluation entirely."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"eval.every must be >= 0, got {self.every}")
        _require(self.episodes > 0, f"eval.episodes must be > 0, got {self.episodes}")
        _require(self.max_steps > 0, f"eval.max_steps must be > 0, got {self.max_steps}")


@dataclass
class HubConfig:
    """Pushing the run to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`, never stored)."""

    repo_id: Optional[str] = None
    """Model repo `user/name` the run is pushed to; unset: nothing is pushed."""
    push_checkpoints: bool = False
    """Upload every saved checkpoint to `checkpoints/<step>/` (one commit, tagged with the step)."""
    push_final: bool = True
    """Upload the final model and a model card to the repo root (when repo_id is set)."""
    private: bool = False
    """Create the repo private (an existing repo keeps its visibility)."""
    max_retries: int = 5
    """Attempts per upload before it waits for the next checkpoint."""
    drain_timeout_s: float = 600.0
    """At exit, wait at most this long for uploads still in flight."""

    def __post_init__(self) -> None:
        _require(
            self.repo_id is None or bool(_REPO_ID.match(self.repo_id)),
            f"hub.repo_id must look like 'user/name', got {self.repo_id!r}",
        )
        _require(
            not self.push_checkpoints or self.repo_id is not None,
            "hub.push_checkpoints=true needs a repo: add hub.repo_id=<user/name>",
        )
        _require(self.max_retries >= 1, f"hub.max_retries must be >= 1, got {self.max_retries}")
        _require(self.drain_timeout_s >= 0, f"hub.drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


@dataclass
class ResumeConfig:
    """Continue a run from a checkpoint. `resume=<spec>` on the command line sets `resume.spec`."""

    spec: Optional[str] = None
    """`auto` (latest checkpoint of this run dir, else fresh), a run or checkpoint folder, or `hub:user/repo[@rev]`."""
    allow_changes: bool = False
    """Allow overrides that break exactness (policy type, dataset, seed, sampler) on resume."""


@dataclass
class TrainConfig:
    """One training run."""

    policy: Any = None
    """The policy; its fields depend on `policy.type` (see robotrain.policies)."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """The LeRobot dataset to train on."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Deterministic, seekable order of frames."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Adapters for fine-tuning."""
    job: JobConfig = field(default_factory=JobConfig)
    """Where the run executes."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation in the embedded simulator."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Pushing checkpoints and the final model to the Hub."""
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    """Where to resume from, if anywhere."""
    seed: int = 0
    """Seed of model init, data order and every RNG; the run is a pure function of it."""
    steps: int = 2000
    """Total optimizer steps of the run (may be raised when resuming)."""
    batch_size: int = 64
    """Samples per optimizer step per process."""
    num_workers: int = 0
    """DataLoader worker processes; results do not depend on it."""
    prefetch: int = 2
    """Batches prepared ahead on a background thread when num_workers=0; 0 turns it off."""
    log_every: int = 100
    """Write a metrics line (and a log line when not on a terminal) every N steps."""

    def __post_init__(self) -> None:
        _require(self.steps > 0, f"steps must be > 0, got {self.steps}")
        _require(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        _require(self.prefetch >= 0, f"prefetch must be >= 0, got {self.prefetch}")
        _require(self.log_every > 0, f"log_every must be > 0, got {self.log_every}")
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")


def register_configs() -> None:
    """Register the schema Hydra composes `conf/config.yaml` against."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="robotrain_schema", node=TrainConfig)


def parse(cfg: DictConfig | dict) -> TrainConfig:
    """Validate a composed config into typed objects; raises `UserError` on bad input."""
    from robotrain.policies import policy_config_class

    try:
        raw = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise UserError(_omegaconf_message(err, "config")) from None
    policy_raw = raw.pop("policy", None)
    if not isinstance(policy_raw, dict) or "type" not in policy_raw:
        raise UserError("no policy selected: pass policy=<name>, e.g. policy=mlp")
    policy_cls = policy_config_class(policy_raw["type"])
    train = _typed(TrainConfig, raw, where="config")
    train.policy = _typed(policy_cls, policy_raw, where="policy")
    return train


def _typed(cls: type, values: dict, where: str) -> Any:
    """Merge plain values into the dataclass schema `cls` and build it (running validation)."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), values)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise UserError(_omegaconf_message(err, where)) from None


def _omegaconf_message(err: OmegaConfBaseException, where: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    first = str(err).strip().splitlines()[0]
    if isinstance(err, MissingMandatoryValue):
        return f"{key} must be set: pass {key}=<value>"
    if "not in struct" in first or "Key '" in first and "not in" in first:
        return f"unknown {where} field {key!r}; check the spelling (python -m robotrain --cfg job lists the fields)"
    return f"bad value for {where} field {key!r}: {first}"


def to_dict(obj: Any) -> dict:
    """A config dataclass as plain JSON-able data (for train_config.json)."""
    return dataclasses.asdict(obj)
