"""pi0 and pi0.5 (issue 18): LeRobot 0.6.1's keys, config and processor files; the tiny
(`dummy`) variant trains, saves, loads and samples; the computation follows LeRobot's.

The real variants (gemma_300m / gemma_2b, ~1.8-3.5 B parameters) are built on the meta device
only, to compare their state dicts with the lists LeRobot 0.6.1 wrote
(tests/data/lerobot_keys/pi0*_gemma300m_*.json); everything that runs uses the dummy variant.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from robotrain import global_batch, policies
from robotrain.policies.pi0 import KEEP_FLOAT32, PI0Config, PI05Config, PI0Policy, PI05Policy
from tests.conftest import REPO_ROOT, assert_one_line_error
from tests.paligemma_tiny import PI0_TINY, build_tiny_paligemma_tokenizer

KEYS = REPO_ROOT / "tests" / "data" / "lerobot_keys"
CLASSES = {"pi0": (PI0Policy, PI0Config), "pi05": (PI05Policy, PI05Config)}
STATS_NAMES = ("mean", "std", "min", "max", "q01", "q99", "q10", "q90")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(build_tiny_paligemma_tokenizer(tmp_path_factory.mktemp("paligemma") / "tokenizer"))


def stats(dim: int = 6) -> dict:
    low = {"mean", "min", "q01", "q10"}
    return {key: {name: torch.full((dim,), -1.0 if name in low else 1.0) if name != "mean" else torch.zeros(dim)
                  for name in STATS_NAMES} for key in ("observation.state", "action")}


def tiny(kind: str, tokenizer: str, **fields):
    policy_cls, config_cls = CLASSES[kind]
    config = config_cls(
        input_features={"observation.state": {"type": "STATE", "shape": [6]},
                        "observation.images.cam0": {"type": "VISUAL", "shape": [3, 32, 32]}},
        output_features={"action": {"type": "ACTION", "shape": [6]}},
        paligemma_variant="dummy", action_expert_variant="dummy", tokenizer_name=tokenizer,
        image_resolution=[28, 28], chunk_size=5, n_action_steps=5, num_inference_steps=3, tokenizer_max_length=24,
        **fields)
    torch.manual_seed(0)
    return policy_cls(config, stats())


def batch(n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"observation.state": torch.randn(n, 6, generator=g) * 0.5,
            "observation.images.cam0": torch.rand(n, 3, 32, 32, generator=g),
            "action": torch.randn(n, 5, 6, generator=g), "action_is_pad": torch.zeros(n, 5, dtype=torch.bool),
            "task": ["pick up the red cube", "open the drawer"][:n] * (n // 2 or 1)}


def reference_build(kind: str, tokenizer: str, **fields):
    """LeRobot's gemma_300m configuration (one 224x224 camera, state and action of 6), on meta."""
    reference = json.loads((KEYS / f"{kind}_gemma300m_config.json").read_text())
    policy_cls, config_cls = CLASSES[kind]
    config = config_cls(input_features=reference["input_features"], output_features=reference["output_features"],
                        paligemma_variant="gemma_300m", action_expert_variant="gemma_300m", tokenizer_name=tokenizer,
                        **fields)
    with torch.device("meta"):
        return policy_cls(config, stats()), reference


@pytest.mark.parametrize("kind", CLASSES)
def test_state_dict_keys_shapes_and_dtypes_are_lerobots(kind, tokenizer):
    policy, _ = reference_build(kind, tokenizer)
    ours = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in policy.state_dict().items()}
    theirs = json.loads((KEYS / f"{kind}_gemma300m_keys.json").read_text())
    assert sorted(set(ours) ^ set(theirs)) == []
    assert ours == theirs


@pytest.mark.parametrize("kind", CLASSES)
def test_bfloat16_keeps_lerobots_float32_parts(kind, tokenizer):
    policy, _ = reference_build(kind, tokenizer, dtype="bfloat16")
    dtypes = {k: v.dtype for k, v in policy.model.paligemma_with_expert.state_dict().items()}
    kept = {k for k in dtypes if any(part in k for part in KEEP_FLOAT32)}
    assert kept and all(dtypes[k] == torch.float32 for k in kept)
    assert all(dtypes[k] == torch.bfloat16 for k in dtypes if k not in kept)
    assert policy.model.action_in_proj.weight.dtype == torch.float32  # outside the backbone: float32


@pytest.mark.parametrize("kind", CLASSES)
def test_written_config_json_is_lerobots(kind, tokenizer):
    policy, reference = reference_build(kind, tokenizer)
    written = policy.config.to_lerobot_dict()
    assert list(written) == list(reference)
    assert {k: v for k, v in written.items() if v != reference[k]} == {"push_to_hub": False}


@pytest.mark.parametrize("kind", CLASSES)
def test_lerobots_config_json_loads(kind, tokenizer, tmp_path):
    (tmp_path / "config.json").write_text((KEYS / f"{kind}_gemma300m_config.json").read_text())
    config = policies.load_config(tmp_path)
    assert type(config) is CLASSES[kind][1] and config.paligemma_variant == "gemma_300m"
    assert config.tokenizer_name == "google/paligemma-3b-pt-224"  # LeRobot's, absent a processor file


@pytest.mark.parametrize("kind, steps", [
    ("pi0", ["rename_observations_processor", "to_batch_processor", "pi0_new_line_processor", "tokenizer_processor",
             "device_processor", "relative_actions_processor", "normalizer_processor"]),
    ("pi05", ["rename_observations_processor", "to_batch_processor", "relative_actions_processor",
              "normalizer_processor", "pi05_prepare_state_tokenizer_processor_step", "tokenizer_processor",
              "device_processor"]),
])
def test_processor_files_are_lerobots_pipeline(kind, steps, tokenizer, tmp_path):
    policy = tiny(kind, tokenizer)
    policy.save_pretrained(tmp_path)
    pre = json.loads((tmp_path / "policy_preprocessor.json").read_text())["steps"]
    assert [s["registry_name"] for s in pre] == steps
    normalizer = steps.index("normalizer_processor")
    assert pre[normalizer]["state_file"] == f"policy_preprocessor_step_{normalizer}_normalizer_processor.safetensors"
    assert (tmp_path / pre[normalizer]["state_file"]).is_file()
    post = json.loads((tmp_path / "policy_postprocessor.json").read_text())["steps"]
    assert [s["registry_name"] for s in post] == ["unnormalizer_processor", "absolute_actions_processor",
                                                  "device_processor"]
    token_step = next(s for s in pre if s["registry_name"] == "tokenizer_processor")["config"]
    assert token_step["tokenizer_name"] == tokenizer and token_step["padding"] == "max_length"


@pytest.mark.parametrize("kind", CLASSES)
def test_save_and_load_round_trip_gives_identical_actions(kind, tokenizer, tmp_path):
    policy = tiny(kind, tokenizer).eval()
    policy.save_pretrained(tmp_path)
    loaded = policies.from_pretrained(tmp_path)  # the tokenizer comes back from the processor file
    assert type(loaded) is type(policy) and loaded.config.tokenizer_name == tokenizer
    obs = {k: v for k, v in batch().items() if not k.startswith("action")}
    torch.manual_seed(3)
    ours = policy.predict_action_chunk(obs)
    torch.manual_seed(3)
    assert torch.equal(loaded.predict_action_chunk(obs), ours)
    assert ours.shape == (2, 5, 6)


@pytest.mark.parametrize("kind", CLASSES)
def test_sampling_noise_is_lerobots_draw(kind, tokenizer):
    """The same seed gives the same chunk as passing LeRobot's noise draw explicitly."""
    policy = tiny(kind, tokenizer).eval()
    obs = policy._normalize({k: v for k, v in batch().items() if not k.startswith("action")}, with_targets=False)
    torch.manual_seed(5)
    drawn = policy.predict_chunk(obs)
    torch.manual_seed(5)
    noise = torch.normal(mean=0.0, std=1.0, size=(2, 5, 32), dtype=torch.float32)  # LeRobot's sample_noise
    images, img_masks, tokens, masks, state = policy._inputs(obs)
    explicit = policy.model.sample_actions(images, img_masks, tokens, masks, state, noise=noise)[:, :, :6]
    assert torch.equal(drawn, explicit)


@pytest.mark.parametrize("kind", CLASSES)
def test_training_draws_noise_then_beta_times_as_lerobot(kind, tokenizer):
    policy = tiny(kind, tokenizer)
    seen = {}
    forward = policy.model.forward

    def spy(*args):
        seen["noise"], seen["time"] = args[-2], args[-1]
        return forward(*args)

    policy.model.forward = spy
    torch.manual_seed(7)
    policy(batch())
    torch.manual_seed(7)
    noise = torch.normal(mean=0.0, std=1.0, size=(2, 5, 32), dtype=torch.float32)
    beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0)).sample((2,))
    assert torch.equal(seen["noise"], noise)
    assert torch.equal(seen["time"], (beta * 0.999 + 0.001).to(torch.float32))


@pytest.mark.parametrize("kind", CLASSES)
def test_the_prefix_cache_gives_the_joint_forward_velocity(kind, tokenizer):
    """Sampling runs the prefix once and the suffix against its cached keys/values; that must be
    the velocity of a full forward over prefix and suffix (what training computes)."""
    policy = tiny(kind, tokenizer).eval()
    model = policy.model
    obs = policy._normalize({k: v for k, v in batch().items() if not k.startswith("action")}, with_targets=False)
    images, img_masks, tokens, masks, state = policy._inputs(obs)
    x_t, time = torch.randn(2, 5, 32), torch.tensor([0.7, 0.3])
    prefix = model.embed_prefix(images, img_masks, tokens, masks)
    cache = {}
    from robotrain.policies.pi0 import attention_mask_4d, make_att_2d_masks
    model.paligemma_with_expert(attention_mask_4d(make_att_2d_masks(prefix[1], prefix[2])),
                                torch.cumsum(prefix[1], dim=1) - 1, [prefix[0], None], kv_cache=cache,
                                fill_kv_cache=True)
    cached = model.denoise_step(state, prefix[1], cache, x_t, time)
    suffix, suffix_pad, suffix_att, cond = model.embed_suffix(state, x_t, time)
    pad = torch.cat([prefix[1], suffix_pad], dim=1)
    att = torch.cat([prefix[2], suffix_att], dim=1)
    _, out = model.paligemma_with_expert(attention_mask_4d(make_att_2d_masks(pad, att)), torch.cumsum(pad, 1) - 1,
                                         [prefix[0], suffix], adarms_cond=(None, cond))
    joint = model.action_out_proj(out[:, -5:].float())
    torch.testing.assert_close(cached, joint, rtol=1e-5, atol=1e-5)


def test_the_cached_prefix_pass_is_transformers_gemma_layers(tokenizer):
    """LeRobot runs the prefix through transformers' GemmaAttention.forward (PiGemmaModel); the
    joint-layer code must compute the same thing for the prefix alone."""
    from transformers.models.gemma import modeling_gemma

    policy = tiny("pi0", tokenizer).eval()
    pwe = policy.model.paligemma_with_expert
    lm = pwe.language_model
    hidden = torch.randn(2, 7, 64)
    pad = torch.ones(2, 7, dtype=torch.bool)
    from robotrain.policies.pi0 import attention_mask_4d, make_att_2d_masks
    mask = attention_mask_4d(make_att_2d_masks(pad, torch.zeros(2, 7)))
    positions = torch.cumsum(pad, dim=1) - 1
    ours, _ = pwe(mask, positions, [hidden, None])
    lm.config._attn_implementation = "eager"
    cos_sin = lm.rotary_emb(hidden, positions)
    expected = hidden
    for layer in lm.layers:  # LeRobot's _PiGemmaDecoderLayerBase.forward
        normed, _ = layer.input_layernorm(expected)
        attn, _ = layer.self_attn(normed, position_embeddings=cos_sin, attention_mask=mask)
        expected = expected + attn
        normed, _ = layer.post_attention_layernorm(expected)
        expected = expected + layer.mlp(normed)
    expected, _ = lm.norm(expected)
    assert isinstance(lm.layers[0].self_attn, modeling_gemma.GemmaAttention)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_pi05_puts_the_discretized_state_in_the_prompt(tokenizer):
    policy = tiny("pi05", tokenizer)
    prompts = policy.prompts({"task": ["pick_up the cube\n"], "observation.state": torch.tensor([[-1.0, 0.0, 0.999,
                                                                                                 -0.5, 0.5, 2.0]])})
    assert prompts == ["Task: pick up the cube, State: 0 128 255 64 192 255;\nAction: "]


def test_pi0_tokenizes_the_task_with_a_newline_and_pads_to_max_length(tokenizer):
    policy = tiny("pi0", tokenizer)
    _, _, tokens, masks, _ = policy._inputs(batch())
    assert tokens.shape == (2, 24) and masks[:, 0].all() and not masks[:, -1].any()
    text = policy.tokenizer.decode(tokens[0][masks[0]], skip_special_tokens=True)
    assert text.strip() == "pick up the red cube" and text.endswith("\n")


def test_loss_ignores_padded_targets(tokenizer):
    policy = tiny("pi0", tokenizer)
    data = batch()
    with global_batch.step(0, 1):
        clean, _ = policy(data)
    data["action"][:, -2:] = 1e3
    data["action_is_pad"][:, -2:] = True
    with global_batch.step(0, 1):
        padded, _ = policy(data)
    assert torch.isfinite(padded) and abs(padded.item() - clean.item()) < 0.5 * clean.item() + 1.0


@pytest.mark.parametrize("kind", CLASSES)
def test_an_empty_camera_is_an_input_no_batch_holds(kind, tokenizer):
    """LeRobot's empty_cameras: image inputs the robot lacks; the policy trains and acts without
    them in the batch (each is an all -1 image with a false mask)."""
    policy = tiny(kind, tokenizer, empty_cameras=1)
    assert "observation.images.empty_camera_0" in policy.config.input_features
    with global_batch.step(0, 1):
        loss, _ = policy(batch())
    assert torch.isfinite(loss)
    policy.eval()
    with torch.no_grad():
        assert policy.predict_action_chunk(batch()).shape == (2, 5, 6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer):
    results = []
    for recompute in (False, True):
        policy = tiny("pi0", tokenizer, gradient_checkpointing=recompute).train()
        with global_batch.step(0, 1):
            loss, _ = policy(batch())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and len(grads_a) > 50
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6)


def test_an_openpi_converted_file_loads(tokenizer, tmp_path):
    """lerobot/pi0_base-style files: time MLP under openpi's names, no language-model embedding."""
    policy = tiny("pi0", tokenizer)
    policy.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    state = {k.replace("model.action_time_mlp_", "model.time_mlp_"): v for k, v in state.items()
             if "language_model.embed_tokens" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = policies.from_pretrained(tmp_path)
    embed = loaded.model.paligemma_with_expert.language_model.embed_tokens.weight
    assert torch.equal(embed, policy.model.paligemma_with_expert.paligemma.lm_head.weight.detach())
    assert torch.equal(loaded.model.action_time_mlp_in.weight, policy.model.action_time_mlp_in.weight.detach())


@pytest.mark.parametrize("fields, message", [
    ({"paligemma_variant": "gemma_7b"}, "policy.paligemma_variant must be one of"),
    ({"paligemma_variant": "dummy"}, "cannot attend jointly"),
    ({"dtype": "float16"}, "policy.dtype must be bfloat16 or float32"),
    ({"image_resolution": [224, 160]}, "policy.image_resolution must be square"),
    ({"use_relative_actions": True}, "use_relative_actions=true is not supported"),
    ({"rtc_config": {"enabled": True}}, "real-time chunking is not supported"),
    ({"normalization_mapping": {"STATE": "QUANTILE5"}}, "policy.normalization_mapping.STATE must be one of"),
])
def test_bad_config_values_are_refused(fields, message):
    from robotrain.errors import UserError

    with pytest.raises(UserError, match=message):
        PI0Config(**fields)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from robotrain.errors import UserError
    from robotrain.policies.pi0 import DUMMY_VOCAB_SIZE

    words = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(DUMMY_VOCAB_SIZE)}}
    big = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "unk_token": "<unk>"}))
    with pytest.raises(UserError, match=f"has {DUMMY_VOCAB_SIZE + 2} tokens, more than the {DUMMY_VOCAB_SIZE}"):
        tiny("pi0", str(tmp_path))


@pytest.mark.parametrize("kind", CLASSES)
def test_cli_trains_offline_saves_and_loads(kind, cli, tmp_path, tokenizer):
    run_dir = tmp_path / "run"
    done = cli.run(f"policy={kind}", f"policy.tokenizer_name={tokenizer}", *PI0_TINY, "dataset.synthetic.num_episodes=8",
                   "batch_size=4", "eval.enabled=false", "steps=6", "log_every=3", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    pretrained = run_dir / "checkpoints" / "000006" / "pretrained_model"
    assert json.loads((pretrained / "config.json").read_text())["type"] == kind
    loaded = policies.from_pretrained(pretrained)
    assert loaded.config.tokenizer_name == tokenizer
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(map(lambda x: x == x, losses))


def test_peft_on_a_scratch_pi0_is_refused_before_anything_is_built(cli, tmp_path, tokenizer):
    done = cli.run("policy=pi0", "policy.tokenizer_name=/nonexistent/tokenizer", "peft=lora", *PI0_TINY,
                   "eval.enabled=false", "steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, "peft=lora adapts a pretrained policy: set policy.pretrained_path")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_tokenizer_folder_is_a_one_line_error(cli, tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    done = cli.run("policy=pi0", f"policy.tokenizer_name={missing}", *PI0_TINY, "dataset.synthetic.num_episodes=4",
                   "eval.enabled=false", "steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, f"policy.tokenizer_name={missing} does not exist")


@pytest.mark.slow
def test_fsdp_shards_pi0_to_half_per_process_with_gradient_checkpointing(cli, tmp_path, tokenizer):
    """Two processes under FSDP: every parameter tensor is sharded and the main process holds
    about half the parameter bytes; recomputing the decoder layers works on the shards."""
    run_dir = tmp_path / "run"
    done = cli.run("policy=pi0", f"policy.tokenizer_name={tokenizer}", *PI0_TINY, "policy.gradient_checkpointing=true",
                   "distributed.processes=2", "distributed.strategy=fsdp", "dataset.synthetic.num_episodes=8",
                   "batch_size=2", "eval.enabled=false", "steps=2", "log_every=1", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"FSDP: (\d+) of (\d+) parameter tensors sharded .* holds ([\d.]+) of the ([\d.]+) MB",
                      done.stdout + done.stderr)
    assert match, done.stderr[-2000:]
    sharded, count, local, total = int(match[1]), int(match[2]), float(match[3]), float(match[4])
    assert sharded == count > 100
    assert 0.45 < local / total < 0.55, (local, total)
    # Each process saved its own shard of model and AdamW state: about half of the bytes each.
    shards = sorted((run_dir / "checkpoints" / "000002" / "training_state" / "dcp").glob("*.safetensors"))
    sizes = [shard.stat().st_size for shard in shards]
    assert len(sizes) == 2 and all(0.4 < size / sum(sizes) < 0.6 for size in sizes), sizes
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss == loss for loss in losses)


@pytest.mark.slow
def test_bfloat16_trains_saves_lerobots_dtypes_and_resumes_bit_exactly(cli, tmp_path, tokenizer):
    import shutil

    from safetensors.torch import load_file

    args = ["policy=pi0", f"policy.tokenizer_name={tokenizer}", *PI0_TINY, "policy.dtype=bfloat16",
            "dataset.synthetic.num_episodes=8", "batch_size=4", "eval.enabled=false", "steps=4", "checkpoint.every=2"]
    done = cli.run(*args, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(tmp_path / "run" / "checkpoints" / "000002", tmp_path / "resumed" / "checkpoints" / "000002")
    done = cli.run(*args, f"hydra.run.dir={tmp_path / 'resumed'}", "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    whole, resumed = (load_file(str(tmp_path / d / "checkpoints" / "000004" / "pretrained_model" / "model.safetensors"))
                      for d in ("run", "resumed"))
    backbone = [k for k in whole if ".paligemma_with_expert." in k]
    assert all(whole[k].dtype == (torch.float32 if any(p in k for p in KEEP_FLOAT32) else torch.bfloat16)
               for k in backbone)
    assert all(whole[k].dtype == torch.float32 for k in whole if k not in backbone)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_lerobots_gemma_300m_vlm_cannot_run_and_says_so(tokenizer):
    """LeRobot's gemma_300m PaliGemma (used for its key lists) projects images to 2048 values for
    a 1024-wide language model: a one-line error instead of a shape mismatch deep in torch.cat."""
    from robotrain.errors import UserError

    policy = tiny("pi0", tokenizer)
    model = policy.model
    images = [torch.zeros(1, 3, 28, 28)]
    wide = lambda img: torch.zeros(1, 4, 128)  # noqa: E731  (the image tokens of a 2x wider projection)
    model.paligemma_with_expert.embed_image = wide
    with pytest.raises(UserError, match="cannot run: LeRobot's layout projects images to 128 values for a 64-wide"):
        model.embed_prefix(images, [torch.ones(1, dtype=torch.bool)], torch.zeros(1, 3, dtype=torch.long),
                           torch.ones(1, 3, dtype=torch.bool))
