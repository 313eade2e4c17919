"""Policy registry: `policy.type` -> class, plus building and loading policies.

Policies are imported lazily so that `python -m robotrain policy=mlp` never pays for
importing transformers or diffusers.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

from robotrain.checkpoint import load_model_weights
from robotrain.errors import UserError
from robotrain.policies.base import (
    Policy,
    PolicyConfig,
    features_from_dataset,
    read_processor_stats,
    stats_to_tensors,
)

_REGISTRY: dict[str, str] = {
    "mlp": "robotrain.policies.mlp:MLPPolicy",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(policy_type: str) -> type[Policy]:
    if policy_type not in _REGISTRY:
        raise UserError(f"unknown policy type {policy_type!r}; choose one of: {', '.join(available())}")
    module, name = _REGISTRY[policy_type].split(":")
    return getattr(importlib.import_module(module), name)


def policy_config_class(policy_type: str) -> type[PolicyConfig]:
    return policy_class(policy_type).config_class


def make(config: PolicyConfig, meta_features: dict[str, dict], stats: dict[str, dict[str, Any]]) -> Policy:
    """A fresh policy for a dataset; features left unset in the config are inferred from it."""
    inputs, outputs = features_from_dataset(meta_features)
    config = dataclasses.replace(
        config,
        input_features=config.input_features or inputs,
        output_features=config.output_features or outputs,
    )
    _check_features_in_dataset(config, meta_features)
    policy = policy_class(config.type)(config, stats_to_tensors(stats))
    if config.pretrained_path:
        load_model_weights(policy, resolve_pretrained(config.pretrained_path, config.pretrained_revision))
    return policy


def resolve_pretrained(path: str, revision: str | None = None) -> Path:
    """A local pretrained_model/ folder for `policy.pretrained_path`: a local folder (a
    pretrained_model/ folder, a checkpoint, or a run dir: its latest checkpoint), or a Hub
    repo id whose `revision` (step, tag, branch or sha) is downloaded."""
    from robotrain import checkpoint

    local = Path(path).expanduser()
    if local.exists():
        if (local / "config.json").is_file():
            return local
        if (local / checkpoint.PRETRAINED).is_dir():
            return local / checkpoint.PRETRAINED
        latest = checkpoint.latest(local / "checkpoints")
        if latest is None:
            raise UserError(f"policy.pretrained_path={path} holds no pretrained_model/ or checkpoints/")
        return latest / checkpoint.PRETRAINED
    if path.startswith(("/", ".", "~")):
        raise UserError(f"policy.pretrained_path={path} does not exist")
    from robotrain import hub

    return hub.download_pretrained(path, revision)


def _check_features_in_dataset(config: PolicyConfig, meta_features: dict[str, dict]) -> None:
    for key in [*config.input_features, *config.output_features]:
        if key not in meta_features:
            raise UserError(
                f"policy feature {key!r} is not in the dataset (it has {', '.join(sorted(meta_features))}); "
                "unset policy.input_features/output_features to infer them"
            )


def load_config(directory: Path) -> PolicyConfig:
    """The policy config saved in a pretrained_model/ folder's config.json."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    cls = policy_config_class(raw.get("type", "?"))
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


def from_pretrained(directory: str | Path) -> Policy:
    """Load a LeRobot-layout pretrained_model/ folder (local) strictly."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not a pretrained policy folder (no config.json)")
    config = load_config(directory)
    policy = policy_class(config.type)(config, read_processor_stats(directory))
    load_model_weights(policy, directory)
    return policy

