"""`python -m robotrain [overrides]`: compose the config with Hydra, then train here.

Bad input ends the process with one line on stderr, `robotrain: error: <what and how to
fix it>`, and exit status 2 — whether Hydra found it while composing (unknown group
option, bad override) or robotrain found it while validating. A run stopped by a
preemption signal exits with `EXIT_PREEMPTED` (75) after saving a checkpoint.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from robotrain import cli_errors, dispatch, distributed
from robotrain.help import register_resolvers
from robotrain.dispatch import RemoteRun
from robotrain.config import conf_dir, parse, register_configs
from robotrain.errors import UserError
from robotrain.preemption import EXIT_PREEMPTED

log = logging.getLogger("robotrain")

register_configs()
register_resolvers(conf_dir())

_CHATTY_LOGGERS = ("httpx", "httpx2", "httpcore", "urllib3", "filelock", "huggingface_hub")


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def _hydra_main(composed: DictConfig) -> float | None:
    cli_errors.composition_done()
    for noisy in _CHATTY_LOGGERS:  # Hydra logs INFO from every library; these log each HTTP request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = run(composed)
    except UserError as err:
        if distributed.launched():  # the other processes may wait for this one in a collective
            distributed.exit_failed(err, _what_ran(composed), cli_errors.EXIT_USAGE)
        cli_errors.fail(str(err))
    except Exception as err:
        if distributed.launched():
            distributed.exit_failed(err, _what_ran(composed))
        raise
    if isinstance(result, RemoteRun):
        return _finish_remote(result)
    if isinstance(result, int):  # the exit code of processes launched here
        if result != 0:
            sys.exit(result)
        return None
    return _finish_local(result)


def _what_ran(composed: DictConfig) -> str:
    return f"training policy {composed.policy.type} with strategy {composed.distributed.strategy}"


def run(composed: DictConfig):
    """Validate; then dispatch the run (job.target slurm|hf: returns a `RemoteRun`), start
    several processes (distributed.processes=N: returns their exit code), or resolve resume
    and train in this process (returns the `RunResult`)."""
    from hydra.core.hydra_config import HydraConfig

    from robotrain import resume
    from robotrain.train import train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    typed = parse(composed)  # validate what was typed before looking at any checkpoint
    if typed.job.is_remote:  # the job resolves resume and downloads; nothing is fetched here
        return dispatch.run_remote(typed.job, hydra_cfg.overrides.task, run_dir)
    if typed.distributed.processes > 1 and not distributed.launched():
        return distributed.launch_local(typed.distributed.processes, hydra_cfg.overrides.task, run_dir)
    accelerator = distributed.make_accelerator()
    # Every process works in the main process's run dir; only the main process fetches a checkpoint.
    point = resume.locate(composed.resume.spec, run_dir) if accelerator.is_main_process else None
    run_dir, point = distributed.broadcast(accelerator, (run_dir, point))
    cfg = typed if point is None else parse(resume.merged_config(point, composed, hydra_cfg.overrides.task))
    result = train(cfg, run_dir, point, accelerator=accelerator)
    if accelerator.is_main_process:
        _print_summary(cfg, result)
    return result


def _finish_local(result):
    """Report a preemption (exit 75 for requeue); end a multi-process run cleanly."""
    code = 0
    if result.preempted_by:
        code = EXIT_PREEMPTED
        if result.is_main:
            print(
                f"robotrain: stopped by {result.preempted_by} at step {result.step}; checkpoint "
                f"{result.last_checkpoint}. Continue with: python -m robotrain hydra.run.dir={result.run_dir} resume=auto",
                file=sys.stderr,
            )
    if result.num_processes > 1:
        distributed.exit_process(code)
    if code:
        sys.exit(code)
    return result.return_value


def _finish_remote(remote: RemoteRun):
    """A followed job that failed fails this command too; a detached one is a success."""
    if remote.detached or remote.outcome is None:
        return None
    if not remote.outcome.ok:
        print(f"robotrain: job {remote.handle.job_id} failed: {remote.outcome.error}", file=sys.stderr)
        sys.exit(1)
    print(f"robotrain: job {remote.handle.job_id} finished", flush=True)
    return remote.outcome.return_value


def _print_summary(cfg, result) -> None:
    lines = [f"robotrain: {cfg.policy.type} trained to step {result.step} in {result.seconds:.1f}s"]
    evals = sorted(result.evals.items())
    if evals:
        parts = [f"step {s}: {m['eval/success_rate']:.2f}" for s, m in evals]
        lines.append(f"  eval success rate ({cfg.eval.episodes} episodes): " + ", ".join(parts))
    lines.append(f"  run dir:     {result.run_dir}")
    if cfg.hub.repo_id and not result.not_pushed:
        lines.append(f"  hub:         {cfg.hub.repo_id} (continue anywhere with resume=hub:{cfg.hub.repo_id})")
    elif result.not_pushed:
        lines.append(f"  not pushed:  {', '.join(result.not_pushed)} (see the log above to push them by hand)")
    if result.last_checkpoint is not None:
        lines.append(f"  checkpoint:  {result.last_checkpoint}")
        lines.append(f"  resume:      python -m robotrain hydra.run.dir={result.run_dir} resume=auto steps=<more>")
    print("\n".join(lines), flush=True)


def main() -> None:
    """Console-script entry point: `robotrain ...` trains, as `python -m robotrain`; `robotrain eval
    ...` evaluates, as `python -m robotrain.eval`."""
    if sys.argv[1:2] == ["eval"]:
        from robotrain.eval.__main__ import main as evaluate

        sys.argv = [sys.argv[0], *sys.argv[2:]]
        evaluate()
        return
    sys.argv = cli_errors.expand_shorthands(sys.argv)
    with cli_errors.one_line_errors():
        _hydra_main()


if __name__ == "__main__":
    main()
