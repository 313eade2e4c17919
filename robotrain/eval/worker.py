"""`python -m robotrain.eval.worker <step_n/spec.json>`: one background evaluation of a training
run (see robotrain.eval.background), writing result.json (and eval_info.json and videos, or the
embedded task's GIF) beside the spec."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(spec_path: Path) -> None:
    import torch

    from robotrain import pretrained
    from robotrain.fsutil import atomic_write_text

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    out = spec_path.parent
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = pretrained.load(spec["policy"]).to(device).eval()
    # A spec without "embedded" was written when only gymnasium envs were evaluated here.
    metrics, video = (_embedded if spec.get("embedded") else _gymnasium)(policy, spec, out)
    # Written last and whole: the trainer takes an evaluation as finished when this file is there.
    atomic_write_text(out / "result.json", json.dumps({"metrics": metrics, "video": video}, indent=2))


def _embedded(policy, spec: dict, out: Path) -> tuple[dict[str, float], str | None]:
    """The embedded reach task, as robotrain.eval.synthetic evaluates it (its first episodes as a GIF)."""
    from robotrain.eval.synthetic import evaluate

    outcome = evaluate(policy, episodes=spec["episodes"], max_steps=spec["max_steps"], seed=spec["seed"],
                       image_size=spec["image_size"], record=spec["record"], render_size=spec["video_size"])
    video = str(outcome.save_video(Path(spec["gif"]))) if outcome.frames is not None else None
    print(f"success rate {outcome.success_rate:.2f} over {outcome.episodes} episodes", flush=True)
    return outcome.as_metrics(), video


def _gymnasium(policy, spec: dict, out: Path) -> tuple[dict[str, float], None]:
    """A gymnasium env: eval_info.json in lerobot-eval's layout and MP4 videos, in `out`."""
    from robotrain.config import EnvConfig
    from robotrain.eval import report, rollout
    from robotrain.eval.background import metrics

    env = EnvConfig(**spec["env"])
    result = rollout.evaluate(policy, env, episodes=spec["episodes"], batch_size=spec["batch_size"],
                              seed=spec["seed"], max_steps=env.max_steps, rename_map=spec["rename_map"],
                              record=min(spec["record"], spec["episodes"]),
                              videos_dir=out / "videos" if spec["record"] else None)
    info = report.eval_info([result])
    print(report.summary(info, spec["policy"], report.write(info, out)), flush=True)
    return metrics(info), None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    main(Path(sys.argv[1]))
