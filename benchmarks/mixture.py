"""Loader throughput over a 3-member mixture against the same members read as one concatenated
dataset, measured side by side in one run (target >= 0.95).

    python benchmarks/mixture.py [--batches 500] [--repeats 7] [--num-workers 0] [--size 96] [--workdir DIR]

Three LeRobot v3.0 datasets are written once into `--workdir` (default
`<tmp>/robotrain-bench-mixture`): two with a PNG image camera and one with an AV1 video camera,
`--size` pixels square (96, PushT's, by default), 20 episodes of 40 frames each at 10 fps.
Both sides read the same frames through the same `robotrain.data.loader` (batch 32, the MLP
policy's action chunk), in the main process by default (`--num-workers 0`: with worker
processes, moving batches between processes adds more noise than the mixture costs on 2 cores):

- mixture: `dataset=mixture` as training opens it (`robotrain.data.open_for_training`) — the
  weighted mixture sampler (weights 2:1:1), a `get_batch` per member touched, renaming, the
  batch put back in the sampler's order, the `member` key.
- concatenated: the members' `LeRobotDataset`s in one index space read by the simplest code
  that can (`Concatenated` below: one `get_batch` per member, concatenated in member order),
  drawing the very frames the mixture sampler chose, batch for batch.

So the ratio is what the mixture machinery costs over reading the same frames (LeRobot's format
cannot hold one feature as images in some episodes and video in others, so a concatenation on
disk is not possible with a video member). Each round runs both loaders in turn, alternating who
goes first; the headline is the median over rounds of mixture / concatenated samples/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import fmt_list, interleaved, median
from robotrain.config import DatasetConfig, MixtureMember, SamplerConfig
from robotrain.data import open_for_training
from robotrain.data.loader import make_loader
from robotrain.data.sampler import GlobalBatchSampler
from robotrain.data.writing import write_dataset
from robotrain.policies.mlp import MLPConfig

EPISODES, LENGTH, BATCH = 20, 40, 32


def write_member(root: Path, member: int, video: bool, size: int) -> Path:
    if (root / "meta" / "info.json").is_file():
        return root
    rng = np.random.default_rng(member)
    features = {"observation.state": {"dtype": "float32", "shape": [2], "names": None},
                "action": {"dtype": "float32", "shape": [2], "names": None},
                "observation.image": {"dtype": "video" if video else "image", "shape": [size, size, 3],
                                      "names": ["height", "width", "channels"]}}
    ramp = np.linspace(0, 255, size, dtype=np.float32)

    def episode(e: int) -> dict:
        t = np.arange(LENGTH, dtype=np.float32)[:, None, None]
        image = (ramp[None, None, :] + 3 * t + 11 * e) % 256  # a drifting gradient: realistic to encode
        frames = np.broadcast_to(image[..., None], (LENGTH, size, size, 3)).astype(np.uint8)
        return {"observation.state": rng.normal(size=(LENGTH, 2)).astype(np.float32),
                "action": rng.normal(size=(LENGTH, 2)).astype(np.float32),
                "observation.image": frames, "task": "reach"}

    write_dataset(root, repo_id=f"bench/member{member}", fps=10, features=features,
                  episodes=(episode(e) for e in range(EPISODES)))
    return root


class Concatenated:
    """The members' datasets in one index space, read as plainly as possible."""

    def __init__(self, datasets, offsets):
        self.datasets, self.offsets = datasets, np.asarray(offsets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def get_batch(self, indices):
        idx = np.asarray(indices)
        member = np.searchsorted(self.offsets, idx, side="right") - 1
        parts = [self.datasets[k].get_batch(idx[member == k] - self.offsets[k]) for k in np.unique(member).tolist()]
        return {key: torch.cat([p[key] for p in parts]) if torch.is_tensor(parts[0][key])
                else [v for p in parts for v in p[key]] for key in parts[0]}


def samples_per_s(dataset, sampler, batches: int, num_workers: int) -> float:
    loader = make_loader(dataset, GlobalBatchSampler(sampler, BATCH), num_workers=num_workers, pin_memory=False,
                         seed=0)
    stream = iter(loader)
    for _ in range(3):  # warm up: workers started, decoders opened
        next(stream)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - t0
    del stream
    return batches * BATCH / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--size", type=int, default=96, help="camera side in pixels (PushT's 96 by default)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "robotrain-bench-mixture")
    args = parser.parse_args()
    roots = [write_member(args.workdir / f"{args.size}px" / f"member{k}", k, video=k == 2, size=args.size)
             for k in range(3)]
    cfg = DatasetConfig(repo_id=None, root=None, datasets=[
        MixtureMember(repo_id=f"bench/member{k}", weight=w, root=str(r)) for k, (r, w) in enumerate(zip(roots, [2, 1, 1]))])
    mixture, sampler = open_for_training(cfg, SamplerConfig(), MLPConfig(), 0, roots)
    concatenated = Concatenated(mixture.datasets, mixture.offsets)
    first = sampler.frames_at(np.arange(BATCH))
    a, b = mixture.get_batch(first), concatenated.get_batch(np.sort(first))
    assert torch.equal(a["observation.state"][np.argsort(first, kind="stable")], b["observation.state"])
    results = interleaved({
        "mixture": lambda: samples_per_s(mixture, sampler, args.batches, args.num_workers),
        "concatenated": lambda: samples_per_s(concatenated, sampler, args.batches, args.num_workers),
    }, args.repeats)
    ratios = [m / c for m, c in zip(results["mixture"], results["concatenated"])]
    print(f"mixture samples/s {fmt_list(results['mixture'], '.0f')}, concatenated "
          f"{fmt_list(results['concatenated'], '.0f')} (batch {BATCH}, {args.size}x{args.size} cameras, "
          f"{args.num_workers} workers)")
    print(f"mixture / concatenated = {median(ratios):.3f} (median of {fmt_list(ratios)}; target >= 0.95)")


if __name__ == "__main__":
    main()
