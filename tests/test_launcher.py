"""The Hydra launcher plugin: Hydra finds it, and its local backend passes Hydra's own
launcher and integration test suites."""

from __future__ import annotations

import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from hydra_plugins.robotrain_launcher.robotrain_launcher import RobotrainLauncher


def test_hydra_discovers_the_plugin():
    assert RobotrainLauncher.__name__ in [x.__name__ for x in Plugins.instance().discover(Launcher)]


@pytest.mark.parametrize("launcher_name, overrides", [("robotrain", [])])
class TestRobotrainLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({"defaults": [{"override hydra/launcher": "robotrain"}]}, ["-m"])],
)
class TestRobotrainLauncherIntegration(IntegrationTestSuite):
    pass
