"""Every registered policy under every strategy, fully trained and LoRA-adapted (issue 13).

Each cell trains 4 steps from the same seed on the same global batch of 8 (one process with 8
samples, or two with 4 each), saving at steps 2 and 4, then resumes a copy of its step-2
checkpoint in a new run dir: on the same world it must end bit-identical to its uninterrupted
run; an FSDP checkpoint resumes resharded on one process and must end within `TOLERANCE`.
Across cells: DDP on 2 processes ends where one process ends, and FSDP on 2 processes where
DDP ends, within `TOLERANCE` (`robotrain.global_batch` makes training noise and masked means
independent of how the global batch is split).

A policy joins the matrix by being registered (`robotrain.policies`) and giving a tiny
configuration in `tiny_policy_cli`; a strategy by being registered in
`robotrain.strategy.STRATEGIES`. Nothing else is written per policy or strategy.

Tolerance. The runs differ only in float reduction order (gradients summed across processes
vs within one batch, norms for clipping summed over shards), so weights agree to ~1e-7 where a
gradient is real. Adam scales any gradient to a step of about `lr`, float noise included: a
weight whose true gradient is exactly zero (attention's key bias: softmax ignores a constant
added to every key) drifts by up to `lr` per step in either run. With Adam's eps at 1e-5
instead of 1e-8 here, a noise gradient (~1e-10) moves a weight ~1e-4 lr per step instead. A
lost gradient (an in-place op on an FSDP view, a missed all-reduce) still moves a weight by
about `lr` (1e-3) per step, four orders above the tolerance.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from robotrain import policies, strategy
from tests.conftest import TINY, load_tensors
from tests.paligemma_tiny import PI0_TINY, build_tiny_paligemma_tokenizer
from tests.smolvlm_tiny import build_tiny_smolvlm

#: name -> (processes, distributed.strategy): one process, and two under every registered strategy.
STRATEGIES = {"single": (1, "ddp"), **{name: (2, name) for name in strategy.STRATEGIES}}
MODES = ("full", "lora")
#: A sharded checkpoint resumes resharded onto one process (within TOLERANCE); the others on their own world.
RESUME_ON = {"fsdp": "single"}
STEPS, GLOBAL_BATCH = 4, 8
TOLERANCE = 1e-6

RUN = [*TINY, f"steps={STEPS}", "checkpoint.every=2", "log_every=2", "log_samples=true", "optim.eps=1e-5"]


@pytest.fixture(scope="session")
def tiny_policy_cli(tmp_path_factory) -> dict[str, list[str]]:
    """Overrides that make each registered policy train in seconds, with no dropout (each process
    draws its own dropout masks, so a split batch would not train like a whole one; adapters'
    dropout is off for the same reason)."""
    vlm = build_tiny_smolvlm(tmp_path_factory.mktemp("vlm") / "tiny_smolvlm")
    paligemma = build_tiny_paligemma_tokenizer(tmp_path_factory.mktemp("paligemma") / "tokenizer")
    return {
        "mlp": ["policy=mlp", "policy.hidden_dim=32"],
        "act": ["policy=act", "policy.dim_model=32", "policy.n_heads=2", "policy.dim_feedforward=64",
                "policy.chunk_size=10", "policy.n_action_steps=5", "policy.pretrained_backbone_weights=null",
                "policy.n_encoder_layers=1", "policy.n_decoder_layers=1", "policy.dropout=0.0"],
        "diffusion": ["policy=diffusion", "policy.n_obs_steps=2", "policy.horizon=8", "policy.n_action_steps=4",
                      "policy.down_dims=[32,64]", "policy.kernel_size=3", "policy.n_groups=8",
                      "policy.diffusion_step_embed_dim=32", "policy.spatial_softmax_num_keypoints=8",
                      "policy.num_train_timesteps=10", "policy.crop_shape=[28,28]"],
        "smolvla": ["policy=smolvla", f"policy.vlm_model_name={vlm}", "policy.chunk_size=10",
                    "policy.n_action_steps=10", "policy.resize_imgs_with_padding=[64,64]",
                    "policy.tokenizer_max_length=16", "policy.num_vlm_layers=4", "policy.num_steps=2"],
        **{name: [f"policy={name}", f"policy.tokenizer_name={paligemma}", *PI0_TINY] for name in ("pi0", "pi05")},
    }


@dataclass
class Matrix:
    """Runs each cell once, on first use, and remembers where."""

    cli: object
    root: Path
    policy_cli: dict[str, list[str]]

    def __post_init__(self) -> None:
        self.done: dict[tuple, Path] = {}

    def args(self, policy: str, mode: str) -> list[str]:
        if policy not in self.policy_cli:
            pytest.fail(f"policy {policy!r} is registered but has no tiny configuration in tiny_policy_cli")
        args = [*RUN, *self.policy_cli[policy]]
        if mode == "lora":
            base = self.run(policy, "full", "single") / "checkpoints" / f"{STEPS:06d}" / "pretrained_model"
            args += ["peft=lora", "peft.r=4", "peft.dropout=0.0", f"policy.pretrained_path={base}"]
        return args

    def run(self, policy: str, mode: str, strategy: str) -> Path:
        """The uninterrupted run of a cell."""
        key = (policy, mode, strategy)
        if key not in self.done:
            run_dir = self.root / "-".join(key)
            self._train(self.args(policy, mode), *STRATEGIES[strategy], run_dir)
            self.done[key] = run_dir
        return self.done[key]

    def resume(self, policy: str, mode: str, strategy: str, on: str | None = None) -> Path:
        """A new run dir holding the cell's step-2 checkpoint, resumed to the end; `on`: with the
        number of processes of another strategy (the checkpoint's own strategy still loads it)."""
        source = self.run(policy, mode, strategy)
        on = on or strategy
        run_dir = self.root / "-".join((policy, mode, strategy, "resumed-on", on))
        shutil.copytree(source / "checkpoints" / "000002", run_dir / "checkpoints" / "000002")
        processes, name = STRATEGIES[on][0], STRATEGIES[strategy][1]
        self._train([*self.args(policy, mode), "resume=auto"], processes, name, run_dir)
        return run_dir

    def _train(self, args: list[str], processes: int, strategy: str, run_dir: Path) -> None:
        done = self.cli.run(*args, f"distributed.processes={processes}", f"distributed.strategy={strategy}",
                            f"batch_size={GLOBAL_BATCH // processes}", f"hydra.run.dir={run_dir}", timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def matrix(module_cli, tiny_policy_cli, tmp_path_factory) -> Matrix:
    return Matrix(module_cli, tmp_path_factory.mktemp("matrix"), tiny_policy_cli)


def trained(run_dir: Path, mode: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    return load_tensors(run_dir / "checkpoints" / f"{step:06d}" / "pretrained_model" / name)


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max().item(), k) for k in a)


CELLS = [(p, m, s) for p in policies.available() for m in MODES for s in STRATEGIES]
POLICY_MODES = [(p, m) for p in policies.available() for m in MODES]


@pytest.mark.slow
@pytest.mark.parametrize("policy, mode, strategy", CELLS, ids=["-".join(c) for c in CELLS])
def test_a_cell_trains_saves_and_resumes(matrix, policy, mode, strategy):
    run_dir = matrix.run(policy, mode, strategy)
    start, end = trained(run_dir, mode, 2), trained(run_dir, mode)
    assert any(not torch.equal(start[k], end[k]) for k in end), "the weights did not change"
    on = RESUME_ON.get(strategy, strategy)
    resumed = trained(matrix.resume(policy, mode, strategy, on), mode)
    if on == strategy:  # the same world: bit-exact
        assert all(torch.equal(resumed[name], end[name]) for name in end)
    else:
        difference, name = largest_difference(resumed, end)
        assert difference <= TOLERANCE, f"{name} differs by {difference}"


#: (a strategy, the one it must train like): DDP like one process, and every other like DDP.
PAIRS = [("ddp", "single"), *((name, "ddp") for name in STRATEGIES if name not in ("single", "ddp"))]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, reference", PAIRS, ids=[f"{a}-like-{b}" for a, b in PAIRS])
@pytest.mark.parametrize("policy, mode", POLICY_MODES, ids=["-".join(c) for c in POLICY_MODES])
def test_strategies_train_alike(matrix, policy, mode, strategy, reference):
    difference, name = largest_difference(trained(matrix.run(policy, mode, strategy), mode),
                                          trained(matrix.run(policy, mode, reference), mode))
    assert difference <= TOLERANCE, f"{name} differs by {difference}"
