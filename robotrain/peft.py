"""Parameter-efficient fine-tuning with the `peft` library: LoRA, LoHa and LoKr adapters on a
pretrained policy.

Users choose `peft.method`, `peft.r` and `peft.init_type`; which modules are adapted and
which are trained in full come from the policy (`Policy.peft_defaults()`), unless
`peft.target_modules` / `peft.modules_to_save` say otherwise (`all-linear` adapts every
linear layer).

A PEFT run's pretrained_model/ folder holds `adapter_config.json` + `adapter_model.safetensors`
(never merged into the base) beside the policy's `config.json`, processor files and
`train_config.json`; `adapter_config.json` names the base model (`base_model_name_or_path`,
`revision`), so `peft.PeftModel.from_pretrained(policy, folder)` works on it, and
`policy.pretrained_path=<that folder>` loads base + adapter.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from robotrain.errors import UserError

log = logging.getLogger("robotrain")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft_config(cfg, targets, modules_to_save, exclude):
    import peft

    common = {"target_modules": targets, "modules_to_save": modules_to_save or None, "exclude_modules": exclude or None}
    init = cfg.init_type if cfg.init_type != "default" else True
    if cfg.method == "lora":
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights=init, **common)
    if cfg.method == "loha":
        return peft.LoHaConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, init_weights=init, **common)
    if cfg.method == "lokr":
        return peft.LoKrConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, init_weights=init, **common)
    raise UserError(f"peft.method {cfg.method!r} is unknown; use none, lora, loha or lokr")


def apply(policy: nn.Module, cfg, policy_cfg) -> nn.Module:
    """Wrap `policy` with an adapter (a `peft.PeftModel`); returns it unchanged for method none.
    An adapted result (also a policy loaded from an adapter folder) says how much it trains."""
    model = _adapt(policy, cfg, policy_cfg)
    if is_adapted(model):
        log.info("%s adapters: %d of %d parameters trainable", model.peft_config["default"].peft_type.value.lower(),
                 *trainable_parameters(model))
    return model


def _adapt(policy: nn.Module, cfg, policy_cfg) -> nn.Module:
    if cfg.method == "none":
        return policy
    if not policy_cfg.pretrained_path:
        raise UserError(f"peft={cfg.method} adapts a pretrained policy: set policy.pretrained_path=<folder or repo id>")
    from peft import get_peft_model

    if is_adapted(policy):  # policy.pretrained_path was an adapter folder: keep training that adapter
        return policy
    defaults = policy.peft_defaults()
    targets = cfg.target_modules if cfg.target_modules is not None else defaults["target_modules"]
    to_save = cfg.modules_to_save if cfg.modules_to_save is not None else defaults["modules_to_save"]
    config = _peft_config(cfg, targets, to_save, _unadaptable(policy))
    try:
        model = get_peft_model(policy, config)
    except ValueError as err:  # peft's "Target modules ... not found in the base model"
        raise UserError(f"peft.target_modules={targets!r} matches no module of policy {policy_cfg.type} "
                        f"({' '.join(str(err).split())[:160]})") from None
    # get_peft_model overwrites these with the module's (absent) name: keep the base's identity.
    model.peft_config["default"].base_model_name_or_path = policy_cfg.pretrained_path
    model.peft_config["default"].revision = policy_cfg.pretrained_revision
    return model


def _unadaptable(policy: nn.Module) -> list[str]:
    """Linear layers an adapter would never reach: nn.MultiheadAttention reads its `out_proj`
    weight directly instead of calling it, so an adapter there gets no gradient (and DDP stops
    on the unused parameter). Excluded whatever peft.target_modules says."""
    return [f"{name}.out_proj" if name else "out_proj" for name, module in policy.named_modules()
            if isinstance(module, nn.MultiheadAttention)]


def is_adapted(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # nothing can be adapted, and plain runs never import peft
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)  # also once FSDP has subclassed it (FSDPPeftModel)


def base_policy(model: nn.Module) -> nn.Module:
    """The policy itself: under an adapter, the base model PEFT wraps; else `model`."""
    return model.get_base_model() if is_adapted(model) else model


def load_adapter(policy: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    """`policy` (holding the base weights) with the adapter saved in `directory`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(policy, str(directory), is_trainable=trainable)


def save_pretrained(model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A PEFT policy's pretrained_model/ folder: adapter files + the policy's config and processors.

    `state_dict` is the full (e.g. FSDP-gathered) state dict to take the adapter from."""
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    model.get_base_model().save_metadata(directory)  # no model.safetensors: the base stays where it came from
    adapter = get_peft_model_state_dict(model, state_dict=state_dict)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(directory / ADAPTER_WEIGHTS))
    model.peft_config["default"].save_pretrained(str(directory))


def pretrained_writer(model: nn.Module):
    """What writes `model`'s pretrained_model/ folder: `(folder, state_dict=None) -> None`; the
    adapter files for an adapted model, the policy's own save_pretrained otherwise."""
    from functools import partial

    return partial(save_pretrained, model) if is_adapted(model) else model.save_pretrained


def read_weights(model: nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    """The weights a pretrained_model/ folder holds for `model`: the adapter's for an adapted
    model, the whole (consolidated) model's otherwise (a one-line error if missing or corrupt)."""
    from robotrain.checkpoint import load_safetensors

    return load_safetensors(Path(directory) / (ADAPTER_WEIGHTS if is_adapted(model) else "model.safetensors"))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str = "the checkpoint") -> None:
    """Weights from `read_weights` into `model` (resume); a mismatch is a one-line error."""
    if not is_adapted(model):
        from robotrain.checkpoint import load_weights_strictly

        load_weights_strictly(model, state, source)
        return
    from peft import set_peft_model_state_dict

    unexpected = getattr(set_peft_model_state_dict(model, state), "unexpected_keys", [])
    if unexpected:
        raise UserError(f"the adapter in {source} does not fit this policy (unexpected {unexpected[:3]}); "
                        "resume with the peft settings it was trained with")


def adapter_base(directory: Path) -> tuple[str, str | None]:
    """(base model path or repo id, revision) recorded in an adapter folder."""
    config: dict[str, Any] = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{directory}/{ADAPTER_CONFIG} does not name its base model (base_model_name_or_path)")
    return base, config.get("revision")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
