"""`hydra/launcher=robotrain`: Hydra's sweeps, dispatched by robotrain.

A thin adapter: Hydra hands over every point of a sweep; `robotrain.dispatch.launch_sweep`
groups the points by `job.target` and submits each group at once (SLURM: one job array
through submitit; HF Jobs: one job per point; local: one after another, in-process, like
Hydra's BasicLauncher). robotrain's primary config selects this launcher, so
`python -m robotrain -m job=slurm optim.lr=1e-4,3e-4` needs nothing more.
"""

# No `from __future__ import annotations`: Hydra imports plugin modules without registering
# them in sys.modules, and dataclasses then cannot resolve string annotations.
from dataclasses import dataclass
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class RobotrainLauncherConf:
    _target_: str = "hydra_plugins.robotrain_launcher.robotrain_launcher.RobotrainLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="robotrain", node=RobotrainLauncherConf, provider="robotrain")


class RobotrainLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from robotrain.dispatch import launch_sweep

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        return launch_sweep(self.hydra_context, self.task_function, self.config, job_overrides, initial_job_idx)
