"""Episodes of a policy in a gymnasium env, scored as `lerobot-eval` 0.6.1 scores them.

Episode `i` starts from `env.reset(seed=eval.seed + i)`; episodes run `eval.batch_size` at a time
in a vector env, batched through the policy (`policy.reset()` at the start of each batch,
actions from `select_action`'s chunk queue). An episode ends at its first `terminated` or
`truncated` step, or at `max_steps`; its `sum_reward`, `max_reward` and `success` (any
`info["is_success"]`) are over its own steps.

That last point is where robotrain is stricter than LeRobot: `lerobot-eval` also counts the
reward of the step after an episode's end when another episode of the batch is still running
(its mask keeps `done_index + 1`), which reads the first step of gymnasium's autoreset
episode. So the two agree with `eval.batch_size=1` (and whenever a batch's episodes end
together, e.g. all time out), and robotrain's results do not depend on `eval.batch_size`.
Noise a policy samples (diffusion, flow matching) comes from a generator per episode, seeded
from its seed (`global_batch.per_sample`), for the same reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robotrain import global_batch
from robotrain.config import EnvConfig
from robotrain.eval import envs
from robotrain.eval.freeze import NEW_ROLLOUT


@dataclass
class Episode:
    """One episode's outcome; `as_lerobot()` is an entry of LeRobot's `per_episode`."""

    index: int
    seed: int
    sum_reward: float
    max_reward: float
    success: bool
    steps: int
    frames: list[np.ndarray] = field(default_factory=list, repr=False)
    """Rendered frames (H, W, 3) uint8 from the reset to the last step; empty unless recorded."""

    def as_lerobot(self) -> dict:
        return {"episode_ix": self.index, "sum_reward": self.sum_reward, "max_reward": self.max_reward,
                "success": self.success, "seed": self.seed}


def run_episodes(policy, vector_env, *, episodes: int, seed: int, max_steps: int, rename_map: dict[str, str],
                 record: int = 0, progress=None) -> list[Episode]:
    """Episodes `0..episodes-1` (seeds `seed + i`), `vector_env.num_envs` at a time; the first
    `record` are rendered frame by frame. Evaluation draws from its own RNG: the caller's torch
    RNG state is the same afterwards."""
    was_training = policy.training
    policy.eval()
    done: list[Episode] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # anything drawn outside per_sample (none of robotrain's policies)
            while len(done) < episodes:
                first = len(done)
                seeds = [seed + first + i for i in range(vector_env.num_envs)]
                batch = _rollout(policy, vector_env, seeds, first, max_steps, rename_map,
                                 record=max(0, min(record - first, vector_env.num_envs)))
                done.extend(batch[: episodes - first])
                if progress is not None:
                    progress(done)
    finally:
        policy.reset()
        policy.train(was_training)
    return done


def _rollout(policy, vector_env, seeds: list[int], first: int, max_steps: int, rename_map: dict[str, str],
             record: int) -> list[Episode]:
    """One batch of episodes, stepped until every one has ended."""
    n = vector_env.num_envs
    device = next(policy.parameters()).device
    policy.reset()
    observation, _ = vector_env.reset(seed=seeds, options={NEW_ROLLOUT: True})
    task = envs.tasks(vector_env)
    rewards: list[list[float]] = [[] for _ in range(n)]
    success = np.zeros(n, dtype=bool)
    ended = np.zeros(n, dtype=bool)
    frames: list[list[np.ndarray]] = [[vector_env.envs[i].render()] for i in range(record)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    step = 0
    with global_batch.per_sample(generators):
        while not ended.all() and step < max_steps:
            batch = envs.to_policy_batch(observation, rename_map, device, task)
            with torch.inference_mode():
                action = policy.select_action(batch)
            observation, reward, terminated, truncated, info = vector_env.step(action.float().cpu().numpy())
            step += 1
            live = ~ended
            for i in np.flatnonzero(live):
                rewards[i].append(float(reward[i]))
            success |= live & _successes(info, n)
            for i in range(record):
                if live[i]:
                    frames[i].append(vector_env.envs[i].render())
            ended |= live & (terminated | truncated | (step == max_steps))
    return [_episode(first + i, seeds[i], rewards[i], bool(success[i]), frames[i] if i < record else [])
            for i in range(n)]


def _episode(index: int, seed: int, rewards: list[float], success: bool, frames: list[np.ndarray]) -> Episode:
    # Summed as LeRobot sums them (a float64 torch reduction), so that the floats agree too.
    values = torch.tensor(rewards, dtype=torch.float64)
    return Episode(index, seed, float(values.sum()), float(values.max()) if rewards else 0.0, success,
                   len(rewards), frames)


def _successes(info: dict, n: int) -> np.ndarray:
    """`is_success` of each sub-env after a step: from `final_info` for those whose episode ended at
    it (gymnasium's same-step autoreset moved their last info there), else from `info`."""
    current = _flag(info, "is_success", n)
    final = info.get("final_info")
    if final is None:
        return current
    ended = np.asarray(info.get("_final_info", np.zeros(n, dtype=bool)), dtype=bool)
    return np.where(ended, _flag(final, "is_success", n), current)


def _flag(info: dict, key: str, n: int) -> np.ndarray:
    values = info.get(key)
    if values is None:
        return np.zeros(n, dtype=bool)
    values = np.asarray(values, dtype=bool).reshape(n)
    mask = info.get(f"_{key}")
    return values & np.asarray(mask, dtype=bool) if mask is not None else values


def write_videos(episodes: list[Episode], folder: Path, fps: int) -> list[str]:
    """`eval_episode_<n>.mp4` for each recorded episode, as lerobot-eval names them; their paths."""
    from robotrain.data.video import VideoEncoder, pick_codec

    paths = []
    codec = pick_codec()
    for n, episode in enumerate(e for e in episodes if e.frames):
        path = folder / f"eval_episode_{n}.mp4"
        height, width = episode.frames[0].shape[:2]
        encoder = VideoEncoder(path, fps, height, width, codec)
        encoder.add(np.stack(episode.frames))
        encoder.close()
        paths.append(str(path))
    return paths


@dataclass
class TaskResult:
    """One env's evaluation, what LeRobot's `eval_policy` returns for a task."""

    env: EnvConfig
    episodes: list[Episode]
    seconds: float
    video_paths: list[str]


def evaluate(policy, env: EnvConfig, *, episodes: int, batch_size: int, seed: int, max_steps: int,
             rename_map: dict[str, str], record: int = 0, videos_dir: Path | None = None,
             progress=None) -> TaskResult:
    """Build the vector env, check the policy against it, run the episodes, write the videos."""
    start = time.time()
    vector_env = envs.make_vector_env(env, min(batch_size, episodes), max_steps)
    try:
        envs.check_policy(policy.config, env, vector_env, rename_map)
        done = run_episodes(policy, vector_env, episodes=episodes, seed=seed, max_steps=max_steps,
                            rename_map=rename_map, record=record if videos_dir is not None else 0, progress=progress)
    finally:
        vector_env.close()
    paths = write_videos(done, videos_dir, env.fps) if videos_dir is not None and record else []
    return TaskResult(env, done, time.time() - start, paths)
