"""The embedded reach task as a gymnasium env, `robotrain/Reach-v0`, so that `python -m
robotrain.eval env=synthetic` evaluates a policy trained on the synthetic dataset as it
evaluates one in PushT: same rollouts, seeds and eval_info.json.

Observations are named as gym-pusht names its own: `pixels` (the top-down image, uint8 HWC) and
`agent_pos` (agent and target positions, the dataset's `observation.state`). The reward is 1 on
the step the agent reaches the target, which ends the episode (`info["is_success"]`), else 0.
Episode `i` of an evaluation starts from `reset(seed=eval.seed + i)`: other start states than
the training loop's own evaluation (`robotrain.eval.synthetic`), which draws all its episodes
from one generator.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import register

from robotrain.data.synthetic import FPS, MAX_EPISODE_STEPS, TASK, ReachEnv, render

GYM_ID = "robotrain/Reach-v0"


class ReachGymEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}
    task_description = TASK  # what language-conditioned policies (SmolVLA) were trained with

    def __init__(self, image_size: int = 32, render_size: int = 128, render_mode: str = "rgb_array"):
        self.render_mode, self.render_size = render_mode, render_size
        self._env = ReachEnv(1, image_size)
        self.observation_space = spaces.Dict({
            "pixels": spaces.Box(0, 255, (image_size, image_size, 3), dtype=np.uint8),
            "agent_pos": spaces.Box(-1.0, 1.0, (4,), dtype=np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._observation(self._env.reset(self.np_random)), {"is_success": False}

    def step(self, action):
        observation, success = self._env.step(np.asarray(action, dtype=np.float32)[None])
        done = bool(success[0])
        return self._observation(observation), float(done), done, False, {"is_success": done}

    def render(self):
        return render(self._env.state, self.render_size)[0]

    @staticmethod
    def _observation(observation: dict) -> dict:
        return {"pixels": observation["observation.image"][0], "agent_pos": observation["observation.state"][0]}


register(id=GYM_ID, entry_point=ReachGymEnv, max_episode_steps=MAX_EPISODE_STEPS)
