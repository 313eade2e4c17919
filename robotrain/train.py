"""The training loop, top to bottom.

    set up the process (accelerate), seed every RNG, check the Hub repo
    open the dataset (prepared once by the main process)
    build the policy, optimizer and schedule
    register what a checkpoint holds (robotrain.checkpoint) and, when resuming, restore all of it
    [evaluate the untrained weights]
    loop: batch -> loss -> backward -> clip -> step -> log -> [checkpoint -> push] -> [evaluate it]
    evaluate the last checkpoint, push the final model, wait (bounded) for evaluations and uploads

Each optimizer step consumes one global batch of consecutive sampler positions
(`robotrain.data.sampler.DataPosition`), so a resumed run continues the exact sequence of
batches. SIGTERM/SIGUSR2 stop the loop
at the next step boundary with a checkpoint (see `robotrain.preemption`). Checkpoint uploads run in the background
(`robotrain.hub.CheckpointPusher`): the loop never waits for the network. Evaluations roll a
checkpoint out in a worker process (`robotrain.eval.background`): no process waits for them.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from robotrain import augmentation, checkpoint, checkpoint_layout as layout, compilation, data, distributed, \
    global_batch, peft, policies, pretrained, strategy, tracking
from robotrain.config import TrainConfig, to_dict
from robotrain.data.loader import batches, make_loader, to_device
from robotrain.data.mixture import MEMBER_KEY
from robotrain.data.sampler import DataPosition
from robotrain.ema import Ema, EmaState
from robotrain.optim import make_optimizer, make_scheduler
from robotrain.precision import SCALER_STATE, Precision
from robotrain.preemption import PreemptionFlag
from robotrain.policies.base import PER_SAMPLE_LOSS
from robotrain.progress import MemberLosses, MetricsLog, Progress, peak_memory_mb
from robotrain.resume import ResumePoint

log = logging.getLogger("robotrain")


@dataclass
class RunResult:
    """What a run did, for the summary a user reads and for tests."""

    run_dir: Path
    step: int
    last_checkpoint: Path | None = None
    preempted_by: str | None = None
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)
    not_pushed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    num_processes: int = 1
    is_main: bool = True

    @property
    def return_value(self) -> float | None:
        """What a sweep optimizes: the final evaluation's success rate, if there was one."""
        return self.evals.get(self.step, {}).get("eval/success_rate")

    def finish(self, seconds: float) -> "RunResult":
        """Record the run's duration and, on the main process, write `<run_dir>/result.json`."""
        self.seconds = seconds
        if self.is_main:
            (self.run_dir / "result.json").write_text(json.dumps(self.summary(), indent=2))
        return self

    def summary(self) -> dict:
        """`<run_dir>/result.json`: how the run ended, for scripts and remote launchers."""
        return {
            "step": self.step, "return_value": self.return_value, "preempted_by": self.preempted_by,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "evals": {str(k): v for k, v in self.evals.items()}, "last_metrics": self.last_metrics,
            "not_pushed": self.not_pushed, "seconds": round(self.seconds, 3),
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, run_dir: Path, resume: ResumePoint | None = None,
          accelerator: Accelerator | None = None) -> RunResult:
    started = time.perf_counter()
    accelerator = accelerator or distributed.make_accelerator()
    if not accelerator.is_main_process:
        log.setLevel(logging.WARNING)  # one voice per run
    seed_everything(cfg.seed)  # the same on every process: identical initial weights
    precision = Precision(cfg.precision, accelerator.device)  # fp16 without a GPU: fail now
    pusher = _make_pusher(cfg) if accelerator.is_main_process else None  # bad repo/token: fail now
    if accelerator.is_main_process:
        tracking.check_installed(cfg.tracker)  # a missing tracker package: fail now too

    dataset, sampler = _open_data(cfg, accelerator)

    # Policy (adapted, sharded or replicated), optimizer and schedule.
    parallel = strategy.make(cfg.distributed.strategy)
    model = parallel.prepare(_build_policy(cfg, dataset, accelerator.device), accelerator)
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.steps)
    if accelerator.num_processes > 1:
        seed_everything(cfg.seed + accelerator.process_index)  # per-process randomness from here on

    # What a checkpoint holds; a resume restores all of it (weights, optimizer, schedule, RNG,
    # data position, tracker run, loss scale, EMA) before training starts.
    position = DataPosition(sampler, cfg.batch_size, accelerator.num_processes, cfg.grad_accum_steps,
                            cfg.resume.allow_changes)
    tracker_run = tracking.TrackerRun()
    ema = Ema(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
    checkpoints = _checkpoints(cfg, run_dir, accelerator, parallel, model, optimizer, position,
                               [scheduler, tracker_run, precision, ema])
    if resume is not None:
        checkpoints.load(resume.checkpoint_dir)
    policy, optimizer = parallel.wrap(model, optimizer, accelerator)

    step = position.step
    result = RunResult(run_dir=run_dir, step=step, num_processes=accelerator.num_processes,
                       is_main=accelerator.is_main_process)
    out = _Outputs.open(cfg, run_dir, tracker_run, accelerator, result, step, model, position.global_batch_size)
    saver = _Saver(cfg, checkpoints, pusher)
    if resume is None and cfg.eval.at_start and out.evaluator.enabled:
        out.evaluator.start(step, checkpoints.save_weights(run_dir / "eval" / "untrained"), label="untrained")
    elif resume is not None:
        out.evaluator.resume(step)  # evaluations a kill interrupted start again

    stream = batches(_loader(cfg, accelerator, dataset, position), cfg.prefetch, cfg.grad_accum_steps,
                     accelerator.device)
    augment = augmentation.for_training(cfg.dataset.image_transforms, cfg.seed, dataset.meta.camera_keys, position,
                                        accelerator.process_index, run_dir if accelerator.is_main_process else None)
    training = _Training(cfg, accelerator, parallel, precision, policy, optimizer, scheduler, ema, augment,
                         out.member_losses)
    try:
        step = result.step = _steps(training, stream, out, saver, step)
        if result.preempted_by is None:
            out.evaluator.start(step, saver.last, label="trained")
            out.evaluator.finish()
            saver.push_final(result)
    finally:
        if hasattr(stream, "close"):
            stream.close()
        out.close()
        result.not_pushed = saver.close()
    return result.finish(time.perf_counter() - started)


def _steps(training: "_Training", stream, out: "_Outputs", saver: "_Saver", step: int) -> int:
    """Optimizer steps from `step` to `cfg.steps`, or to a preemption (saved, and noted in the
    run's result); returns the step reached."""
    cfg, result = training.cfg, out.result
    with PreemptionFlag() as preemption:
        while step < cfg.steps:
            t0 = time.perf_counter()
            micro_batches = next(stream)
            t1 = time.perf_counter()
            loss, grad_norm = training.update(micro_batches, step)
            step += 1
            out.samples(step, micro_batches)
            out.window.add(loss, grad_norm, t1 - t0, time.perf_counter() - t0)
            out.report(step, training.scheduler.get_last_lr()[0])
            # An evaluation reads a checkpoint of its step, in a process of its own.
            eval_due = out.evaluator.enabled and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps
            # Every process must stop at the same step, whichever the signal reached first.
            stop = distributed.any_process(training.accelerator, preemption.requested)
            if _checkpoint_due(cfg, step) or stop or eval_due:
                result.last_checkpoint = saver.save(step, out.evaluator.in_use())
            if eval_due:
                out.evaluator.start(step, result.last_checkpoint)
            out.evaluator.poll()
            if stop:
                result.preempted_by = preemption.signal_name or "a preemption signal to another process"
                break
    return step


def _open_data(cfg: TrainConfig, accelerator: Accelerator):
    """(dataset, sampler): the main process generates, downloads or checks the dataset (each
    member of a mixture) once, the others wait, then every process reads it as the policy will
    see it (action chunk, history)."""
    with accelerator.main_process_first():
        roots = data.prepare_all(cfg.dataset)
    return data.open_for_training(cfg.dataset, cfg.sampler, cfg.policy, cfg.seed, roots, accelerator.device)


def _build_policy(cfg: TrainConfig, dataset, device):
    """The policy for this run: built (from pretrained weights if asked), adapted (PEFT) and,
    with compile.enabled, its forward compiled (in place: the same state dict keys)."""
    folders = pretrained.local_folders(cfg.policy.pretrained_path, cfg.policy.pretrained_revision) \
        if cfg.policy.pretrained_path else []
    policy = peft.apply(policies.make(cfg.policy, dataset.meta.features, dataset.meta.stats, folders),
                        cfg.peft, cfg.policy)
    peft.base_policy(policy).reports_per_sample_loss = cfg.dataset.is_mixture  # for the per-member losses
    if cfg.compile.enabled:
        compilation.apply(policy, cfg.compile.mode, device)
    return policy


def _checkpoints(cfg: TrainConfig, run_dir: Path, accelerator: Accelerator, parallel, model, optimizer,
                 position: DataPosition, state: list) -> checkpoint.CheckpointManager:
    """The run's checkpoint parts, registered with the manager that saves and loads them.
    `state`: the scheduler, the tracker run, the precision (its fp16 loss scale) and the EMA or None."""
    scheduler, tracker_run, precision, ema = state
    world = checkpoint.World(accelerator)
    manager = checkpoint.CheckpointManager(run_dir / "checkpoints", cfg.steps, position, world,
                                           fsync=cfg.checkpoint.fsync, keep_last=cfg.checkpoint.keep_last)
    manager.register(parallel.checkpoint_parts(model, optimizer, to_dict(cfg), published=_published(cfg, ema)))
    manager.register({
        "scheduler": checkpoint.Json(scheduler, f"{layout.TRAINING_STATE}/{layout.SCHEDULER_STATE}"),
        "rng": checkpoint.RngStates(world),
        "tracker": checkpoint.Json(tracker_run, f"{layout.TRAINING_STATE}/{tracking.STATE_FILE}", optional=True),
    })
    if precision.scaler is not None:  # optional: a bf16/fp32 checkpoint resumed under fp16 starts a new scale
        scaler = checkpoint.Json(precision, f"{layout.TRAINING_STATE}/{SCALER_STATE}", optional=True)
        manager.register({"grad_scaler": scaler})
    if ema is not None:  # after the model: with for_eval it puts the raw weights back
        manager.register({"ema": EmaState(ema, raw=cfg.ema.for_eval)})
    return manager


def _published(cfg: TrainConfig, ema: Ema | None):
    """The context in which the model holds what is evaluated and published: the EMA averages
    with ema.for_eval, else None (the weights themselves)."""
    return ema.applied if ema is not None and cfg.ema.for_eval else None


@dataclass
class _Outputs:
    """Where a run reports: metrics.jsonl, the progress bar or log lines, the tracker, the
    sample log, and simulator evaluations (most of it on the main process only)."""

    cfg: TrainConfig
    accelerator: Accelerator
    result: RunResult
    global_batch_size: int
    metrics_log: MetricsLog
    progress: Progress
    tracker: Any
    evaluator: "_Evaluator"
    sample_log: "_SampleLog | None"
    window: "_Window" = field(default_factory=lambda: _Window())
    member_losses: MemberLosses | None = None
    """A mixture's per-member losses, logged with the window's metrics."""

    @classmethod
    def open(cls, cfg, run_dir, tracker_run, accelerator, result, step, model, global_batch_size) -> "_Outputs":
        main = accelerator.is_main_process
        metrics_log = MetricsLog(run_dir / "metrics.jsonl" if main else None)
        progress = Progress(cfg.steps, step, cfg.log_every, enabled=main)
        tracker = tracking.start(cfg, run_dir, tracker_run, step, model, main)
        evaluator = _Evaluator(cfg, accelerator, result, metrics_log, progress, tracker, run_dir)
        samples = _SampleLog(run_dir, accelerator.process_index) if cfg.log_samples else None
        members = MemberLosses(len(cfg.dataset.datasets)) if cfg.dataset.is_mixture else None
        return cls(cfg, accelerator, result, global_batch_size, metrics_log, progress, tracker, evaluator, samples,
                   member_losses=members)

    def report(self, step: int, lr: float) -> None:
        """After each step: the progress bar, and every `log_every` steps the window's metrics."""
        metrics = None
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            metrics = self.window.flush(lr, self.global_batch_size)
            if self.member_losses is not None:
                metrics.update(self.member_losses.flush(self.accelerator))
            metrics["peak_memory_mb"] = distributed.max_over_processes(self.accelerator,
                                                                       peak_memory_mb(self.accelerator.device))
            self.result.last_metrics = metrics
            self.metrics_log.write(step, metrics)
            self.tracker.log(step, metrics)
        self.progress.update(step, metrics)

    def samples(self, step: int, micro_batches: list[dict]) -> None:
        if self.sample_log is not None:
            members = [batch[MEMBER_KEY] for batch in micro_batches if MEMBER_KEY in batch]
            self.sample_log.write(step, torch.cat([batch["index"] for batch in micro_batches]),
                                  torch.cat(members) if members else None)

    def close(self) -> None:
        self.evaluator.close()
        if self.sample_log is not None:
            self.sample_log.close()
        self.progress.close()
        self.metrics_log.close()
        self.tracker.close()


def _make_pusher(cfg: TrainConfig):
    if cfg.hub.repo_id is None:
        return None
    from robotrain import hub

    return hub.CheckpointPusher.from_config(cfg.hub)


def _loader(cfg: TrainConfig, accelerator: Accelerator, dataset, position: DataPosition):
    """This rank's share of each global batch, from the run's data position on."""
    return make_loader(
        dataset, position.batches(accelerator.process_index),
        # Frames decoded on the GPU are there already; pinning is for CPU tensors only.
        num_workers=cfg.num_workers, seed=cfg.seed, micro_batches=cfg.grad_accum_steps,
        pin_memory=accelerator.device.type == "cuda" and cfg.dataset.video_device == "cpu",
    )


@dataclass
class _Training:
    """What one optimizer step uses: the policy, optimizer and schedule, how the processes hold
    them (`parallel`) and the forward pass's precision."""

    cfg: TrainConfig
    accelerator: Accelerator
    parallel: Any
    precision: Precision
    policy: Any
    optimizer: Any
    scheduler: Any
    ema: Ema | None = None
    augment: Any = None
    """(batch on the device, step, micro-batch) -> the batch with its camera frames augmented."""
    member_losses: MemberLosses | None = None
    """Where a mixture's per-sample losses are summed per member."""

    def update(self, micro_batches: list[dict], step: int):
        """One optimizer step on `grad_accum_steps` micro-batches; returns (loss, grad norm or
        None) as tensors. Micro-batches weigh by their share of the step's loss terms (a masked
        mean's count of valid entries, else equally), so the step's gradient and loss are the
        whole global batch's."""
        cfg, accelerator, count = self.cfg, self.accelerator, len(micro_batches)
        losses, weights, first = [], [], 1.0
        for micro, batch in enumerate(micro_batches):
            # Gradients are reduced across processes once per step, on the last micro-batch.
            with self.parallel.syncing(self.policy, accelerator, sync=micro == count - 1):
                # The policy's noise and masked means come from the global batch: any split trains alike.
                batch = to_device(batch, accelerator.device)
                if self.augment is not None:
                    batch = self.augment(batch, step, micro)
                with global_batch.step(cfg.seed, step, accelerator.process_index, accelerator.num_processes,
                                       micro, count) as share, self.precision.autocast():
                    loss, metrics = self.policy(batch)
                if self.member_losses is not None and PER_SAMPLE_LOSS in metrics:
                    self.member_losses.add(batch[MEMBER_KEY], metrics[PER_SAMPLE_LOSS])
                first = share.weight if micro == 0 else first
                weights.append(share.weight / first if micro else 1.0)  # relative to the first micro-batch's
                accelerator.backward(self.precision.scale(loss * weights[-1] if micro else loss))
            losses.append(loss.detach() * weights[-1] if micro else loss.detach())
        if count > 1:
            total = float(sum(weights))
            for param in self.policy.parameters():
                if param.grad is not None:
                    param.grad.div_(total)
        grad_norm = None
        if cfg.optim.grad_clip_norm > 0:
            self.precision.unscale(self.optimizer)
            grad_norm = accelerator.clip_grad_norm_(self.policy.parameters(), cfg.optim.grad_clip_norm)
        self.precision.step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(step)
        return (losses[0] if count == 1 else torch.stack(losses).sum() / total), grad_norm


def _checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    return step == cfg.steps or (cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0)


class _Saver:
    """Checkpoints: save (every process), queue the upload (main process), and let the manager
    prune only what is both old and already pushed."""

    def __init__(self, cfg: TrainConfig, checkpoints: checkpoint.CheckpointManager, pusher):
        self.cfg, self.checkpoints, self.pusher = cfg, checkpoints, pusher
        self.pushing = pusher is not None and cfg.hub.push_checkpoints

    @property
    def last(self) -> Path | None:
        return self.checkpoints.last

    def save(self, step: int, in_use: frozenset[str] = frozenset()) -> Path | None:
        """Save `step` (every process); `in_use`: checkpoint names that must not be pruned yet."""
        protect = frozenset(self.pusher.pending()) | in_use if self.pushing else in_use
        folder = self.checkpoints.save(step, protect)
        if folder is not None and self.pushing:
            self.pusher.submit(folder, step)
        return folder

    def push_final(self, result: RunResult) -> None:
        if self.pusher is None or not self.cfg.hub.push_final or self.last is None:
            return
        from robotrain import hub

        metrics = {**result.last_metrics, **result.evals.get(result.step, {})}
        card = hub.model_card(self.cfg.hub.repo_id, policy_type=self.cfg.policy.type,
                              dataset_repo_id=self.cfg.dataset.repo_ids, steps=result.step, metrics=metrics,
                              adapter=self.cfg.peft.method != "none")
        self.pusher.push_final(self.last / layout.PRETRAINED, card, step=result.step)

    def close(self) -> list[str]:
        """Wait (bounded) for uploads in flight; returns what was not pushed."""
        return self.pusher.close(self.cfg.hub.drain_timeout_s) if self.pusher is not None else []


class _SampleLog:
    """Each step's dataset indices seen by this process (`log_samples=true`); from a mixture, also
    each sample's member (its position in dataset.datasets)."""

    def __init__(self, run_dir: Path, rank: int):
        self.file = open(run_dir / f"samples_rank{rank}.jsonl", "a", buffering=1)

    def write(self, step: int, indices: torch.Tensor, members: torch.Tensor | None = None) -> None:
        line = {"step": step, "index": indices.tolist()}
        if members is not None:
            line[MEMBER_KEY] = members.tolist()
        self.file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self.file.close()


class _Window:
    """Accumulates per-step numbers between log lines without forcing a device sync each step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.grad_sum, self.n = 0.0, 0.0, 0
        self.data_s, self.total_s = 0.0, 0.0

    def add(self, loss: torch.Tensor, grad_norm, data_s: float, total_s: float) -> None:
        self.loss_sum = self.loss_sum + loss.detach()
        if grad_norm is not None:
            self.grad_sum = self.grad_sum + grad_norm.detach()
        self.n += 1
        self.data_s += data_s
        self.total_s += total_s

    def flush(self, lr: float, global_batch_size: int) -> dict[str, float]:
        n = max(self.n, 1)
        metrics = {
            "loss": float(self.loss_sum) / n,
            "grad_norm": float(self.grad_sum) / n,
            "lr": lr,
            "steps_per_s": n / max(self.total_s, 1e-9),
            "samples_per_s": n * global_batch_size / max(self.total_s, 1e-9),
            "data_wait_frac": self.data_s / max(self.total_s, 1e-9),
        }
        self.reset()
        return metrics


class _Evaluator:
    """Evaluations of the policy in `env`, each of a checkpoint (or, before the first step, of the
    untrained weights), in a worker process beside training (robotrain.eval.background): no
    process waits for them. Their results are logged at their step when they arrive; the
    embedded task's first episodes are saved as `<run_dir>/eval/step_<n>.gif` and logged to the
    tracker. Evaluation needs a gymnasium env, or the synthetic dataset for the embedded task."""

    def __init__(self, cfg: TrainConfig, accelerator, result: RunResult, metrics_log, progress, tracker, run_dir):
        self.cfg, self.result = cfg, result
        self.metrics_log, self.progress, self.tracker = metrics_log, progress, tracker
        self.enabled = cfg.eval.enabled and (cfg.env.gym_id is not None or cfg.dataset.is_synthetic)
        self.background, self.labels = None, {}  # labels: step -> "trained"... for the log line
        if self.enabled and accelerator.is_main_process:
            from robotrain.eval.background import BackgroundEvaluations

            self.background = BackgroundEvaluations(cfg.env, cfg.eval, run_dir / "eval",
                                                    cfg.dataset.synthetic.image_size)

    def start(self, step: int, checkpoint: Path | None, label: str = "") -> None:
        """Evaluate `checkpoint` (a folder holding pretrained_model/), saved at `step`, in the
        background (main process; the others pass None)."""
        self.labels[step] = label
        if self.background is not None and checkpoint is not None:
            self.background.start(step, checkpoint)

    def resume(self, step: int) -> None:
        if self.background is not None:
            self.background.resume(step)

    def in_use(self) -> frozenset[str]:
        """Checkpoints that running evaluations read."""
        return self.background.in_use() if self.background is not None else frozenset()

    def poll(self) -> None:
        """Log the background evaluations that finished."""
        if self.background is not None:
            for finished in self.background.poll():
                self._logged(*finished)

    def finish(self) -> None:
        """Wait (at most eval.timeout_s) for the background evaluations and log them."""
        if self.background is not None:
            for finished in self.background.wait(self.cfg.eval.timeout_s):
                self._logged(*finished)

    def close(self) -> None:
        if self.background is not None:
            self.background.close()

    def _logged(self, step: int, metrics: dict[str, float], video: Path | None) -> None:
        self.result.evals[step] = metrics
        self.metrics_log.write(step, metrics)
        self.tracker.log(step, metrics)
        if video is not None:
            self.tracker.log_video(step, "eval/video", video)
        self.background.logged(step)
        label = f" ({self.labels[step]})" if self.labels.get(step) else ""
        where = "" if self.cfg.env.gym_id is None else f" in env={self.cfg.env.name}"
        self.progress.write(f"eval at step {step}{label}{where}: success rate {metrics['eval/success_rate']:.2f} "
                            f"over {self.cfg.eval.episodes} episodes")
