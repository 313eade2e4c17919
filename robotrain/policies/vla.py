"""What the vision-language-action policies (SmolVLA, pi0, pi0.5) share: their backbone's files
(config and tokenizer, from a Hub repo id or a local folder), the task's tokenization, and
openpi's flow-matching building blocks (LeRobot's `policies/common/vla_utils.py`).

transformers is imported only when one of these policies is built.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from robotrain import global_batch
from robotrain.errors import UserError


def transformers_module(policy: str):
    """transformers, imported on first use (robotrain's other policies never import it)."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"policy={policy} needs transformers: pip install 'robotrain[policies]'") from None
    return transformers


def first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


def check_source(model_id: str, option: str, what: str) -> None:
    """A one-line error for a local-looking path that is not a folder holding config.json or a
    tokenizer; Hub repo ids pass (they are read, or refused, when loaded)."""
    local = Path(model_id).expanduser()
    looks_local = model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1
    if looks_local and not local.is_dir():
        raise UserError(f"{option}={model_id} does not exist; pass a {what} folder or a Hub repo id")


def load_tokenizer(model_id: str, option: str, policy: str):
    """The tokenizer in `model_id` (what LeRobot's `tokenizer_processor` step loads); `option`
    names the setting it came from, for errors."""
    check_source(model_id, option, "tokenizer")
    try:
        tokenizer = transformers_module(policy).AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{option}={model_id}: cannot read its tokenizer ({first_line(err)})") from None
    if tokenizer.pad_token is None:
        raise UserError(f"{option}={model_id}: its tokenizer has no pad token")
    return tokenizer


def tokenize(tokenizer, tasks: list[str] | str, max_length: int, padding: str,
             device: torch.device | str = "cpu", newline: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """LeRobot's `*_new_line_processor` (`newline`: one after each task) then `tokenizer_processor`:
    right padding (`longest` or `max_length`), truncation to `max_length`; (ids, bool mask)."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if newline:
        tasks = [t if t.endswith("\n") else f"{t}\n" for t in tasks]
    tokens = tokenizer(tasks, max_length=max_length, truncation=True, padding=padding, padding_side="right",
                       return_tensors="pt")
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device=device, dtype=torch.bool)


def check_features(config, policy: str) -> tuple[list[str], int]:
    """(camera keys, action size) of a VLA policy's config: at least one camera, a state, and state
    and action sizes within `max_state_dim` / `max_action_dim`; else a one-line error."""
    image_keys = list(config.image_features)
    if not image_keys:
        raise UserError(f"{policy} needs at least one image input (a VISUAL feature); the dataset has none")
    if "observation.state" not in config.input_features:
        raise UserError(f"{policy} needs an 'observation.state' input; the inputs are {sorted(config.input_features)}")
    state_dim = config.input_features["observation.state"]["shape"][-1]
    action_dim = config.output_features["action"]["shape"][-1]
    if state_dim > config.max_state_dim:
        raise UserError(f"policy.max_state_dim={config.max_state_dim} is below the state size {state_dim}")
    if action_dim > config.max_action_dim:
        raise UserError(f"policy.max_action_dim={config.max_action_dim} is below the action size {action_dim}")
    return image_keys, action_dim


def action_loss(policy, losses: torch.Tensor, batch: dict, action_dim: int):
    """(loss, metrics) from per-element flow-matching losses (B, chunk, max_action_dim): the padded
    action dimensions are not targets, nor are actions past the episode end (`action_is_pad`)."""
    losses = losses[:, :, :action_dim]
    is_pad = batch.get("action_is_pad")
    if is_pad is None:
        return losses.mean(), policy._per_sample_loss(losses)
    valid = ~is_pad.unsqueeze(-1)
    return global_batch.masked_mean(losses, valid), policy._per_sample_loss(losses, valid)


def create_sinusoidal_pos_embedding(time: torch.Tensor, dimension: int, min_period: float, max_period: float):
    """Sine-cosine embedding [B, dimension] of scalar times [B]."""
    if dimension % 2:
        raise ValueError(f"dimension ({dimension}) must be divisible by 2")
    dtype = torch.float32 if time.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dimension // 2, dtype=dtype, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    sin_input = (1.0 / period * 2 * math.pi)[None, :] * time[:, None]
    return torch.cat([torch.sin(sin_input), torch.cos(sin_input)], dim=1)


def make_att_2d_masks(pad_masks: torch.Tensor, att_masks: torch.Tensor) -> torch.Tensor:
    """big_vision's masks: a token attends to valid tokens whose cumulative `att_masks` is <= its own."""
    cumsum = torch.cumsum(att_masks, dim=1)
    att_2d = cumsum[:, None, :] <= cumsum[:, :, None]
    return att_2d & (pad_masks[:, None, :] * pad_masks[:, :, None])


def pad_vector(vector: torch.Tensor, new_dim: int) -> torch.Tensor:
    """Zero-pad the last dimension to `new_dim`."""
    if vector.shape[-1] == new_dim:
        return vector
    return F.pad(vector, (0, new_dim - vector.shape[-1]))
