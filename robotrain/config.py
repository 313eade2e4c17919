"""Config schemas for one training run, and the validation that guards them.

Every group of `conf/` has a dataclass here; Hydra composes the YAML files against
these schemas (registered in Hydra's ConfigStore by `register_configs`), so a YAML file
states only what differs from its schema (tests/test_conf_files.py), and `parse` turns
the composed `DictConfig` into typed, validated objects. The `job` group has one schema
per option (`JOB_SCHEMAS`); `parse_job` validates a job node on its own. Validation happens in
`__post_init__`, at the bad value, and raises `UserError` with a one-line message that
names the fix.

Policies are the exception to static typing: each policy type has its own config class
(`robotrain.policies`), so `TrainConfig.policy` is `Any` in the schema and `parse` builds
the class named by `policy.type`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from robotrain.errors import UserError
from robotrain.repo_id import check_repo_id

#: The dataset the package generates itself (see `robotrain.data.synthetic`).
SYNTHETIC_REPO_ID = "robotrain/synthetic_reach"



def conf_dir() -> Path:
    """The `conf/` tree: inside the package in a wheel, beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"robotrain's conf/ folder is missing next to {here}; reinstall robotrain")


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (a fresh one for a default_factory field)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


#: `precision` values (see robotrain.precision).
PRECISIONS = ("fp32", "bf16", "fp16")
#: `compile.mode` values (torch.compile's; see robotrain.compilation).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    video: bool = False
    """Store the camera as AV1 MP4 video (LeRobot's default) instead of PNG images in the parquet."""

    def __post_init__(self) -> None:
        _require(self.num_episodes > 0, f"dataset.synthetic.num_episodes must be > 0, got {self.num_episodes}")
        _require(8 <= self.image_size <= 256, f"dataset.synthetic.image_size must be in [8, 256], got {self.image_size}")


#: Image augmentation types (`dataset.image_transforms.tfs.<name>.type`) and the keywords each
#: reads its range from (see robotrain.augmentation).
AUGMENTATION_TYPES = {"ColorJitter": ("brightness", "contrast", "saturation", "hue"),
                      "SharpnessJitter": ("sharpness",), "RandomAffine": ("degrees", "translate"), "Identity": ()}


@dataclass
class ImageTransformConfig:
    """One augmentation, as LeRobot's `ImageTransformConfig`."""

    weight: float = 1.0
    """Probability weight of drawing this transform for an image (0 leaves it out)."""
    type: str = "Identity"
    """ColorJitter, SharpnessJitter, RandomAffine or Identity."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The range to draw its parameter from, e.g. {brightness: [0.8, 1.2]}."""


def _lerobot_transforms() -> dict[str, ImageTransformConfig]:
    """LeRobot 0.6.1's default transforms and ranges."""
    return {
        "brightness": ImageTransformConfig(1.0, "ColorJitter", {"brightness": [0.8, 1.2]}),
        "contrast": ImageTransformConfig(1.0, "ColorJitter", {"contrast": [0.8, 1.2]}),
        "saturation": ImageTransformConfig(1.0, "ColorJitter", {"saturation": [0.5, 1.5]}),
        "hue": ImageTransformConfig(1.0, "ColorJitter", {"hue": [-0.05, 0.05]}),
        "sharpness": ImageTransformConfig(1.0, "SharpnessJitter", {"sharpness": [0.5, 1.5]}),
        "affine": ImageTransformConfig(1.0, "RandomAffine", {"degrees": [-5.0, 5.0], "translate": [0.05, 0.05]}),
    }


@dataclass
class ImageTransformsConfig:
    """Training-time image augmentation, with LeRobot's names and defaults (see robotrain.augmentation)."""

    enable: bool = False
    """Augment the camera frames of training batches."""
    max_num_transforms: int = 3
    """Transforms drawn (without replacement, by weight) for each camera image of a sample."""
    random_order: bool = False
    """Apply the drawn transforms in a random order instead of the order of tfs."""
    tfs: dict[str, ImageTransformConfig] = field(default_factory=_lerobot_transforms)
    """The transforms to draw from, by name."""

    def __post_init__(self) -> None:
        _require(self.max_num_transforms >= 0,
                 f"dataset.image_transforms.max_num_transforms must be >= 0, got {self.max_num_transforms}")
        for name, tf in self.tfs.items():
            _require(tf.type in AUGMENTATION_TYPES,
                     f"dataset.image_transforms.tfs.{name}.type={tf.type!r} is not an augmentation robotrain has; "
                     f"use one of {', '.join(AUGMENTATION_TYPES)}")
            wanted = AUGMENTATION_TYPES[tf.type]
            _require(set(tf.kwargs) <= set(wanted) and (tf.type != "ColorJitter" or len(tf.kwargs) == 1),
                     f"dataset.image_transforms.tfs.{name}.kwargs must hold "
                     f"{'one of ' if tf.type == 'ColorJitter' else ''}{', '.join(wanted) or 'nothing'} for {tf.type}, "
                     f"got {sorted(tf.kwargs)}")


@dataclass
class MixtureMember:
    """One dataset of a mixture (`dataset.datasets`), as a single dataset is given."""

    repo_id: str = MISSING
    """LeRobot repo id (`user/name`) of the member."""
    weight: float = 1.0
    """Share of the samples it supplies: weight / (sum of the members' weights)."""
    root: Optional[str] = None
    """Local folder holding it; null: the cache (downloaded from the Hub once)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or sha) to download when root is unset."""
    episodes: Optional[list[int]] = None
    """Train on these episode indices of the member only; unset: all."""
    rename_map: Any = None
    """Feature renames for this member only, applied after dataset.rename_map."""

    def __post_init__(self) -> None:
        if self.repo_id == MISSING:
            return
        check_repo_id(self.repo_id, "dataset.datasets[].repo_id")
        _require(math.isfinite(self.weight) and self.weight > 0,
                 f"dataset.datasets: {self.repo_id} has weight {self.weight}; weights must be > 0 (drop the member "
                 "instead of giving it weight 0)")

    @property
    def identity(self) -> tuple:
        """What makes two members the same dataset."""
        root = str(Path(self.root).expanduser().resolve()) if self.root else None
        return self.repo_id, root, self.revision, tuple(self.episodes) if self.episodes is not None else None


@dataclass
class DatasetConfig:
    """Which LeRobot-format dataset to train on: one (`repo_id`), or a weighted mixture (`datasets`)."""

    repo_id: Optional[str] = MISSING
    """LeRobot repo id (`user/name`); `robotrain/synthetic_reach` generates the embedded task; null with datasets."""
    root: Optional[str] = MISSING
    """Local folder holding the dataset; null: the cache (downloaded from the Hub, or generated if synthetic)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or sha) to download when root is unset."""
    episodes: Optional[list[int]] = None
    """Train on these episode indices only; unset: all."""
    datasets: Optional[list[MixtureMember]] = None
    """A mixture instead of one dataset (dataset=mixture): [{repo_id, weight, root, ...}, ...]."""
    rename_map: Any = None
    """Feature renames applied to the dataset (or every member) as it is read, {old: new}."""
    tolerance_s: float = 1e-4
    """Tolerance when matching `delta_timestamps` to frame times, in seconds."""
    image_cache_mb: float = 2048
    """Keep decoded image-camera frames in memory up to this size (per process); 0 decodes every read."""
    video_backend: str = "torchcodec"
    """Decoder of video cameras: `torchcodec` (system FFmpeg) or `pyav` (bundled FFmpeg)."""
    video_decoder_cache: int = 100
    """Open video files kept per data-loading process (least recently used closed first)."""
    video_decoder_cache_mb: float = 512
    """Memory budget of those open decoders per process, in MB (estimated from frame sizes)."""
    video_device: str = "cpu"
    """Decode video on `cpu`, or on the training `cuda` device (torchcodec NVDEC; needs num_workers=0)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Generator settings for the embedded task."""
    image_transforms: ImageTransformsConfig = field(default_factory=ImageTransformsConfig)
    """Image augmentation of training batches (LeRobot's names and defaults)."""

    @property
    def is_synthetic(self) -> bool:
        return self.repo_id == SYNTHETIC_REPO_ID

    @property
    def is_mixture(self) -> bool:
        return self.datasets is not None

    @property
    def repo_ids(self) -> list[str]:
        """The dataset's repo id, or each mixture member's."""
        return [str(self.repo_id)] if self.datasets is None else [m.repo_id for m in self.datasets]

    def member(self, index: int) -> "DatasetConfig":
        """Mixture member `index` as a single-dataset config (the rest of the settings shared)."""
        m = self.datasets[index]
        return dataclasses.replace(self, repo_id=m.repo_id, root=m.root, revision=m.revision, episodes=m.episodes,
                                   datasets=None, rename_map={**(self.rename_map or {}), **(m.rename_map or {})})

    def __post_init__(self) -> None:
        _require(self.video_backend in ("torchcodec", "pyav"),
                 f"dataset.video_backend must be 'torchcodec' or 'pyav', got {self.video_backend!r}")
        _require(self.video_decoder_cache >= 1 and self.video_decoder_cache_mb > 0,
                 "dataset.video_decoder_cache must be >= 1 and dataset.video_decoder_cache_mb > 0")
        _require(self.video_device in ("cpu", "cuda"),
                 f"dataset.video_device must be 'cpu' or 'cuda', got {self.video_device!r}")
        _check_rename_map(self.rename_map, "dataset.rename_map")
        if self.datasets is not None:
            self._check_mixture()
            return
        if self.repo_id == MISSING:  # the schema itself; parse() reports a missing value
            return
        _require(self.repo_id is not None,
                 "dataset.repo_id is unset: pass dataset.repo_id=user/name, or dataset=mixture with dataset.datasets")
        check_repo_id(self.repo_id, "dataset.repo_id")

    def _check_mixture(self) -> None:
        _require(self.repo_id in (None, MISSING),
                 f"dataset.repo_id={self.repo_id} and dataset.datasets are both set: a mixture names its datasets in "
                 "dataset.datasets only (dataset=mixture sets repo_id to null)")
        _require(len(self.datasets) > 0,
                 "dataset.datasets is empty: list the mixture's datasets, e.g. "
                 "'dataset.datasets=[{repo_id: user/a, weight: 2.0}, {repo_id: user/b}]'")
        seen: dict[tuple, int] = {}
        for i, member in enumerate(self.datasets):
            _require(member.identity not in seen,
                     f"dataset.datasets[{i}] ({member.repo_id}) repeats dataset.datasets[{seen.get(member.identity)}]: "
                     "list each dataset once and give it a larger weight instead")
            seen[member.identity] = i
            _check_rename_map(member.rename_map, f"dataset.datasets[{i}].rename_map")


def _check_rename_map(rename_map: Mapping[str, str] | None, where: str) -> None:
    """A {old name: new name} map of strings, two features never renamed to one name (one feature
    with two sources). Rename maps are untyped and null in the schemas, not dict[str, str] = {}:
    Hydra then takes a `{a.b: c}` override whole instead of refusing keys a struct dict lacks."""
    _require(rename_map is None or (isinstance(rename_map, Mapping) and
                                    all(isinstance(k, str) and isinstance(v, str) for k, v in rename_map.items())),
             f"{where} must map feature names to feature names, e.g. {{observation.images.top: observation.image}}; "
             f"got {rename_map!r}")
    targets: dict[str, str] = {}
    for old, new in (rename_map or {}).items():
        _require(new not in targets,
                 f"{where} renames both {targets.get(new)!r} and {old!r} to {new!r}: give each feature its own name")
        targets[new] = old


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
    """Parameter-efficient fine-tuning of a pretrained policy (`robotrain.peft`)."""

    method: str = "none"
    """none (train every parameter), lora, loha or lokr."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Adapter scaling (LoRA's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter path (LoRA) or per module (LoHa, LoKr)."""
    init_type: str = "default"
    """Adapter initialization: default, or LoRA's gaussian / pissa / olora / orthogonal ..."""
    target_modules: Optional[Any] = None
    """Modules to adapt: a list of names, a regex or `all-linear`; unset: the policy's defaults."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full beside the adapters; unset: the policy's defaults."""

    def __post_init__(self) -> None:
        _require(self.method in ("none", "lora", "loha", "lokr"),
                 f"peft.method must be none, lora, loha or lokr, got {self.method!r}")
        _require(self.r > 0, f"peft.r must be > 0, got {self.r}")
        _require(0 <= self.dropout < 1, f"peft.dropout must be in [0, 1), got {self.dropout}")
        _require(self.method != "lora" or self.init_type in _LORA_INITS,
                 f"peft.init_type {self.init_type!r} is not a LoRA initialization; choose one of {', '.join(_LORA_INITS)}")
        _require(self.method not in ("loha", "lokr") or self.init_type == "default",
                 f"peft.init_type={self.init_type} is for LoRA; use peft.init_type=default with {self.method}")


_LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")


_TIMEOUT = re.compile(r"^(\d+(\.\d+)?)([smhd]?)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIMEOUT_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def timeout_seconds(value: str | int | float) -> float:
    """`"90s"`, `"30m"`, `"2h"`, `"1d"` or a number of seconds -> seconds."""
    match = _TIMEOUT.match(str(value).strip())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"job.timeout must look like 90s, 30m, 2h or 1d, got {value!r}")
    return float(match.group(1)) * _TIMEOUT_UNITS[match.group(3)]


@dataclass
class JobConfig:
    """Where the run executes: the settings every target shares.

    Each option of the `job` group has its own schema, a subclass registered in Hydra's ConfigStore
    (`JOB_SCHEMAS`), so a setting of another target is refused where it is typed. SLURM fields keep
    hydra-submitit-launcher's names (its SlurmQueueConf)."""

    target: str = "local"
    """`local` trains in this process; `slurm` and `hf` submit the run and follow it."""
    detach: bool = False
    """Submit and return at once, printing the job ids (otherwise follow logs until the end)."""
    timeout: Optional[str] = None
    """Wall-clock limit, e.g. 90s, 30m, 2h, 1d (HF Jobs; on SLURM it sets timeout_min when that is unset)."""
    tags: list[str] = field(default_factory=list)
    """Labels on the job (HF Jobs labels; SLURM job comment)."""
    secrets: list[str] = field(default_factory=list)
    """NAMES of environment variables whose values are passed to the job as secrets (never the values)."""
    env: dict[str, str] = field(default_factory=dict)
    """Plain (non-secret) environment variables for the job."""

    #: How a field of this schema is named in an error, e.g. "a SLURM setting".
    described_as: ClassVar[str] = "a job setting"

    def __post_init__(self) -> None:
        _require(self.target in JOB_SCHEMAS, f"job.target must be local, slurm or hf, got {self.target!r}")
        # A job running where it was sent sets job.target=local; any other target needs its own schema.
        _require(self.target in ("local", type(self).target), f"job.target={self.target} needs job={self.target}")
        if self.timeout is not None:
            timeout_seconds(self.timeout)
        self._check_names()

    def _check_names(self) -> None:
        for name in self.secrets:
            _require("=" not in name and not name.startswith("hf_") and bool(_ENV_NAME.match(name)),
                     "job.secrets lists NAMES of environment variables, never values: export the value, "
                     "then pass e.g. job.secrets=[HF_TOKEN]")
        for name in self.env:
            _require(bool(_ENV_NAME.match(name)), f"job.env key {name!r} is not an environment variable name")
        for name in self.env:
            _require(name not in self.secrets, f"{name} is in both job.env and job.secrets; keep it in job.secrets only")

    @property
    def is_remote(self) -> bool:
        return self.target != "local"

    @property
    def shares_run_dir(self) -> bool:
        """The job runs in a run dir chosen here, on a filesystem it shares with this machine (SLURM);
        an HF Job picks its own."""
        return self.target == "slurm"


@dataclass
class LocalJob(JobConfig):
    """`job=local`: train in this process, on this machine."""


@dataclass
class SlurmJob(JobConfig):
    """`job=slurm`: submit to a SLURM cluster through submitit."""

    target: str = "slurm"
    """`slurm` submits the run; `local` trains here (what the submitted job itself runs)."""
    submitit_folder: Optional[str] = None
    """Folder for submitit's job files and logs; unset: `<run or sweep dir>/.submitit/%j`."""
    partition: Optional[str] = None
    """SLURM partition."""
    nodes: int = 1
    """SLURM nodes per run."""
    tasks_per_node: int = 1
    """SLURM tasks (training processes) per node."""
    gpus_per_node: Optional[int] = None
    """SLURM GPUs per node."""
    cpus_per_task: Optional[int] = None
    """SLURM CPUs per task."""
    mem_gb: Optional[int] = None
    """SLURM memory per node, in GB."""
    timeout_min: Optional[int] = None
    """SLURM time limit in minutes (default: from job.timeout, else 60)."""
    account: Optional[str] = None
    """SLURM account."""
    qos: Optional[str] = None
    """SLURM quality of service."""
    constraint: Optional[str] = None
    """SLURM node constraint."""
    array_parallelism: int = 256
    """Most jobs of a sweep's array running at once."""
    max_num_timeout: int = 3
    """Requeues allowed after the time limit (preemptions requeue without limit)."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options, e.g. {begin: now+60, mail-type: END}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the sbatch script before the job (module load, conda activate...)."""

    described_as: ClassVar[str] = "a SLURM setting"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.nodes >= 1 and self.tasks_per_node >= 1, "job.nodes and job.tasks_per_node must be >= 1")
        _require(self.array_parallelism >= 1, f"job.array_parallelism must be >= 1, got {self.array_parallelism}")
        _require(self.timeout_min is None or self.timeout_min > 0, f"job.timeout_min must be > 0, got {self.timeout_min}")

    @property
    def slurm_timeout_min(self) -> int:
        if self.timeout_min is not None:
            return self.timeout_min
        return max(1, int(timeout_seconds(self.timeout) // 60)) if self.timeout else 60


@dataclass
class HfJob(JobConfig):
    """`job=hf`: submit to Hugging Face Jobs."""

    target: str = "hf"
    """`hf` submits the run; `local` trains here (what the submitted job itself runs)."""
    image: Optional[str] = None
    """Docker image with robotrain installed (HF Jobs)."""
    flavor: str = "cpu-basic"
    """HF Jobs hardware flavor, e.g. cpu-basic, t4-small, a10g-small, a100-large."""
    namespace: Optional[str] = None
    """HF Jobs namespace (user or org); unset: the token's user."""

    described_as: ClassVar[str] = "an HF Jobs setting"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target != "hf":  # the submitted job itself (job.target=local) needs no image
            return
        _require(bool(self.image), "job=hf needs an image with robotrain installed: add job.image=<docker image>")
        from huggingface_hub import JobHardware

        flavors = [f.value for f in JobHardware]
        _require(self.flavor in flavors, f"job.flavor {self.flavor!r} is not an HF Jobs flavor; choose one of: "
                 f"{', '.join(flavors)}")


#: The `job` group's options (each also a `job.target` value) and their schemas.
JOB_SCHEMAS: dict[str, type[JobConfig]] = {"local": LocalJob, "slurm": SlurmJob, "hf": HfJob}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def job_schema(node: Mapping[str, Any]) -> type[JobConfig]:
    """The schema of a `job` node: that of the `job` option it was composed from (its type when Hydra
    composed it, else told by its fields). A `local` node takes the schema of its `job.target`, so
    `job.target=slurm|hf` alone dispatches a run with that target's defaults."""
    composed = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if composed in JOB_SCHEMAS.values() and composed is not LocalJob:
        return composed
    own = set(node) - _field_names(JobConfig)
    fitting = [cls for cls in JOB_SCHEMAS.values() if own <= _field_names(cls)]
    if composed is LocalJob or not own or not fitting:  # not fitting: validation names the stray field
        return JOB_SCHEMAS.get(node.get("target"), LocalJob)
    return fitting[0]


def misplaced_job_field(key: str, schema_name: str) -> Optional[str]:
    """The one-line fix for `job.<key>` given to the job schema named `schema_name`, which lacks it;
    None when no job option has that field (a misspelling, reported as an unknown key)."""
    given = next((name for name, cls in JOB_SCHEMAS.items() if cls.__name__ == schema_name), None)
    owner = next((name for name, cls in JOB_SCHEMAS.items() if key in _field_names(cls)), None)
    if given is None or owner is None:
        return None
    verb = "add" if given == "local" else "use"
    return f"job.{key} is {JOB_SCHEMAS[owner].described_as}, which job={given} does not have: {verb} job={owner}, or drop it"


@dataclass
class DistributedConfig:
    """Several training processes: data-parallel (DDP) or sharded (FSDP2)."""

    processes: int = 1
    """Processes to start on this machine (robotrain runs torchrun for you). Under torchrun,
    accelerate launch or a multi-task SLURM job, the world comes from the environment instead."""
    strategy: str = "ddp"
    """ddp: each process holds the whole model; fsdp: parameters, gradients and optimizer state are sharded
    (the choices: robotrain.strategy.STRATEGIES)."""

    def __post_init__(self) -> None:
        _require(self.processes >= 1, f"distributed.processes must be >= 1, got {self.processes}")
        from robotrain.strategy import STRATEGIES

        _require(self.strategy in STRATEGIES,
                 f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")


@dataclass
class EmaConfig:
    """An exponential moving average of the trained weights (see robotrain.ema)."""

    enabled: bool = False
    """Keep the average (updated after every optimizer step, saved in checkpoints)."""
    decay: float = 0.999
    """Weight of the old average at each update, once warmed up."""
    warmup: bool = True
    """Ramp the decay as min(decay, (1 + step) / (10 + step)): a young average follows the weights."""
    for_eval: bool = True
    """Evaluate and publish (pretrained_model/, the Hub's final model) the average instead of the raw weights."""

    def __post_init__(self) -> None:
        _require(0 < self.decay < 1, f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass
class CompileConfig:
    """torch.compile of the policy's training forward (see robotrain.compilation)."""

    enabled: bool = False
    """Compile the forward in place (state dict keys unchanged); without a working backend, warn and train eagerly."""
    mode: str = "default"
    """torch.compile mode: default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs."""

    def __post_init__(self) -> None:
        _require(self.mode in COMPILE_MODES, f"compile.mode must be one of {', '.join(COMPILE_MODES)}, got {self.mode!r}")


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
class EnvConfig:
    """A simulated environment policies are evaluated in: conf/env/<name>.yaml, a gymnasium env
    that LeRobot evaluates in too (robotrain.eval.envs), or the embedded synthetic task."""

    name: str = "synthetic"
    """The option's name (conf/env/<name>.yaml): pusht, aloha_insertion, aloha_transfer_cube, synthetic."""
    gym_id: Optional[str] = None
    """gymnasium id passed to gym.make, e.g. gym_pusht/PushT-v0; None: the embedded synthetic task."""
    package: Optional[str] = None
    """Module whose import registers gym_id (e.g. gym_pusht)."""
    install: str = "pip install 'robotrain[sim]'"
    """How to install the package (named in the error when it is missing)."""
    max_steps: int = 50
    """Steps before an episode is cut off (LeRobot's episode_length; the embedded task's: eval.max_steps)."""
    fps: int = 10
    """Frames per second of rollout videos (the env's render_fps)."""
    gl: Optional[str] = None
    """MuJoCo rendering backend set as MUJOCO_GL when unset (egl renders headless, on a CPU too)."""
    gym_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of gym.make (obs_type, render_mode...), as LeRobot's env config passes them."""
    task_group: str = "synthetic"
    """LeRobot's env type (pusht, aloha): the task_group of eval_info.json."""

    def __post_init__(self) -> None:
        _require(self.max_steps > 0, f"env.max_steps must be > 0, got {self.max_steps}")
        _require(self.gym_id is None or self.package is not None,
                 f"env {self.name!r} names gym_id={self.gym_id!r} but no package that registers it: set env.package")


@dataclass
class EvalConfig:
    """Rollouts of the policy: in the embedded simulator while training on the synthetic dataset,
    in any env with python -m robotrain.eval."""

    every: int = 0
    """Evaluate every N steps; 0: only after the last step."""
    at_start: bool = True
    """Also evaluate the untrained policy before the first step (fresh runs only)."""
    episodes: int = 50
    """Episodes per evaluation; episode i starts from seed eval.seed + i."""
    max_steps: int = 50
    """Steps before an episode of the embedded task is cut off (a gymnasium env's: env.max_steps)."""
    seed: int = 1000
    """Seed of the evaluation episodes (independent of training randomness)."""
    enabled: bool = True
    """Set false to skip evaluation entirely."""
    video_episodes: int = 1
    """Episodes recorded: side by side into `<run_dir>/eval/step_<n>.gif` when training, as MP4 by robotrain.eval; 0: none."""
    video_size: int = 128
    """Side of each episode's square in the video, in pixels (the policy still sees the dataset's image size)."""
    batch_size: int = 1
    """Envs stepped side by side (gymnasium's SyncVectorEnv), one policy batch; results do not depend on it."""
    rename_map: Any = None
    """Env observation name -> the policy's, e.g. {observation.images.top: observation.image}."""
    num_threads: int = 1
    """Torch threads of an evaluation running beside training (gymnasium envs); training keeps the rest."""
    timeout_s: float = 3600.0
    """At the end of a run, wait at most this long for evaluations still running beside training."""

    def __post_init__(self) -> None:
        _check_rename_map(self.rename_map, "eval.rename_map")
        _require(self.every >= 0, f"eval.every must be >= 0, got {self.every}")
        _require(self.episodes > 0, f"eval.episodes must be > 0, got {self.episodes}")
        _require(self.max_steps > 0, f"eval.max_steps must be > 0, got {self.max_steps}")
        _require(0 <= self.video_episodes <= self.episodes,
                 f"eval.video_episodes must be in [0, eval.episodes={self.episodes}], got {self.video_episodes}")
        _require(16 <= self.video_size <= 1024, f"eval.video_size must be in [16, 1024], got {self.video_size}")
        _require(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")
        _require(self.num_threads > 0, f"eval.num_threads must be > 0, got {self.num_threads}")
        _require(self.timeout_s >= 0, f"eval.timeout_s must be >= 0, got {self.timeout_s}")


@dataclass
class TrackerConfig:
    """Experiment tracking beside metrics.jsonl: metrics, the config and eval videos (`robotrain.tracking`)."""

    name: str = "none"
    """none, tensorboard, wandb or trackio (each needs `pip install 'robotrain[trackers]'`)."""
    project: str = "robotrain"
    """Project the run belongs to (wandb, trackio)."""
    run_name: Optional[str] = None
    """Name of the run (wandb display name, trackio run, folder under tracker.dir); unset: generated / the run dir's."""
    entity: Optional[str] = None
    """wandb user or team; unset: your default entity."""
    mode: Optional[str] = None
    """wandb mode: online, or offline (upload later with `wandb sync`); unset: $WANDB_MODE, else online."""
    dir: Optional[str] = None
    """Folder for tensorboard's or wandb's local files; unset: the run dir (wandb: $WANDB_DIR if set)."""

    def __post_init__(self) -> None:
        _require(self.name in _TRACKERS, f"tracker must be one of {', '.join(_TRACKERS)}, got {self.name!r}")
        _require(bool(self.project), "tracker.project must not be empty")
        _require(self.mode in (None, "online", "offline"),
                 f"tracker.mode must be online or offline, got {self.mode!r}")
        for key in ("mode", "entity"):
            _require(getattr(self, key) is None or self.name == "wandb",
                     f"tracker.{key} is a wandb setting and does nothing with tracker={self.name}; drop it")
        _require(self.dir is None or self.name != "trackio",
                 "trackio keeps its data in $TRACKIO_DIR: set that environment variable instead of tracker.dir")


_TRACKERS = ("none", "tensorboard", "wandb", "trackio")


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
        if self.repo_id is not None:
            check_repo_id(self.repo_id, "hub.repo_id")
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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes: DDP or FSDP."""
    ema: EmaConfig = field(default_factory=EmaConfig)
    """An exponential moving average of the trained weights."""
    compile: CompileConfig = field(default_factory=CompileConfig)
    """torch.compile of the policy's forward."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The simulated environment evaluations run in (env=synthetic: the embedded reach task)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation in the embedded simulator."""
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    """Experiment tracker (tensorboard, wandb, trackio) the main process logs to."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Pushing checkpoints and the final model to the Hub."""
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    """Where to resume from, if anywhere."""
    seed: int = 0
    """Seed of model init, data order and every RNG; the run is a pure function of it."""
    steps: int = 2000
    """Total optimizer steps of the run (may be raised when resuming)."""
    batch_size: int = 64
    """Samples per micro-batch per process (an optimizer step takes grad_accum_steps of them)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step: the global batch is batch_size x processes x grad_accum_steps."""
    precision: str = "fp32"
    """fp32; bf16: autocast the forward to bfloat16 (CPU or GPU); fp16: float16 with loss scaling (GPU)."""
    num_workers: int = 0
    """DataLoader worker processes; results do not depend on it."""
    prefetch: int = 2
    """Steps of batches (each grad_accum_steps micro-batches) read ahead on a thread when num_workers=0; 0: off."""
    log_every: int = 100
    """Write a metrics line (and a log line when not on a terminal) every N steps."""
    log_samples: bool = False
    """Write every step's dataset indices, per process, to samples_rank<r>.jsonl (to audit data order)."""

    def __post_init__(self) -> None:
        _require(self.steps > 0, f"steps must be > 0, got {self.steps}")
        _require(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _require(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _require(self.precision in PRECISIONS,
                 f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        _require(self.num_workers == 0 or self.dataset.video_device == "cpu",
                 "dataset.video_device=cuda decodes in the training process (CUDA cannot start in forked "
                 "DataLoader workers): set num_workers=0")
        _require(self.prefetch >= 0, f"prefetch must be >= 0, got {self.prefetch}")
        _require(self.log_every > 0, f"log_every must be > 0, got {self.log_every}")
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")


@dataclass
class PolicySource:
    """The policy an evaluation loads."""

    path: str = MISSING
    """A pretrained_model/ folder, a checkpoint or run dir, or hub:user/repo[@step|tag|sha]."""


@dataclass
class EvalRunConfig:
    """One evaluation of a trained policy: python -m robotrain.eval (conf/eval.yaml)."""

    policy: PolicySource = field(default_factory=PolicySource)
    """Which policy to evaluate."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The environment to evaluate it in (env=pusht|aloha_insertion|aloha_transfer_cube)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Episodes, seeds, vector size, videos."""
    device: str = "auto"
    """Where the policy runs: auto (cuda if available, else cpu), cpu, cuda, cuda:1..."""


def register_configs() -> None:
    """Register the schemas Hydra composes `conf/` against: the run's, and each job option's (the
    --help text's resolvers are `robotrain.help.register_resolvers`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="robotrain_schema", node=TrainConfig)
    store.store(name="robotrain_eval_schema", node=EvalRunConfig)
    store.store(group="env", name="env_schema", node=EnvConfig)
    for name, schema in JOB_SCHEMAS.items():  # conf/job/<name>.yaml starts from its schema
        store.store(group="job", name=f"{name}_schema", node=schema)


def parse(cfg: DictConfig | dict) -> TrainConfig:
    """Validate a composed config into typed objects; raises `UserError` on bad input."""
    from robotrain.policies import policy_config_class

    node = OmegaConf.create(cfg)
    try:
        raw = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise UserError(_omegaconf_message(err, "config")) from None
    policy_raw = raw.pop("policy", None)
    if not isinstance(policy_raw, dict) or "type" not in policy_raw:
        raise UserError("no policy selected: pass policy=<name>, e.g. policy=mlp")
    policy_cls = policy_config_class(policy_raw["type"])
    schema = OmegaConf.structured(TrainConfig)
    schema.job = OmegaConf.structured(job_schema(node.get("job") or {}))
    train = _typed(schema, raw, where="config")
    train.policy = _typed(policy_cls, policy_raw, where="policy")
    # Here, before a policy fetches a tokenizer or backbone weights it would not be adapted from.
    _require(train.peft.method == "none" or bool(train.policy.pretrained_path),
             f"peft={train.peft.method} adapts a pretrained policy: set policy.pretrained_path=<folder or repo id>")
    _require(not (train.compile.enabled and getattr(train.policy, "compile_model", False)),
             "compile.enabled=true compiles the whole policy and policy.compile_model=true a part of it: "
             "use one of the two")
    return train


def parse_eval(cfg: DictConfig | dict) -> EvalRunConfig:
    """Validate a composed conf/eval.yaml (python -m robotrain.eval); raises `UserError` on bad input."""
    try:
        raw = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        message = _omegaconf_message(err, "eval")
        if "policy.path" in message:
            message = "policy.path must be set: pass policy.path=<pretrained_model folder | hub:user/repo[@step]>"
        raise UserError(message) from None
    return _typed(EvalRunConfig, raw, where="eval")


def parse_job(node: Mapping[str, Any]) -> JobConfig:
    """Validate a `job` node alone (a sweep point's, before its run is planned), against the schema
    of the option it was composed from (`job_schema`)."""
    try:
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    except OmegaConfBaseException as err:
        raise UserError(_omegaconf_message(err, "job")) from None
    return _typed(job_schema(node), values, where="job")


def _typed(schema: Any, values: dict, where: str) -> Any:
    """Merge plain values into a dataclass schema (a class or its structured node) and build it
    (running validation)."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise UserError(_omegaconf_message(err, where)) from None


def _omegaconf_message(err: OmegaConfBaseException, where: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    first = str(err).strip().splitlines()[0]
    if isinstance(err, MissingMandatoryValue):
        return f"{key} must be set: pass {key}=<value>"
    if "not in struct" in first or "Key '" in first and "not in" in first:
        leaf, schema = getattr(err, "key", None), getattr(err, "object_type", None)
        in_job = isinstance(schema, type) and issubclass(schema, JobConfig)
        misplaced = in_job and misplaced_job_field(str(leaf), schema.__name__)
        if misplaced:
            return misplaced
        return f"unknown {where} field {key!r}; check the spelling (python -m robotrain --cfg job lists the fields)"
    return f"bad value for {where} field {key!r}: {first}"


def to_dict(obj: Any) -> dict:
    """A config dataclass as plain JSON-able data (for train_config.json)."""
    return dataclasses.asdict(obj)
