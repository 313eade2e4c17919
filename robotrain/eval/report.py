"""`eval_info.json` in the layout `lerobot-eval` 0.6.1 writes, and the summary printed after it.

    per_task     [{task_group, task_id, metrics: {sum_rewards, max_rewards, successes, video_paths}}]
    per_group    {task_group: {avg_sum_reward, avg_max_reward, pc_success, n_episodes, video_paths}}
    overall      {avg_sum_reward, avg_max_reward, pc_success, n_episodes, eval_s, eval_ep_s, video_paths}
    per_episode  [{episode_ix, sum_reward, max_reward, success, seed}]   (LeRobot's eval_policy's)

`task_group` is LeRobot's env type (`env.task_group`: pusht, aloha), `task_id` 0: these envs
have one task each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from robotrain.eval.rollout import TaskResult
from robotrain.fsutil import atomic_write_text


def eval_info(results: list[TaskResult]) -> dict:
    per_task, per_group = [], {}
    for result in results:
        metrics = {
            "sum_rewards": [e.sum_reward for e in result.episodes],
            "max_rewards": [e.max_reward for e in result.episodes],
            "successes": [e.success for e in result.episodes],
            "video_paths": result.video_paths,
        }
        per_task.append({"task_group": result.env.task_group, "task_id": 0, "metrics": metrics})
        per_group[result.env.task_group] = _aggregate(result.episodes, result.video_paths)
    episodes = [e for result in results for e in result.episodes]
    seconds = sum(result.seconds for result in results)
    overall = _aggregate(episodes, [p for result in results for p in result.video_paths])
    overall["eval_s"] = seconds
    overall["eval_ep_s"] = seconds / max(1, len(episodes))
    overall["video_paths"] = overall.pop("video_paths")  # after the timings, in LeRobot's key order
    return {"per_task": per_task, "per_group": per_group, "overall": overall,
            "per_episode": [e.as_lerobot() for e in episodes]}


def _aggregate(episodes, video_paths: list[str]) -> dict:
    def mean(values) -> float:
        return float(np.nanmean(np.array(values, dtype=float))) if values else float("nan")

    return {
        "avg_sum_reward": mean([e.sum_reward for e in episodes]),
        "avg_max_reward": mean([e.max_reward for e in episodes]),
        "pc_success": mean([e.success for e in episodes]) * 100 if episodes else float("nan"),
        "n_episodes": len(episodes),
        "video_paths": list(video_paths),
    }


def write(info: dict, folder: Path) -> Path:
    """`folder/eval_info.json`, indented as LeRobot writes it (NaN where there is no episode)."""
    path = Path(folder) / "eval_info.json"
    atomic_write_text(path, json.dumps(info, indent=2))
    return path


def summary(info: dict, policy_path: str, path: Path) -> str:
    """One paragraph: what was evaluated where, the success rate and rewards, where the files are."""
    overall = info["overall"]
    groups = ", ".join(info["per_group"])
    rate = overall["pc_success"]
    count = len(overall["video_paths"])
    videos = f"; {count} video{'s' if count > 1 else ''} beside it" if count else ""
    return (f"robotrain.eval: {policy_path} in {groups}: success {_pct(rate)} over {overall['n_episodes']} "
            f"episodes, average sum of rewards {overall['avg_sum_reward']:.3f}, average max reward "
            f"{overall['avg_max_reward']:.3f}, {overall['eval_ep_s']:.1f}s per episode ({overall['eval_s']:.1f}s in "
            f"all). Results: {path}{videos}.")


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}%"
