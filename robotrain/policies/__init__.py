"""Policy registry: `policy.type` -> class, plus building and loading policies.

Policies are imported lazily so that `python -m robotrain policy=mlp` never pays for
importing transformers or diffusers.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from robotrain.checkpoint import load_model_weights
from robotrain.errors import UserError
from robotrain.policies.base import (
    Policy,
    PolicyConfig,
    features_from_dataset,
    read_processor_stats,
    stats_to_tensors,
)

_MAX_ADAPTER_DEPTH = 8  # an adapter whose base is an adapter... ; more means a loop

_REGISTRY: dict[str, str] = {
    "act": "robotrain.policies.act:ACTPolicy",
    "mlp": "robotrain.policies.mlp:MLPPolicy",
    "smolvla": "robotrain.policies.smolvla:SmolVLAPolicy",
    "diffusion": "robotrain.policies.diffusion:DiffusionPolicy",
    "pi0": "robotrain.policies.pi0:PI0Policy",
    "pi05": "robotrain.policies.pi0:PI05Policy",
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


def with_dataset_features(config: PolicyConfig, meta_features: dict[str, dict]) -> PolicyConfig:
    """`config` with the input/output features it leaves unset taken from the dataset's features."""
    inputs, outputs = features_from_dataset(meta_features)
    return dataclasses.replace(config, input_features=config.input_features or inputs,
                               output_features=config.output_features or outputs)


def make(config: PolicyConfig, meta_features: dict[str, dict], stats: dict[str, dict[str, Any]],
         pretrained: Sequence[Path] = ()) -> Policy:
    """A policy for a dataset; features left unset in the config are inferred from it.
    `pretrained`: the local folders of `config.pretrained_path` (`robotrain.pretrained.local_folders`:
    the folder, then the base of each adapter folder), whose weights it starts from."""
    config = with_dataset_features(config, meta_features)
    _check_features_in_dataset(config, meta_features)
    if config.pretrained_path and not pretrained:
        raise ValueError("policy.pretrained_path is set: pass its local folders (robotrain.pretrained.local_folders)")
    if pretrained:
        _check_type(pretrained[0], config.type)  # before building: a policy may fetch backbone weights
    policy = policy_class(config.type)(config, stats_to_tensors(stats))
    return _load_weights(policy, list(pretrained), trainable=True) if pretrained else policy


def _check_type(folder: Path, policy_type: str) -> None:
    config = folder / "config.json"
    saved_type = json.loads(config.read_text()).get("type") if config.is_file() else None
    if saved_type is not None and saved_type != policy_type:
        raise UserError(f"{folder} holds a {saved_type} policy, not {policy_type}: use policy={saved_type}")


def _load_weights(policy: Policy, folders: list[Path], trainable: bool):
    """Weights of pretrained_model/ folders into `policy`: an adapter folder (first) loads its
    base (next) first and returns the policy wrapped with the adapter (a peft.PeftModel)."""
    from robotrain import peft

    folder = folders[0]
    _check_type(folder, policy.config.type)
    if not (folder / peft.ADAPTER_CONFIG).is_file():
        load_model_weights(policy, folder)
        return policy
    if len(folders) == 1:
        base, _ = peft.adapter_base(folder)
        raise UserError(f"{folder} holds an adapter whose base {base} is not a local folder: load it with "
                        "robotrain.pretrained.load(<folder>), which downloads the base")
    _load_weights(policy, folders[1:], trainable=False)
    return peft.load_adapter(policy, folder, trainable)


def local_pretrained_folder(path: str | Path) -> Path | None:
    """The pretrained_model/ folder a local path holds: itself, a checkpoint's, or a run dir's
    latest checkpoint's; None when `path` is not on this disk (a Hub repo id, see
    `robotrain.pretrained`, which downloads). Nothing here fetches."""
    from robotrain import checkpoint_layout as layout

    local = Path(path).expanduser()
    if not local.exists():
        if str(path).startswith(("/", ".", "~")):
            raise UserError(f"policy.pretrained_path={path} does not exist")
        return None
    if (local / "config.json").is_file() and ((local / "model.safetensors").is_file()
                                              or (local / "adapter_config.json").is_file()):
        return local
    if (local / layout.PRETRAINED).is_dir():
        return local / layout.PRETRAINED
    latest = layout.latest(local / layout.CHECKPOINTS)
    if latest is None:
        raise UserError(f"policy.pretrained_path={path} holds no pretrained_model/ or checkpoints/")
    return latest / layout.PRETRAINED


def adapter_chain(folder: Path, resolve: Callable[[str, str | None], Path | None]) -> list[Path]:
    """`folder`, then, while the last is an adapter folder, its base's folder as
    `resolve(path, revision)` finds it; a base it cannot find (None) ends the chain there, and
    loading says what to do."""
    from robotrain import peft

    folders = [folder]
    while (folders[-1] / peft.ADAPTER_CONFIG).is_file():
        if len(folders) > _MAX_ADAPTER_DEPTH:
            raise UserError(f"{folder}: adapter bases nest deeper than {_MAX_ADAPTER_DEPTH} (a loop?)")
        base = resolve(*peft.adapter_base(folders[-1]))
        if base is None:
            break
        folders.append(base)
    return folders


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
    raw.update(cls.fields_from_folder(Path(directory)))
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


def from_pretrained(directory: str | Path, bases: Sequence[Path] | None = None) -> Policy:
    """Load a LeRobot-layout pretrained_model/ folder (local) strictly. An adapter folder needs its
    base's folder: `bases` (from `robotrain.pretrained.local_folders`), else the local path its
    adapter_config.json names."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not a pretrained policy folder (no config.json)")
    folders = ([directory, *bases] if bases is not None
               else adapter_chain(directory, lambda path, _revision: local_pretrained_folder(path)))
    config = load_config(directory)
    policy = policy_class(config.type)(config, read_processor_stats(directory))
    return _load_weights(policy, folders, trainable=False)

