"""Benchmark `robotrain.data.sampler`, measured side by side in one run.

    python benchmarks/sampler.py [--repeats 5]

1. feistel at 1e12 frames / 1e6 episodes: construction + seek + 1e5 draws through `iter()`,
   wall time (target < 1 s) and peak RSS growth (target < 64 MB), in a fresh subprocess so the
   peak is not inherited from anything else.
2. a mixture of 100 feistel members totalling 1e11 frames (1e4 episodes each, random weights):
   construction + seek + 1e5 draws in batches of 256 through `frames_at`, wall time (target
   < 1 s) and peak RSS growth (target < 64 MB), in a fresh subprocess.
3. randperm at 1e8 frames: a new epoch's permutation + 1e5 draws through `frames_at`, against
   bare `torch.randperm(1e8)` + the same draws, interleaved; the ratio of the best times
   (target <= 1.10). Measured with contiguous episodes (fast path) and with dropped frames
   (per-draw episode search).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from robotrain.data.mixture import MixtureSampler
from robotrain.data.sampler import EpisodeAwareSampler, derived_seed


def _current_rss_bytes() -> int:
    """Resident memory now (Linux /proc), falling back to the peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _boundaries(frames: int, episodes: int) -> tuple[np.ndarray, np.ndarray]:
    start = np.arange(episodes, dtype=np.int64) * (frames // episodes)
    return start, start + frames // episodes


def feistel_child(frames: int, episodes: int, draws: int) -> dict[str, float]:
    """Runs in a fresh process: the dataset's boundaries exist before the clock starts."""
    start, end = _boundaries(frames, episodes)
    rss_before = _current_rss_bytes()
    t0 = time.perf_counter()
    sampler = EpisodeAwareSampler(start, end, permutation="feistel", seed=0)
    sampler.seek(7 * len(sampler) + len(sampler) // 3)
    drawn = np.fromiter(itertools.islice(iter(sampler), draws), dtype=np.int64, count=draws)
    seconds = time.perf_counter() - t0
    assert np.unique(drawn).size == draws
    return {"seconds": seconds, "rss_growth": _peak_rss_bytes() - rss_before}


def mixture_child(members: int, frames: int, episodes: int, draws: int) -> dict[str, float]:
    """Runs in a fresh process: `members` datasets of `frames // members` frames each."""
    per_member = frames // members
    bounds = [_boundaries(per_member, episodes // members) for _ in range(members)]
    weights = np.random.default_rng(0).uniform(0.1, 5.0, size=members).tolist()
    rss_before = _current_rss_bytes()
    t0 = time.perf_counter()
    samplers = [EpisodeAwareSampler(start, end, permutation="feistel", seed=derived_seed(0, f"member {k}"))
                for k, (start, end) in enumerate(bounds)]
    sampler = MixtureSampler(samplers, weights, np.arange(members) * per_member, seed=0)
    first = 7 * frames + frames // 3  # seek: positions far into the run
    drawn = np.concatenate([sampler.frames_at(np.arange(p, p + 256)) for p in range(first, first + draws, 256)])
    seconds = time.perf_counter() - t0
    assert drawn.size >= draws and np.unique(drawn).size == drawn.size
    return {"seconds": seconds, "rss_growth": _peak_rss_bytes() - rss_before}


def bench_mixture(members: int, frames: int, episodes: int, draws: int) -> None:
    cmd = [sys.executable, __file__, "--mixture-child", str(members), str(frames), str(episodes), str(draws)]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(
        f"mixture of {members} feistel members, {frames:.0e} frames / {episodes:.0e} episodes in all, "
        f"{draws:.0e} draws: {result['seconds']:.2f} s, peak RSS +{result['rss_growth'] / 2**20:.0f} MB "
        "(target < 1 s, < 64 MB)"
    )


def bench_feistel(frames: int, episodes: int, draws: int) -> None:
    cmd = [sys.executable, __file__, "--feistel-child", str(frames), str(episodes), str(draws)]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    mb = result["rss_growth"] / 2**20
    print(
        f"feistel {frames:.0e} frames / {episodes:.0e} episodes, {draws:.0e} draws: "
        f"{result['seconds']:.2f} s, peak RSS +{mb:.0f} MB (target < 1 s, < 64 MB)"
    )


def bench_randperm(frames: int, episodes: int, draws: int, repeats: int, drop: int) -> float:
    start, end = _boundaries(frames, episodes)
    n = len(EpisodeAwareSampler(start, end, drop_n_first_frames=drop))
    offsets = np.arange(draws, dtype=np.int64)

    def bare(epoch: int) -> float:
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        perm.numpy()[offsets]
        return time.perf_counter() - t0

    def ours(epoch: int) -> float:
        # Built untimed and dropped after, so neither side runs with the other's
        # 800 MB permutation alive.
        sampler = EpisodeAwareSampler(start, end, drop_n_first_frames=drop)
        t0 = time.perf_counter()
        sampler.frames_at(epoch * n + offsets)
        return time.perf_counter() - t0

    best_bare, best_ours = float("inf"), float("inf")
    # Interleaved, alternating who goes first, so drifting machine load hits both alike.
    for epoch in range(repeats):
        first, second = (bare, ours) if epoch % 2 == 0 else (ours, bare)
        times = {first: first(epoch), second: second(epoch)}
        best_bare, best_ours = min(best_bare, times[bare]), min(best_ours, times[ours])
    ratio = best_ours / best_bare
    label = f"drop_n_first_frames={drop}" if drop else "no drops"
    print(
        f"randperm {frames:.0e} ({label}): sampler {best_ours:.2f} s, torch.randperm "
        f"{best_bare:.2f} s, sampler/torch.randperm = {ratio:.2f} (target <= 1.10)"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feistel-frames", type=float, default=1e12)
    parser.add_argument("--randperm-frames", type=float, default=1e8)
    parser.add_argument("--episodes", type=float, default=1e6)
    parser.add_argument("--draws", type=float, default=1e5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mixture-members", type=int, default=100)
    parser.add_argument("--mixture-frames", type=float, default=1e11)
    parser.add_argument("--feistel-child", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mixture-child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.feistel_child:
        print(json.dumps(feistel_child(*args.feistel_child)))
        return
    if args.mixture_child:
        print(json.dumps(mixture_child(*args.mixture_child)))
        return
    draws, episodes = int(args.draws), int(args.episodes)
    bench_feistel(int(args.feistel_frames), episodes, draws)
    bench_mixture(args.mixture_members, int(args.mixture_frames), episodes, draws)
    for drop in (0, 1):
        bench_randperm(int(args.randperm_frames), episodes, draws, args.repeats, drop)


if __name__ == "__main__":
    main()
