"""Gradient checkpointing's memory and time, and bf16 against fp32, side by side in one run.

    python benchmarks/training_options.py [--steps 6] [--batch-size 32]

Each variant trains in a fresh child process (so that its peak memory is its own): the policy
built from a composed config as `robotrain.train` builds it, a batch of the embedded task,
`--steps` optimizer steps (AdamW) inside `robotrain.global_batch.step` and the precision's
autocast, exactly the training loop's forward. Printed per policy:

- gradient checkpointing (`policy.gradient_checkpointing=true`) against without: the
  activations the forward keeps for the backward (bytes of the distinct storages passed to
  autograd's saved-tensor hooks, parameters excluded: what checkpointing cuts), the memory
  training adds (peak resident memory during the steps minus before them: it also holds the
  gradients, AdamW's state and the allocator's slack) and the median step time, with ratios
  (expect far fewer kept activations for more time: the recomputed blocks run twice);
- `precision=bf16` against `fp32`: the median step time, for information only (CPU bf16 speed
  depends on the CPU's vector units; claims about speed belong to a GPU).

Policies: Diffusion (down_dims 128/256/512, horizon 16, 2 observation steps: the U-Net's
activations dominate) and a tiny SmolVLA (the tests' 4-layer SmolVLM, 64x64 images).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

POLICIES = {
    "diffusion": ["policy=diffusion", "policy.n_obs_steps=2", "policy.horizon=16", "policy.n_action_steps=8",
                  "policy.down_dims=[128,256,512]", "policy.crop_shape=[28,28]",
                  "policy.pretrained_backbone_weights=null"],
    "smolvla": ["policy=smolvla", "policy.chunk_size=10", "policy.n_action_steps=10",
                "policy.resize_imgs_with_padding=[64,64]", "policy.tokenizer_max_length=16", "policy.num_vlm_layers=4",
                "policy.num_steps=2"],
}

CHILD = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from _common import compose, use_benchmark_cache
use_benchmark_cache()
from robotrain import data, global_batch, policies
from robotrain.data.metadata import load_meta
from robotrain.data.reading import LeRobotDataset
from robotrain.precision import Precision
args = json.loads(sys.argv[2])
if args["vlm"]:
    sys.path.insert(0, args["repo"])
    from tests.smolvlm_tiny import build_tiny_smolvlm
    args["overrides"].append(f"policy.vlm_model_name={build_tiny_smolvlm(args['vlm'])}")
cfg = compose(args["overrides"])
root = data.prepare(cfg.dataset)
meta = load_meta(root)
torch.manual_seed(0)
config = policies.with_dataset_features(cfg.policy, meta.features)
dataset = LeRobotDataset(cfg.dataset.repo_id, root, delta_timestamps=config.delta_timestamps(meta.fps))
policy = policies.make(cfg.policy, meta.features, meta.stats).train()
optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
batch = dataset.get_batch(list(range(args["batch_size"])))
precision = Precision(cfg.precision, torch.device("cpu"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times, saved = [], {}

def pack(tensor):  # what the forward keeps for the backward: one entry per storage
    if tensor.device.type != "meta":
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return tensor

for step in range(args["steps"]):
    t0 = time.perf_counter()
    saved.clear()
    with global_batch.step(0, step), precision.autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = policy(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
kept = sum(n for ptr, n in saved.items() if ptr not in params) / 2**20
print(json.dumps({"added_mb": (peak - before) / 1024, "saved_mb": kept,
                  "step_s": sorted(times[1:])[len(times[1:]) // 2]}))
"""


def measure(policy: str, extra: list[str], args, vlm: Path | None) -> dict:
    overrides = [*POLICIES[policy], "dataset.synthetic.num_episodes=20", "dataset.synthetic.image_size=32", *extra]
    spec = {"overrides": overrides, "steps": args.steps, "batch_size": args.batch_size,
            "vlm": str(vlm) if policy == "smolvla" else None, "repo": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).resolve().parent), json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{policy} {extra} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each pair")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--vlm-dir", type=Path, default=Path("/tmp/robotrain-bench-tiny-smolvlm"))
    args = parser.parse_args()
    for policy in args.policies:
        for label, pair in (("gradient checkpointing", (["policy.gradient_checkpointing=true"], [])),
                            ("bf16", (["precision=bf16"], ["precision=fp32"]))):
            runs: dict[int, list[dict]] = {0: [], 1: []}
            for round_ in range(args.repeats):
                for side in ((0, 1) if round_ % 2 == 0 else (1, 0)):
                    runs[side].append(measure(policy, pair[side], args, args.vlm_dir))
            kept = [median([r["saved_mb"] for r in runs[side]]) for side in (0, 1)]
            mem = [median([r["added_mb"] for r in runs[side]]) for side in (0, 1)]
            step = [median([r["step_s"] for r in runs[side]]) for side in (0, 1)]
            print(f"{policy}, {label} / without: activations kept for backward {kept[0]:.1f} MB / {kept[1]:.1f} MB "
                  f"= {kept[0] / max(kept[1], 1e-9):.2f}; peak memory added {mem[0]:.0f} MB / {mem[1]:.0f} MB "
                  f"= {mem[0] / max(mem[1], 1e-9):.2f}; step time {step[0] * 1e3:.0f} ms / {step[1] * 1e3:.0f} ms "
                  f"= {step[0] / step[1]:.2f}")


if __name__ == "__main__":
    main()
