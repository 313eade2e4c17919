"""LoRA fine-tuning of a tiny pretrained SmolVLA from the command line, offline, with the
policy's own adapter defaults (LeRobot's: the action expert's q/v projections and the
state/action/time projections)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from robotrain import peft as rpeft
from robotrain import policies
from robotrain.config import PeftConfig
from tests.conftest import TINY as TINY_RUN
from tests.test_policy_smolvla import TINY_CLI, tiny_vlm  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def pretrained(module_cli, tiny_vlm, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("smolvla_base")
    done = module_cli.run("policy=smolvla", f"policy.vlm_model_name={tiny_vlm}", *TINY_CLI, *TINY_RUN,
                          "batch_size=4", "steps=2", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "checkpoints" / "000002" / "pretrained_model"


def test_smolvla_default_adapts_the_expert_attention_and_the_projections(pretrained):
    policy = policies.from_pretrained(pretrained)
    pattern = policy.peft_defaults()["target_modules"]
    targeted = [m for name, m in policy.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, name)]
    assert targeted and all(any(k in name for k in ("lm_expert", "proj", "mlp"))
                            for name, m in policy.named_modules() if m in targeted)
    cfg = policy.config
    cfg.pretrained_path = str(pretrained)
    adapted = rpeft.apply(policy, PeftConfig(method="lora", r=16), cfg)
    assert rpeft.trainable_parameters(adapted)[0] == sum(16 * (m.in_features + m.out_features) for m in targeted)


def test_lora_fine_tune_of_a_pretrained_smolvla_runs_from_the_cli(cli, tiny_vlm, pretrained, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    done = cli.run("policy=smolvla", f"policy.vlm_model_name={tiny_vlm}", *TINY_CLI, *TINY_RUN, "batch_size=4",
                   "steps=4", "peft=lora", f"policy.pretrained_path={pretrained}", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = run_dir / "checkpoints" / "000004" / "pretrained_model"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(pretrained)
    assert not (folder / "model.safetensors").exists()
    assert "lora adapters:" in done.stdout + done.stderr
