"""`python -m robotrain --help`: config groups and options, each with its one-line description.

The descriptions are not written twice: a group option's is the first comment line of its
YAML file in conf/, and an option's is the docstring line under its dataclass field in
robotrain/config.py (or the selected policy's config class). Hydra's help template calls
these through the `robotrain_help_groups` / `robotrain_help_options` resolvers.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring line written under it, for a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def options(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, description) for every field, nested dataclasses expanded."""
    from robotrain.config import field_default

    rows = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = field_default(f)
        if dataclasses.is_dataclass(default):
            rows += options(type(default), f"{prefix}{f.name}.")
        elif f.name in docs:
            rows.append((f"{prefix}{f.name}", docs[f.name]))
    return rows


def groups_text(conf_dir: Path, only: str | None = None) -> str:
    """Each group option (of every group, or of group `only`) with the first comment line of its YAML file."""
    lines = []
    for group in sorted(p for p in conf_dir.iterdir() if p.is_dir() and only in (None, p.name)):
        lines.append(f"{group.name}:")
        for option in sorted(group.glob("*.yaml")):
            text = option.read_text()
            first = text.splitlines()[0] if text else ""
            lines.append(f"  {group.name + '=' + option.stem:<26} {first.lstrip('# ').strip()}")
    return "\n".join(lines)


def options_text(policy_type: str) -> str:
    from robotrain.config import JOB_SCHEMAS, TrainConfig
    from robotrain.policies import policy_config_class

    rows = [(k, d) for k, d in options(TrainConfig) if not k.startswith(("policy", "job."))]
    # Every job option's fields: each `job=<option>` has its own schema (the first describes a shared field).
    job_rows = dict(reversed([row for schema in JOB_SCHEMAS.values() for row in options(schema, "job.")]))
    rows += list(job_rows.items())
    try:
        rows += options(policy_config_class(policy_type), "policy.")
    except Exception:  # an unknown policy type is reported when training starts, not in --help
        pass
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {key:<{width}}  {doc}" for key, doc in sorted(rows))


def eval_options_text() -> str:
    """python -m robotrain.eval's options (conf/eval.yaml's schema)."""
    from robotrain.config import EvalRunConfig

    training_only = {f"eval.{name}" for name in ("every", "at_start", "enabled", "video_size", "max_steps",
                                                 "num_threads", "timeout_s")}
    rows = [(k, d) for k, d in options(EvalRunConfig) if k not in training_only]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {key:<{width}}  {doc}" for key, doc in sorted(rows))


def register_resolvers(conf_dir: Path) -> None:
    from omegaconf import OmegaConf

    def escaped(text: str) -> str:  # Hydra fills the template with string.Template: `$` is special
        return text.replace("$", "$$")

    if not OmegaConf.has_resolver("robotrain_help_groups"):
        OmegaConf.register_new_resolver("robotrain_help_groups",
                                        lambda only=None: escaped(groups_text(conf_dir, only)))
        OmegaConf.register_new_resolver("robotrain_eval_help_options", lambda: escaped(eval_options_text()))
        OmegaConf.register_new_resolver("robotrain_help_options",
                                        lambda policy_type: escaped(options_text(str(policy_type))))
