"""pi0 under FSDP: peak memory per process on 1 and on 2 processes, side by side in one run.

    python benchmarks/pi0_fsdp.py [--variant gemma_300m] [--steps 1] [--image 112]

Each side is the real command (`python -m robotrain policy=pi0 distributed.strategy=fsdp
distributed.processes=N ...`): a full fine-tune (every parameter trained, AdamW) of pi0 with the
given Gemma variant for the VLM and the expert, `policy.dtype=bfloat16` (LeRobot's mixed
layout: vision tower, projector and norms float32), batch 1 per process, on the embedded task.
Printed per side: the parameter bytes the main process holds after sharding (from robotrain's
FSDP log line), the whole model's, and the peak resident memory of the largest process (the
model, its gradients and AdamW's two moments, plus what the step allocates). The ratio of the
2-process peak to the 1-process peak is the figure issue 18 asks for: close to 1/2 plus the
fixed cost of a process (torch, transformers, the data loader) and of gathering one layer.

Sizes. LeRobot's `gemma_300m` PaliGemma does not run (its image projection is 2048 wide, its
language model 1024; LeRobot 0.6.1 fails alike), so the runnable sizes are `dummy` (the test
size: seconds, and its peak memory is the fixed cost of a process) and `gemma_2b` (real pi0,
~3.5 B parameters: a full fine-tune needs ~30 GB on one process in bfloat16, more than a 24 GB
machine has). Every process builds the whole model before sharding it, so the start-up peak is
one model per process; the training peak (gradients and AdamW's moments, twice the parameters)
is what sharding divides.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.paligemma_tiny import build_tiny_paligemma_tokenizer  # noqa: E402

LOG = re.compile(r"holds ([\d.]+) of the ([\d.]+) MB of parameters")


def run(overrides: list[str], run_dir: Path) -> dict:
    """One training run: the main process's share of the parameters (FSDP's log line) and the
    largest process's peak memory while training (metrics.jsonl's `peak_memory_mb` at the last
    step, before the final checkpoint gathers the whole model on the main process)."""
    done = subprocess.run([sys.executable, "-m", "robotrain", *overrides, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    held = LOG.search(done.stdout + done.stderr)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peak = max(line["peak_memory_mb"] for line in lines if "peak_memory_mb" in line)
    return {"held_mb": float(held[1]), "total_mb": float(held[2]), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="gemma_300m", choices=["dummy", "gemma_300m", "gemma_2b"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--image", type=int, default=112, help="policy.image_resolution (square)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="robotrain-pi0-fsdp-") as tmp:
        tokenizer = build_tiny_paligemma_tokenizer(Path(tmp) / "tokenizer")
        common = ["policy=pi0", f"policy.tokenizer_name={tokenizer}", f"policy.paligemma_variant={args.variant}",
                  f"policy.action_expert_variant={args.variant}", "policy.dtype=bfloat16",
                  f"policy.image_resolution=[{args.image},{args.image}]", "policy.chunk_size=10",
                  "policy.n_action_steps=10", "batch_size=1", f"steps={args.steps}", "log_every=1",
                  "eval.enabled=false", "checkpoint.every=0", "checkpoint.fsync=false",
                  "dataset.synthetic.num_episodes=4", "distributed.strategy=fsdp", "optim.lr=1e-5"]
        results = {processes: run([*common, f"distributed.processes={processes}"], Path(tmp) / f"p{processes}")
                   for processes in (1, 2)}
    for processes, result in results.items():
        print(f"    {processes} process(es): the main process holds {result['held_mb']:.2f} of the "
              f"{result['total_mb']:.2f} MB of parameters; peak memory of the largest process while "
              f"training {result['peak_mb']:.0f} MB")
    print(f"pi0 {args.variant} FSDP, 2 processes / 1 process: parameters held per process "
          f"{results[2]['held_mb'] / results[1]['held_mb']:.2f}, peak memory per process "
          f"{results[2]['peak_mb'] / results[1]['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
