"""The ACT policy: checkpoint-compatible with LeRobot 0.4.4 both ways (state-dict keys, shapes and
buffers, config.json, processor files), trains through the CLI, and acts chunk by chunk.

LeRobot's side is recorded in tests/data: `lerobot_keys/act_keys.json` (a tiny ACT),
`act_full_keys.json` (the default ACT) and `act_config.json`, dumped by LeRobot itself, and
`lerobot_act_checkpoint/` (config and processor files of a checkpoint LeRobot wrote)."""

from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from robotrain import policies
from robotrain.errors import UserError
from robotrain.policies.act import ACTConfig, ACTPolicy
from robotrain.policies.base import stats_file_bytes
from robotrain.policies.resnet import ResNet18
from tests.conftest import TINY

DATA = Path(__file__).parent / "data"
LEROBOT_TINY = json.loads((DATA / "lerobot_keys" / "act_keys.json").read_text())
LEROBOT_FULL = json.loads((DATA / "lerobot_keys" / "act_full_keys.json").read_text())
LEROBOT_CONFIG_TEXT = (DATA / "lerobot_keys" / "act_config.json").read_text()
LEROBOT_CHECKPOINT = DATA / "lerobot_act_checkpoint" / "pretrained_model"

#: The tiny ACT of act_keys.json (state[4], image[3, 32, 32] -> action[2]) as CLI overrides.
TINY_ACT = [
    "policy=act",
    "policy.pretrained_backbone_weights=null",
    "policy.dim_model=32",
    "policy.n_heads=2",
    "policy.dim_feedforward=64",
    "policy.n_encoder_layers=1",
    "policy.n_decoder_layers=1",
    "policy.n_vae_encoder_layers=1",
    "policy.latent_dim=8",
    "policy.chunk_size=10",
    "policy.n_action_steps=10",
]


def unit_stats(features: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Mean 0 / std 1 for every feature, shaped as LeRobot's stats (images: (C, 1, 1))."""
    stats = {}
    for key, ft in features.items():
        shape = [ft["shape"][0], 1, 1] if ft["type"] == "VISUAL" else ft["shape"]
        stats[key] = {"mean": torch.zeros(shape), "std": torch.ones(shape),
                      "min": -torch.ones(shape), "max": torch.ones(shape)}
    return stats


def make_act(lerobot: dict = LEROBOT_TINY, device: str = "cpu", **fields) -> ACTPolicy:
    overrides = {**lerobot["config_overrides"], **fields}
    config = ACTConfig(input_features=lerobot["input_features"], output_features=lerobot["output_features"], **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        return ACTPolicy(config, unit_stats({**config.input_features, **config.output_features}))


def tensor_specs(state_dict: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state_dict.items()}


def buffers_in_state_dict(policy: ACTPolicy) -> list[str]:
    keys = policy.state_dict().keys()
    return [name for name, _ in policy.named_buffers() if name in keys]


def observation(batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"observation.state": torch.randn(batch_size, 4, generator=g),
            "observation.image": torch.rand(batch_size, 3, 32, 32, generator=g)}


# -- LeRobot -> robotrain and back ---------------------------------------------------------

def test_state_dict_has_lerobots_keys_shapes_dtypes_and_buffers():
    policy = make_act()
    assert tensor_specs(policy.state_dict()) == LEROBOT_TINY["state_dict"]
    assert list(policy.state_dict()) == list(LEROBOT_TINY["state_dict"])  # same order too
    assert buffers_in_state_dict(policy) == LEROBOT_TINY["buffers_in_state_dict"]
    assert sum(p.numel() for p in policy.parameters()) == LEROBOT_TINY["num_parameters"]


def test_default_size_state_dict_has_lerobots_keys_shapes_and_buffers():
    policy = make_act(LEROBOT_FULL, device="meta")  # ~52M parameters: shapes only, no memory
    assert tensor_specs(policy.state_dict()) == LEROBOT_FULL["state_dict"]
    assert buffers_in_state_dict(policy) == LEROBOT_FULL["buffers_in_state_dict"]
    assert sum(p.numel() for p in policy.parameters()) == LEROBOT_FULL["num_parameters"]


def test_config_defaults_are_lerobots():
    lerobot = json.loads(LEROBOT_CONFIG_TEXT)
    lerobot_defaults = {**lerobot, "dim_model": 512, "n_heads": 8, "dim_feedforward": 3200, "n_encoder_layers": 4,
                        "n_vae_encoder_layers": 4, "latent_dim": 32, "chunk_size": 100, "n_action_steps": 100,
                        "pretrained_backbone_weights": "ResNet18_Weights.IMAGENET1K_V1"}
    ours = ACTConfig().to_lerobot_dict()
    assert {k: v for k, v in ours.items() if "features" not in k} == \
        {k: v for k, v in lerobot_defaults.items() if "features" not in k}


def test_conf_policy_act_yaml_is_lerobots_default_config():
    from omegaconf import OmegaConf

    from robotrain.config import conf_dir

    yaml = OmegaConf.load(conf_dir() / "policy" / "act.yaml")
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ACTConfig), yaml)) == ACTConfig()


def test_lerobot_config_json_loads():
    config = policies.load_config(LEROBOT_CHECKPOINT)
    lerobot = json.loads((LEROBOT_CHECKPOINT / "config.json").read_text())
    assert isinstance(config, ACTConfig)
    for key, value in lerobot.items():
        if hasattr(config, key):
            assert getattr(config, key) == value, key
    assert (config.dim_model, config.n_heads, config.chunk_size) == (32, 2, 10)


def test_written_config_json_is_lerobots_byte_for_byte_in_content_and_order(tmp_path):
    (tmp_path / "lerobot").mkdir()
    (tmp_path / "lerobot" / "config.json").write_text(LEROBOT_CONFIG_TEXT)
    config = policies.load_config(tmp_path / "lerobot")
    ACTPolicy(config, unit_stats({**config.input_features, **config.output_features})).save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    lerobot = json.loads(LEROBOT_CONFIG_TEXT)
    assert list(written) == list(lerobot)
    assert written == lerobot


def test_saved_folder_has_lerobots_files_and_processor_pipelines(tmp_path):
    make_act().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(LEROBOT_TINY["pretrained_dir_files"])
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((LEROBOT_CHECKPOINT / name).read_text()), name
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {k: f.get_slice(k).get_shape() for k in f.keys()} == \
            {k: spec["shape"] for k, spec in LEROBOT_TINY["state_dict"].items()}


def test_lerobot_checkpoint_loads_strictly(tmp_path):
    """A folder as LeRobot writes it: its config and processor files, stats with LeRobot's extra
    entries (count, quantiles), and weights named and shaped from LeRobot's own key list."""
    folder = tmp_path / "pretrained_model"
    shutil.copytree(LEROBOT_CHECKPOINT, folder)
    stats = unit_stats(json.loads(LEROBOT_CONFIG_TEXT)["input_features"] | {"action": {"type": "ACTION", "shape": [2]}})
    for per in stats.values():
        per.update(count=torch.tensor([100.0]), q01=per["min"].clone(), q99=per["max"].clone())
    stats["timestamp"] = {"mean": torch.zeros(1), "std": torch.ones(1)}
    stats_bytes = stats_file_bytes(stats)
    for name in ("policy_preprocessor_step_3_normalizer_processor.safetensors",
                 "policy_postprocessor_step_0_unnormalizer_processor.safetensors"):
        (folder / name).write_bytes(stats_bytes)
    g = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(spec["shape"], generator=g) for k, spec in LEROBOT_TINY["state_dict"].items()}
    save_file(weights, str(folder / "model.safetensors"))

    policy = policies.from_pretrained(folder)

    assert isinstance(policy, ACTPolicy)
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in weights.items())
    assert policy.predict_action_chunk(observation(2)).shape == (2, 10, 2)


def test_round_trip_gives_identical_actions(tmp_path):
    policy = make_act().eval()
    policy.save_pretrained(tmp_path)
    loaded = policies.from_pretrained(tmp_path).eval()
    obs = observation(3)
    assert torch.equal(policy.predict_action_chunk(obs), loaded.predict_action_chunk(obs))


# -- training --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(module_cli, tmp_path_factory) -> Path:
    """A 30-step CLI run of the tiny ACT on the embedded task."""
    run_dir = tmp_path_factory.mktemp("act") / "run"
    done = module_cli.run(*TINY, *TINY_ACT, "steps=30", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    return run_dir


def test_cli_training_lowers_the_loss(trained):
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10, 15, 20, 25, 30]
    assert lines[-1]["loss"] < lines[0]["loss"] / 2, [line["loss"] for line in lines]


def test_cli_checkpoint_is_the_folder_lerobot_writes(trained):
    folder = trained / "checkpoints" / "000030" / "pretrained_model"
    assert json.loads((folder / "config.json").read_text()) == json.loads(LEROBOT_CONFIG_TEXT)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {k: f.get_slice(k).get_shape() for k in f.keys()} == \
            {k: spec["shape"] for k, spec in LEROBOT_TINY["state_dict"].items()}
    assert isinstance(policies.from_pretrained(folder), ACTPolicy)


def test_loss_is_masked_l1_plus_weighted_kl_and_ignores_padded_targets():
    policy = make_act(dropout=0.0)
    policy.reports_per_sample_loss = True  # as a mixture's training turns it on
    batch = {**observation(4), "action": torch.randn(4, 10, 2), "action_is_pad": torch.zeros(4, 10, dtype=torch.bool)}
    batch["action_is_pad"][:, 7:] = True
    torch.manual_seed(0)
    loss, metrics = policy(batch)
    assert loss.item() == pytest.approx(metrics["l1_loss"].item() + 10.0 * metrics["kld_loss"].item(), rel=1e-5)
    assert metrics["per_sample_loss"].shape == (4,)  # what a mixture's per-member loss averages
    assert metrics["per_sample_loss"].mean().item() == pytest.approx(loss.item(), rel=1e-5)
    batch["action"] = batch["action"] + 100.0 * batch["action_is_pad"].unsqueeze(-1)
    torch.manual_seed(0)
    assert torch.equal(policy(batch)[0], loss)


# -- acting ----------------------------------------------------------------------------------

def test_select_action_replays_n_action_steps_of_each_chunk():
    policy = make_act(n_action_steps=3).eval()
    obs = observation(2)
    chunk = policy.predict_action_chunk(obs)
    actions = [policy.select_action(obs) for _ in range(3)]
    assert actions[0].shape == (2, 2)
    assert all(torch.equal(actions[i], chunk[:, i]) for i in range(3))
    policy.select_action(observation(2, seed=1))  # the queue is empty: a fresh chunk
    assert len(policy._queue) == 2


def test_temporal_ensembling_averages_every_prediction_for_a_step():
    policy = make_act(n_action_steps=1, temporal_ensemble_coeff=0.5).eval()
    first, second = observation(2, seed=0), observation(2, seed=1)
    chunk1, chunk2 = policy.predict_action_chunk(first), policy.predict_action_chunk(second)
    assert torch.equal(policy.select_action(first), chunk1[:, 0])
    w_old, w_new = 1.0, torch.exp(torch.tensor(-0.5))  # w_i = exp(-coeff * i), oldest first
    expected = (w_old * chunk1[:, 1] + w_new * chunk2[:, 0]) / (w_old + w_new)
    torch.testing.assert_close(policy.select_action(second), expected)
    policy.reset()
    assert torch.equal(policy.select_action(second), chunk2[:, 0])


def test_pretrained_backbone_starts_from_torchvisions_imagenet_weights(monkeypatch):
    torchvision_state = ResNet18(norm="batch_norm").state_dict()  # torchvision's names, fc and counters included
    urls = []

    def fake_download(url, **kwargs):
        urls.append(url)
        assert kwargs["weights_only"] and kwargs["check_hash"]
        return torchvision_state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    policy = make_act(pretrained_backbone_weights="ResNet18_Weights.IMAGENET1K_V1")
    assert urls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    for key, value in policy.model.backbone.state_dict().items():
        assert torch.equal(value, torchvision_state[key]), key


def test_backbone_weights_unavailable_offline_is_a_one_line_error(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"set policy.pretrained_backbone_weights=null"):
        make_act(pretrained_backbone_weights="ResNet18_Weights.IMAGENET1K_V1")


# -- bad input -------------------------------------------------------------------------------

def test_more_action_steps_than_the_chunk_is_a_one_line_cli_error(module_cli, tmp_path):
    done = module_cli.run(*TINY_ACT, "policy.n_action_steps=11", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "robotrain: error: policy.n_action_steps must be in [1, chunk_size=10], got 11"]


@pytest.mark.parametrize("fields, message", [
    ({"temporal_ensemble_coeff": 0.01, "n_action_steps": 5}, "n_action_steps must be 1 with temporal ensembling"),
    ({"vision_backbone": "resnet34"}, "vision_backbone must be 'resnet18'"),
    ({"n_heads": 3}, "n_heads=3 must divide policy.dim_model=512"),
])
def test_bad_config_values_are_one_line_errors(fields, message):
    with pytest.raises(UserError, match=message):
        ACTConfig(**fields)


def test_inputs_without_image_or_environment_state_are_refused():
    with pytest.raises(UserError, match="at least one camera image or observation.environment_state"):
        ACTPolicy(ACTConfig(input_features={"observation.state": {"type": "STATE", "shape": [4]}},
                            output_features={"action": {"type": "ACTION", "shape": [2]}}, pretrained_backbone_weights=None),
                  unit_stats({"observation.state": {"type": "STATE", "shape": [4]},
                              "action": {"type": "ACTION", "shape": [2]}}))
