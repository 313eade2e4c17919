"""PEFT: adapters on a pretrained policy, saved as adapter files beside the policy config,
loaded back (robotrain and peft's own PeftModel), resumed bit-exactly, and refused when
they cannot apply."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from robotrain import peft as rpeft
from robotrain import policies
from tests.conftest import TINY, assert_one_line_error, load_tensors
from tests.test_resume import assert_same_tensors

RUN = [*TINY, "steps=20", "checkpoint.every=10", "policy.hidden_dim=32"]


@pytest.fixture(scope="module")
def base_run(module_cli, tmp_path_factory) -> Path:
    """A pretrained MLP policy to fine-tune."""
    run_dir = tmp_path_factory.mktemp("base")
    done = module_cli.run(*RUN, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.fixture(scope="module")
def lora_run(module_cli, base_run, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora")
    done = module_cli.run(*RUN, "peft=lora", "peft.r=4", f"policy.pretrained_path={base_run}", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    return run_dir


def adapter_folder(run_dir: Path, step: int = 20) -> Path:
    return run_dir / "checkpoints" / f"{step:06d}" / "pretrained_model"


def test_a_peft_checkpoint_holds_the_adapter_and_the_policy_config_not_the_base(lora_run, base_run):
    folder = adapter_folder(lora_run)
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "train_config.json"} <= names
    assert "model.safetensors" not in names
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_run) and config["peft_type"] == "LORA" and config["r"] == 4


def test_training_leaves_the_base_weights_unchanged(lora_run, base_run):
    model = policies.from_pretrained(adapter_folder(lora_run))
    base = load_tensors(base_run / "checkpoints" / "000020" / "pretrained_model" / "model.safetensors")
    for name, tensor in base.items():
        module, leaf = name.rsplit(".", 1)
        adapted = model.get_base_model().get_submodule(module)
        adapted = getattr(adapted, "base_layer", adapted)
        assert torch.equal(getattr(adapted, leaf), tensor), name


def test_peft_models_own_loader_reads_the_folder(lora_run, base_run):
    from peft import PeftModel

    folder = adapter_folder(lora_run)
    ours = policies.from_pretrained(folder)
    base = policies.from_pretrained(base_run / "checkpoints" / "000020" / "pretrained_model")
    theirs = PeftModel.from_pretrained(base, str(folder))
    batch = {"observation.state": torch.randn(3, 4), "observation.image": torch.rand(3, 3, 32, 32)}
    assert torch.equal(ours.predict_action_chunk(batch), theirs.predict_action_chunk(batch))


def test_lora_trains_the_expected_number_of_parameters(base_run):
    from robotrain.config import PeftConfig, parse

    cfg = parse({"policy": {"type": "mlp", "hidden_dim": 32, "pretrained_path": str(base_run)},
                 "dataset": {"repo_id": "robotrain/synthetic_reach", "root": None}})
    folder = base_run / "checkpoints" / "000020" / "pretrained_model"
    policy = policies.from_pretrained(folder)
    linears = [m for m in policy.modules() if isinstance(m, torch.nn.Linear)]
    expected = sum(4 * (m.in_features + m.out_features) for m in linears)  # all-linear, r=4, no bias
    adapted = rpeft.apply(policy, PeftConfig(method="lora", r=4), cfg.policy)
    assert rpeft.trainable_parameters(adapted)[0] == expected


def test_peft_resume_is_bit_exact(module_cli, lora_run, base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(lora_run / "checkpoints" / "000010", run_dir / "checkpoints" / "000010")
    done = module_cli.run(*RUN, "peft=lora", "peft.r=4", f"policy.pretrained_path={base_run}",
                          f"hydra.run.dir={run_dir}", "resume=auto")
    assert done.returncode == 0, done.stderr
    for name in ("pretrained_model/adapter_model.safetensors", "training_state/optimizer_state.safetensors"):
        assert_same_tensors(load_tensors(lora_run / "checkpoints" / "000020" / name),
                            load_tensors(run_dir / "checkpoints" / "000020" / name))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_other_adapter_methods_train(module_cli, base_run, tmp_path, method):
    done = module_cli.run(*TINY, "steps=5", "policy.hidden_dim=32", f"peft={method}",
                          f"policy.pretrained_path={base_run}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    config = json.loads((adapter_folder(tmp_path / "run", 5) / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()


def test_an_adapter_folder_as_pretrained_path_continues_training_that_adapter(module_cli, lora_run, tmp_path):
    done = module_cli.run(*TINY, "steps=5", "policy.hidden_dim=32", "peft=lora", "peft.r=4",
                          f"policy.pretrained_path={adapter_folder(lora_run)}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert (adapter_folder(tmp_path / "run", 5) / "adapter_model.safetensors").is_file()


BAD_PEFT = {
    "peft on a policy trained from scratch": (["peft=lora"], "policy.pretrained_path"),
    # Refused before ACT would fetch its ImageNet backbone, or SmolVLA its VLM's tokenizer.
    "peft on act from scratch": (["policy=act", "peft=lora"], "peft=lora adapts a pretrained policy"),
    "peft on smolvla from scratch": (["policy=smolvla", "peft=lora"], "peft=lora adapts a pretrained policy"),
    "unknown peft method": (["peft.method=dora"], "peft.method must be"),
    "target modules matching nothing": (["peft=lora", "peft.target_modules=[no_such_layer]", "PRETRAINED"],
                                        "matches no module"),
    "pretrained path that is not a policy": (["policy.pretrained_path=/tmp"], "holds no pretrained_model"),
    "pretrained policy of another type": (["policy=act", "PRETRAINED"], "holds a mlp policy, not act"),
    "lora init for loha": (["peft=loha", "peft.init_type=pissa"], "is for LoRA"),
}


@pytest.mark.parametrize("case", sorted(BAD_PEFT))
def test_bad_peft_input_is_one_line(cli, base_run, tmp_path, case):
    overrides, expected = BAD_PEFT[case]
    overrides = [f"policy.pretrained_path={base_run}" if o == "PRETRAINED" else o for o in overrides]
    if not any(o.startswith("policy=") for o in overrides):
        overrides = ["policy.hidden_dim=32", *overrides]
    done = cli.run(*TINY, "steps=3", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, expected)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_peft_run_pushes_the_adapter_not_the_base_weights(module_cli, hub, base_run, tmp_path):
    repo = "user/peft-push"
    env = {**module_cli.env, **hub.env}
    cli = type(module_cli)(env=env, cwd=tmp_path)
    done = cli.run(*TINY, "steps=5", "policy.hidden_dim=32", "peft=lora", f"policy.pretrained_path={base_run}",
                   f"hub.repo_id={repo}", "hub.push_checkpoints=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    files = hub.run_json(f"from huggingface_hub import HfApi; import json; print(json.dumps(HfApi().list_repo_files({repo!r})))")
    assert "adapter_model.safetensors" in files and "config.json" in files
    assert not any(f.endswith("model.safetensors") and "adapter" not in f for f in files)
    card = hub.run_json(f"from huggingface_hub import hf_hub_download; import json; "
                        f"print(json.dumps(open(hf_hub_download({repo!r}, 'README.md')).read()))")
    assert "adapter_model.safetensors" in card and "model.safetensors" not in card.replace("adapter_model.safetensors", "")


TINY_POLICIES = {
    "act": {"dim_model": 32, "n_heads": 2, "dim_feedforward": 64, "n_encoder_layers": 1, "n_decoder_layers": 1,
            "n_vae_encoder_layers": 1, "latent_dim": 8, "pretrained_backbone_weights": None},
    "diffusion": {"crop_shape": [28, 28], "down_dims": [64, 128], "horizon": 8, "n_action_steps": 4},
}


def lora_size(module: torch.nn.Module, r: int) -> int:
    """Parameters LoRA adds to one Linear or Conv1d (A: in -> r over the kernel, B: r -> out)."""
    if isinstance(module, torch.nn.Conv1d):
        return r * module.in_channels * module.kernel_size[0] + module.out_channels * r
    return r * (module.in_features + module.out_features)


@pytest.mark.parametrize("policy_type", sorted(TINY_POLICIES))
def test_each_policys_lora_default_trains_the_expected_parameters(policy_type):
    import re

    from robotrain.config import PeftConfig, parse
    from robotrain.data.metadata import load_meta

    meta = load_meta(Path(__file__).parent / "data" / "lerobot_v3_tiny")
    cfg = parse({"policy": {"type": policy_type, **TINY_POLICIES[policy_type], "pretrained_path": "x"},
                 "dataset": {"repo_id": "user/tiny", "root": "x"}})
    scratch = parse({"policy": {"type": policy_type, **TINY_POLICIES[policy_type]},
                     "dataset": {"repo_id": "user/tiny", "root": "x"}})
    policy = policies.make(scratch.policy, meta.features, meta.stats)
    defaults = policy.peft_defaults()
    adapted = [m for n, m in policy.named_modules() if re.fullmatch(defaults["target_modules"], n)]
    saved = sum(p.numel() for n in defaults["modules_to_save"] for p in policy.get_submodule(n).parameters())
    expected = sum(lora_size(m, 4) for m in adapted) + saved
    model = rpeft.apply(policy, PeftConfig(method="lora", r=4), cfg.policy)
    assert adapted and rpeft.trainable_parameters(model)[0] == expected


@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["defaults", "all-linear"])
@pytest.mark.parametrize("policy_type", sorted(TINY_POLICIES))
def test_every_adapter_parameter_gets_a_gradient(policy_type, targets):
    """An adapter the forward pass never reaches (nn.MultiheadAttention's out_proj) would not
    train, and DDP would stop on its unused parameters."""
    from torch.utils.data import default_collate

    from robotrain.config import PeftConfig, parse
    from robotrain.data import LeRobotDataset
    from robotrain.data.metadata import load_meta

    root = Path(__file__).parent / "data" / "lerobot_v3_tiny"
    meta = load_meta(root)
    fields = {"policy": {"type": policy_type, **TINY_POLICIES[policy_type]}, "dataset": {"repo_id": "user/tiny", "root": "x"}}
    policy = policies.make(parse(fields).policy, meta.features, meta.stats)
    fields["policy"]["pretrained_path"] = "x"
    model = rpeft.apply(policy, PeftConfig(method="lora", r=4, target_modules=targets), parse(fields).policy)
    dataset = LeRobotDataset("user/tiny", root=root, delta_timestamps=policy.config.delta_timestamps(meta.fps))
    loss, _ = model(default_collate([dataset[i] for i in range(2)]))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_a_peft_run_resumes_from_the_hub_bit_exactly(module_cli, hub, base_run, lora_run, tmp_path):
    repo = "user/peft-resume"
    cli = type(module_cli)(env={**module_cli.env, **hub.env}, cwd=tmp_path)
    lora = ["peft=lora", "peft.r=4", f"policy.pretrained_path={base_run}"]
    pushed = cli.run(*RUN, *lora, f"hub.repo_id={repo}", "hub.push_checkpoints=true", f"hydra.run.dir={tmp_path / 'a'}")
    assert pushed.returncode == 0, pushed.stderr
    resumed = cli.run(*RUN, *lora, "hub.push_checkpoints=false", "hub.push_final=false",
                      f"resume=hub:{repo}@10", f"hydra.run.dir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("pretrained_model/adapter_model.safetensors", "training_state/optimizer_state.safetensors"):
        assert_same_tensors(load_tensors(tmp_path / "a" / "checkpoints" / "000020" / name),
                            load_tensors(tmp_path / "b" / "checkpoints" / "000020" / name))


def test_policy_features_the_dataset_lacks_are_refused_in_one_line(cli, tmp_path):
    done = cli.run(*TINY, "steps=3", "+policy.input_features={observation.velocity:{type:STATE,shape:[3]}}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    line = assert_one_line_error(done, "'observation.velocity' is not in the dataset")
    assert "unset policy.input_features" in line
