"""Do the LeRobot policies learn the embedded reach task? Success rates in the built-in simulator,
trained against untrained, for ACT and Diffusion Policy (and the MLP default for reference).

    python benchmarks/policies.py [--policies act diffusion mlp]

Each run is the real command with settings sized for a CPU (small transformer / U-Net, short
chunks) on the default 1000-episode dataset; 50 evaluation episodes before and after training.
Target: trained >= 0.8 (untrained < 0.2). Minutes per policy on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "mlp": ["policy=mlp", "steps=2000"],
    "act": ["policy=act", "policy.pretrained_backbone_weights=null", "policy.dim_model=64", "policy.n_heads=4",
            "policy.dim_feedforward=256", "policy.chunk_size=10", "policy.n_action_steps=5", "optim.lr=3e-4",
            "steps=500", "batch_size=32"],
    "diffusion": ["policy=diffusion", "policy.n_obs_steps=1", "policy.n_action_steps=4", "policy.down_dims=[64,128,256]",
                  "policy.diffusion_step_embed_dim=64", "policy.noise_scheduler_type=DDIM",
                  "policy.num_inference_steps=10", "optim.lr=1e-3", "batch_size=32", "steps=800"],
}


def run(name: str, workdir: Path) -> dict:
    run_dir = workdir / name
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "robotrain", *RUNS[name], "log_every=100", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, cwd=workdir)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    evals = {int(step): m["eval/success_rate"] for step, m in result["evals"].items()}
    return {"untrained": evals[0], "trained": evals[result["step"]], "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=["act", "diffusion"], choices=sorted(RUNS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="robotrain-policies-") as tmp:
        for name in args.policies:
            r = run(name, Path(tmp))
            verdict = "ok" if r["trained"] >= 0.8 and r["untrained"] < 0.2 else "MISSED"
            print(f"{name}: success rate trained {r['trained']:.2f}, untrained {r['untrained']:.2f} "
                  f"(target >= 0.80 and < 0.20: {verdict}); {r['seconds']:.0f} s  [{' '.join(RUNS[name])}]",
                  flush=True)


if __name__ == "__main__":
    main()
