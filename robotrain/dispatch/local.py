"""Sweep points that run here: one after another, in this process, exactly as Hydra's own
BasicLauncher runs them (its run dirs, logging and job returns)."""

from __future__ import annotations

from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


def run_in_process(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig,
                   points: Sequence[tuple[int, Sequence[str]]]) -> list[JobReturn]:
    """Run each `(job index, overrides)` point; indices are kept, so run dirs stay stable."""
    launcher = BasicLauncher()
    launcher.setup(hydra_context=hydra_context, task_function=task_function, config=config)
    return [launcher.launch([list(overrides)], initial_job_idx=idx)[0] for idx, overrides in points]
