"""A sub-env that stops simulating once its episode has ended.

A batch of episodes is stepped until its last episode ends; the others are still stepped, and
gymnasium's autoreset starts new episodes in them that nobody reads. `FreezeAtEnd` replays the
last step instead (zero reward), so a finished episode costs nothing (ALOHA renders 480x640 each
step). Only a reset with `NEW_ROLLOUT` in its options starts a new episode: the vector env's
autoreset calls `reset()` without options.
"""

from __future__ import annotations

import gymnasium as gym

#: Passed in `reset(options=...)` at the start of a rollout.
NEW_ROLLOUT = "robotrain_new_rollout"


class FreezeAtEnd(gym.Wrapper):
    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._last: tuple | None = None

    def reset(self, *, seed=None, options=None):
        if self._last is not None and not (options or {}).get(NEW_ROLLOUT):
            observation, _, _, _, info = self._last
            return observation, info
        self._last = None
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self._last is not None:
            return self._last
        observation, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            self._last = (observation, 0.0, terminated, truncated, info)
        return observation, reward, terminated, truncated, info
