"""The diffusion policy: LeRobot 0.4.4's checkpoints load here and ours load there (same
state-dict keys and shapes, same config.json), it trains from the command line, and it acts
from single-frame observations with an observation history."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from robotrain import policies
from robotrain.config import SYNTHETIC_REPO_ID, parse
from robotrain.data import synthetic
from robotrain.data.reading import LeRobotDataset
from robotrain.errors import UserError
from robotrain.eval.synthetic import observation_to_batch
from robotrain.policies.diffusion import DiffusionConfig, DiffusionPolicy, make_noise_scheduler
from tests.conftest import assert_close_gradients, loss_and_gradients

KEYS = Path(__file__).parent / "data" / "lerobot_keys"
LEROBOT_TINY = json.loads((KEYS / "diffusion_keys.json").read_text())
LEROBOT_FULL = json.loads((KEYS / "diffusion_full_keys.json").read_text())
LEROBOT_CONFIG = json.loads((KEYS / "diffusion_config.json").read_text())
ACT_CHECKPOINT = Path(__file__).parent / "data" / "lerobot_act_checkpoint" / "pretrained_model"

#: A diffusion policy that trains in seconds: LeRobot's tiny key-list config, plus a random crop.
TINY_DIFFUSION = [
    "policy=diffusion",
    "policy.n_obs_steps=2",
    "policy.horizon=8",
    "policy.n_action_steps=4",
    "policy.down_dims=[32,64]",
    "policy.kernel_size=3",
    "policy.n_groups=8",
    "policy.diffusion_step_embed_dim=32",
    "policy.spatial_softmax_num_keypoints=8",
    "policy.num_train_timesteps=10",
    "policy.crop_shape=[28,28]",
]

TINY_FIELDS = dict(LEROBOT_TINY["config_overrides"])


def overrides_to_fields(overrides: list[str]) -> dict:
    fields = {}
    for item in overrides:
        key, value = item.split("=", 1)
        if key.startswith("policy."):
            fields[key.removeprefix("policy.")] = json.loads(value)
    return fields


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 episodes of the embedded task (32x32 images: LeRobot's key lists were made for these
    features), sampled with the tiny policy's observation history and action horizon."""
    root = synthetic.ensure_dataset(synthetic.SyntheticSpec(4, 0, 32), tmp_path_factory.mktemp("ds") / "d")
    config = tiny_config()
    meta = LeRobotDataset(SYNTHETIC_REPO_ID, root=root).meta
    inputs, outputs = policies.features_from_dataset(meta.features)
    config = dataclasses.replace(config, input_features=inputs, output_features=outputs)
    return LeRobotDataset(SYNTHETIC_REPO_ID, root=root, delta_timestamps=config.delta_timestamps(synthetic.FPS))


def tiny_config(**fields) -> DiffusionConfig:
    cfg = parse({"policy": {"type": "diffusion", **overrides_to_fields(TINY_DIFFUSION[1:]), **fields},
                 "dataset": {"repo_id": "robotrain/synthetic_reach", "root": None}})
    return cfg.policy


def make_policy(dataset, **fields) -> DiffusionPolicy:
    torch.manual_seed(0)
    return policies.make(tiny_config(**fields), dataset.meta.features, dataset.meta.stats)


def lerobot_config(**fields) -> DiffusionConfig:
    return DiffusionConfig(**{**TINY_FIELDS, **fields}, input_features=LEROBOT_TINY["input_features"],
                           output_features=LEROBOT_TINY["output_features"])


def some_stats() -> dict:
    return {
        "observation.state": {"min": -torch.ones(4), "max": torch.ones(4),
                              "mean": torch.zeros(4), "std": torch.ones(4)},
        "observation.image": {"min": torch.zeros(3, 1, 1), "max": torch.ones(3, 1, 1),
                              "mean": torch.full((3, 1, 1), 0.3), "std": torch.full((3, 1, 1), 0.2)},
        "action": {"min": -torch.ones(2), "max": torch.ones(2), "mean": torch.zeros(2), "std": torch.ones(2)},
    }


def layout(state_dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state_dict.items()}


def observation(n: int, seed: int = 0):
    env = synthetic.ReachEnv(n, image_size=32)
    return observation_to_batch(env.reset(np.random.default_rng(seed)), torch.device("cpu"))


# -- LeRobot checkpoint compatibility ---------------------------------------------------------


def test_state_dict_equals_lerobots_keys_shapes_and_dtypes():
    torch.manual_seed(0)
    policy = DiffusionPolicy(lerobot_config(), some_stats())
    assert layout(policy.state_dict()) == LEROBOT_TINY["state_dict"]
    assert sum(p.numel() for p in policy.parameters()) == LEROBOT_TINY["num_parameters"]


def test_full_size_state_dict_equals_lerobots():
    """LeRobot's defaults (down_dims 512/1024/2048: 263 M parameters), built on the meta device."""
    config = DiffusionConfig(input_features=LEROBOT_FULL["input_features"],
                             output_features=LEROBOT_FULL["output_features"])
    with torch.device("meta"):
        policy = DiffusionPolicy(config, some_stats())
    assert layout(policy.state_dict()) == LEROBOT_FULL["state_dict"]
    assert sum(p.numel() for p in policy.parameters()) == LEROBOT_FULL["num_parameters"]


def test_lerobots_config_json_loads_and_is_written_back_identically(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LEROBOT_CONFIG))
    config = policies.load_config(tmp_path)
    assert isinstance(config, DiffusionConfig)
    assert (config.horizon, config.down_dims, config.num_train_timesteps) == (8, [32, 64], 10)
    written = config.to_lerobot_dict()
    assert list(written) == list(LEROBOT_CONFIG)  # same keys, same order
    assert written == LEROBOT_CONFIG


def test_defaults_are_lerobots():
    defaults = DiffusionConfig().to_lerobot_dict()
    lerobot = {**LEROBOT_CONFIG, **{k: v for k, v in {
        "n_obs_steps": 2, "horizon": 16, "n_action_steps": 8, "drop_n_last_frames": 7,
        "spatial_softmax_num_keypoints": 32, "down_dims": [512, 1024, 2048], "kernel_size": 5,
        "diffusion_step_embed_dim": 128, "num_train_timesteps": 100}.items()}}
    lerobot.update(input_features=None, output_features=None)
    assert defaults == lerobot


def test_the_yaml_config_is_lerobots_default():
    from omegaconf import OmegaConf

    from robotrain.config import conf_dir

    raw = OmegaConf.to_container(OmegaConf.load(conf_dir() / "policy" / "diffusion.yaml"))
    assert DiffusionConfig(**raw) == DiffusionConfig()


def lerobot_processor_files(directory: Path, stats: dict[str, dict[str, torch.Tensor]]) -> None:
    """policy_{pre,post}processor.json as LeRobot 0.4.4 writes them for diffusion (the steps of
    make_diffusion_pre_post_processors; same layout as the ACT checkpoint LeRobot wrote)."""
    features = {**LEROBOT_CONFIG["input_features"], **LEROBOT_CONFIG["output_features"]}
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        pipeline = json.loads((ACT_CHECKPOINT / name).read_text())
        for step in pipeline["steps"]:
            if "norm_map" in step["config"]:
                step["config"]["norm_map"] = LEROBOT_CONFIG["normalization_mapping"]
                if step["registry_name"] == "normalizer_processor":
                    assert step["config"]["features"] == features
        (directory / name).write_text(json.dumps(pipeline, indent=2))
        state_file = next(s["state_file"] for s in pipeline["steps"] if "state_file" in s)
        save_file({f"{k}.{s}": t for k, per in stats.items() for s, t in per.items()}, str(directory / state_file))


def test_a_lerobot_checkpoint_loads_strictly(tmp_path):
    folder = tmp_path / "pretrained_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LEROBOT_CONFIG, indent=4))
    generator = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(v["shape"], generator=generator) for k, v in LEROBOT_TINY["state_dict"].items()}
    save_file(weights, str(folder / "model.safetensors"))
    lerobot_processor_files(folder, some_stats())

    policy = policies.from_pretrained(folder)
    assert isinstance(policy, DiffusionPolicy)
    assert all(torch.equal(policy.state_dict()[k], weights[k]) for k in weights)
    assert torch.equal(policy.normalizer.stats["action"]["max"], torch.ones(2))


def test_a_lerobot_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    folder = tmp_path / "pretrained_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LEROBOT_CONFIG))
    weights = {k: torch.zeros(v["shape"]) for k, v in LEROBOT_TINY["state_dict"].items()}
    del weights["diffusion.unet.final_conv.1.bias"]
    save_file(weights, str(folder / "model.safetensors"))
    lerobot_processor_files(folder, some_stats())
    with pytest.raises(UserError, match="do not fit this policy"):
        policies.from_pretrained(folder)


def test_our_pretrained_folder_is_lerobots(dataset, tmp_path):
    policy = make_policy(dataset, crop_shape=None, drop_n_last_frames=3)
    policy.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == LEROBOT_TINY["pretrained_dir_files"]
    assert layout(load_file(str(tmp_path / "model.safetensors"))) == LEROBOT_TINY["state_dict"]
    assert json.loads((tmp_path / "config.json").read_text()) == LEROBOT_CONFIG
    pre = json.loads((tmp_path / "policy_preprocessor.json").read_text())
    assert [s["registry_name"] for s in pre["steps"]] == [
        "rename_observations_processor", "to_batch_processor", "device_processor", "normalizer_processor"]
    loaded = policies.from_pretrained(tmp_path)
    obs = observation(3)
    torch.manual_seed(5)
    expected = policy.eval().predict_action_chunk(obs)
    torch.manual_seed(5)
    assert torch.equal(loaded.eval().predict_action_chunk(obs), expected)


# -- the noise scheduler ------------------------------------------------------------------


def test_noise_scheduler_is_diffusers_configured_as_lerobot():
    from diffusers import DDIMScheduler, DDPMScheduler

    scheduler = make_noise_scheduler(lerobot_config())
    assert type(scheduler) is DDPMScheduler
    expected = {"num_train_timesteps": 10, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
                "clip_sample": True, "clip_sample_range": 1.0, "prediction_type": "epsilon"}
    assert {k: scheduler.config[k] for k in expected} == expected
    assert type(make_noise_scheduler(lerobot_config(noise_scheduler_type="DDIM"))) is DDIMScheduler


def test_training_noise_follows_the_ddpm_forward_process():
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with the cosine schedule
    beta_t = min(1 - abar(t+1)/abar(t), 0.999), abar(t) = cos((t/T + 0.008) / 1.008 * pi/2)^2."""
    T = 10
    scheduler = make_noise_scheduler(lerobot_config(num_train_timesteps=T))
    abar = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - abar(t + 1) / abar(t), 0.999) for t in range(T)], dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    x0, eps, t = torch.randn(4, 8, 2), torch.randn(4, 8, 2), torch.tensor([0, 3, 7, 9])
    expected = alphas_cumprod[t].sqrt()[:, None, None] * x0 + (1 - alphas_cumprod[t]).sqrt()[:, None, None] * eps
    torch.testing.assert_close(scheduler.add_noise(x0, eps, t), expected)


def test_inference_steps_default_to_the_training_steps():
    torch.manual_seed(0)
    assert DiffusionPolicy(lerobot_config(), some_stats()).diffusion.num_inference_steps == 10
    assert DiffusionPolicy(lerobot_config(num_inference_steps=4), some_stats()).diffusion.num_inference_steps == 4


# -- training ---------------------------------------------------------------------------------


def test_samples_hold_the_observation_history_and_the_action_horizon(dataset):
    sample = dataset[5]
    assert sample["observation.state"].shape == (2, 4)
    assert sample["observation.image"].shape == (2, 3, 32, 32)
    assert sample["action"].shape == (8, 2) and sample["action_is_pad"].shape == (8,)
    assert tiny_config().action_delta_indices == list(range(-1, 7))
    assert tiny_config().observation_delta_indices == [-1, 0]


def test_the_loss_is_a_pure_function_of_the_torch_rng(dataset):
    """Noise, timesteps and the random crop all come from the torch RNG (restored on resume)."""
    policy = make_policy(dataset)
    batch = dataset.get_batch(list(range(8)))
    torch.manual_seed(3)
    first = policy(batch)[0]
    torch.manual_seed(3)
    assert torch.equal(policy(batch)[0], first)
    assert not torch.equal(policy(batch)[0], first)


def test_masked_loss_ignores_padded_targets(dataset):
    """With do_mask_loss_for_padding, padded steps add nothing (seen through a U-Net that
    predicts zeros, so that the loss is the mean squared target over the unpadded steps)."""
    policy = make_policy(dataset, do_mask_loss_for_padding=True, prediction_type="sample")
    policy.reports_per_sample_loss = True  # as a mixture's training turns it on
    policy.diffusion.unet.forward = lambda x, timestep, global_cond=None: torch.zeros_like(x)
    _, ends = dataset.episode_bounds
    batch = dataset.get_batch([int(i) - 1 for i in ends])  # last frames: padded chunks
    assert batch["action_is_pad"].any()
    loss, metrics = policy(batch)
    per_sample = metrics["per_sample_loss"]  # what a mixture's per-member loss averages
    assert per_sample.shape == (len(ends),) and per_sample.mean().item() == pytest.approx(loss.item(), rel=1e-5)
    batch["action"] = batch["action"] + 100.0 * batch["action_is_pad"].unsqueeze(-1)
    assert torch.equal(policy(batch)[0], loss)
    policy.config.do_mask_loss_for_padding = False
    assert policy(batch)[0] > 100 * loss


def test_cli_training_runs_and_the_loss_decreases(cli, tmp_path):
    run_dir = tmp_path / "run"
    done = cli.run(*TINY_DIFFUSION, "dataset.synthetic.num_episodes=20", "batch_size=8", "eval.enabled=false",
                   "steps=30", "log_every=5", "scheduler.warmup_steps=5", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    pretrained = run_dir / "checkpoints" / "000030" / "pretrained_model"
    assert list(json.loads((pretrained / "config.json").read_text())) == list(LEROBOT_CONFIG)
    assert isinstance(policies.from_pretrained(pretrained), DiffusionPolicy)


# -- acting -----------------------------------------------------------------------------------


def test_select_action_takes_single_frames_and_keeps_a_history(dataset):
    policy = make_policy(dataset).eval()
    first, second = observation(3, seed=0), observation(3, seed=1)
    torch.manual_seed(7)
    chunk = policy.predict_action_chunk(first)  # one frame stands for the whole history
    assert chunk.shape == (3, 4, 2)

    policy.reset()
    torch.manual_seed(7)
    actions = [policy.select_action(first)]
    actions += [policy.select_action(second) for _ in range(3)]
    assert all(a.shape == (3, 2) for a in actions)
    assert torch.equal(torch.stack(actions, dim=1), chunk)  # n_action_steps=4 actions from one prediction
    history = policy._obs_queues["observation.state"]
    assert len(history) == 2 and all(torch.equal(h, history[0]) for h in history)  # second repeated 3x: last 2 kept

    policy.select_action(first)  # a fresh prediction once the queue is empty
    assert len(policy._queue) == 3
    policy.reset()
    assert len(policy._queue) == 0 and all(len(q) == 0 for q in policy._obs_queues.values())


def test_eval_uses_a_center_crop():
    torch.manual_seed(0)
    policy = DiffusionPolicy(lerobot_config(crop_shape=[28, 28]), some_stats()).eval()
    image = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    assert torch.equal(policy.diffusion.rgb_encoder._crop(image), image[..., 2:30, 2:30])


# -- bad input ----------------------------------------------------------------------------------


def test_a_crop_larger_than_the_images_is_one_line(dataset):
    with pytest.raises(UserError, match=r"policy.crop_shape=\[84, 84\] does not fit the 32x32 images"):
        make_policy(dataset, crop_shape=[84, 84])


@pytest.mark.parametrize("fields, message", [
    ({"horizon": 10}, r"policy.horizon=10 must be a multiple of 2\*\*len\(down_dims\) = 4"),
    ({"n_action_steps": 8}, r"policy.n_action_steps must be <= horizon - n_obs_steps \+ 1 = 7"),
    ({"noise_scheduler_type": "DPM"}, r"policy.noise_scheduler_type must be DDPM or DDIM"),
    ({"prediction_type": "v_prediction"}, r"policy.prediction_type must be 'epsilon' or 'sample'"),
    ({"down_dims": [30, 64]}, r"must all be multiples of policy.n_groups=8"),
])
def test_bad_config_values_are_refused_in_one_line(fields, message):
    with pytest.raises(UserError, match=message):
        tiny_config(**fields)


def test_the_cli_reports_a_bad_crop_in_one_line(cli, tmp_path):
    done = cli.run(*TINY_DIFFUSION, "policy.crop_shape=[84,84]", "dataset.synthetic.num_episodes=20",
                   "eval.enabled=false", "steps=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        "robotrain: error: policy.crop_shape=[84, 84] does not fit the 32x32 images; use at most [32, 32] or null"]


def test_gradient_checkpointing_recomputes_the_unet_blocks_with_the_same_loss_and_gradients(dataset):
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    results = {}
    for on in (False, True):
        policy = make_policy(dataset, gradient_checkpointing=on)
        results[on] = loss_and_gradients(policy, batch, policy.diffusion.unet.mid_modules[0].conv1)
    (loss, grads, calls), (loss_gc, grads_gc, calls_gc) = results[False], results[True]
    assert (calls, calls_gc) == (1, 2)  # the block ran again in the backward pass
    assert torch.allclose(loss, loss_gc, rtol=0, atol=1e-6)
    assert_close_gradients(grads, grads_gc, atol=1e-6)
