"""The embedded task: a tiny 2-D reach simulator, its scripted expert, and a generator
that records the expert as a LeRobot v3.0 dataset.

The arena is the square [-1, 1]^2. A point agent starts at least `MIN_START_DISTANCE`
away from a target and moves by `SPEED * action` per step (actions are clipped to the
unit disc). An episode succeeds once the agent is within `SUCCESS_RADIUS` of the target.

- `observation.state` = [agent_x, agent_y, target_x, target_y]  (float32)
- `observation.image` = a top-down RGB rendering (agent red, target green)  (uint8 HWC),
  stored as PNG in the data parquet, or (`video=True`) as an AV1 MP4 camera as most LeRobot
  datasets store theirs
- `action`            = the velocity command  (float32, 2)

Everything is a pure function of its seed: the same seed writes byte-identical frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

FPS = 10
SPEED = 0.1
SUCCESS_RADIUS = 0.08
MIN_START_DISTANCE = 0.5
MAX_EPISODE_STEPS = 60
TASK = "move the red dot onto the green target"
_FORMAT_VERSION = 2  # bump when the generator's output changes, to invalidate caches


def _to_unit_disc(action: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(action, axis=-1, keepdims=True)
    return action / np.maximum(norm, 1.0)


def expert_action(state: np.ndarray) -> np.ndarray:
    """Straight at the target at full speed, landing exactly on it on the last step."""
    delta = state[..., 2:4] - state[..., 0:2]
    return _to_unit_disc(delta / SPEED).astype(np.float32)


def render(state: np.ndarray, size: int) -> np.ndarray:
    """Top-down RGB images (N, size, size, 3) uint8 of a batch of states (N, 4)."""
    state = np.atleast_2d(state)
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in arena units
    xx, yy = np.meshgrid(coords, -coords)  # image row 0 is the top (y = +1)
    radius = max(SUCCESS_RADIUS, 1.5 * 2 / size)
    images = np.empty((len(state), size, size, 3), dtype=np.uint8)
    images[...] = 20
    # A faint floor gradient in blue gives every channel some variance: a constant channel has
    # std 0 and its normalized value would be float noise divided by eps.
    images[..., 2] = (40 + 40 * (yy + 1) / 2).astype(np.uint8)[None]
    for channel, (cx, cy) in ((1, (2, 3)), (0, (0, 1))):  # target first, agent drawn on top
        dist2 = (xx[None] - state[:, cx, None, None]) ** 2 + (yy[None] - state[:, cy, None, None]) ** 2
        mask = dist2 <= radius**2
        images[..., channel][mask] = 235
    return images


class ReachEnv:
    """A batch of independent reach episodes, stepped together."""

    def __init__(self, num_envs: int, image_size: int = 32):
        self.num_envs = num_envs
        self.image_size = image_size
        self.state = np.zeros((num_envs, 4), dtype=np.float32)

    def reset(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        self.state = sample_start_states(rng, self.num_envs)
        return self.observation()

    def observation(self) -> dict[str, np.ndarray]:
        return {"observation.state": self.state.copy(), "observation.image": render(self.state, self.image_size)}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Apply velocity commands (N, 2); returns the observation and per-env success."""
        move = SPEED * _to_unit_disc(np.asarray(action, dtype=np.float32))
        self.state[:, 0:2] = np.clip(self.state[:, 0:2] + move, -1.0, 1.0)
        return self.observation(), self.success()

    def success(self) -> np.ndarray:
        return np.linalg.norm(self.state[:, 2:4] - self.state[:, 0:2], axis=1) < SUCCESS_RADIUS


def sample_start_states(rng: np.random.Generator, n: int) -> np.ndarray:
    """Agent and target uniform in [-0.9, 0.9]^2, at least MIN_START_DISTANCE apart."""
    states = np.empty((n, 4), dtype=np.float32)
    filled = 0
    while filled < n:
        cand = rng.uniform(-0.9, 0.9, size=(n, 4)).astype(np.float32)
        ok = cand[np.linalg.norm(cand[:, 2:4] - cand[:, 0:2], axis=1) >= MIN_START_DISTANCE]
        take = min(len(ok), n - filled)
        states[filled : filled + take] = ok[:take]
        filled += take
    return states


def expert_episodes(num_episodes: int, seed: int, image_size: int) -> Iterator[dict]:
    """Episodes of the scripted expert, ending on the frame where it reached the target."""
    rng = np.random.default_rng(seed)
    env = ReachEnv(1, image_size)
    for _ in range(num_episodes):
        obs = env.reset(rng)
        frames: dict[str, list] = {"observation.state": [], "observation.image": [], "action": []}
        for _ in range(MAX_EPISODE_STEPS):
            action = expert_action(obs["observation.state"])
            frames["observation.state"].append(obs["observation.state"][0])
            frames["observation.image"].append(obs["observation.image"][0])
            frames["action"].append(action[0])
            obs, success = env.step(action)
            if success[0]:
                break
        episode = {key: np.stack(values) for key, values in frames.items()}
        episode["task"] = TASK
        yield episode


def features(image_size: int, video: bool = False) -> dict[str, dict]:
    """The dataset's user features, in LeRobot info.json form."""
    return {
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["agent_x", "agent_y", "target_x", "target_y"]},
        "observation.image": {
            "dtype": "video" if video else "image", "shape": [image_size, image_size, 3],
            "names": ["height", "width", "channels"],
        },
        "action": {"dtype": "float32", "shape": [2], "names": ["vx", "vy"]},
    }


@dataclass(frozen=True)
class SyntheticSpec:
    """What determines the generated dataset's content (and so its cache folder)."""

    num_episodes: int
    seed: int
    image_size: int
    video: bool = False

    def folder_name(self) -> str:
        video = "-video" if self.video else ""
        return f"v{_FORMAT_VERSION}-ep{self.num_episodes}-seed{self.seed}-img{self.image_size}{video}"


def default_cache_root() -> Path:
    """`$ROBOTRAIN_CACHE`, else `$XDG_CACHE_HOME/robotrain`, else `~/.cache/robotrain`."""
    if os.environ.get("ROBOTRAIN_CACHE"):
        return Path(os.environ["ROBOTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "robotrain"


def ensure_dataset(spec: SyntheticSpec, root: Path | None = None) -> Path:
    """The dataset folder for `spec`, generating it first if it does not exist yet.

    With no `root`, the folder lives in the robotrain cache, named after the spec, so a
    different spec never reuses another's data. Generation writes atomically (the writer
    builds in a temporary folder), so concurrent or interrupted runs never see half a dataset.
    """
    from robotrain.data.writing import write_dataset

    from robotrain.config import SYNTHETIC_REPO_ID
    from robotrain.errors import UserError

    if root is None:
        root = default_cache_root() / "datasets" / SYNTHETIC_REPO_ID / spec.folder_name()
    root = Path(root)
    if (root / "meta" / "info.json").is_file():
        return root
    try:
        write_dataset(
            root,
            repo_id=SYNTHETIC_REPO_ID,
            fps=FPS,
            features=features(spec.image_size, spec.video),
            episodes=expert_episodes(spec.num_episodes, spec.seed, spec.image_size),
            robot_type="robotrain_point_reach",
        )
    except UserError:
        # Another process generating the same spec finished first: its dataset is identical.
        if not (root / "meta" / "info.json").is_file():
            raise
    return root
