"""Evaluation in PushT: training throughput with a background evaluation in flight, and env
steps/s at vector sizes 1 and 4, side by side in one run.

    python benchmarks/evaluation.py [--repeats 2] [--steps 80]

1. Training beside an evaluation. The same tiny-ACT run on a PushT-like dataset (96x96 images,
   2-D state and action: tests/sim_policies.py), `python -m robotrain` with `log_every=1`,
   once with `env=pusht eval.every=20` (4 episodes of up to 300 steps per evaluation, in a
   worker with `eval.num_threads=1`) and once with `eval.enabled=false`, interleaved over
   `--repeats` rounds. Training runs with OMP_NUM_THREADS=1: on this 2-core machine the worker
   takes one core and training the other. Printed: training steps/s over the steps logged while
   an evaluation was in flight (from its spec.json's mtime to its result's arrival in
   metrics.jsonl) divided by the steps/s of the same steps in the run without evaluations
   (target >= 0.9), and the same ratio over the whole run.
2. Env steps/s of PushT through `robotrain.eval.rollout` (SyncVectorEnv, the real observation
   mapping and batched `select_action`), vector size 1 and 4: with a policy that returns a
   random action (the simulator and the plumbing alone) and with the untrained tiny ACT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_list, interleaved, median, use_benchmark_cache  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train_run(dataset: Path, out: Path, steps: int, with_eval: bool) -> list[dict]:
    """One training run; its metrics.jsonl rows."""
    from tests.sim_policies import TINY_FIELDS

    act = ["policy=act", *(f"policy.{k}={'null' if v is None else v}" for k, v in TINY_FIELDS["act"].items())]
    evaluation = ["env=pusht", "eval.every=20", "eval.episodes=4", "eval.video_episodes=0"] if with_eval \
        else ["eval.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "robotrain", "dataset=local", f"dataset.root={dataset}",
                           "dataset.repo_id=robotrain_tests/pusht_like", *act, *evaluation, f"steps={steps}",
                           "batch_size=16", "log_every=1", "checkpoint.every=0", f"hydra.run.dir={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_times(rows: list[dict]) -> dict[int, float]:
    """Step -> seconds it took (the time between its line and the previous step's)."""
    train = [r for r in rows if "loss" in r]
    return {b["step"]: b["time"] - a["time"] for a, b in zip(train, train[1:])}


def in_flight_steps(rows: list[dict], run_dir: Path) -> set[int]:
    """Training steps logged while an evaluation was running (not the last one: it is awaited)."""
    arrivals = {r["step"]: r["time"] for r in rows if "eval/pc_success" in r}
    last = max(arrivals)
    steps = set()
    for step, arrived in arrivals.items():
        if step == last:
            continue
        started = (run_dir / "eval" / f"step_{step:06d}" / "spec.json").stat().st_mtime
        steps |= {r["step"] for r in rows if "loss" in r and started < r["time"] <= arrived}
    return steps


def training_beside_evaluation(steps: int, repeats: int) -> None:
    from tests.sim_policies import write_pusht_like_dataset

    work = Path(tempfile.mkdtemp(prefix="rt-eval-bench-"))
    dataset = write_pusht_like_dataset(work / "pusht_like", episodes=8, length=40)
    runs = iter(range(10_000))

    def side(with_eval: bool):
        def run():
            out = work / f"run{next(runs)}"
            return out, train_run(dataset, out, steps, with_eval)
        return run

    results = interleaved({"with": side(True), "without": side(False)}, repeats)
    during, overall = [], []
    for (out, rows), (_, base_rows) in zip(results["with"], results["without"]):
        times, base = step_times(rows), step_times(base_rows)
        busy = sorted(s for s in in_flight_steps(rows, out) if s in times and s in base)
        during.append(sum(base[s] for s in busy) / sum(times[s] for s in busy))
        common = sorted(set(times) & set(base))
        overall.append(sum(base[s] for s in common) / sum(times[s] for s in common))
        print(f"  round: {len(busy)} of {len(common)} steps ran beside an evaluation")
    print(f"training beside an evaluation / without: {median(during):.3f} (target >= 0.9) "
          f"per round {fmt_list(during)}; over the whole run {median(overall):.3f} {fmt_list(overall)}")


class RandomActions:
    """A stand-in policy: uniform actions over PushT's 512x512 field."""

    def __init__(self, config):
        import torch

        self.config, self.training, self.anchor = config, False, torch.zeros(1)
        self.generator = torch.Generator().manual_seed(0)

    def parameters(self):
        yield self.anchor

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def reset(self):
        pass

    def select_action(self, batch):
        import torch

        return torch.rand((batch["observation.state"].shape[0], 2), generator=self.generator) * 512


def env_steps_per_second() -> None:
    import torch
    from omegaconf import OmegaConf

    from robotrain import pretrained
    from robotrain.config import EnvConfig, conf_dir
    from robotrain.eval import rollout
    from tests.sim_policies import save_tiny_policy

    torch.set_num_threads(1)
    values = OmegaConf.to_container(OmegaConf.load(conf_dir() / "env" / "pusht.yaml"))
    values.pop("defaults")
    env = EnvConfig(**values)
    act = pretrained.load(str(save_tiny_policy("act", "pusht", Path(tempfile.mkdtemp()) / "act")))
    for name, policy in (("random actions", RandomActions(act.config)), ("tiny ACT", act)):
        rates = {}
        for size in (1, 4):
            start = time.perf_counter()
            result = rollout.evaluate(policy, env, episodes=8, batch_size=size, seed=0, max_steps=100, rename_map={})
            rates[size] = sum(e.steps for e in result.episodes) / (time.perf_counter() - start)
        print(f"PushT env steps/s, {name}: vector size 1 {rates[1]:.0f}, vector size 4 {rates[4]:.0f} "
              f"({rates[4] / rates[1]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    use_benchmark_cache()
    env_steps_per_second()
    training_beside_evaluation(args.steps, args.repeats)


if __name__ == "__main__":
    main()
