"""Training options (issue 15): mixed precision that really reaches the policy's layers, and
gradient accumulation that trains like one big batch — both keeping bit-exact resume and the
exact data position."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import TINY, assert_one_line_error, assert_same_tensors, load_tensors, sitecustomize

RUN = [*TINY, "steps=4", "checkpoint.every=2", "log_every=2", "log_samples=true", "optim.eps=1e-5"]
#: As in tests/test_matrix.py: runs that differ only in float reduction order agree to this
#: (two steps in).
TOLERANCE = 1e-6
#: Four steps in. Adam divides each gradient by its running scale, so a gradient entry that is a
#: near-cancelling sum (summed in another order over micro-batches than over one batch) can
#: differ by much more than its float rounding relative to itself: ACT's VAE encoder reaches
#: ~1e-5 at step 4 from 1e-7 at step 2. A micro-batch weighed wrongly moves weights by ~lr
#: (5e-4 seen for the MLP before masked means were weighed by their counts).
LATER_TOLERANCE = 1e-4
TINY_ACT = ["policy=act", "policy.dim_model=32", "policy.n_heads=2", "policy.dim_feedforward=64",
            "policy.chunk_size=10", "policy.n_action_steps=5", "policy.pretrained_backbone_weights=null",
            "policy.n_encoder_layers=1", "policy.n_decoder_layers=1", "policy.dropout=0.0"]
TINY_DIFFUSION = ["policy=diffusion", "policy.n_obs_steps=2", "policy.horizon=8", "policy.n_action_steps=4",
                  "policy.down_dims=[32,64]", "policy.kernel_size=3", "policy.n_groups=8",
                  "policy.diffusion_step_embed_dim=32", "policy.spatial_softmax_num_keypoints=8",
                  "policy.num_train_timesteps=10", "policy.crop_shape=[28,28]"]

#: Records the dtype of every Linear/Conv output computed with gradients (training forwards),
#: one file per process, written as it grows (ranks leave through os._exit, past atexit).
RECORD_DTYPES = """
import os, torch
_seen = set()
def _hook(module, args, output):
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and torch.is_grad_enabled():
        if str(output.dtype) not in _seen:
            _seen.add(str(output.dtype))
            with open(os.path.join(os.environ["DTYPES_OUT"], str(os.getpid())), "w") as f:
                f.write(" ".join(sorted(_seen)))
torch.nn.modules.module.register_module_forward_hook(_hook)
"""
#: robotrain offers fp16 on CUDA only; this opens it to CPU runs so that its loss scaling runs here.
FP16_ON_CPU = """
import robotrain.precision
robotrain.precision.FP16_DEVICES = ("cuda", "cpu")
"""


def recording_dtypes(tmp_path: Path, *sources: str) -> dict[str, str]:
    """Environment whose processes record their training forwards' dtypes (`recorded_dtypes`)
    and then run `sources`."""
    (tmp_path / "dtypes").mkdir()
    return {**sitecustomize(tmp_path, RECORD_DTYPES, *sources), "DTYPES_OUT": str(tmp_path / "dtypes")}


def train(cli, run_dir: Path, *args: str, processes: int = 1, env: dict | None = None) -> Path:
    runner = type(cli)(env={**cli.env, **(env or {})}, cwd=cli.cwd)
    done = runner.run(*RUN, *args, f"distributed.processes={processes}", f"hydra.run.dir={run_dir}", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def weights(run_dir: Path, step: int = 4) -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "checkpoints" / f"{step:06d}" / "pretrained_model" / "model.safetensors")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def resumed(cli, run_dir: Path, *args: str, processes: int = 1, env: dict | None = None) -> Path:
    """A new run dir holding `run_dir`'s step-2 checkpoint, resumed to step 4 with `args`."""
    again = run_dir.with_name(run_dir.name + "-resumed")
    shutil.copytree(run_dir / "checkpoints" / "000002", again / "checkpoints" / "000002")
    return train(cli, again, *args, "resume=auto", processes=processes, env=env)


def ema_state(run_dir: Path, step: int = 4) -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "checkpoints" / f"{step:06d}" / "training_state" / "ema_state.safetensors")


def step_samples(run_dir: Path, rank: int = 0) -> list[list[int]]:
    lines = (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["index"] for line in lines]


# -- mixed precision ----------------------------------------------------------------------


@pytest.mark.parametrize("precision, dtypes", [("fp32", "torch.float32"), ("bf16", "torch.bfloat16")])
def test_precision_reaches_the_policys_matmuls_and_convolutions(module_cli, tmp_path, precision, dtypes):
    env = recording_dtypes(tmp_path)
    run_dir = train(module_cli, tmp_path / "run", *TINY_ACT, "steps=2", f"precision={precision}", env=env)
    assert recorded_dtypes(tmp_path) == {dtypes}
    with safe_open(str(run_dir / "checkpoints" / "000002" / "pretrained_model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # LeRobot's layout, whatever the precision
    optimizer = load_tensors(run_dir / "checkpoints" / "000002" / "training_state" / "optimizer_state.safetensors")
    assert {t.dtype for k, t in optimizer.items() if not k.endswith("/step")} == {torch.float32}


def test_bf16_training_differs_from_fp32_and_resumes_bit_exactly(module_cli, tmp_path):
    run = train(module_cli, tmp_path / "bf16", "precision=bf16")
    fp32 = train(module_cli, tmp_path / "fp32")
    assert largest_difference(weights(run), weights(fp32)) > 1e-5  # bf16 did change what was computed
    assert_same_tensors(weights(resumed(module_cli, run, "precision=bf16")), weights(run))


def recorded_dtypes(tmp_path: Path) -> set[str]:
    """What RECORD_DTYPES saw, over every process that ran a training forward."""
    return {dtype for path in (tmp_path / "dtypes").iterdir() for dtype in path.read_text().split()}


def scaler_state(run_dir: Path, step: int = 4) -> dict:
    return json.loads((run_dir / "checkpoints" / f"{step:06d}" / "training_state" / "grad_scaler.json").read_text())


@pytest.mark.parametrize("processes, strategy", [(1, "ddp"), pytest.param(2, "fsdp", marks=pytest.mark.slow)])
def test_fp16_scales_the_loss_and_resumes_its_scale_bit_exactly(module_cli, tmp_path, processes, strategy):
    """fp16's path, run on CPU (float16 matmuls run there too): the forward in float16, the loss
    scaled and the gradients unscaled before clipping, the scaler's state saved and resumed."""
    env = recording_dtypes(tmp_path, FP16_ON_CPU)
    options = ["precision=fp16", f"distributed.strategy={strategy}"]
    run = train(module_cli, tmp_path / "run", *options, processes=processes, env=env)
    assert recorded_dtypes(tmp_path) == {"torch.float16"}
    assert len(list((tmp_path / "dtypes").iterdir())) == processes
    assert scaler_state(run) == {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                 "growth_interval": 2000, "_growth_tracker": 4}  # 4 steps, none skipped
    fp32 = train(module_cli, tmp_path / "fp32", f"distributed.strategy={strategy}", processes=processes)
    # Float16 rounding only: the last two steps moved weights by ~1e-3, and gradients clipped
    # while still scaled (or unscaled twice) shrink the updates far more than this.
    assert 1e-6 < largest_difference(weights(run), weights(fp32)) < 1e-4
    again = resumed(module_cli, run, *options, processes=processes, env=env)
    assert_same_tensors(weights(again), weights(run))
    assert scaler_state(again) == scaler_state(run)


def test_fp16_resuming_a_checkpoint_without_a_loss_scale_starts_a_new_one(module_cli, tmp_path):
    env = sitecustomize(tmp_path, FP16_ON_CPU)
    run = train(module_cli, tmp_path / "run")
    again = resumed(module_cli, run, "precision=fp16", env=env)
    assert scaler_state(again)["_growth_tracker"] == 2  # counted from the resumed step


@pytest.mark.parametrize("args, expected", [
    (["precision=fp8"], "precision must be one of fp32, bf16, fp16, got 'fp8'"),
    (["precision=fp16"], "precision=fp16 needs a GPU"),
    (["grad_accum_steps=0"], "grad_accum_steps must be >= 1, got 0"),
    (["ema.decay=1.5"], "ema.decay must be in (0, 1), got 1.5"),
    (["compile.mode=fastest"], "compile.mode must be one of default, reduce-overhead, max-autotune"),
])
def test_bad_training_options_are_one_line_errors(module_cli, tmp_path, args, expected):
    done = module_cli.run(*RUN, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, expected)
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- gradient accumulation --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy", [["policy=mlp"], TINY_ACT, TINY_DIFFUSION], ids=["mlp", "act", "diffusion"])
def test_two_micro_batches_of_8_train_like_one_batch_of_16(module_cli, tmp_path, policy):
    whole = train(module_cli, tmp_path / "whole", *policy, "batch_size=16")
    accumulated = train(module_cli, tmp_path / "accumulated", *policy, "batch_size=8", "grad_accum_steps=2")
    # The same samples, in the same order, at every step (micro-batch 0, then 1).
    assert step_samples(accumulated) == step_samples(whole)
    assert largest_difference(weights(accumulated, step=2), weights(whole, step=2)) < TOLERANCE
    assert largest_difference(weights(accumulated), weights(whole)) < LATER_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_and_ema_on_two_processes_train_like_one_big_batch(module_cli, tmp_path, strategy):
    whole = train(module_cli, tmp_path / "whole", "batch_size=16", "ema.enabled=true")
    split = train(module_cli, tmp_path / strategy, "batch_size=4", "grad_accum_steps=2", "ema.enabled=true",
                  f"distributed.strategy={strategy}", processes=2)
    assert largest_difference(weights(split), weights(whole)) < TOLERANCE
    assert largest_difference(ema_state(split), ema_state(whole)) < TOLERANCE  # averages and raw weights
    info = json.loads((split / "checkpoints" / "000004" / "training_state" / "training_step.json").read_text())
    assert info == {"step": 4, "num_processes": 2, "batch_size": 4, "global_batch_size": 16, "sample_position": 64,
                    "grad_accum_steps": 2}


@pytest.mark.slow
@pytest.mark.parametrize("processes, strategy", [(1, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_every_option_at_once_resumes_bit_exactly(module_cli, tmp_path, processes, strategy):
    options = ["precision=bf16", "grad_accum_steps=2", "batch_size=4", "ema.enabled=true",
               "dataset.image_transforms.enable=true", f"distributed.strategy={strategy}"]
    run = train(module_cli, tmp_path / "run", *options, processes=processes)
    again = resumed(module_cli, run, *options, processes=processes)
    assert_same_tensors(weights(again), weights(run))
    assert_same_tensors(ema_state(again), ema_state(run))
    assert step_samples(again)[-2:] == step_samples(run)[-2:]


def test_resuming_with_another_split_of_the_same_global_batch_continues_exactly(module_cli, tmp_path):
    """A checkpoint of batch 16 resumed as 2 micro-batches of 8: same position, same samples, the
    same weights within float tolerance, and no warning (the global batch is unchanged)."""
    run = train(module_cli, tmp_path / "run", "batch_size=16")
    again = run.with_name("again")
    shutil.copytree(run / "checkpoints" / "000002", again / "checkpoints" / "000002")
    done = module_cli.run(*RUN, "batch_size=8", "grad_accum_steps=2", "resume=auto", f"hydra.run.dir={again}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch changes" not in done.stdout + done.stderr
    assert step_samples(again) == step_samples(run)[2:]
    assert largest_difference(weights(again), weights(run)) < TOLERANCE


def test_resuming_with_another_global_batch_warns_and_keeps_the_position(module_cli, tmp_path):
    run = train(module_cli, tmp_path / "run", "batch_size=8")
    again = run.with_name("again")
    shutil.copytree(run / "checkpoints" / "000002", again / "checkpoints" / "000002")
    done = module_cli.run(*RUN, "batch_size=8", "grad_accum_steps=2", "resume=auto", f"hydra.run.dir={again}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the global batch changes from 8 (1 processes x 8) to 16 (1 x 8 x 2 micro-batches)" in done.stdout + done.stderr
    info = json.loads((again / "checkpoints" / "000004" / "training_state" / "training_step.json").read_text())
    assert info["sample_position"] == 2 * 8 + 2 * 16


# -- EMA ------------------------------------------------------------------------------------


def test_the_average_follows_its_formula_with_warmup():
    from robotrain.ema import Ema

    model = torch.nn.Linear(3, 2)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    ema = Ema(model, decay=0.999, warmup=True)
    for step in range(3):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)
        ema.update(step)
    expected = {k: v.clone() for k, v in start.items()}
    for step in range(3):
        decay = min(0.999, (1 + step) / (10 + step))
        expected = {k: decay * v + (1 - decay) * (start[k] + step + 1) for k, v in expected.items()}
    for name, average in ema.averages.items():
        assert torch.allclose(average, expected[name], atol=1e-6), name
    trained = model.weight.detach().clone()
    with ema.applied():
        assert torch.equal(model.weight, ema.averages["weight"])
    assert torch.equal(model.weight, trained)  # the raw weights are back, exactly


def test_ema_is_published_updated_each_step_and_resumed_bit_exactly(module_cli, tmp_path):
    run = train(module_cli, tmp_path / "run", "ema.enabled=true", "checkpoint.every=1")
    state = {step: ema_state(run, step) for step in (1, 2)}
    names = [k[len("ema."):] for k in state[2] if k.startswith("ema.")]
    assert sorted(names) == sorted(weights(run, 2)) and all(f"raw.{n}" in state[2] for n in names)
    decay = min(0.999, (1 + 1) / (10 + 1))  # the update after step index 1 (the second step)
    for name in names:
        expected = decay * state[1][f"ema.{name}"] + (1 - decay) * state[2][f"raw.{name}"]
        assert torch.allclose(state[2][f"ema.{name}"], expected, atol=1e-7), name
        assert torch.equal(weights(run, 2)[name], state[2][f"ema.{name}"])  # pretrained_model/ holds the average
    assert largest_difference({n: state[2][f"raw.{n}"] for n in names}, weights(run, 2)) > 1e-6
    again = resumed(module_cli, run, "ema.enabled=true", "checkpoint.every=1")
    assert_same_tensors(weights(again), weights(run))
    assert_same_tensors(ema_state(again), ema_state(run))


def test_ema_for_eval_false_publishes_the_raw_weights(module_cli, tmp_path):
    run = train(module_cli, tmp_path / "run", "ema.enabled=true", "ema.for_eval=false")
    state = ema_state(run)
    assert all(k.startswith("ema.") for k in state)
    plain = train(module_cli, tmp_path / "plain")
    assert_same_tensors(weights(run), weights(plain))  # the average does not change training


def test_ema_under_peft_averages_the_adapter_only(module_cli, tmp_path):
    base = train(module_cli, tmp_path / "base") / "checkpoints" / "000004" / "pretrained_model"
    run = train(module_cli, tmp_path / "lora", "peft=lora", "peft.r=4", f"policy.pretrained_path={base}",
                "ema.enabled=true")
    names = {k.split(".", 1)[1] for k in ema_state(run)}
    assert names and all("lora_" in name for name in names)
    adapter = load_tensors(run / "checkpoints" / "000004" / "pretrained_model" / "adapter_model.safetensors")
    assert adapter
    state = ema_state(run)
    for key, tensor in adapter.items():  # the published adapter is the average
        match = [k for k in state if k.startswith("ema.") and k.endswith(key.split("base_model.model.", 1)[-1]
                                                                         .replace(".weight", ".default.weight"))]
        assert len(match) == 1 and torch.equal(state[match[0]], tensor), key


def test_turning_ema_on_when_resuming_is_refused(module_cli, tmp_path):
    run = train(module_cli, tmp_path / "run")
    done = module_cli.run(*RUN, "ema.enabled=true", "resume=auto", f"hydra.run.dir={run}")
    assert_one_line_error(done, "ema")


# -- run diagnostics ------------------------------------------------------------------------

#: Process 1 of 2 touches 1 GiB at start-up: its peak resident memory passes 1 GiB, process 0's does not.
GROW_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    _ballast = bytearray(1 << 30)
    for _i in range(0, len(_ballast), 4096):
        _ballast[_i] = 1
"""


def test_metrics_report_the_peak_memory_of_the_largest_process(module_cli, tmp_path):
    env = sitecustomize(tmp_path, GROW_RANK_1)
    run_dir = train(module_cli, tmp_path / "run", "batch_size=4", processes=2, env=env)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert lines and all(line["peak_memory_mb"] > 1024 for line in lines)
    single = train(module_cli, tmp_path / "single", "batch_size=8")
    lines = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert lines and all(100 < line["peak_memory_mb"] < 1024 for line in lines)


# -- torch.compile ------------------------------------------------------------------------------

#: Writes how many graphs torch.compile produced in the process (the probe of the backend is one).
COUNT_GRAPHS = """
import atexit, os
def _write():
    import sys
    dynamo = sys.modules.get("torch._dynamo.utils")
    graphs = dynamo.counters["stats"]["unique_graphs"] if dynamo is not None else 0
    open(os.environ["GRAPHS_OUT"], "w").write(str(graphs))
atexit.register(_write)
"""


@pytest.mark.slow
def test_compile_compiles_the_forward_keeps_plain_keys_and_resumes_bit_exactly(module_cli, tmp_path):
    env = {**sitecustomize(tmp_path, COUNT_GRAPHS), "GRAPHS_OUT": str(tmp_path / "graphs")}
    run = train(module_cli, tmp_path / "run", "compile.enabled=true", env=env)
    assert int((tmp_path / "graphs").read_text()) >= 2  # the backend's probe, and the policy's forward
    plain = train(module_cli, tmp_path / "plain")
    assert sorted(weights(run)) == sorted(weights(plain))  # no _orig_mod. prefixes
    assert largest_difference(weights(run), weights(plain)) < 1e-5  # the same math, other kernels
    assert_same_tensors(weights(resumed(module_cli, run, "compile.enabled=true")), weights(run))


def test_compile_without_a_backend_warns_once_and_trains(module_cli, tmp_path):
    done = type(module_cli)(env={**module_cli.env, "CXX": "/nonexistent/c++"}, cwd=module_cli.cwd).run(
        *RUN, "compile.enabled=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert said.count("torch.compile cannot run here") == 1 and "Traceback" not in said
    assert (tmp_path / "run" / "checkpoints" / "000004").is_dir()


def test_compile_and_a_policys_own_compile_switch_are_not_both_on(module_cli, tmp_path):
    done = module_cli.run(*RUN, *TINY_DIFFUSION, "compile.enabled=true", "policy.compile_model=true",
                          f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, "use one of the two")


# -- image augmentation -----------------------------------------------------------------------

AUGMENT = ["dataset.image_transforms.enable=true"]


def lerobot_transforms(**changes):
    from robotrain.config import ImageTransformsConfig

    cfg = ImageTransformsConfig(enable=True)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def test_a_samples_augmentation_depends_only_on_the_seed_and_its_position():
    from robotrain.augmentation import Augmentation

    augment = Augmentation(lerobot_transforms(), seed=0, camera_keys=["observation.image"])
    frames = torch.rand(3, 2, 3, 32, 32)  # 3 samples, 2 history frames
    whole = augment({"observation.image": frames}, [10, 11, 12])["observation.image"]
    alone = augment({"observation.image": frames[1:2]}, [11])["observation.image"]
    assert torch.equal(whole[1], alone[0])  # the same sample at the same position, in any batch
    assert not torch.equal(whole[1], frames[1])  # it was changed
    moved = augment({"observation.image": frames[1:2]}, [12])["observation.image"]
    assert not torch.equal(moved[0], alone[0])  # another position draws otherwise
    other_seed = Augmentation(lerobot_transforms(), seed=1, camera_keys=["observation.image"])
    assert not torch.equal(other_seed({"observation.image": frames[1:2]}, [11])["observation.image"][0], alone[0])


def test_the_kernels_leave_an_image_alone_at_their_neutral_parameter():
    from robotrain import augmentation as aug

    image = torch.rand(2, 3, 16, 16)
    for kernel, neutral in ((aug.adjust_brightness, 1.0), (aug.adjust_contrast, 1.0), (aug.adjust_saturation, 1.0),
                            (aug.adjust_sharpness, 1.0)):
        assert torch.equal(kernel(image, neutral), image), kernel.__name__
    assert torch.allclose(aug.adjust_hue(image, 0.0), image, atol=1e-6)
    assert torch.equal(aug.affine(image, 0.0, (0.0, 0.0)), image)
    gray = aug.adjust_saturation(image, 0.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    assert torch.allclose(aug.adjust_hue(image, 1.0), image, atol=1e-5)  # a full turn
    shifted = aug.affine(image, 0.0, (0.25, 0.0))  # a quarter of the width to the right
    assert torch.equal(shifted[..., 4:], image[..., :-4]) and not shifted[..., :4].any()


def test_only_the_drawn_number_of_transforms_is_applied():
    from robotrain.augmentation import Augmentation

    cfg = lerobot_transforms(max_num_transforms=1)
    for name in list(cfg.tfs)[1:]:
        cfg.tfs[name].weight = 0.0  # brightness only
    augment = Augmentation(cfg, seed=0, camera_keys=["cam"])
    frames = torch.full((4, 3, 8, 8), 0.5)
    out = augment({"cam": frames}, [0, 1, 2, 3])["cam"]
    factors = out[:, 0, 0, 0] / 0.5
    assert torch.allclose(out, factors[:, None, None, None] * 0.5)  # a uniform brightness change, nothing else
    assert ((factors >= 0.8) & (factors <= 1.2)).all() and factors.unique().numel() == 4


def test_augmented_training_writes_a_preview_and_resumes_bit_exactly(module_cli, tmp_path):
    run = train(module_cli, tmp_path / "run", *AUGMENT)
    assert (run / "augmentations.png").stat().st_size > 0
    plain = train(module_cli, tmp_path / "plain")
    assert largest_difference(weights(run), weights(plain)) > 1e-6  # the policy saw other images
    assert_same_tensors(weights(resumed(module_cli, run, *AUGMENT)), weights(run))


def test_an_augmentation_robotrain_does_not_have_is_a_one_line_error(module_cli, tmp_path):
    done = module_cli.run(*RUN, *AUGMENT, "dataset.image_transforms.tfs.hue.type=GaussianBlur",
                          f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, "dataset.image_transforms.tfs.hue.type='GaussianBlur' is not an augmentation")
