"""`python -m robotrain.eval policy.path=<...> env=<name> [overrides]`: evaluate one policy.

Loads the policy (a local pretrained_model/ folder, checkpoint or run dir, or
`hub:user/repo[@step]`, of which only the pretrained_model/ files are downloaded), checks it
against the env, runs `eval.episodes` episodes and writes `<run dir>/eval_info.json` (LeRobot's
layout, see `robotrain.eval.report`) and `<run dir>/videos/<task_group>_0/eval_episode_<n>.mp4`.
Bad input is one `robotrain: error:` line on stderr and exit status 2, as for training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from robotrain import cli_errors
from robotrain.config import EvalRunConfig, conf_dir, parse_eval, register_configs
from robotrain.errors import UserError
from robotrain.help import register_resolvers

log = logging.getLogger("robotrain.eval")

register_configs()
register_resolvers(conf_dir())


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="eval")
def _hydra_main(composed: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    cli_errors.composition_done()
    try:
        return run(composed, Path(HydraConfig.get().runtime.output_dir))
    except UserError as err:
        cli_errors.fail(str(err))


def run(composed: DictConfig, out_dir: Path) -> float:
    """Evaluate as `composed` says, write the files into `out_dir`; the success rate in percent."""
    from robotrain.eval import report, rollout

    cfg: EvalRunConfig = parse_eval(composed)
    policy = _load_policy(cfg.policy.path, cfg.device)
    record = min(cfg.eval.video_episodes, cfg.eval.episodes)
    result = rollout.evaluate(
        policy, cfg.env, episodes=cfg.eval.episodes, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed,
        max_steps=cfg.env.max_steps, rename_map=cfg.eval.rename_map or {}, record=record,
        videos_dir=out_dir / "videos" / f"{cfg.env.task_group}_0" if record else None,
        progress=_progress(cfg.eval.episodes),
    )
    info = report.eval_info([result])
    path = report.write(info, out_dir)
    print(report.summary(info, cfg.policy.path, path), flush=True)
    return info["overall"]["pc_success"]


def _load_policy(path: str, device: str):
    """The policy `path` names, on `device`, for inference."""
    import torch

    from robotrain import pretrained
    from robotrain.resume import parse_hub_spec

    spec = parse_hub_spec(path)
    policy = pretrained.load(spec.repo_id, spec.revision) if spec else pretrained.load(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return policy.to(torch.device(device)).eval()
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"device={device} is not usable here ({str(err).splitlines()[0]}); pass device=cpu") from err


def _progress(total: int):
    def report(done) -> None:
        successes = sum(e.success for e in done)
        log.info("episodes %d/%d, success %.1f%%", len(done), total, 100 * successes / len(done))

    return report


def main() -> None:
    with cli_errors.one_line_errors():
        _hydra_main()


if __name__ == "__main__":
    main()
