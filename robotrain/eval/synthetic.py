"""Roll policies out in the embedded reach simulator and report their success rate.

Evaluation is isolated from training randomness: episodes come from their own seeded
generator and the global torch RNG is forked, so evaluating (or not) never changes the
weights a run ends with. Recording a video (`record=N`) only renders the simulator's
state again at a size a person can see; it draws no random numbers, so the episodes and
the success rate are the same with or without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robotrain.data.synthetic import FPS, TASK, ReachEnv, render
from robotrain.policies.base import Policy

#: The frame around an episode once it has succeeded (RGB).
SUCCESS_BORDER = (250, 250, 250)


@dataclass
class EvalResult:
    success_rate: float
    """Fraction of episodes that reached the target within max_steps."""
    mean_steps: float
    """Mean steps to success over successful episodes (nan if none succeeded)."""
    episodes: int
    frames: np.ndarray | None = None
    """The recorded episodes side by side, (T, H, W, 3) uint8; None when nothing was recorded."""

    def as_metrics(self) -> dict[str, float]:
        return {"eval/success_rate": self.success_rate, "eval/mean_steps": self.mean_steps}

    def save_video(self, path: Path, fps: int = FPS) -> Path:
        """Write the recorded frames as a looping GIF (Pillow; no video codec needed)."""
        from PIL import Image

        assert self.frames is not None, "evaluate(..., record=N) with N > 0 records frames"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        images = [Image.fromarray(frame) for frame in self.frames]
        durations = [round(1000 / fps)] * len(images)
        durations[-1] = 1000  # hold the outcome a second before the loop restarts
        tmp = path.with_name(f".tmp-{path.name}")
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
        tmp.replace(path)
        return path


def observation_to_batch(obs: dict[str, np.ndarray], device: torch.device) -> dict:
    """Simulator observations -> what a policy gets from the dataset (images CHW in [0, 1], and
    the language task for policies that read it)."""
    image = torch.from_numpy(obs["observation.image"]).permute(0, 3, 1, 2).float().div_(255)
    return {
        "observation.state": torch.from_numpy(obs["observation.state"]).to(device),
        "observation.image": image.to(device),
        "task": [TASK] * len(image),
    }


def evaluate(policy: Policy, *, episodes: int, max_steps: int, seed: int, image_size: int,
             record: int = 0, render_size: int = 128) -> EvalResult:
    """Run `episodes` episodes as one batch; an episode stops counting once it succeeds.

    `record=N` also returns the first N episodes as video frames (`EvalResult.frames`), each
    rendered at `render_size` pixels: one frame per simulator step until all N have ended,
    an episode frozen at the step it succeeded, framed in white."""
    device = next(policy.parameters()).device
    env = ReachEnv(episodes, image_size)
    was_training = policy.training
    policy.eval()
    policy.reset()
    done_at = np.full(episodes, -1)
    video = _Recorder(min(record, episodes), render_size) if record > 0 else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        obs = env.reset(np.random.default_rng(seed))
        if video is not None:
            video.add(env.state, done_at)
        for step in range(1, max_steps + 1):
            action = policy.select_action(observation_to_batch(obs, device))
            obs, success = env.step(action.float().cpu().numpy())
            done_at[(done_at < 0) & success] = step
            if video is not None:
                video.add(env.state, done_at)
            if (done_at > 0).all():
                break
    policy.reset()
    policy.train(was_training)
    solved = done_at > 0
    mean_steps = float(done_at[solved].mean()) if solved.any() else float("nan")
    return EvalResult(success_rate=float(solved.mean()), mean_steps=mean_steps, episodes=episodes,
                      frames=video.frames() if video is not None else None)


class _Recorder:
    """Frames of the first `n` episodes, side by side. An episode's picture stops changing once
    it has succeeded (and gets a white frame); recording stops once all `n` have."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size
        self.shown: np.ndarray | None = None  # the state each episode is drawn at
        self.done = np.zeros(n, dtype=bool)
        self.images: list[np.ndarray] = []

    def add(self, state: np.ndarray, done_at: np.ndarray) -> None:
        """After a reset or a step: `done_at` holds each episode's success step, else -1."""
        if self.done.all():
            return
        state = state[: self.n]
        if self.shown is None:
            self.shown = state.copy()
        self.shown[~self.done] = state[~self.done]
        self.done = done_at[: self.n] > 0
        frames = render(self.shown, self.size)
        width = max(2, self.size // 32)
        for edge in (np.s_[:width], np.s_[-width:]):
            frames[self.done, edge] = SUCCESS_BORDER
            frames[self.done, :, edge] = SUCCESS_BORDER
        gap = np.full((self.size, 2, 3), 90, dtype=np.uint8)  # a grey line between episodes
        self.images.append(np.concatenate([part for frame in frames for part in (gap, frame)][1:], axis=1))

    def frames(self) -> np.ndarray:
        return np.stack(self.images)
