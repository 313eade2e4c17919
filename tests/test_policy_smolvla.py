"""SmolVLA: built offline from a tiny SmolVLM folder, its state dict and config.json are
LeRobot's (tests/data/lerobot_keys/smolvla_*.json, written by lerobot 0.4.4), LeRobot's folders
load strictly, it trains from the command line and acts from observations with a task."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from robotrain.config import SYNTHETIC_REPO_ID
from robotrain import policies
from robotrain.data import synthetic
from robotrain.data.reading import LeRobotDataset
from robotrain.errors import UserError
from robotrain.eval.synthetic import observation_to_batch
from tests.conftest import REPO_ROOT, assert_close_gradients, assert_one_line_error, loss_and_gradients
from tests.smolvlm_tiny import build_tiny_smolvlm

KEYS = REPO_ROOT / "tests" / "data" / "lerobot_keys"
#: The tiny sizes LeRobot's reference files were made with (their `config_overrides`).
TINY = {"chunk_size": 10, "n_action_steps": 10, "resize_imgs_with_padding": [64, 64],
        "tokenizer_max_length": 16, "num_vlm_layers": 4, "num_steps": 2}
TINY_CLI = [f"policy.{k}={v}".replace(" ", "") for k, v in TINY.items()]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_smolvlm(tmp_path_factory.mktemp("vlm") / "tiny_smolvlm")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = synthetic.ensure_dataset(synthetic.SyntheticSpec(4, 0, 32), tmp_path_factory.mktemp("ds") / "d")
    return LeRobotDataset(SYNTHETIC_REPO_ID, root=root, delta_timestamps={"action": [i / synthetic.FPS for i in range(10)]})


def make_policy(dataset, tiny_vlm, **fields):
    config = policies.policy_config_class("smolvla")(vlm_model_name=str(tiny_vlm), **{**TINY, **fields})
    torch.manual_seed(0)
    return policies.make(config, dataset.meta.features, dataset.meta.stats)


@pytest.fixture(scope="module")
def policy(dataset, tiny_vlm):
    return make_policy(dataset, tiny_vlm).eval()


def lerobot_config(tiny_vlm) -> dict:
    config = json.loads((KEYS / "smolvla_config.json").read_text())
    return {**config, "vlm_model_name": str(tiny_vlm)}


def observation(n: int) -> dict:
    env = synthetic.ReachEnv(n, image_size=32)
    return observation_to_batch(env.reset(np.random.default_rng(0)), torch.device("cpu"))


def seeded_chunk(policy, obs, seed=1):
    torch.manual_seed(seed)  # the sampler starts from noise
    return policy.predict_action_chunk(obs)


def test_state_dict_keys_shapes_and_dtypes_are_lerobots(policy):
    reference = json.loads((KEYS / "smolvla_keys.json").read_text())
    ours = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in policy.state_dict().items()}
    assert list(ours) == list(reference["state_dict"])
    assert ours == reference["state_dict"]
    assert sum(p.numel() for p in policy.parameters()) == reference["num_parameters"]
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert trainable == reference["num_trainable_parameters"]  # VLM frozen, expert + projections trained


def test_lerobots_config_json_loads(tmp_path, tiny_vlm):
    written = lerobot_config(tiny_vlm)
    (tmp_path / "config.json").write_text(json.dumps(written))
    config = policies.load_config(tmp_path)
    assert type(config).__name__ == "SmolVLAConfig"
    fields = {k: v for k, v in written.items() if hasattr(config, k)}
    assert {k: getattr(config, k) for k in fields} == fields
    assert set(written) - set(fields) == {"device", "use_amp", "use_peft", "push_to_hub", "repo_id", "private",
                                          "tags", "license"}


def test_written_config_json_is_lerobots(policy, tmp_path, tiny_vlm):
    policy.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert list(written) == list(lerobot_config(tiny_vlm))
    assert written == lerobot_config(tiny_vlm)


def test_saved_folder_has_lerobots_files_and_smolvla_preprocessor(policy, tmp_path):
    reference = json.loads((KEYS / "smolvla_keys.json").read_text())
    policy.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == reference["pretrained_dir_files"]
    steps = json.loads((tmp_path / "policy_preprocessor.json").read_text())["steps"]
    assert [s["registry_name"] for s in steps] == [
        "rename_observations_processor", "to_batch_processor", "smolvla_new_line_processor",
        "tokenizer_processor", "device_processor", "normalizer_processor"]
    assert steps[3]["config"]["max_length"] == 16 and steps[3]["config"]["padding"] == "longest"
    assert steps[5]["state_file"] == "policy_preprocessor_step_5_normalizer_processor.safetensors"


def test_lerobot_layout_folder_loads_strictly(policy, tmp_path, tiny_vlm):
    """LeRobot's config.json and a model.safetensors with exactly LeRobot's keys and shapes."""
    policy.save_pretrained(tmp_path)  # the processor files
    (tmp_path / "config.json").write_text(json.dumps(lerobot_config(tiny_vlm), indent=4))
    reference = json.loads((KEYS / "smolvla_keys.json").read_text())["state_dict"]
    generator = torch.Generator().manual_seed(7)
    tensors = {k: torch.randn(v["shape"], generator=generator) for k, v in reference.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))

    loaded = policies.from_pretrained(tmp_path)

    state = loaded.state_dict()
    assert all(torch.equal(state[k], tensors[k]) for k in tensors)
    assert loaded.config.n_action_steps == 10 and loaded.config.vlm_model_name == str(tiny_vlm)


def test_a_missing_key_is_refused(policy, tmp_path):
    policy.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.action_out_proj.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="action_out_proj.bias"):
        policies.from_pretrained(tmp_path)


def test_save_and_load_round_trip_gives_identical_actions(policy, tmp_path):
    policy.save_pretrained(tmp_path)
    loaded = policies.from_pretrained(tmp_path).eval()
    obs = observation(3)
    assert torch.equal(seeded_chunk(policy, obs), seeded_chunk(loaded, obs))


def test_select_action_gives_one_action_per_environment(policy):
    policy.reset()
    action = policy.select_action(observation(3))
    assert action.shape == (3, 2) and torch.isfinite(action).all()
    assert len(policy._queue) == policy.config.n_action_steps - 1
    policy.reset()


def test_an_empty_camera_is_an_input_no_observation_holds(dataset, tiny_vlm):
    policy = make_policy(dataset, tiny_vlm, empty_cameras=1).eval()
    assert "observation.images.empty_camera_0" in policy.config.input_features
    assert torch.isfinite(seeded_chunk(policy, observation(2))).all()


def test_the_kv_cache_does_not_change_the_actions(policy):
    obs = observation(2)
    cached = seeded_chunk(policy, obs)
    policy.config.use_cache = False
    try:
        assert torch.allclose(seeded_chunk(policy, obs), cached, atol=1e-6)
    finally:
        policy.config.use_cache = True


def test_tasks_get_a_newline_and_are_padded_on_the_right(policy):
    tokens, mask = policy.tokenize(["open the drawer", "move the red dot onto the green target"])
    assert tokens.shape == mask.shape == (2, 16)  # the longer task fills tokenizer_max_length
    short = tokens[0][mask[0]]
    assert policy.tokenizer.decode(short) == "open the drawer\n"
    assert not mask[0, len(short):].any()
    assert (tokens[0, len(short):] == policy.tokenizer.pad_token_id).all()


def test_language_changes_the_actions(policy):
    obs = observation(1)
    other = {**obs, "task": ["open the drawer"]}
    assert not torch.equal(seeded_chunk(policy, obs), seeded_chunk(policy, other))


def test_loss_ignores_padded_targets(dataset, tiny_vlm):
    policy = make_policy(dataset, tiny_vlm)
    policy.reports_per_sample_loss = True  # as a mixture's training turns it on
    _, ends = dataset.episode_bounds
    batch = torch.utils.data.default_collate([dataset[int(i) - 1] for i in ends])  # last frames: padded chunks
    assert batch["action_is_pad"].any()
    torch.manual_seed(3)
    loss, metrics = policy(batch)
    # Per-sample losses (a mixture's per-member loss averages them) weigh into the loss by valid entries.
    valid = (~batch["action_is_pad"]).sum(1).float()
    per_sample = metrics["per_sample_loss"]
    assert per_sample.shape == valid.shape and (per_sample * valid).sum() / valid.sum() == pytest.approx(loss.item(), rel=1e-5)
    batch["action"] = batch["action"] + 100.0 * batch["action_is_pad"].unsqueeze(-1)
    torch.manual_seed(3)
    assert torch.equal(policy(batch)[0], loss)


def test_pretrained_vlm_weights_load_from_a_local_folder(dataset, tiny_vlm, tmp_path):
    """load_vlm_weights=true reads the backbone's safetensors (in bfloat16, as LeRobot does)."""
    import shutil

    import transformers

    folder = tmp_path / "with_weights"
    shutil.copytree(tiny_vlm, folder)
    torch.manual_seed(5)
    vlm = transformers.SmolVLMForConditionalGeneration(transformers.AutoConfig.from_pretrained(folder))
    vlm.save_pretrained(folder)
    policy = make_policy(dataset, folder, load_vlm_weights=True)
    ours = policy.state_dict()["model.vlm_with_expert.vlm.model.text_model.layers.0.mlp.up_proj.weight"]
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, vlm.model.text_model.layers[0].mlp.up_proj.weight.bfloat16())


def test_cli_trains_offline_and_the_loss_decreases(cli, tmp_path, tiny_vlm):
    run_dir = tmp_path / "run"
    done = cli.run("policy=smolvla", f"policy.vlm_model_name={tiny_vlm}", *TINY_CLI,
                   "dataset.synthetic.num_episodes=20", "batch_size=8", "eval.enabled=false", "steps=40",
                   "log_every=10", "scheduler.warmup_steps=2", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    # Flow matching's loss is noisy over a few steps (random times and noise); 40 steps drop it
    # by 0.2 or more from the first 10 (measured on 4 seeds).
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    pretrained = run_dir / "checkpoints" / "000040" / "pretrained_model"
    assert json.loads((pretrained / "config.json").read_text())["type"] == "smolvla"
    assert policies.from_pretrained(pretrained).select_action(observation(2)).shape == (2, 2)


def test_a_missing_vlm_folder_is_a_one_line_error(cli, tmp_path):
    missing = tmp_path / "no_such_vlm"
    done = cli.run("policy=smolvla", f"policy.vlm_model_name={missing}", *TINY_CLI,
                   "dataset.synthetic.num_episodes=4", "eval.enabled=false", "steps=1",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, f"policy.vlm_model_name={missing} does not exist")


@pytest.mark.parametrize("fields, message", [
    ({"attention_mode": "both"}, "policy.attention_mode must be cross_attn or self_attn"),
    ({"pad_language_to": "shortest"}, "policy.pad_language_to must be longest or max_length"),
    ({"n_action_steps": 11}, "policy.n_action_steps must be in"),
    ({"use_delta_joint_actions_aloha": True}, "is not ported"),
])
def test_bad_config_values_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        policies.policy_config_class("smolvla")(**{**TINY, **fields})


def test_actions_wider_than_max_action_dim_are_refused(dataset, tiny_vlm):
    with pytest.raises(UserError, match="policy.max_action_dim=1 is below the action size 2"):
        make_policy(dataset, tiny_vlm, max_action_dim=1)


def test_transformers_is_imported_only_to_build_the_model():
    code = ("import sys; from robotrain import policies; "
            "policies.policy_config_class('smolvla')(); print('transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.stdout.strip() == "False", done.stderr


def test_gradient_checkpointing_recomputes_the_layers_with_the_same_loss_and_gradients(dataset, tiny_vlm):
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    results = {}
    for on in (False, True):
        policy = make_policy(dataset, tiny_vlm, gradient_checkpointing=on)
        watched = policy.model.vlm_with_expert.vlm.model.text_model.layers[0].mlp
        results[on] = loss_and_gradients(policy, batch, watched)
    (loss, grads, calls), (loss_gc, grads_gc, calls_gc) = results[False], results[True]
    assert calls_gc == 2 * calls > 0  # every layer ran again in the backward pass
    assert torch.allclose(loss, loss_gc, rtol=0, atol=1e-6)
    assert_close_gradients(grads, grads_gc, atol=1e-6)
