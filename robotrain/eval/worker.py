"""`python -m robotrain.eval.worker <step_n/spec.json>`: one background evaluation of a training
run (see robotrain.eval.background), writing eval_info.json and videos beside the spec."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(spec_path: Path) -> None:
    import torch

    from robotrain import pretrained
    from robotrain.config import EnvConfig
    from robotrain.eval import report, rollout

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    out = spec_path.parent
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = pretrained.load(spec["policy"]).to(device).eval()
    env = EnvConfig(**spec["env"])
    result = rollout.evaluate(policy, env, episodes=spec["episodes"], batch_size=spec["batch_size"],
                              seed=spec["seed"], max_steps=env.max_steps, rename_map=spec["rename_map"],
                              record=min(spec["record"], spec["episodes"]),
                              videos_dir=out / "videos" if spec["record"] else None)
    info = report.eval_info([result])
    print(report.summary(info, spec["policy"], report.write(info, out)), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    main(Path(sys.argv[1]))
