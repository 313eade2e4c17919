"""Framework overhead of `robotrain.train.train` against a bare PyTorch loop, side by side.

    python benchmarks/overhead.py [--repeats 6] [--warmup 150] [--steps 40] [--profile]

Both sides train the same policy class (`robotrain.policies.make`, MLP) on the same dataset
(`LeRobotDataset` over the embedded reach task, same `delta_timestamps`) with the same batch
size, num_workers, AdamW hyper-parameters, gradient clipping and warmup+cosine LambdaLR; they
differ only in the code around the math:

- robotrain: the real loop, in-process: a `TrainConfig` composed by Hydra from
  `robotrain.config.conf_dir()` with `checkpoint.every=0 eval.enabled=false`, passed to
  `robotrain.train.train(cfg, run_dir)` (Accelerator, EpisodeAwareSampler +
  GlobalBatchSampler, device moves, metric windows, progress, preemption flag, ...).
- bare: a `DataLoader` over the same batched reads (`LeRobotDataset.get_batch`) with a
  `BatchSampler(RandomSampler)`, and the plainest loop (one read per micro-batch; robotrain
  reads a step's micro-batches as one, which is part of what is measured).

Printed per training option (`--variants`: plain, `grad_accum_steps=4` with a quarter of the
batch per micro-batch, `ema.enabled=true`; the bare loop does the same accumulation — each
micro-batch weighed by its valid action entries, as robotrain weighs masked means, then the
gradients divided by the total weight — or the same EMA update) and num_workers (0 and 2):
- `robotrain/bare`: the median over rounds of (robotrain steps/s / bare steps/s), the two runs
  of a round being adjacent in time (target >= 0.98); the detail line adds each side's median
  steps/s, their ratio and every round's numbers;
- data wait: time blocked in `next(loader)` over total step time, for each side (target <= 2 %).

How the robotrain side is timed (the last step is always checkpointed, even with
checkpoint.every=0): each metrics.jsonl line carries a wall-clock `time` stamp written when a
log window closes, *before* that step's checkpoint is saved. The wall time between two
consecutive lines is one window of `log_every` steps with everything the loop does in it
(logging, progress, sampler, accelerate wrappers); set-up and the final checkpoint save fall
outside. The headline covers the `--steps` after `--warmup` steps: a fresh dataset decodes each
of the task's 10,637 PNG frames once, on first use, and at batch 256 most have been by step
150; a long run spends nearly all its steps past that. A second line gives the same ratio over
the warm-up itself (but its first window: worker start-up, first batches). A run's throughput
is log_every / the median window time (robust to a window slowed by another tenant). The bare loop takes a
`perf_counter` stamp at the same steps. Data wait of robotrain comes from the windows' own
`data_wait_frac` and `steps_per_s` (sum of data seconds / sum of step seconds over the timed
windows); the bare loop times `next()` the same way.

Model and batch: MLP hidden_dim=1024 (1.3 M parameters), batch 256. The forward+backward+AdamW
step then costs ~25 ms on one CPU thread and reading a batch ~2 ms once images are cached, so a per-step framework
cost of a few hundred microseconds (Python bookkeeping, an extra sync, a wrapper) shows at the
~1 % level, while the step is not dominated by fixed per-call costs as a tiny model's would be.
torch runs one intra-op thread on both sides by default (`--threads`): on a small shared machine
a two-thread GEMM stalls whenever another tenant takes a core (we saw one configuration swing
between 3 and 16 steps/s), while single-threaded steps vary by a few percent.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import pstats
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compose, fmt_list, interleaved, median, use_benchmark_cache  # noqa: E402

use_benchmark_cache()

import torch  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, RandomSampler  # noqa: E402

from robotrain import data, policies  # noqa: E402
from robotrain.data.metadata import load_meta  # noqa: E402
from robotrain.data.reading import LeRobotDataset  # noqa: E402
from robotrain.train import train  # noqa: E402


@dataclass
class Measured:
    steps_per_s: float
    data_wait: float  # fraction of step time spent in next(loader)


#: Training options measured, each against a bare loop doing the same math: the plain run, four
#: micro-batches of a quarter of the batch per step, and an EMA of the weights; the `prefetch=0`
#: rows turn robotrain's read-ahead thread off (the bare loop has none).
VARIANTS = {"plain": [], "grad_accum_steps=4": ["grad_accum_steps=4"], "ema": ["ema.enabled=true"],
            "grad_accum_steps=4 prefetch=0": ["grad_accum_steps=4", "prefetch=0"], "prefetch=0": ["prefetch=0"]}


def overrides(args, num_workers: int, variant: str = "plain") -> list[str]:
    micro_batches = 4 if variant.startswith("grad_accum_steps=4") else 1
    return [
        "policy=mlp", f"policy.hidden_dim={args.hidden_dim}", f"batch_size={args.batch_size // micro_batches}",
        f"num_workers={num_workers}", f"steps={args.warmup + args.steps}", f"log_every={args.log_every}",
        "checkpoint.every=0", "eval.enabled=false",
        # The final checkpoint is outside the timed span; no fsync keeps the runs short.
        "checkpoint.fsync=false", *VARIANTS[variant],
    ]


@dataclass
class Windows:
    """A run's log windows: step at the window's end, wall stamp, per-step data and busy seconds."""

    steps: list[int]
    stamps: list[float]
    data_s: list[float]
    busy_s: list[float]

    def measured(self, first: int, last: int) -> Measured:
        """Throughput and data wait over the windows ending in steps (first, last]: the window
        ending at `first` only opens the span. Throughput is one window's steps over the median
        window wall time, which shrugs off a window that another tenant of the machine slowed.
        (robotrain's stamps are rounded to 1 ms: +-0.15 % of a ~130 ms window, and unbiased.)"""
        keep = [i for i, step in enumerate(self.steps) if first <= step <= last]
        steps, stamps = [self.steps[i] for i in keep], [self.stamps[i] for i in keep]
        spans = [(b - a, t1 - t0) for a, b, t0, t1 in zip(steps, steps[1:], stamps, stamps[1:])]
        per_step = median([seconds / n for n, seconds in spans])
        weights = [n for n, _ in spans]
        data = sum(w * self.data_s[i] for w, i in zip(weights, keep[1:]))
        busy = sum(w * self.busy_s[i] for w, i in zip(weights, keep[1:]))
        return Measured(1 / per_step, data / busy)


def run_robotrain(cfg, scratch: Path) -> Windows:
    run_dir = Path(tempfile.mkdtemp(prefix="robotrain-", dir=scratch))
    try:
        train(cfg, run_dir)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    windows = [m for m in lines if "steps_per_s" in m]
    return Windows([m["step"] for m in windows], [m["time"] for m in windows],
                   [m["data_wait_frac"] / m["steps_per_s"] for m in windows],
                   [1 / m["steps_per_s"] for m in windows])


class _BatchReads(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, indices):
        return self.dataset.get_batch(indices)


def run_bare(cfg) -> Windows:
    """The simplest loop doing the same math (no accelerate, no custom sampler, no logging)."""
    torch.manual_seed(cfg.seed)
    root = data.prepare(cfg.dataset)
    fps = load_meta(root).fps
    dataset = LeRobotDataset(
        cfg.dataset.repo_id, root,
        delta_timestamps={"action": [i / fps for i in cfg.policy.action_delta_indices]},
        tolerance_s=cfg.dataset.tolerance_s,
    )
    policy = policies.make(cfg.policy, dataset.meta.features, dataset.meta.stats)
    o, s = cfg.optim, cfg.scheduler
    optimizer = torch.optim.AdamW(policy.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine to min_lr_ratio (or flat)
        if step < s.warmup_steps:
            return (step + 1) / (s.warmup_steps + 1)
        if s.name == "constant":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, cfg.steps - s.warmup_steps))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # One sampler covering every step (consecutive random permutations), so the bare side
    # has no epoch restarts either: robotrain's batch sampler is infinite.
    micro_batches = cfg.grad_accum_steps
    sampler = RandomSampler(dataset, num_samples=cfg.steps * cfg.batch_size * micro_batches,
                            generator=torch.Generator().manual_seed(cfg.seed))
    averages = [p.detach().clone() for p in policy.parameters()] if cfg.ema.enabled else None
    # Same batch reads as robotrain (LeRobotDataset.get_batch), without its prefetch thread.
    loader = DataLoader(_BatchReads(dataset), sampler=BatchSampler(sampler, cfg.batch_size, drop_last=True),
                        batch_size=None, num_workers=cfg.num_workers)

    windows = Windows([], [], [], [])
    window_data, window_busy = 0.0, 0.0
    batches = iter(loader)
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(micro_batches)]
        t1 = time.perf_counter()
        if micro_batches == 1:
            loss, _ = policy(micro[0])
            loss.backward()
        else:
            _accumulate(policy, micro)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), o.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if averages is not None:
            _update_averages(averages, policy, min(cfg.ema.decay, step / (9 + step)))
        t2 = time.perf_counter()
        window_data, window_busy = window_data + (t1 - t0), window_busy + (t2 - t0)
        if step % cfg.log_every == 0:  # the same windows robotrain logs
            windows.steps.append(step)
            windows.stamps.append(t2)
            windows.data_s.append(window_data / cfg.log_every)
            windows.busy_s.append(window_busy / cfg.log_every)
            window_data, window_busy = 0.0, 0.0
    del batches
    return windows


def _accumulate(policy, micro: list[dict]) -> None:
    """Gradient accumulation with the same math as robotrain's: the MLP's loss is a mean over the
    valid (not padded) action entries, so each micro-batch weighs by its count of them, and the
    summed gradients are divided by the total weight."""
    weights = []
    for batch in micro:
        loss, _ = policy(batch)
        weights.append((~batch["action_is_pad"]).sum() / (~micro[0]["action_is_pad"]).sum() if weights else 1.0)
        (loss * weights[-1] if len(weights) > 1 else loss).backward()
    total = float(sum(weights))
    for param in policy.parameters():
        if param.grad is not None:
            param.grad.div_(total)


@torch.no_grad()
def _update_averages(averages: list[torch.Tensor], policy, decay: float) -> None:
    for average, param in zip(averages, policy.parameters()):
        average.mul_(decay).add_(param, alpha=1 - decay)


def profile(cfg, scratch: Path, top: int) -> None:
    """cProfile of one robotrain run, by total time in each function (main process only)."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_robotrain(cfg, scratch)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def report(title: str, runs: dict[str, list[Windows]], first: int, last: int, detail: bool) -> None:
    """Print robotrain/bare over steps (first, last]: the median of per-round ratios (the two runs
    of a round are adjacent in time and alternate in order, so load drift between rounds cancels)."""
    ours = [w.measured(first, last) for w in runs["robotrain"]]
    bare = [w.measured(first, last) for w in runs["bare"]]
    ours_sps, bare_sps = [m.steps_per_s for m in ours], [m.steps_per_s for m in bare]
    ratio = median([a / b for a, b in zip(ours_sps, bare_sps)])
    wait_ours, wait_bare = median([m.data_wait for m in ours]), median([m.data_wait for m in bare])
    print(f"{title}: robotrain/bare = {ratio:.3f}{' (target >= 0.98)' if detail else ''}; data wait robotrain "
          f"{100 * wait_ours:.1f}% bare {100 * wait_bare:.1f}%{' (target <= 2%)' if detail else ''}")
    if detail:
        print(f"    median steps/s robotrain {median(ours_sps):.2f} bare {median(bare_sps):.2f} "
              f"(ratio of medians {median(ours_sps) / median(bare_sps):.3f}); per round: robotrain "
              f"{fmt_list(ours_sps, '.2f')} bare {fmt_list(bare_sps, '.2f')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6, help="interleaved runs per side")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=150,
                        help="untimed steps first: a fresh dataset decodes each PNG frame once, in about the "
                             "first 150 steps of batch 256 over the task's 10,637 frames")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one robotrain run per num_workers")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="training options to measure, each against a bare loop doing the same math")
    args = parser.parse_args()
    # One intra-op thread by default: on a small shared machine a 2-thread OpenMP GEMM stalls
    # whenever another tenant takes one core, and we measured the same run swinging between
    # 3 and 16 steps/s; single-threaded steps vary by a few percent. Both sides use the setting.
    torch.set_num_threads(args.threads)
    if args.steps < 2 * args.log_every or args.warmup % args.log_every:
        parser.error("--steps must be at least 2 x --log-every and --warmup a multiple of it")

    scratch = Path(tempfile.mkdtemp(prefix="robotrain-overhead-"))
    try:
        for variant, num_workers in [(v, w) for v in args.variants for w in args.workers]:
            cfg = compose(overrides(args, num_workers, variant))
            data.prepare(cfg.dataset)  # generate the dataset (once, cached) outside any timing
            runs = interleaved({"robotrain": lambda: run_robotrain(cfg, scratch), "bare": lambda: run_bare(cfg)},
                               args.repeats)
            last = args.warmup + args.steps
            report(f"overhead ({variant}, num_workers={num_workers})", runs, args.warmup, last, detail=True)
            if args.warmup > 2 * args.log_every:
                report("    while the image cache fills (steps after the first window, up to the warm-up's end)",
                       runs, args.log_every, args.warmup, detail=False)
            if args.profile:
                profile(cfg, scratch, top=25)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
