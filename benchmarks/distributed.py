"""Several processes on this machine: 2-process DDP against 1 process, and FSDP against DDP,
side by side in one run, with peak memory per process.

    python benchmarks/distributed.py [--rounds 3] [--steps 60]

Each side is the real command, `python -m robotrain distributed.processes=N
distributed.strategy=S ...` (robotrain starts torchrun itself), on the embedded dataset with
the MLP policy (hidden 1024, 3 layers: ~3.3 M parameters) and the same batch per process, so
2 processes do twice the samples per step (weak scaling). Throughput is the median of the
metrics.jsonl windows after the first (start-up). Peak memory is the largest resident set of
any process of the run (getrusage of the waited-for children, measured in a fresh
intermediate process per run). Rounds interleave the sides.

On CPU the processes share the machine's cores: each gets cores/N threads, so 2-process DDP
is not expected to double throughput here; on GPUs each process has its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import json, resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(json.dumps({"code": code, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run(name: str, overrides: list[str], workdir: Path) -> dict:
    run_dir = workdir / name
    cmd = [sys.executable, "-m", "robotrain", *overrides, f"hydra.run.dir={run_dir}"]
    out = subprocess.run([sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True, cwd=workdir)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    if probe["code"] != 0:
        raise RuntimeError(f"{name} failed: {out.stderr[-2000:]}")
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "steps_per_s" in w][1:]
    return {"steps_per_s": statistics.median(w["steps_per_s"] for w in windows),
            "samples_per_s": statistics.median(w["samples_per_s"] for w in windows),
            "peak_rss_mb": probe["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    common = ["policy.hidden_dim=1024", "policy.num_layers=3", "batch_size=64", f"steps={args.steps}",
              "log_every=10", "eval.enabled=false", "checkpoint.every=0", "checkpoint.fsync=false"]
    sides = {
        "1 process": ["distributed.processes=1"],
        "2 processes DDP": ["distributed.processes=2", "distributed.strategy=ddp"],
        "2 processes FSDP": ["distributed.processes=2", "distributed.strategy=fsdp"],
    }
    results: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="robotrain-dist-bench-") as tmp:
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
            for name in order:
                folder = Path(tmp) / f"{name.replace(' ', '_')}-{rnd}"
                results[name].append(run(folder.name, common + sides[name], Path(tmp)))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    one, ddp, fsdp = med["1 process"], med["2 processes DDP"], med["2 processes FSDP"]
    print(f"distributed: 2-process DDP / 1 process: steps/s {ddp['steps_per_s'] / one['steps_per_s']:.2f}, "
          f"samples/s {ddp['samples_per_s'] / one['samples_per_s']:.2f}")
    print(f"distributed: FSDP / DDP (2 processes): steps/s {fsdp['steps_per_s'] / ddp['steps_per_s']:.2f}; "
          f"peak memory per process: 1 process {one['peak_rss_mb']:.0f} MB, DDP {ddp['peak_rss_mb']:.0f} MB, "
          f"FSDP {fsdp['peak_rss_mb']:.0f} MB")
    for name, r in med.items():
        print(f"    {name}: {r['steps_per_s']:.1f} steps/s, {r['samples_per_s']:.0f} samples/s, "
              f"peak {r['peak_rss_mb']:.0f} MB (cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
