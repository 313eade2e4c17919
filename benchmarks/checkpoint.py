"""Checkpoint save time of `robotrain.checkpoint.CheckpointManager.save` against raw `safetensors` writes.

    python benchmarks/checkpoint.py [--repeats 11] [--hidden-dim 2048] [--num-layers 12]

The state: the MLP policy (default hidden_dim=2048, num_layers=12: 46.6 M parameters, 178 MiB of
float32 weights) after one real AdamW step on a batch of the embedded dataset, so the optimizer
holds exp_avg and exp_avg_sq for every parameter (356 MiB more). At that size the tensor bytes
dominate everything else a checkpoint writes (JSON configs, processor stats, RNG state: a fixed
few ms measured with a tiny model), as they do for the policies robotrain is for.

- robotrain: `CheckpointManager.save(step)` with the parts a one-process run registers: the whole LeRobot
  folder (pretrained_model/ + training_state/) built under a temporary name and published by
  rename, then the `last` symlink swapped.
- raw: `safetensors.torch.save_file` of the same tensors (the model state_dict and the
  optimizer state flattened as `state/<param>/<name>`, both built before the clock starts)
  into two files in a fresh folder on the same disk.

Two durability variants, printed side by side:
- fsync: robotrain with fsync=True against raw + fsync of both files and of their folder;
- no fsync: robotrain with fsync=False against plain save_file.

Each measurement starts from a quiet disk (`os.sync()` before the clock starts, so write-back
of an earlier save never lands in a later one's time); the two sides alternate who goes first
each round, and medians are reported with the ratio robotrain / raw (target <= 1.10).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compose, fmt_list, interleaved, median, use_benchmark_cache  # noqa: E402

use_benchmark_cache()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from robotrain import checkpoint, checkpoint_layout as layout, data, policies, strategy  # noqa: E402
from robotrain.config import to_dict  # noqa: E402
from robotrain.data.metadata import load_meta  # noqa: E402
from robotrain.data.reading import LeRobotDataset  # noqa: E402
from robotrain.data.sampler import DataPosition, EpisodeAwareSampler  # noqa: E402
from robotrain.optim import make_optimizer, make_scheduler  # noqa: E402


class State:
    """A policy, optimizer, scheduler and sampler after one real training step."""

    def __init__(self, hidden_dim: int, num_layers: int, batch_size: int = 32):
        self.cfg = compose(["policy=mlp", f"policy.hidden_dim={hidden_dim}", f"policy.num_layers={num_layers}",
                            "steps=1000"])
        cfg = self.cfg
        root = data.prepare(cfg.dataset)
        fps = load_meta(root).fps
        dataset = LeRobotDataset(
            cfg.dataset.repo_id, root, tolerance_s=cfg.dataset.tolerance_s,
            delta_timestamps={"action": [i / fps for i in cfg.policy.action_delta_indices]},
        )
        torch.manual_seed(cfg.seed)
        self.policy = policies.make(cfg.policy, dataset.meta.features, dataset.meta.stats)
        self.optimizer = make_optimizer(self.policy.parameters(), cfg.optim)
        self.scheduler = make_scheduler(self.optimizer, cfg.scheduler, cfg.steps)
        self.sampler = EpisodeAwareSampler(*dataset.episode_bounds, seed=cfg.seed)
        batch = default_collate([dataset[i] for i in range(batch_size)])
        loss, _ = self.policy(batch)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = 1
        self.params = sum(p.numel() for p in self.policy.parameters())
        # What the raw side writes, built once: the same tensors robotrain writes.
        self.model_tensors = {k: v.detach().contiguous() for k, v in self.policy.state_dict().items()}
        self.optimizer_tensors = {
            f"state/{idx}/{name}": value.detach().contiguous()
            for idx, per_param in self.optimizer.state_dict()["state"].items()
            for name, value in per_param.items()
        }
        self.tensor_bytes = sum(t.numel() * t.element_size()
                                for d in (self.model_tensors, self.optimizer_tensors) for t in d.values())


def save_robotrain(state: State, folder: Path, fsync: bool) -> None:
    """The training loop's save: the parts a one-process run registers, saved by its manager."""
    position = DataPosition(state.sampler, state.cfg.batch_size)
    manager = checkpoint.CheckpointManager(folder / "checkpoints", state.cfg.steps, position, fsync=fsync)
    manager.register(strategy.Replicated().checkpoint_parts(state.policy, state.optimizer, to_dict(state.cfg)))
    manager.register({
        "scheduler": checkpoint.Json(state.scheduler, f"{layout.TRAINING_STATE}/{layout.SCHEDULER_STATE}"),
        "rng": checkpoint.RngStates(checkpoint.World()),
    })
    manager.save(state.step)


def save_raw(state: State, folder: Path, fsync: bool) -> None:
    folder.mkdir()
    files = [folder / "model.safetensors", folder / "optimizer_state.safetensors"]
    save_file(state.model_tensors, str(files[0]))
    save_file(state.optimizer_tensors, str(files[1]))
    if fsync:
        for path in [*files, folder]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def timed(save: Callable[[State, Path, bool], None], state: State, scratch: Path, fsync: bool) -> float:
    folder = Path(tempfile.mkdtemp(dir=scratch)) / "out"
    os.sync()  # a quiet disk: no earlier save's write-back inside this measurement
    t0 = time.perf_counter()
    save(state, folder, fsync)
    seconds = time.perf_counter() - t0
    shutil.rmtree(folder.parent)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help="interleaved saves per side and variant")
    parser.add_argument("--hidden-dim", type=int, default=2048)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a temp folder; pick the disk your checkpoints go to)")
    args = parser.parse_args()

    state = State(args.hidden_dim, args.num_layers)
    scratch = Path(tempfile.mkdtemp(prefix="robotrain-ckpt-bench-", dir=args.dir))
    print(f"state: {state.params / 1e6:.1f} M parameters, {state.tensor_bytes / 2**20:.0f} MiB of tensors "
          f"(model + AdamW state); writing to {scratch}")
    try:
        timed(save_robotrain, state, scratch, True)  # warm-up: imports, first-touch of page cache
        timed(save_raw, state, scratch, True)
        for fsync, label, raw_label in ((True, "fsync", "save_file + fsync"), (False, "no fsync", "save_file")):
            results = interleaved({
                "robotrain": lambda: timed(save_robotrain, state, scratch, fsync),
                "raw": lambda: timed(save_raw, state, scratch, fsync),
            }, args.repeats)
            ours, raw = median(results["robotrain"]), median(results["raw"])
            print(f"checkpoint save ({label}): robotrain {ours:.3f} s, raw {raw_label} {raw:.3f} s, "
                  f"robotrain/raw = {ours / raw:.3f} (target <= 1.10)")
            print(f"    per round: robotrain {fmt_list(results['robotrain'])} raw {fmt_list(results['raw'])}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
