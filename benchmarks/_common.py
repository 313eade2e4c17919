"""Helpers shared by the benchmark scripts (not part of the package).

- `use_benchmark_cache()`: point `ROBOTRAIN_CACHE` at a fixed temp folder (unless the caller set
  it), so the synthetic dataset is generated once and reused by every benchmark run.
- `compose(overrides)`: the real config, composed by Hydra from `robotrain.config.conf_dir()`
  exactly as `python -m robotrain` composes it, then validated by `robotrain.config.parse`.
- `interleaved(sides, repeats)`: run each side once per round, alternating who goes first, so
  drifting load on a shared machine hits every side alike; returns each side's results.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def use_benchmark_cache() -> Path:
    """`$ROBOTRAIN_CACHE`, defaulting to `<tmp>/rtcache` (set before robotrain reads it)."""
    os.environ.setdefault("ROBOTRAIN_CACHE", str(Path(tempfile.gettempdir()) / "rtcache"))
    return Path(os.environ["ROBOTRAIN_CACHE"])


def compose(overrides: Sequence[str]):
    """A validated `TrainConfig` from `conf/config.yaml` plus Hydra-style `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from robotrain.config import conf_dir, parse, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        composed = hydra_compose(config_name="config", overrides=list(overrides))
    return parse(composed)


def interleaved(sides: dict[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Call every side once per round, rotating the order each round (A B, B A, A B, ...)."""
    names = list(sides)
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(sides[name]())
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_list(values: Sequence[float], spec: str = ".3f") -> str:
    return "[" + ", ".join(format(v, spec) for v in values) + "]"
