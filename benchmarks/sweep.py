"""Time to submit a 100-point sweep to a real SLURM cluster: robotrain's launcher against
hydra-submitit-launcher, side by side in one run.

    python benchmarks/sweep.py [--points 100] [--rounds 3]

Needs the test cluster (`bash tests/slurm/start_slurm.sh`, as root). Both sides run the same
app, `python -m robotrain -m seed=0,...,99 ...`, so config composition is identical; only the
launcher differs:

- robotrain: `job=slurm` (robotrain's launcher, the default);
- hydra-submitit-launcher: `hydra/launcher=submitit_slurm` (job stays local, so the points
  would run robotrain in-process inside the SLURM jobs, the plugin's own way).

Submission time = from starting the command to the moment the sweep's jobs are all visible to
`squeue` (hydra-submitit-launcher then waits for results, robotrain with job.detach=true
returns; neither wait is counted). The jobs are held with `--begin=now+1hour` so nothing runs,
and cancelled after each measurement. Rounds alternate which side goes first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOLD = "now+3600"


def _queued(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


def _cancel(name: str) -> None:
    subprocess.run(["scancel", "-n", name], check=False)


def submit(side: str, points: int, workdir: Path) -> tuple[float, int]:
    """Seconds until all `points` jobs are queued, and how many array job ids they use."""
    name = f"bench-{side}-{os.getpid()}"
    common = [f"seed=range({points})", "steps=5", f"hydra.sweep.dir={workdir / name}", f"hydra.job.name={name}"]
    if side == "robotrain":
        args = ["job=slurm", "job.detach=true", f"+job.additional_parameters.begin={HOLD}", *common]
    else:
        args = ["hydra/launcher=submitit_slurm", f"+hydra.launcher.additional_parameters.begin={HOLD}",
                "hydra.launcher.timeout_min=60", *common]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "robotrain", "-m", *args], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while len(ids := _queued(name)) < points:
            if proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError(f"{side} failed: {proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait()
        _cancel(name)
    return elapsed, len({i.split("_")[0] for i in ids})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"robotrain": [], "hydra-submitit-launcher": []}
    arrays: dict[str, set[int]] = {side: set() for side in times}
    with tempfile.TemporaryDirectory(prefix="robotrain-sweep-bench-") as tmp:
        for rnd in range(args.rounds):
            order = list(times) if rnd % 2 == 0 else list(reversed(times))
            for side in order:
                seconds, n_arrays = submit(side, args.points, Path(tmp))
                times[side].append(seconds)
                arrays[side].add(n_arrays)
    ours, theirs = (statistics.median(times[s]) for s in times)
    print(f"sweep submit ({args.points} points): robotrain {ours:.2f} s, hydra-submitit-launcher {theirs:.2f} s, "
          f"robotrain/hydra-submitit-launcher = {ours / theirs:.2f} (target <= 1.0); "
          f"job arrays used: robotrain {sorted(arrays['robotrain'])}, "
          f"hydra-submitit-launcher {sorted(arrays['hydra-submitit-launcher'])} (target: 1)")
    print("    per round: " + "; ".join(f"{s} {[round(t, 2) for t in v]}" for s, v in times.items()))


if __name__ == "__main__":
    main()
