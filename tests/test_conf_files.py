"""conf/ states each default once: a YAML file holds its leading comment, its defaults list and
only the values that differ from its schema (the dataclasses of robotrain.config), and composing
conf/ gives exactly what the schemas and those values say.

Policies are the exception: `policy` is untyped in the run's schema, because registering the
policy classes would import every policy (torch, transformers, diffusers) before composing. So
a policy's YAML lists every field of its config class, and here each must equal the class default.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.singleton import Singleton
from omegaconf import OmegaConf

from robotrain.config import JOB_SCHEMAS, EvalRunConfig, TrainConfig, conf_dir, field_default, register_configs

CONF = conf_dir()
GROUP_FILES = sorted(CONF.glob("*/*.yaml"))
SCHEMA_FILES = [CONF / "config.yaml", CONF / "eval.yaml"] + [p for p in GROUP_FILES if p.parent.name != "policy"]


def _rel(path: Path) -> str:
    return str(path.relative_to(CONF))


def yaml_values(path: Path) -> dict:
    """What a conf file states, without its defaults list (and Hydra's own settings)."""
    values = OmegaConf.to_container(OmegaConf.load(path)) or {}
    return {k: v for k, v in values.items() if k not in ("defaults", "hydra")}


def schema_of(path: Path) -> type:
    group = path.parent.name
    if path == CONF / "eval.yaml":
        return EvalRunConfig
    if path.parent == CONF:
        return TrainConfig
    if group == "job":
        return JOB_SCHEMAS[path.stem]
    if group == "policy":
        from robotrain.policies import policy_config_class

        return policy_config_class(yaml_values(path)["type"])
    (run_field,) = [f for f in dataclasses.fields(TrainConfig) if f.name == group]
    return type(field_default(run_field))


def schema_defaults(schema: type) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema))


def leaves(values: dict, prefix: str = "") -> dict:
    """Dotted key -> value; empty dicts and lists are values."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def expected_option(group: str, option: str) -> dict:
    """A group option's node as the schema and its YAML's values make it."""
    path = CONF / group / f"{option}.yaml"
    if group == "policy":
        return yaml_values(path)
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema_of(path)), yaml_values(path)))


def default_options() -> dict[str, str]:
    entries = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]
    return {k: v for entry in entries if isinstance(entry, dict) for k, v in entry.items() if "/" not in k
            and not k.startswith("override")}


@pytest.fixture(scope="module")
def composer():
    # Hydra's globals (its version base, the ConfigStore) outlive `initialize_config_dir`; Hydra's own
    # launcher test suite, run later in this process, needs them as they were.
    state = copy.deepcopy(Singleton.get_state())
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONF)):
        yield lambda *overrides: OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=False)
    Singleton.set_state(state)


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=_rel)
def test_a_conf_file_states_only_what_differs_from_its_schema(path):
    stated, defaults = leaves(yaml_values(path)), leaves(schema_defaults(schema_of(path)))
    free = [k for k, v in defaults.items() if v == {}]  # dict fields (e.g. env.gym_kwargs) take any keys
    assert not [k for k in stated if k not in defaults and not k.startswith(tuple(f"{f}." for f in free))], \
        "keys its schema does not have"
    restated = [k for k, v in stated.items() if k in defaults and v == defaults[k]]
    assert not restated, f"{_rel(path)} restates schema defaults: {restated}"


@pytest.mark.parametrize("path", sorted(CONF.glob("**/*.yaml")), ids=_rel)
def test_a_conf_file_starts_with_what_it_is_for_and_an_example(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and any("python -m robotrain" in line for line in lines if line.startswith("#"))


@pytest.mark.parametrize("option", sorted(JOB_SCHEMAS))
def test_a_job_option_starts_from_its_own_schema(option):
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "job" / f"{option}.yaml"))["defaults"]
    assert defaults == [f"{option}_schema", "_self_"]


@pytest.mark.parametrize("path", sorted(CONF.glob("policy/*.yaml")), ids=_rel)
def test_a_policy_file_lists_every_field_at_its_class_default(path):
    assert yaml_values(path) == schema_defaults(schema_of(path))


def test_the_default_run_composes_to_the_schema_defaults_and_default_options(composer):
    expected = schema_defaults(TrainConfig)
    for group, option in default_options().items():
        expected[group] = expected_option(group, option)
    assert composer() == expected


@pytest.mark.parametrize("path", GROUP_FILES, ids=_rel)
def test_a_group_option_composes_to_its_schema_with_its_values(composer, path):
    group, option = path.parent.name, path.stem
    composed, default = composer(f"{group}={option}"), composer()
    assert composed.pop(group) == expected_option(group, option)
    default.pop(group)
    assert composed == default
