"""Hub pushes and resumes: training throughput with a push in flight, and bytes a resume downloads.

    python benchmarks/hub.py [--repeats 5] [--steps 300] [--every 60] [--profile]

Everything runs against the local Hub emulator (tests/hub_emulator.py, started here as a
subprocess on a free port, storage in a temp folder), reached by the real huggingface_hub client
through HF_ENDPOINT (`tests.hub_fixtures.hub_env`). huggingface_hub reads that variable when it is
first imported, so this script starts the emulator and sets the environment before it imports
torch, accelerate or robotrain.train.

1. push: `robotrain.train.train(cfg, run_dir)` in this process, two sides interleaved (A B, B A...):
   - push: `hub.repo_id=user/bench-push-<round> hub.push_checkpoints=true`, a fresh repo per round,
     `hub.push_final=false` (the root model would only lengthen the drain, which is outside the
     timed span anyway) and `hub.drain_timeout_s=300`, so that a run always ends with everything
     pushed;
   - local: the same run without a repo: the same checkpoints saved locally at the same cadence.
   Model and cadence: MLP hidden_dim=1024, num_layers=4 (3.4 M parameters), batch 64: ~35 ms a
   step on one core, and a 40.5 MB checkpoint (weights + AdamW moments) every 60 steps (~2 s).
   Printed: the median over rounds of (push steps/s / local steps/s), target >= 0.95.

   How a push is kept in flight: both a real upload and a stall. The checkpoint is big enough that
   the client does real work for it (hashing, then huggingface_hub base64-encodes every file into a
   54 MB NDJSON commit body and sends it), and the emulator then holds each checkpoint's commit,
   body received, until the next checkpoint folder appears in the run dir (a `stall_commits` rule
   with a 30 s cap, freed by a watcher thread that polls the run's checkpoints/ folder every 50 ms
   and calls `HubAdmin.release()`; at the last checkpoint it clears the rule). That is the worst
   steady case for an uplink, a push always in flight with the next one starting right as it
   lands (here 40.5 MB per ~2 s, ~160 Mbit/s), and the stall tracks the cadence whatever the
   machine's load, so each checkpoint interval holds exactly one push's client-side work. A fixed
   stall cannot do both: shorter than the interval it leaves the pusher idle, longer it builds a
   backlog and intervals with no push. On localhost the upload alone takes ~0.5 s, so without a
   stall the pusher would be idle most of the time; the stall is what a remote Hub and a real
   uplink would add. The detail line prints the share of the timed span during which a push was in
   flight (emulator log: from a push's preupload to the end of its tag request), and every round
   checks that each local checkpoint got its tag on the Hub and nothing was left unpushed, so the
   ratio cannot pass by pushing nothing. The watcher runs, and makes the same admin calls, on both
   sides. The last checkpoint's commit is not held, which keeps the drain short.

   The emulator runs at nice 19: its own work (base64 decoding, hashing, writing blobs) belongs to
   the Hub's servers, not to the training machine, and on this 2-core machine it would otherwise
   compete with training for a core. The client's work stays where it really is: in the pusher's
   upload child process (robotrain.hub runs each commit there, niced, so that huggingface_hub's
   Python-level encoding never holds the training process's GIL).

   How a run is timed: the metrics.jsonl stamps (wall clock, written when a log window closes,
   before that step's checkpoint is saved) at the checkpoint steps split the run into checkpoint
   intervals (60-120, 120-180, ...), each holding one local save (both sides) and, on the push side,
   one submit and the client-side work of one push. A run's throughput is `every` / the median
   interval: the median shrugs off an interval that another tenant slowed down, while every
   interval carries the push's cost (a median of log windows, as in benchmarks/overhead.py, would
   hide it: it lands in the one window in which the client encodes). Start-up, the first interval
   and the final save and drain fall outside, and an untimed warm-up run goes first (the first run
   in a process is 20-25 % slower). torch uses one intra-op thread (`--threads`), as in
   benchmarks/overhead.py, which leaves the second core to the pusher; fsync is off on both sides
   (local saves are in the intervals of both sides, and fsync only adds disk noise).

   Where the time goes: the watcher also samples the training (main) thread's scheduler counters
   (Linux /proc/self/task/<tid>/schedstat), and a detail line splits its time per interval into on
   a CPU / waiting for a CPU (other threads, processes, tenants) / blocked (neither: waiting for
   the GIL, for the data prefetch thread, for I/O). Extra "blocked" time on the push side would be
   the pusher holding the GIL; extra "waiting" time is CPU the upload child takes from training.

   Not emulated: LFS/Xet. The emulator answers "regular" to every preupload, so huggingface_hub
   sends each file base64-encoded inside the NDJSON commit, which it builds in Python. Against the
   real Hub, .safetensors files go through Xet (native code, off the GIL) or LFS (raw bytes), so
   this measures the worst client-side path robotrain can meet.

2. resume: after the last push round, `python -m robotrain resume=hub:<repo>@<step>` (a middle
   checkpoint, so newer checkpoints and the history exist but must not be fetched), in a fresh run
   dir, as a subprocess with the emulator's environment, training a few steps further without
   pushing. Bytes downloaded = sum of `bytes_sent` of the emulator's successful file GETs for that
   repo since a mark taken just before; one checkpoint = the on-disk size of that step's folder in
   the pushing run. Printed: their ratio, target <= 1.05 (and every downloaded file must lie in
   that checkpoint's folder).

`--profile` also prints a cProfile of the pusher thread in one extra push run (by tottime); since
the commits run in the upload child, it shows the parent's side only (queueing, tags, waiting).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import compose, fmt_list, interleaved, median, use_benchmark_cache  # noqa: E402
from hub_fixtures import HubAdmin, hub_env, start_emulator, stop_emulator  # noqa: E402

use_benchmark_cache()

USER = "user"
STALL_CAP_S = 30.0  # a held commit is freed by the next checkpoint; this only bounds a missed release


@dataclass
class Run:
    steps_per_s: float
    intervals: list[float]  # seconds per checkpoint interval
    split: tuple[float, float, float] | None = None  # main thread per interval: on a CPU, waiting for one, blocked
    in_flight: float = 0.0  # share of the timed span with a push in flight (push side)
    pushed: int = 0  # checkpoints tagged on the Hub (push side)
    repo: str | None = None
    run_dir: Path | None = None


def overrides(args) -> list[str]:
    return [
        "policy=mlp", f"policy.hidden_dim={args.hidden_dim}", f"policy.num_layers={args.num_layers}",
        f"batch_size={args.batch_size}", f"steps={args.steps}", f"log_every={args.log_every}",
        f"checkpoint.every={args.every}", "checkpoint.fsync=false", "eval.enabled=false",
    ]


def checkpoint_stamps(run_dir: Path, every: int) -> list[float]:
    """metrics.jsonl wall-clock stamps at the checkpoint steps (every, 2*every, ..., the last step)."""
    stamps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "steps_per_s" in entry and entry["step"] % every == 0:
            stamps.append(entry["time"])
    return stamps


def in_flight_share(admin: HubAdmin, mark: int, repo: str, start: float, end: float) -> float:
    """Share of [start, end] during which a push to `repo` was in flight, as the emulator saw it:
    from a push's preupload to the end of its tag request (a lower bound: the client's hashing
    before the preupload is left out)."""
    entries = sorted((e for e in admin.log(since=mark, repo=repo) if e["kind"] in ("preupload", "tag")),
                     key=lambda e: e["started"])
    covered, opened = 0.0, None
    for entry in entries:
        if entry["kind"] == "preupload" and opened is None:
            opened = entry["started"]
        elif entry["kind"] == "tag" and opened is not None:
            covered += max(0.0, min(entry["started"] + entry["duration"], end) - max(opened, start))
            opened = None
    return covered / (end - start)


class Watcher(threading.Thread):
    """Runs beside training, polling every 50 ms: each new step folder in `checkpoints_dir` frees
    the commit the emulator holds (the previous checkpoint's), and the last one (`last`) also
    removes the stall rule. It also samples the main thread's scheduler counters (Linux
    /proc/self/task/<tid>/schedstat: ns on a CPU, ns waiting for one) for `split()`."""

    def __init__(self, admin: HubAdmin, checkpoints_dir: Path, last: str):
        super().__init__(name="bench-watcher", daemon=True)
        self.admin, self.dir, self.last = admin, checkpoints_dir, last
        self.done = threading.Event()
        self.schedstat = Path(f"/proc/self/task/{threading.main_thread().native_id}/schedstat")
        self.samples: list[tuple[float, float, float]] = []  # (wall time, s on a CPU, s waiting for a CPU)

    def run(self) -> None:
        seen: set[str] = set()
        releasing = True
        while not self.done.wait(0.05):
            self._sample()
            if not releasing:
                continue
            try:
                names = {n for n in os.listdir(self.dir) if n.isdigit()}
            except FileNotFoundError:
                continue
            if names - seen:
                seen |= names
                if self.last in names:
                    self.admin.clear_faults()  # frees what is held and holds nothing more
                    releasing = False
                else:
                    self.admin.release()

    def _sample(self) -> None:
        try:
            on_cpu, waiting = self.schedstat.read_text().split()[:2]
        except (OSError, ValueError):
            return
        self.samples.append((time.time(), int(on_cpu) / 1e9, int(waiting) / 1e9))

    def split(self, start: float, end: float) -> tuple[float, float, float] | None:
        """Main thread's seconds (on a CPU, waiting for a CPU, neither) between two wall times; the
        last is time blocked: on the GIL, on the data prefetch thread, on I/O."""
        def at(t: float) -> tuple[float, float] | None:
            for (t0, c0, w0), (t1, c1, w1) in zip(self.samples, self.samples[1:]):
                if t0 <= t <= t1:
                    f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
                    return c0 + f * (c1 - c0), w0 + f * (w1 - w0)
            return None

        a, b = at(start), at(end)
        if a is None or b is None:
            return None
        cpu, wait = b[0] - a[0], b[1] - a[1]
        return cpu, wait, (end - start) - cpu - wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per side")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=60, help="checkpoint.every (both sides)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--profile", action="store_true", help="also cProfile the pusher thread in one push run")
    args = parser.parse_args()
    if args.steps % args.every or args.steps // args.every < 3 or args.every % args.log_every:
        parser.error("--steps must be a multiple of --every with at least 3 checkpoints; --every a multiple "
                     "of --log-every")

    scratch = Path(tempfile.mkdtemp(prefix="robotrain-hub-bench-"))
    emulator, url = start_emulator(scratch / "hub-root", scratch / "emulator.log")
    try:
        _renice(emulator.pid, 19)
        # Before anything imports huggingface_hub (it reads HF_ENDPOINT once, at import).
        assert "huggingface_hub" not in sys.modules, "huggingface_hub was imported before HF_ENDPOINT was set"
        os.environ.update(hub_env(url, scratch / "hf_home"))
        bench(args, scratch, HubAdmin(url))
    finally:
        stop_emulator(emulator)
        shutil.rmtree(scratch, ignore_errors=True)


def _renice(pid: int, value: int) -> None:
    """Lower the priority of every thread of `pid` (threads it starts later inherit it)."""
    try:
        tids = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:  # no /proc: the process's (main thread's) priority
        tids = [pid]
    for tid in tids:
        os.setpriority(os.PRIO_PROCESS, tid, value)


def make_runner(args, scratch: Path, admin: HubAdmin):
    """`run(push, tag) -> Run`: one training run (in this process), timed and, for push, checked."""
    import torch
    from huggingface_hub import HfApi

    from robotrain import checkpoint_layout as layout, data
    from robotrain.train import train

    torch.set_num_threads(args.threads)
    base = overrides(args)
    data.prepare(compose(base).dataset)  # generate the dataset (once, cached) outside any timing
    api = HfApi()

    def run(push: bool, tag: str, steps: int = args.steps) -> Run:
        run_dir = scratch / f"run-{tag}"
        run_dir.mkdir()
        n_checkpoints = steps // args.every
        repo = f"{USER}/bench-push-{tag}" if push else None
        extra = [f"hub.repo_id={repo}", "hub.push_checkpoints=true", "hub.push_final=false",
                 "hub.drain_timeout_s=300"] if push else []
        cfg = compose([*base, *extra, f"steps={steps}"])
        admin.clear_faults()
        if push:
            # Each checkpoint's commit waits at the "server", body received, until the next checkpoint
            # is published (the watcher frees it); the last step's commit is not held.
            admin.stall_commits(seconds=STALL_CAP_S, times=n_checkpoints - 1, repo=repo)
        mark = admin.mark()
        watcher = Watcher(admin, run_dir / "checkpoints", layout.step_folder_name(steps, steps))
        watcher.start()
        try:
            result = train(cfg, run_dir)
        finally:
            watcher.done.set()
            watcher.join()
            admin.clear_faults()
        stamps = checkpoint_stamps(run_dir, args.every)
        intervals = [b - a for a, b in zip(stamps, stamps[1:])]
        split = watcher.split(stamps[0], stamps[-1])
        measured = Run(args.every / median(intervals), intervals, run_dir=run_dir,
                       split=tuple(x / len(intervals) for x in split) if split else None)
        if not push:
            shutil.rmtree(run_dir, ignore_errors=True)
            return measured
        local = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
        tags = sorted(t.name for t in api.list_repo_refs(repo).tags)
        if result.not_pushed or len(local) != n_checkpoints or tags != local:
            raise SystemExit(f"push run {tag}: not everything was pushed: local {local}, tags on the Hub {tags}, "
                             f"not pushed {result.not_pushed}")
        measured.repo, measured.pushed = repo, len(tags)
        measured.in_flight = in_flight_share(admin, mark, repo, stamps[0], stamps[-1])
        return measured

    return run, api


def bench(args, scratch: Path, admin: HubAdmin) -> None:
    run, api = make_runner(args, scratch, admin)
    kept: list[Run] = []  # the latest pushing run (run dir and repo), for the resume part
    rounds = {"push": itertools.count(), "local": itertools.count()}

    def push_side() -> Run:
        measured = run(True, f"{next(rounds['push'])}")
        for old in kept:
            shutil.rmtree(old.run_dir, ignore_errors=True)
            api.delete_repo(old.repo)
        kept[:] = [measured]
        return measured

    # The first training run in a process is 20-25 % slower (one-time warm-up); keep it out of the rounds.
    run(False, "warm-up", steps=3 * args.every)
    results = interleaved({"push": push_side, "local": lambda: run(False, f"local-{next(rounds['local'])}")},
                          args.repeats)
    push, local = results["push"], results["local"]
    push_sps, local_sps = [r.steps_per_s for r in push], [r.steps_per_s for r in local]
    ratios = [a / b for a, b in zip(push_sps, local_sps)]
    print(f"hub push: steps/s with push in flight / without = {median(ratios):.3f} (target >= 0.95)")
    interval = median([i for r in local for i in r.intervals])
    extra = median([i for r in push for i in r.intervals]) - interval
    print(
        f"    median steps/s push {median(push_sps):.2f} local {median(local_sps):.2f} (ratio of medians "
        f"{median(push_sps) / median(local_sps):.3f}); per round: push {fmt_list(push_sps, '.2f')} local "
        f"{fmt_list(local_sps, '.2f')} ratios {fmt_list(ratios)}"
    )
    ckpt_mb = _folder_bytes(kept[0].run_dir / "checkpoints" / f"{args.every:06d}") / 1e6
    print(
        f"    a {ckpt_mb:.1f} MB checkpoint every {args.every} steps ({interval:.2f}s without pushing, "
        f"{extra * 1000:+.0f} ms per interval with; {8 * ckpt_mb / interval:.0f} Mbit/s of checkpoints); "
        f"{push[0].pushed} checkpoints tagged per push run; a push in flight "
        f"{fmt_list([100 * r.in_flight for r in push], '.0f')} % of the timed span", flush=True,
    )
    splits = {name: [r.split for r in side if r.split] for name, side in results.items()}
    if all(splits.values()):
        parts = [f"{name} " + "/".join(f"{1000 * median([s[k] for s in got]):.0f}" for k in range(3))
                 for name, got in splits.items()]
        print(f"    main thread per interval, ms on a CPU / waiting for a CPU / blocked (GIL, data, I/O): "
              f"{'; '.join(parts)}", flush=True)

    resume(args, scratch, admin, kept[0])
    if args.profile:
        profile(lambda: run(True, "profile"))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def resume(args, scratch: Path, admin: HubAdmin, pushed: Run) -> None:
    names = sorted(p.name for p in (pushed.run_dir / "checkpoints").iterdir() if p.name.isdigit())
    name = names[len(names) // 2 - 1] if len(names) > 2 else names[0]  # a middle one: newer ones exist
    step = int(name)
    target = scratch / "resumed"
    mark = admin.mark()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(
        [sys.executable, "-m", "robotrain", f"hydra.run.dir={target}", f"resume=hub:{pushed.repo}@{step}",
         f"steps={step + args.log_every}", "hub.push_checkpoints=false", "hub.push_final=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        raise SystemExit(f"resume failed ({done.returncode}):\n{done.stderr[-3000:]}")
    downloads = admin.downloads(since=mark, repo=pushed.repo)
    stray = sorted({d["file"] for d in downloads if not d["file"].startswith(f"checkpoints/{name}/")})
    if stray:
        raise SystemExit(f"resume downloaded files outside checkpoints/{name}/: {stray}")
    got = sum(d["bytes_sent"] for d in downloads)
    folder = pushed.run_dir / "checkpoints" / name
    one = _folder_bytes(folder)
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    print(f"hub resume: bytes downloaded / one checkpoint = {got / one:.3f} (target <= 1.05)")
    print(f"    resume=hub:{pushed.repo}@{step} ({len(names)} checkpoints on the Hub): {got:,} bytes in "
          f"{len(downloads)} GETs; checkpoint {name} on disk: {one:,} bytes in {files} files", flush=True)


def profile(one_push_run) -> None:
    """cProfile of the pusher thread's uploads (CheckpointPusher._attempt) during one push run."""
    from robotrain import hub

    profiler = cProfile.Profile()
    original = hub.CheckpointPusher._attempt

    def profiled(self, job):
        profiler.enable()
        try:
            return original(self, job)
        finally:
            profiler.disable()

    hub.CheckpointPusher._attempt = profiled
    try:
        one_push_run()
    finally:
        hub.CheckpointPusher._attempt = original
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    print("\npusher thread, one push run (cProfile, by tottime; the wait in recv is the held commit):")
    print(out.getvalue())


if __name__ == "__main__":
    main()
