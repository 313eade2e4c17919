"""Evaluations that run beside training, in a process of their own.

At an evaluation step the run saves a checkpoint (every process takes part, briefly, as in any
save; before the first step, the untrained weights alone), and the main process starts
`python -m robotrain.eval.worker` on its `pretrained_model/`, then goes on training: no process
waits for the rollouts. In a gymnasium env (pusht, aloha...) the worker writes
`<run_dir>/eval/step_<n>/eval_info.json` (robotrain.eval's layout) and its MP4 videos there; in
the embedded task (env=synthetic) it runs `robotrain.eval.synthetic.evaluate` and saves the
first episodes as `<run_dir>/eval/step_<n>.gif`. Either way it ends with `step_<n>/result.json`:
the metrics to log and the video for the tracker. After every step the main process picks up
finished evaluations and logs them at the step they belong to in metrics.jsonl and the
tracker; at the end of the run it waits for the last ones, at most `eval.timeout_s`.

Everything an evaluation needs is in `step_<n>/spec.json`, so a run resumed after a kill
starts again the evaluations that had not finished (a worker dies with its trainer), and logs
those that had finished but were not logged yet. The worker runs with `eval.num_threads` torch
threads at the lowest CPU priority (nice 19): where training and evaluation compete for a core,
training gets it, and the evaluation uses what training leaves idle.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from robotrain.config import EnvConfig, EvalConfig

log = logging.getLogger("robotrain")

SPEC, INFO, RESULT, LOGGED, WORKER_LOG = "spec.json", "eval_info.json", "result.json", "logged", "worker.log"


def metrics(info: dict) -> dict[str, float]:
    """What is logged of an `eval_info.json`: LeRobot's overall numbers, and the success rate
    as a fraction under the name the embedded task's evaluation uses."""
    overall = info["overall"]
    return {"eval/success_rate": overall["pc_success"] / 100, "eval/pc_success": overall["pc_success"],
            "eval/avg_sum_reward": overall["avg_sum_reward"], "eval/avg_max_reward": overall["avg_max_reward"],
            "eval/eval_s": overall["eval_s"]}


class BackgroundEvaluations:
    """The evaluation workers of one run (main process only)."""

    def __init__(self, env: EnvConfig, eval_cfg: EvalConfig, folder: Path, image_size: int):
        """`image_size`: the embedded task's camera size (dataset.synthetic.image_size)."""
        self.env, self.eval_cfg, self.folder, self.image_size = env, eval_cfg, Path(folder), image_size
        self.running: dict[int, tuple[subprocess.Popen, str]] = {}  # step -> (worker, checkpoint name)

    def start(self, step: int, checkpoint: Path) -> None:
        """Evaluate `checkpoint` (the step folder of `step`, or any folder holding a
        pretrained_model/) in a new worker."""
        out = self._out(step)
        out.mkdir(parents=True, exist_ok=True)
        spec = {"step": step, "policy": str(checkpoint / "pretrained_model"), "checkpoint": checkpoint.name,
                "env": dataclasses.asdict(self.env), "episodes": self.eval_cfg.episodes,
                "batch_size": self.eval_cfg.batch_size, "seed": self.eval_cfg.seed,
                "rename_map": dict(self.eval_cfg.rename_map or {}), "record": self.eval_cfg.video_episodes,
                "threads": self.eval_cfg.num_threads, "embedded": self.env.gym_id is None,
                "max_steps": self.eval_cfg.max_steps, "image_size": self.image_size,
                "video_size": self.eval_cfg.video_size, "gif": str(self.folder / f"step_{step:06d}.gif")}
        (out / SPEC).write_text(json.dumps(spec, indent=2))
        self._launch(step, spec)

    def _launch(self, step: int, spec: dict) -> None:
        out = self._out(step)
        for stale in (out / INFO, out / RESULT, out / LOGGED):
            stale.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        with open(out / WORKER_LOG, "a") as worker_log:
            worker = subprocess.Popen([sys.executable, "-m", "robotrain.eval.worker", str(out / SPEC)], env=env,
                                      stdout=worker_log, stderr=subprocess.STDOUT, preexec_fn=_prepare_worker)
        self.running[step] = (worker, spec["checkpoint"])
        log.info("evaluating step %d in env=%s in the background (pid %d, %s)", step, self.env.name, worker.pid,
                 out / WORKER_LOG)

    def resume(self, up_to_step: int) -> None:
        """After a resume: start again the evaluations of steps <= `up_to_step` that did not
        finish; those that finished but were not logged are picked up by the next `poll`."""
        for spec_path in sorted(self.folder.glob(f"step_*/{SPEC}")):
            spec = json.loads(spec_path.read_text())
            out = spec_path.parent
            if spec["step"] > up_to_step or (out / LOGGED).exists() or spec["step"] in self.running:
                continue
            if (out / RESULT).exists():
                self.running[spec["step"]] = (None, spec["checkpoint"])  # finished before the kill
            elif Path(spec["policy"]).is_dir():
                self._launch(spec["step"], spec)
            else:
                log.warning("the evaluation of step %d cannot restart: %s is gone", spec["step"], spec["policy"])

    def in_use(self) -> frozenset[str]:
        """Checkpoint folder names that running evaluations read (not to be pruned)."""
        return frozenset(name for worker, name in self.running.values() if worker is not None)

    def poll(self) -> list[tuple[int, dict[str, float], Path | None]]:
        """(step, metrics, video for the tracker or None) of the evaluations that finished since
        the last call."""
        finished = []
        for step, (worker, _) in sorted(self.running.items()):
            if worker is not None and worker.poll() is None:
                continue
            del self.running[step]
            out = self._out(step)
            if worker is not None and worker.returncode != 0 or not (out / RESULT).exists():
                log.warning("the evaluation of step %d failed (exit %s); see %s", step,
                            worker.returncode if worker is not None else "?", out / WORKER_LOG)
                continue
            result = json.loads((out / RESULT).read_text())
            finished.append((step, result["metrics"], Path(result["video"]) if result["video"] else None))
        return finished

    def logged(self, step: int) -> None:
        (self._out(step) / LOGGED).touch()

    def wait(self, timeout_s: float) -> list[tuple[int, dict[str, float], Path | None]]:
        """Wait for every running evaluation, at most `timeout_s` in all; stop the rest."""
        deadline = time.monotonic() + timeout_s
        for worker, _ in list(self.running.values()):
            if worker is not None:
                try:
                    worker.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        late = sorted(step for step, (worker, _) in self.running.items() if worker is not None and worker.poll() is None)
        if late:
            log.warning("evaluations of steps %s still running after eval.timeout_s=%g: stopped", late, timeout_s)
        self.close()
        return self.poll()

    def close(self) -> None:
        """Stop the workers still running (their steps restart on resume)."""
        for worker, _ in self.running.values():
            if worker is not None and worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()

    def _out(self, step: int) -> Path:
        return self.folder / f"step_{step:06d}"


def _prepare_worker() -> None:
    """In the worker, before exec: yield the CPU to training when both want it (the lowest
    priority), and get SIGTERM when the trainer dies (Linux), even by SIGKILL."""
    os.nice(19)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the worker finishes its evaluation alone
        pass
