"""`resume=<spec>` -> a local checkpoint, and the config to continue with.

Specs:
    auto                  the latest checkpoint of this run dir, else start fresh
    <path>                a run dir, its checkpoints/ folder, or one checkpoint folder
    hub:user/repo[@rev]   a run pushed to the Hub (see robotrain.hub)

The config of a resumed run is the checkpoint's `train_config.json` with this command
line's task overrides (as Hydra parsed them) applied on top. Overrides that would make
the continuation differ from an uninterrupted run (`EXACTNESS_KEYS`) are refused unless
`resume.allow_changes=true`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from robotrain import checkpoint_layout as layout
from robotrain.repo_id import is_repo_id
from robotrain.errors import UserError

#: Config keys whose change breaks exact continuation of a run.
EXACTNESS_KEYS = ("seed", "policy.type", "dataset.repo_id", "dataset.episodes", "dataset.datasets",
                  "dataset.rename_map", "dataset.synthetic", "sampler", "ema")

_HUB_SPEC = re.compile(r"^hub:(?P<repo>[^@\s]+)(?:@(?P<rev>[^@\s]+))?$")


@dataclass
class ResumePoint:
    """A checkpoint to continue from."""

    checkpoint_dir: Path
    """The step folder (holding pretrained_model/ and training_state/)."""
    step: int
    """Optimizer steps already taken."""


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str | None


def parse_hub_spec(spec: str) -> HubSpec | None:
    """`hub:user/repo[@rev]` -> HubSpec; None if `spec` is not a hub spec."""
    if not spec.startswith("hub:"):
        return None
    match = _HUB_SPEC.match(spec)
    if not match or not is_repo_id(match["repo"]):
        raise UserError(f"bad hub spec {spec!r}: expected hub:user/repo or hub:user/repo@<step|tag|sha>")
    return HubSpec(match["repo"], match["rev"])


def locate(spec: str | None, run_dir: Path) -> ResumePoint | None:
    """The checkpoint a spec names; None means start fresh."""
    if not spec:
        return None
    if spec == "auto":
        found = layout.latest(run_dir / "checkpoints")
        return _point(found) if found else None
    remote = parse_hub_spec(spec)
    if remote is not None:
        from robotrain import hub

        # Only that checkpoint's files, into this run's own checkpoints/ folder.
        return _point(hub.download_checkpoint(remote.repo_id, remote.revision, dest=run_dir))
    return _point(_local_checkpoint(Path(spec).expanduser()))


def _local_checkpoint(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"resume path {path} does not exist; pass a run dir, a checkpoint folder, or resume=auto")
    if path.is_symlink() or (path / layout.TRAINING_STATE).exists() or path.name.isdigit():
        folder = path.resolve()
        if not layout.is_complete(folder):
            raise UserError(f"{path} is not a complete checkpoint (no training_state/training_step.json); pick another step")
        return folder
    for candidate in (path / "checkpoints", path):
        found = layout.latest(candidate)
        if found is not None:
            return found
    raise UserError(f"no checkpoint found under {path}; pass a run dir that has checkpoints/, or a checkpoint folder")


def _point(folder: Path) -> ResumePoint:
    info = layout.read_json(folder / layout.TRAINING_STATE / layout.TRAINING_STEP)
    return ResumePoint(checkpoint_dir=folder, step=int(info["step"]))


def merged_config(point: ResumePoint, composed: DictConfig, task_overrides: Sequence[str]) -> DictConfig:
    """The checkpoint's train_config.json with this command line's overrides on top."""
    saved = layout.read_json(point.checkpoint_dir / layout.PRETRAINED / layout.TRAIN_CONFIG)
    base = OmegaConf.create(saved)
    # Where the run executes is this command's choice, not the run's; and a job node saved by an older
    # robotrain (one flat schema for every target) would not fit any of today's job schemas.
    if "job" in composed:
        OmegaConf.update(base, "job", composed.job, merge=False, force_add=True)
    merged = apply_overrides(base.copy(), composed, task_overrides)
    if not merged.resume.allow_changes:
        _refuse_exactness_changes(base, merged)
    if merged.steps <= point.step:
        raise UserError(
            f"steps={merged.steps} is not beyond the checkpoint's step {point.step}; "
            f"pass steps=<more than {point.step}> to train further"
        )
    return merged


def apply_overrides(base: DictConfig, composed: DictConfig, task_overrides: Sequence[str]) -> DictConfig:
    """Set each overridden key of `base` to its value in the freshly composed config.

    Hydra has already interpreted the overrides (groups, interpolations, `~` and `+`)
    when composing; reading the results back from `composed` reuses that exactly."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None:
            continue
        if override.is_delete():
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(base, parent_key) if parent_key else base
            if isinstance(parent, DictConfig) and leaf in parent:
                parent.pop(leaf)
            continue
        OmegaConf.update(base, key, OmegaConf.select(composed, key), merge=False, force_add=True)
    return base


def _refuse_exactness_changes(base: DictConfig, merged: DictConfig) -> None:
    for key in EXACTNESS_KEYS:
        before, after = OmegaConf.select(base, key), OmegaConf.select(merged, key)
        if _plain(before) != _plain(after):
            change = f"{_plain(before)!r} -> {_plain(after)!r}"
            raise UserError(
                f"resuming with a different {key}{f' ({change})' if len(change) <= 160 else ''} would not continue "
                "the run exactly; drop that override or add resume.allow_changes=true"
            )


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
