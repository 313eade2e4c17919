"""Controllers known to succeed, to show that evaluation can read success: the synthetic task's
scripted expert (`ReachExpert`), and a PushT case a hand-written controller solves.

`robotrain_tests/PushTNearGoal-v0` is gym-pusht's PushT, except that an episode reset with an even
seed starts with the T at its goal angle, 10 px right of the goal, and the agent to its right at
y=300; `PushLeft` then moves the agent left along y=300 and pushes the T home (coverage 0.75 ->
above 0.95 in about 30 steps). Odd seeds start as PushT does, at random, where it fails.
Importing this module registers the env (`env.package=tests.sim_envs`).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from gymnasium.envs.registration import register
from gym_pusht.envs.pusht import PushTEnv
from torch import nn

GYM_ID = "robotrain_tests/PushTNearGoal-v0"
OFFSET, AGENT_Y, AGENT_START = 10.0, 300.0, 100.0


class PushTNearGoal(PushTEnv):
    def reset(self, seed=None, options=None):
        observation, info = super().reset(seed=seed, options=options)
        if seed is None or seed % 2:
            return observation, info
        goal = self.goal_pose
        self.block.angle = goal[2]  # the angle first: setting it turns the T about its centre of mass
        self.block.position = (goal[0] + OFFSET, goal[1])
        self.agent.position = (goal[0] + OFFSET + AGENT_START, AGENT_Y)
        self.space.step(self.dt)
        return self.get_obs(), info


register(id=GYM_ID, entry_point=PushTNearGoal, max_episode_steps=300)


class PushLeft(nn.Module):
    """The controller: agent targets 2 px further left each step, from where the env put it."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # for the device
        self.t = 0

    def reset(self) -> None:
        self.t = 0

    def select_action(self, batch: dict) -> torch.Tensor:
        x = 256.0 + OFFSET + AGENT_START - 2.0 * (self.t + 1)
        self.t += 1
        rows = batch["observation.state"].shape[0]
        return torch.tensor(np.tile([x, AGENT_Y], (rows, 1)), dtype=torch.float32)


class ReachExpert(nn.Module):
    """The embedded reach task's scripted expert (the synthetic dataset's demonstrator) as a policy."""

    def __init__(self, image_size: int = 32):
        super().__init__()
        self.config = SimpleNamespace(
            input_features={"observation.state": {"type": "STATE", "shape": [4]},
                            "observation.image": {"type": "VISUAL", "shape": [3, image_size, image_size]}},
            output_features={"action": {"type": "ACTION", "shape": [2]}})
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    def reset(self) -> None:
        pass

    def select_action(self, batch: dict) -> torch.Tensor:
        from robotrain.data.synthetic import expert_action

        return torch.from_numpy(expert_action(batch["observation.state"].numpy()))
