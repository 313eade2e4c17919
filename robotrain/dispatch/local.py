"""Sweep points that run here: one after another, in this process, as Hydra's own BasicLauncher
runs them (its run dirs, logging and job returns), built from Hydra's public job API."""

from __future__ import annotations

import logging
from typing import Sequence

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def run_in_process(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig,
                   points: Sequence[tuple[int, Sequence[str]]]) -> list[JobReturn]:
    """Run each `(job index, overrides)` point; indices are kept, so run dirs stay stable.
    The caller has set up Hydra's globals, its logging and the sweep dir (`launch_sweep`)."""
    if points:
        log.info(f"Launching {len(points)} jobs locally")
    runs = []
    for idx, overrides in points:
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        runs.append(run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                            job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)  # the job replaced it with its own
    return runs
