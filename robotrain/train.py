"""The training loop, top to bottom.

    set up the process (accelerate) and seed every RNG
    open the dataset (prepared once by the main process)
    build the policy, optimizer and schedule
    restore a checkpoint when resuming (weights, optimizer, schedule, RNG, data position)
    loop: batch -> loss -> backward -> clip -> step -> log -> [eval] -> [checkpoint]
    evaluate and report

Each optimizer step consumes one global batch of consecutive sampler positions, so the
data position after step `s` is `s * global_batch` and a resumed run continues the exact
sequence of batches. SIGTERM/SIGUSR2 stop the loop at the next step boundary with a
checkpoint (see `robotrain.preemption`).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from robotrain import checkpoint, data, policies
from robotrain.config import TrainConfig, to_dict
from robotrain.data.sampler import EpisodeAwareSampler, GlobalBatchSampler
from robotrain.optim import make_optimizer, make_scheduler
from robotrain.preemption import PreemptionFlag
from robotrain.progress import MetricsLog, Progress
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
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, run_dir: Path, resume: ResumePoint | None = None) -> RunResult:
    started = time.perf_counter()
    accelerator = Accelerator(step_scheduler_with_optimizer=False)
    seed_everything(cfg.seed)

    # Data: the main process generates or checks the dataset once; the others wait, then read it.
    with accelerator.main_process_first():
        root = data.prepare(cfg.dataset)
    fps_deltas = [i / _fps(root) for i in cfg.policy.action_delta_indices]
    dataset = data.open_dataset(cfg.dataset, root, delta_timestamps={"action": fps_deltas})
    sampler = EpisodeAwareSampler(
        *dataset.episode_bounds, seed=cfg.seed, shuffle=cfg.sampler.shuffle,
        permutation=cfg.sampler.permutation, drop_n_first_frames=cfg.sampler.drop_n_first_frames,
        drop_n_last_frames=cfg.sampler.drop_n_last_frames,
    )

    # Policy, optimizer, schedule.
    policy = policies.make(cfg.policy, dataset.meta.features, dataset.meta.stats)
    optimizer = make_optimizer(policy.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.steps)

    # Resume: weights, optimizer, schedule, RNG and the data position.
    step, position = 0, 0
    if resume is not None:
        checkpoint.load_model_weights(policy, resume.checkpoint_dir / checkpoint.PRETRAINED)
        state = checkpoint.load_training_state(resume.checkpoint_dir, optimizer, scheduler)
        if not cfg.resume.allow_changes:
            sampler.load_state_dict(state["sampler_state"])  # refuses a changed dataset or sampler
        step, position = state["step"], state["sample_position"]
        log.info("resumed from %s at step %d (sample %d)", resume.checkpoint_dir, step, position)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    global_batch = cfg.batch_size * accelerator.num_processes
    loader = DataLoader(
        dataset,
        batch_sampler=GlobalBatchSampler(
            sampler, cfg.batch_size, num_processes=accelerator.num_processes,
            rank=accelerator.process_index, start_position=position,
        ),
        num_workers=cfg.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        # An explicit generator keeps the loader from drawing on the global RNG.
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    result = RunResult(run_dir=run_dir, step=step)
    main = accelerator.is_main_process
    metrics_log = MetricsLog(run_dir / "metrics.jsonl" if main else None)
    progress = Progress(cfg.steps, step, cfg.log_every, enabled=main)
    evaluator = _Evaluator(cfg, dataset, accelerator, result, metrics_log, progress)
    if resume is None and cfg.eval.at_start:
        evaluator.run(policy, step, label="untrained")

    batches = iter(loader)
    window = _Window()
    with PreemptionFlag() as preemption:
        while step < cfg.steps:
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
            loss, _ = policy(batch)
            accelerator.backward(loss)
            grad_norm = (accelerator.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip_norm)
                         if cfg.optim.grad_clip_norm > 0 else None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.add(loss, grad_norm, t1 - t0, time.perf_counter() - t0)

            metrics = None
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = window.flush(scheduler.get_last_lr()[0], global_batch)
                metrics_log.write(step, metrics)
            progress.update(step, metrics)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
                evaluator.run(policy, step)
            if _checkpoint_due(cfg, step) or preemption.requested:
                result.last_checkpoint = _save(cfg, run_dir, step, global_batch, accelerator,
                                               policy, optimizer, scheduler, sampler)
            if preemption.requested:
                result.preempted_by = preemption.signal_name
                break
    result.step = step

    if result.preempted_by is None:
        evaluator.run(policy, step, label="trained")
    progress.close()
    metrics_log.close()
    result.seconds = time.perf_counter() - started
    return result


def _fps(root: Path) -> int:
    from robotrain.data.lerobot_format import load_meta

    return load_meta(root).fps


def _checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    return step == cfg.steps or (cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0)


def _save(cfg, run_dir, step, global_batch, accelerator, policy, optimizer, scheduler, sampler) -> Path | None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    position = step * global_batch
    sampler.seek(position)
    folder = checkpoint.save(
        run_dir / "checkpoints",
        step=step,
        total_steps=cfg.steps,
        save_pretrained=accelerator.unwrap_model(policy).save_pretrained,
        optimizer=optimizer,
        scheduler=scheduler,
        train_config=to_dict(cfg),
        training_step={
            "num_processes": accelerator.num_processes,
            "batch_size": cfg.batch_size,
            "global_batch_size": global_batch,
            "sample_position": position,
        },
        sampler_state=sampler.state_dict(),
        fsync=cfg.checkpoint.fsync,
    )
    checkpoint.prune(run_dir / "checkpoints", cfg.checkpoint.keep_last)
    return folder


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

    def flush(self, lr: float, global_batch: int) -> dict[str, float]:
        n = max(self.n, 1)
        metrics = {
            "loss": float(self.loss_sum) / n,
            "grad_norm": float(self.grad_sum) / n,
            "lr": lr,
            "steps_per_s": n / max(self.total_s, 1e-9),
            "samples_per_s": n * global_batch / max(self.total_s, 1e-9),
            "data_wait_frac": self.data_s / max(self.total_s, 1e-9),
        }
        self.reset()
        return metrics


class _Evaluator:
    """Runs simulator rollouts when the dataset is the embedded task (main process only)."""

    def __init__(self, cfg: TrainConfig, dataset, accelerator, result: RunResult, metrics_log, progress):
        self.cfg, self.accelerator, self.result = cfg, accelerator, result
        self.metrics_log, self.progress = metrics_log, progress
        self.enabled = cfg.eval.enabled and cfg.dataset.is_synthetic
        self.image_size = cfg.dataset.synthetic.image_size

    def run(self, policy, step: int, label: str = "") -> None:
        if not self.enabled or not self.accelerator.is_main_process:
            return
        from robotrain.eval import evaluate

        outcome = evaluate(
            self.accelerator.unwrap_model(policy), episodes=self.cfg.eval.episodes,
            max_steps=self.cfg.eval.max_steps, seed=self.cfg.eval.seed, image_size=self.image_size,
        )
        metrics = outcome.as_metrics()
        self.result.evals[step] = metrics
        self.metrics_log.write(step, metrics)
        name = f" ({label})" if label else ""
        self.progress.write(
            f"eval at step {step}{name}: success rate {outcome.success_rate:.2f} over {outcome.episodes} episodes"
        )
