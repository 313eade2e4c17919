"""Roll policies out in the embedded reach simulator and report their success rate.

Evaluation is isolated from training randomness: episodes come from their own seeded
generator and the global torch RNG is forked, so evaluating (or not) never changes the
weights a run ends with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from robotrain.data.synthetic import TASK, ReachEnv
from robotrain.policies.base import Policy


@dataclass
class EvalResult:
    success_rate: float
    """Fraction of episodes that reached the target within max_steps."""
    mean_steps: float
    """Mean steps to success over successful episodes (nan if none succeeded)."""
    episodes: int

    def as_metrics(self) -> dict[str, float]:
        return {"eval/success_rate": self.success_rate, "eval/mean_steps": self.mean_steps}


def observation_to_batch(obs: dict[str, np.ndarray], device: torch.device) -> dict:
    """Simulator observations -> what a policy gets from the dataset (images CHW in [0, 1], and
    the language task for policies that read it)."""
    image = torch.from_numpy(obs["observation.image"]).permute(0, 3, 1, 2).float().div_(255)
    return {
        "observation.state": torch.from_numpy(obs["observation.state"]).to(device),
        "observation.image": image.to(device),
        "task": [TASK] * len(image),
    }


def evaluate(policy: Policy, *, episodes: int, max_steps: int, seed: int, image_size: int) -> EvalResult:
    """Run `episodes` episodes as one batch; an episode stops counting once it succeeds."""
    device = next(policy.parameters()).device
    env = ReachEnv(episodes, image_size)
    was_training = policy.training
    policy.eval()
    policy.reset()
    done_at = np.full(episodes, -1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        obs = env.reset(np.random.default_rng(seed))
        for step in range(1, max_steps + 1):
            action = policy.select_action(observation_to_batch(obs, device))
            obs, success = env.step(action.float().cpu().numpy())
            done_at[(done_at < 0) & success] = step
            if (done_at > 0).all():
                break
    policy.reset()
    policy.train(was_training)
    solved = done_at > 0
    mean_steps = float(done_at[solved].mean()) if solved.any() else float("nan")
    return EvalResult(success_rate=float(solved.mean()), mean_steps=mean_steps, episodes=episodes)
