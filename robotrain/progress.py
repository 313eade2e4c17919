"""Progress a person watches and metrics a program reads.

- `Progress`: a tqdm bar (step/total, it/s, loss, ETA) when stderr is a terminal; otherwise
  one compact log line every `log_every` steps, so SLURM and HF Jobs logs are not flooded
  with bar redraws.
- `MetricsLog`: one JSON object per line in `<run_dir>/metrics.jsonl`.
- `peak_memory_mb`: what each metrics line reports as `peak_memory_mb` (the largest over the
  processes).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("robotrain")


class Progress:
    def __init__(self, total: int, start: int, log_every: int, enabled: bool = True):
        self.total, self.log_every = total, log_every
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            # A terminal that reports no size (some multiplexers, `script`) would hide the bar.
            sized = _terminal_columns() > 0
            self.bar = tqdm(total=total, initial=start, unit="step", file=sys.stderr,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24)
        self.enabled = enabled

    def update(self, step: int, metrics: dict[str, float] | None) -> None:
        """Advance to `step`; `metrics` is given on the steps where fresh numbers exist."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        elif self.enabled and metrics:
            eta = (self.total - step) / max(metrics["steps_per_s"], 1e-9)
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.1f steps/s  %.0f samples/s  data wait %.0f%%  peak mem %.0f MB  eta %s",
                step, self.total, metrics["loss"], metrics["lr"], metrics["steps_per_s"], metrics["samples_per_s"],
                100 * metrics["data_wait_frac"], metrics["peak_memory_mb"], _duration(eta),
            )

    def write(self, message: str) -> None:
        """A line that must not be torn by the bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self.enabled:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    def __init__(self, path: Path | None):
        self.file = open(path, "a", buffering=1) if path is not None else None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def peak_memory_mb(device) -> float:
    """This process's peak memory so far: the GPU's allocated bytes on CUDA (what a batch size is
    limited by), else the process's peak resident set (RSS), in MB."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # Linux: this process image's own peak; getrusage's ru_maxrss keeps the pre-exec one's
        with open("/proc/self/status") as status:  # (a child started by a large process reports that size)
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, others kB


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MemberLosses:
    """Each mixture member's mean per-sample loss over the steps between two log lines
    (`member_loss/<k>`, k its position in dataset.datasets), summed on the device without a sync
    per step and over the processes at the log line. A member no sample came from is left out."""

    def __init__(self, members: int):
        self.members = members
        self.sums = self.counts = None

    def add(self, member: "torch.Tensor", per_sample: "torch.Tensor") -> None:
        import torch

        member = member.to(per_sample.device)
        sums = torch.zeros(self.members, dtype=torch.float64, device=per_sample.device)
        sums.index_add_(0, member, per_sample.detach().double())
        counts = torch.bincount(member, minlength=self.members)
        self.sums = sums if self.sums is None else self.sums + sums
        self.counts = counts if self.counts is None else self.counts + counts

    def flush(self, accelerator) -> dict[str, float]:
        import torch

        from robotrain import distributed

        totals = torch.zeros(2, self.members, dtype=torch.float64)
        if self.sums is not None:
            totals = torch.stack([self.sums.cpu(), self.counts.cpu().double()])
        totals = distributed.sum_over_processes(accelerator, totals)
        self.sums = self.counts = None
        return {f"member_loss/{k}": float(totals[0, k] / totals[1, k]) for k in range(self.members) if totals[1, k] > 0}
