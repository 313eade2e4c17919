"""SmolVLA: a SmolVLM backbone plus a flow-matching action expert (LeRobot's `smolvla`).

Checkpoint-compatible with LeRobot 0.4.4 both ways:

- `config.json` has LeRobot's `SmolVLAConfig` keys in LeRobot's order (`to_lerobot_dict`), and
  every field LeRobot writes is accepted when loading one.
- `model.safetensors` keys and shapes are LeRobot's: `model.vlm_with_expert.vlm.model.{vision_model,
  connector,text_model}.*` and `model.vlm_with_expert.vlm.lm_head.*` (the SmolVLM backbone),
  `model.vlm_with_expert.lm_expert.*` (the action expert) and `model.{state_proj,action_in_proj,
  action_out_proj,action_time_mlp_in,action_time_mlp_out}.*`.
  Module names under transformers 5 (5.23) are the same as under 4.57, with which LeRobot's
  reference keys were made (`SmolVLMForConditionalGeneration.model` is a `SmolVLMModel` holding
  `vision_model`, `connector` and `text_model`; `lm_head` beside it; `text_model` and the expert
  are `LlamaModel`s): no key renaming is needed, and `load_state_dict(strict=True)` takes
  LeRobot's files as they are. `tests/test_policy_smolvla.py` checks the full key list, so a
  transformers release that renames a module fails there rather than silently.
- The processor files are SmolVLA's pipeline (rename, to_batch, `smolvla_new_line_processor`,
  `tokenizer_processor`, device, normalizer): the normalizer's stats are
  `policy_preprocessor_step_5_normalizer_processor.safetensors`, as LeRobot names them.

Where robotrain differs from LeRobot 0.4.4 (each is LeRobot's later fix or a robotrain need):

- The loss ignores targets past the episode end (`action_is_pad`) and the padded action
  dimensions, averaging over valid entries only (LeRobot's #3434; 0.4.4 read a misspelt key and
  so never masked).
- Tokenization happens in the policy (LeRobot does it in its preprocessor): each `task` string
  gets a trailing newline, then the backbone's tokenizer pads it on the right
  (`pad_language_to`) and truncates it to `tokenizer_max_length`.
- Only the backbone's config and tokenizer are read from `vlm_model_name` (LeRobot also builds
  its `AutoProcessor`, which needs the `num2words` package, and uses only its tokenizer).
- `use_cache=false` recomputes the prefix at every denoising step instead of caching its keys
  and values (same actions, slower); LeRobot 0.4.4 leaves that path unusable.
- Observations are the current frame only (`observation_delta_indices` None): LeRobot's `[0]`
  asks for the same frame with a time axis of 1.
- `optimizer_*` and `scheduler_*` are LeRobot's training presets, kept for the round trip;
  robotrain trains with the `optim` and `scheduler` config groups.
- Real-time chunking (`rtc_config` enabled) is not implemented.

The backbone comes from `vlm_model_name` (a Hub id or a local folder): with
`load_vlm_weights=false` (LeRobot's default, and what tests use) only its config and tokenizer are
read and weights are random; with `true` its weights are loaded in bfloat16, as LeRobot does.
transformers is imported only when a SmolVLA model is built.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch.utils.checkpoint import checkpoint
import torch.nn.functional as F
from torch import nn

from robotrain import global_batch
from robotrain.errors import UserError
from robotrain.policies import vla
from robotrain.policies.base import Policy, PolicyConfig, resize_with_pad
from robotrain.policies.vla import create_sinusoidal_pos_embedding, first_line, make_att_2d_masks, pad_vector

OBS_STATE = "observation.state"
ACTION = "action"
_EMPTY_CAMERA = "observation.images.empty_camera_{}"


@dataclass
class SmolVLAConfig(PolicyConfig):
    """SmolVLA, with LeRobot's field names and defaults (lerobot 0.4.4 `SmolVLAConfig`)."""

    type: str = "smolvla"
    """Policy type."""
    chunk_size: int = 50
    """Actions predicted per forward pass."""
    n_action_steps: int = 50
    """Actions of each predicted chunk executed before predicting again."""
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    """Normalization per feature type; images stay in [0, 1] (the model maps them to [-1, 1])."""
    max_state_dim: int = 32
    """State vectors are zero-padded to this size."""
    max_action_dim: int = 32
    """Action vectors are zero-padded to this size."""
    resize_imgs_with_padding: Optional[list[int]] = field(default_factory=lambda: [512, 512])
    """Images are resized to fit [width, height], keeping aspect ratio, and padded; null: as is."""

    empty_cameras: int = 0
    """Extra all-padding cameras added to the inputs (LeRobot's smolvla_aloha_sim uses 2)."""
    adapt_to_pi_aloha: bool = False
    """Map Aloha joint/gripper conventions to the ones the pi runtime was trained with."""
    use_delta_joint_actions_aloha: bool = False
    """Delta joint actions for Aloha (not ported in LeRobot; must stay false)."""
    tokenizer_max_length: int = 48
    """Language tokens kept per task (longer tasks are truncated)."""
    num_steps: int = 10
    """Euler steps of the flow-matching sampler at inference."""
    use_cache: bool = True
    """Cache the prefix's keys and values across denoising steps."""
    freeze_vision_encoder: bool = True
    """Keep the vision encoder's weights fixed (and it in eval mode)."""
    train_expert_only: bool = True
    """Keep the whole VLM fixed; train the action expert and projections only."""
    train_state_proj: bool = True
    """Train the state projection."""
    optimizer_lr: float = 1e-4
    """LeRobot's preset learning rate (robotrain uses `optim.lr`)."""
    optimizer_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """LeRobot's preset AdamW betas (robotrain uses `optim.betas`)."""
    optimizer_eps: float = 1e-8
    """LeRobot's preset AdamW eps (robotrain uses `optim.eps`)."""
    optimizer_weight_decay: float = 1e-10
    """LeRobot's preset weight decay (robotrain uses `optim.weight_decay`)."""
    optimizer_grad_clip_norm: float = 10
    """LeRobot's preset gradient clipping (robotrain uses `optim.grad_clip_norm`)."""
    scheduler_warmup_steps: int = 1_000
    """LeRobot's preset warmup steps (robotrain uses `scheduler.warmup_steps`)."""
    scheduler_decay_steps: int = 30_000
    """LeRobot's preset cosine decay steps (robotrain decays over `steps`)."""
    scheduler_decay_lr: float = 2.5e-6
    """LeRobot's preset final learning rate (robotrain uses `scheduler.min_lr_ratio`)."""
    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    """The SmolVLM backbone: a Hub repo id or a local folder (config + tokenizer [+ weights])."""
    load_vlm_weights: bool = False
    """Load the backbone's pretrained weights (true when fine-tuning from the VLM); false: random."""
    add_image_special_tokens: bool = False
    """Surround each image's tokens with SmolVLM's image start/end tokens."""
    attention_mode: str = "cross_attn"
    """How the expert reads the VLM: cross_attn (interleaved with self_attn layers) or self_attn."""
    prefix_length: int = -1
    """Pad the prefix (images, language, state) to this many tokens; <= 0: no padding."""
    pad_language_to: str = "longest"
    """Language padding: longest (in the batch) or max_length (tokenizer_max_length)."""
    num_expert_layers: int = -1
    """Expert layers; <= 0: as many as the VLM (must divide num_vlm_layers)."""
    num_vlm_layers: int = 16
    """VLM text layers kept (the first ones); <= 0: all."""
    self_attn_every_n_layers: int = 2
    """In cross_attn mode, every n-th layer is self-attention; <= 0: all cross-attention."""
    expert_width_multiplier: float = 0.75
    """Expert hidden size relative to the VLM's."""
    min_period: float = 4e-3
    """Shortest period of the sine-cosine timestep embedding."""
    max_period: float = 4.0
    """Longest period of the sine-cosine timestep embedding."""
    rtc_config: Optional[dict[str, Any]] = None
    """LeRobot's real-time chunking settings; accepted, but enabling it is not supported."""
    compile_model: bool = False
    """torch.compile the model's forward and sampler."""
    compile_mode: str = "max-autotune"
    """torch.compile mode."""
    gradient_checkpointing: bool = False
    """Recompute each transformer layer (VLM and expert) in the backward pass instead of keeping its activations."""

    robotrain_fields: ClassVar[tuple[str, ...]] = (*PolicyConfig.robotrain_fields, "gradient_checkpointing")

    def image_resize(self) -> tuple[int, int] | None:
        return tuple(self.resize_imgs_with_padding) if self.resize_imgs_with_padding is not None else None

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("max_state_dim", "max_action_dim", "tokenizer_max_length", "num_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"policy.{name} must be > 0, got {getattr(self, name)}")
        if self.resize_imgs_with_padding is not None and (
            len(self.resize_imgs_with_padding) != 2 or min(self.resize_imgs_with_padding) <= 0
        ):
            raise UserError(f"policy.resize_imgs_with_padding must be [width, height] > 0 or null, "
                            f"got {self.resize_imgs_with_padding}")
        if self.empty_cameras < 0:
            raise UserError(f"policy.empty_cameras must be >= 0, got {self.empty_cameras}")
        if self.use_delta_joint_actions_aloha:
            raise UserError("policy.use_delta_joint_actions_aloha=true is not ported (nor in LeRobot); set it to false")
        if self.attention_mode not in ("cross_attn", "self_attn"):
            raise UserError(f"policy.attention_mode must be cross_attn or self_attn, got {self.attention_mode!r}")
        if self.pad_language_to not in ("longest", "max_length"):
            raise UserError(f"policy.pad_language_to must be longest or max_length, got {self.pad_language_to!r}")
        if self.expert_width_multiplier <= 0:
            raise UserError(f"policy.expert_width_multiplier must be > 0, got {self.expert_width_multiplier}")
        if self.num_vlm_layers > 0 and self.num_expert_layers > 0 and self.num_vlm_layers % self.num_expert_layers:
            raise UserError(f"policy.num_vlm_layers={self.num_vlm_layers} must be a multiple of "
                            f"policy.num_expert_layers={self.num_expert_layers}")
        if not 0 < self.min_period < self.max_period:
            raise UserError(f"policy.min_period must be in (0, max_period={self.max_period}), got {self.min_period}")
        if not self.vlm_model_name:
            raise UserError("policy.vlm_model_name must be set: a Hub repo id or a local SmolVLM folder")
        if isinstance(self.rtc_config, dict) and self.rtc_config.get("enabled"):
            raise UserError("policy.rtc_config: real-time chunking is not supported by robotrain; set it to null")


# -- the model (LeRobot's modeling_smolvla.py / smolvlm_with_expert.py) -----------------------


def apply_rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: float = 10_000) -> torch.Tensor:
    """Rotary embedding of positions [B, L] applied to x [B, L, H, D] (computed in float32)."""
    d_half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.to(torch.float32)
    freq_exponents = (2.0 / x.shape[-1]) * torch.arange(d_half, dtype=torch.float32, device=x.device)
    timescale = max_wavelength**freq_exponents
    radians = positions[..., None].to(torch.float32) / timescale[None, None, :]
    radians = radians[..., None, :]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = x.split(d_half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)


def get_intermediate_size(hidden_dim: int, ffn_dim_multiplier: int = 4, multiple_of: int = 256) -> int:
    hidden_dim = int(2 * hidden_dim / 3)
    hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def _load_backbone_config(model_id: str):
    """The SmolVLM config from a local folder or the Hub, or a one-line UserError."""
    _check_backbone_source(model_id)
    try:
        return _transformers().AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        raise UserError(f"policy.vlm_model_name={model_id}: cannot read its config ({first_line(err)})") from None


def load_tokenizer(model_id: str):
    """The backbone's tokenizer (what LeRobot's `tokenizer_processor` step loads)."""
    _check_backbone_source(model_id)
    return vla.load_tokenizer(model_id, "policy.vlm_model_name", "smolvla")


def _transformers():
    return vla.transformers_module("smolvla")


def _check_backbone_source(model_id: str) -> None:
    vla.check_source(model_id, "policy.vlm_model_name", "SmolVLM")
    if Path(model_id).expanduser().is_dir() and not (Path(model_id).expanduser() / "config.json").is_file():
        raise UserError(f"policy.vlm_model_name={model_id} has no config.json; pass a SmolVLM folder")


class SmolVLMWithExpertModel(nn.Module):
    """The SmolVLM backbone (truncated to `num_vlm_layers`) and the action expert, run layer by
    layer side by side: in self-attention layers both token streams attend jointly; in
    cross-attention layers the expert's queries attend to the VLM's keys and values, projected
    to the expert's width by its own k_proj/v_proj."""

    def __init__(self, config: SmolVLAConfig):
        super().__init__()
        transformers = _transformers()
        model_id = config.vlm_model_name
        vlm_config = _load_backbone_config(model_id)
        if getattr(vlm_config, "model_type", None) != "smolvlm":
            raise UserError(f"policy.vlm_model_name={model_id} is a {getattr(vlm_config, 'model_type', '?')!r} "
                            "model; SmolVLA needs a SmolVLM backbone (model_type 'smolvlm')")
        if config.load_vlm_weights:
            try:
                self.vlm = transformers.AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.bfloat16)
            except OSError as err:
                raise UserError(f"policy.vlm_model_name={model_id}: cannot load its weights ({first_line(err)}); "
                                "set policy.load_vlm_weights=false to start from random weights") from None
            vlm_config = self.vlm.config
        else:
            self.vlm = transformers.SmolVLMForConditionalGeneration(config=vlm_config)
        text_model = self.vlm.model.text_model
        if config.num_vlm_layers > 0:
            if config.num_vlm_layers > len(text_model.layers):
                raise UserError(f"policy.num_vlm_layers={config.num_vlm_layers} exceeds the "
                                f"{len(text_model.layers)} layers of {model_id}")
            text_model.layers = text_model.layers[: config.num_vlm_layers]
        self.num_vlm_layers = len(text_model.layers)
        self.config = vlm_config
        text_config = vlm_config.text_config

        expert_config = copy.deepcopy(text_config)
        expert_config.hidden_size = int(text_config.hidden_size * config.expert_width_multiplier)
        expert_config.intermediate_size = get_intermediate_size(expert_config.hidden_size)
        expert_config.num_hidden_layers = self.num_vlm_layers
        if config.num_expert_layers > 0:
            if self.num_vlm_layers % config.num_expert_layers:
                raise UserError(f"the VLM's {self.num_vlm_layers} layers are not a multiple of "
                                f"policy.num_expert_layers={config.num_expert_layers}")
            expert_config.num_hidden_layers = config.num_expert_layers
        self.lm_expert = transformers.AutoModel.from_config(expert_config)
        self.num_expert_layers = len(self.lm_expert.layers)
        self.self_attn_every_n_layers = config.self_attn_every_n_layers
        self.attention_mode = config.attention_mode
        self.gradient_checkpointing = config.gradient_checkpointing
        if "cross" in self.attention_mode:
            # Cross-attention layers read the VLM's keys/values: their k/v projections take the VLM's kv width.
            kv_in = text_config.num_key_value_heads * text_config.head_dim
            kv_out = expert_config.num_key_value_heads * expert_config.head_dim
            for idx, layer in enumerate(self.lm_expert.layers):
                if self._is_self_attn_layer(idx):
                    continue
                layer.self_attn.k_proj = nn.Linear(kv_in, kv_out, bias=expert_config.attention_bias)
                layer.self_attn.v_proj = nn.Linear(kv_in, kv_out, bias=expert_config.attention_bias)
        self.lm_expert.embed_tokens = None  # the expert reads embeddings, never token ids

        self.num_attention_heads = text_config.num_attention_heads
        self.num_key_value_heads = text_config.num_key_value_heads
        self.head_dim = text_config.head_dim
        self.expert_hidden_size = expert_config.hidden_size
        self.freeze_vision_encoder = config.freeze_vision_encoder
        self.train_expert_only = config.train_expert_only
        self.set_requires_grad()

    def _is_self_attn_layer(self, idx: int) -> bool:
        return self.self_attn_every_n_layers > 0 and idx % self.self_attn_every_n_layers == 0

    def set_requires_grad(self) -> None:
        """LeRobot's freezing: the vision encoder, the whole VLM (train_expert_only), or else the
        VLM's last layer(s), final norm and lm_head, which never reach the loss."""
        vlm_model = self.vlm.model
        if self.freeze_vision_encoder:
            vlm_model.vision_model.eval()
            vlm_model.vision_model.requires_grad_(False)
        if self.train_expert_only:
            self.vlm.eval()
            self.vlm.requires_grad_(False)
        else:
            last_layers = [self.num_vlm_layers - 1]
            if self.num_vlm_layers != self.num_expert_layers and self.num_vlm_layers % self.num_expert_layers == 0:
                last_layers.append(self.num_vlm_layers - 2)
            frozen = ["lm_head", "text_model.norm.weight"] + [f"text_model.layers.{i}." for i in last_layers]
            for name, param in self.vlm.named_parameters():
                if any(pattern in name for pattern in frozen):
                    param.requires_grad = False
        for name, param in self.lm_expert.named_parameters():
            if "lm_head" in name:
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision_encoder:
            self.vlm.model.vision_model.eval()
        if self.train_expert_only:
            self.vlm.eval()
        return self

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        vlm_model = self.vlm.model
        hidden = vlm_model.vision_model(pixel_values=image.to(dtype=vlm_model.vision_model.dtype),
                                        patch_attention_mask=None).last_hidden_state
        return vlm_model.connector(hidden)

    def embed_language_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vlm.model.text_model.get_input_embeddings()(tokens)

    def get_model_layers(self) -> list[list]:
        """Per VLM layer: (VLM layer, expert layer or None when the expert has fewer layers)."""
        vlm_layers, expert_layers = [], []
        multiple_of = self.num_vlm_layers // self.num_expert_layers
        for i in range(self.num_vlm_layers):
            if multiple_of > 0 and i > 0 and i % multiple_of != 0:
                expert_layer = None
            else:
                expert_layer = self.lm_expert.layers[i // multiple_of if multiple_of > 0 else i]
            vlm_layers.append(self.vlm.model.text_model.layers[i])
            expert_layers.append(expert_layer)
        return [vlm_layers, expert_layers]

    @staticmethod
    def _qkv(layer, hidden_states: torch.Tensor):
        hidden_states = layer.input_layernorm(hidden_states)
        shape = (*hidden_states.shape[:-1], -1, layer.self_attn.head_dim)
        hidden_states = hidden_states.to(dtype=layer.self_attn.q_proj.weight.dtype)
        attn = layer.self_attn
        return attn.q_proj(hidden_states).view(shape), attn.k_proj(hidden_states).view(shape), \
            attn.v_proj(hidden_states).view(shape)

    def forward_attn_layer(self, model_layers, inputs_embeds, layer_idx, position_ids, attention_mask,
                           batch_size, use_cache, fill_kv_cache, past_key_values):
        queries, keys, values = [], [], []
        for i, hidden_states in enumerate(inputs_embeds):
            layer = model_layers[i][layer_idx]
            if hidden_states is None or layer is None:
                continue
            q, k, v = self._qkv(layer, hidden_states)
            queries.append(q)
            keys.append(k)
            values.append(v)
        query_states, key_states, value_states = torch.cat(queries, 1), torch.cat(keys, 1), torch.cat(values, 1)
        seq_len = query_states.shape[1]
        if seq_len < position_ids.shape[1]:
            position_ids = position_ids[:, :seq_len]
            attention_mask = attention_mask[:, :seq_len, :seq_len]
        query_states = apply_rope(query_states, position_ids)
        key_states = apply_rope(key_states, position_ids)
        if use_cache:
            if past_key_values is None:
                past_key_values = {}
            if fill_kv_cache:
                past_key_values[layer_idx] = {"key_states": key_states, "value_states": value_states}
            else:
                key_states = torch.cat([past_key_values[layer_idx]["key_states"], key_states], dim=1)
                value_states = torch.cat([past_key_values[layer_idx]["value_states"], value_states], dim=1)
        out = self.eager_attention_forward(attention_mask, batch_size, query_states, key_states, value_states)
        return [out], past_key_values

    def forward_cross_attn_layer(self, model_layers, inputs_embeds, layer_idx, position_ids, attention_mask,
                                 batch_size, use_cache, fill_kv_cache, past_key_values):
        att_outputs = []
        if len(inputs_embeds) == 2 and inputs_embeds[0] is not None and not past_key_values:
            # The prefix attends to itself.
            seq_len = inputs_embeds[0].shape[1]
            position_id, expert_position_id = position_ids[:, :seq_len], position_ids[:, seq_len:]
            q, k, value_states = self._qkv(model_layers[0][layer_idx], inputs_embeds[0])
            query_states = apply_rope(q, position_id)
            key_states = apply_rope(k, position_id)
            att_outputs.append(self.eager_attention_forward(
                attention_mask[:, :seq_len, :seq_len], batch_size, query_states, key_states, value_states))
        else:
            expert_position_id = position_ids
        if use_cache:
            if past_key_values is None:
                past_key_values = {}
            if fill_kv_cache:
                past_key_values[layer_idx] = {"key_states": key_states, "value_states": value_states}
            else:
                key_states = past_key_values[layer_idx]["key_states"]
                value_states = past_key_values[layer_idx]["value_states"]

        # The expert's queries attend to the prefix's keys/values, re-projected to its width.
        expert_layer = model_layers[1][layer_idx]
        if expert_layer is None:
            att_outputs.append(None)
            return att_outputs, past_key_values
        attn = expert_layer.self_attn
        hidden = expert_layer.input_layernorm(inputs_embeds[1])
        hidden = hidden.to(dtype=attn.q_proj.weight.dtype)
        expert_query = attn.q_proj(hidden).view(*hidden.shape[:-1], -1, attn.head_dim)
        flat_keys = key_states.to(dtype=attn.k_proj.weight.dtype).view(*key_states.shape[:2], -1)
        expert_keys = attn.k_proj(flat_keys).view(*flat_keys.shape[:-1], -1, attn.head_dim)
        flat_values = value_states.to(dtype=attn.v_proj.weight.dtype).view(*value_states.shape[:2], -1)
        expert_values = attn.v_proj(flat_values).view(*flat_values.shape[:-1], -1, attn.head_dim)
        expert_position_id = expert_position_id - torch.min(expert_position_id, dim=1, keepdim=True).values
        expert_mask = attention_mask[:, -inputs_embeds[1].shape[1]:, : expert_keys.shape[1]]
        expert_query = apply_rope(expert_query, expert_position_id)
        att_outputs.append(self.eager_attention_forward(expert_mask, batch_size, expert_query, expert_keys,
                                                        expert_values))
        return att_outputs, past_key_values

    def forward(self, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, fill_kv_cache):
        """Run both streams (`inputs_embeds` = [prefix or None, suffix or None]) through all layers;
        returns their final-normed outputs and the (filled) key/value cache."""
        models = [self.vlm.model.text_model, self.lm_expert]
        model_layers = self.get_model_layers()
        batch_size = next(h for h in inputs_embeds if h is not None).shape[0]
        # Recomputing a layer in the backward pass needs it to be a pure function of its inputs: no cache.
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not use_cache
        for layer_idx in range(self.num_vlm_layers):
            args = (model_layers, inputs_embeds, layer_idx, position_ids, attention_mask, batch_size, use_cache,
                    fill_kv_cache, past_key_values)
            if recompute:
                inputs_embeds, past_key_values = checkpoint(self._layer, *args, use_reentrant=False)
            else:
                inputs_embeds, past_key_values = self._layer(*args)
        return [models[i].norm(h) if h is not None else None for i, h in enumerate(inputs_embeds)], past_key_values

    def _layer(self, model_layers, inputs_embeds, layer_idx, position_ids, attention_mask, batch_size, use_cache,
               fill_kv_cache, past_key_values):
        """Layer `layer_idx` of both streams: (their outputs, the key/value cache)."""
        if fill_kv_cache or "cross" not in self.attention_mode or self._is_self_attn_layer(layer_idx):
            att_outputs, past_key_values = self.forward_attn_layer(
                model_layers, inputs_embeds, layer_idx, position_ids, attention_mask, batch_size,
                use_cache, fill_kv_cache, past_key_values)
        else:
            att_outputs, past_key_values = self.forward_cross_attn_layer(
                model_layers, inputs_embeds, layer_idx, position_ids, attention_mask, batch_size,
                use_cache, fill_kv_cache, past_key_values)
        outputs, start = [], 0
        for i, hidden_states in enumerate(inputs_embeds):
            layer = model_layers[i][layer_idx]
            att_output = att_outputs[i] if i < len(att_outputs) else att_outputs[0]
            if hidden_states is None:
                outputs.append(None)
                continue
            if layer is None:
                outputs.append(hidden_states)
                continue
            end = start + hidden_states.shape[1]
            att_output = att_output.to(layer.self_attn.o_proj.weight.dtype)
            # In-place adds keep the layer's dtype (bfloat16 with pretrained VLM weights), as in LeRobot.
            out = layer.self_attn.o_proj(att_output[:, start:end])
            out += hidden_states
            residual = out.clone()
            out = layer.mlp(layer.post_attention_layernorm(out))
            out += residual
            outputs.append(out)
            start = end if len(att_outputs) == 1 else 0
        return outputs, past_key_values

    def eager_attention_forward(self, attention_mask, batch_size, query_states, key_states, value_states):
        """Grouped-query attention in float32 with a boolean mask [B, Lq, Lk]; returns [B, Lq, H*D]."""
        groups = self.num_attention_heads // self.num_key_value_heads
        seq_len, head_dim = key_states.shape[1], self.head_dim
        key_states = key_states[:, :, :, None, :].expand(batch_size, seq_len, self.num_key_value_heads, groups,
                                                         head_dim).reshape(batch_size, seq_len, -1, head_dim)
        value_states = value_states[:, :, :, None, :].expand(batch_size, seq_len, self.num_key_value_heads, groups,
                                                             head_dim).reshape(batch_size, seq_len, -1, head_dim)
        query_states = query_states.to(torch.float32).transpose(1, 2)
        key_states = key_states.to(torch.float32).transpose(1, 2)
        weights = torch.matmul(query_states, key_states.transpose(2, 3)) * head_dim**-0.5
        weights = torch.where(attention_mask[:, None, :, :], weights, torch.finfo(weights.dtype).min)
        probs = F.softmax(weights, dim=-1).to(dtype=value_states.dtype)
        out = torch.matmul(probs, value_states.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        return out.reshape(batch_size, -1, self.num_attention_heads * head_dim)


def pad_tensor(tensor: torch.Tensor, max_len: int, pad_value=0) -> torch.Tensor:
    """Pad dimension 1 to `max_len`."""
    padded = torch.full((tensor.shape[0], max_len, *tensor.shape[2:]), pad_value, dtype=tensor.dtype,
                        device=tensor.device)
    padded[:, : tensor.shape[1]] = tensor
    return padded


class VLAFlowMatching(nn.Module):
    """Prefix (images, language, state) through the VLM; suffix (noisy actions + time) through
    the expert; trained to predict the flow `noise - actions`, sampled with Euler steps."""

    def __init__(self, config: SmolVLAConfig, fake_image_token: int, global_image_token: int):
        super().__init__()
        self.config = config
        self.vlm_with_expert = SmolVLMWithExpertModel(config)
        text_hidden = self.vlm_with_expert.config.text_config.hidden_size
        expert_hidden = self.vlm_with_expert.expert_hidden_size
        self.state_proj = nn.Linear(config.max_state_dim, text_hidden)
        self.action_in_proj = nn.Linear(config.max_action_dim, expert_hidden)
        self.action_out_proj = nn.Linear(expert_hidden, config.max_action_dim)
        self.action_time_mlp_in = nn.Linear(expert_hidden * 2, expert_hidden)
        self.action_time_mlp_out = nn.Linear(expert_hidden, expert_hidden)
        self.state_proj.requires_grad_(config.train_state_proj)
        # Plain tensors, not buffers: LeRobot's state dict has none.
        self.global_image_start_token = torch.tensor([fake_image_token, global_image_token], dtype=torch.long)
        self.image_end_token = torch.tensor([fake_image_token], dtype=torch.long)
        if config.compile_model:
            torch.set_float32_matmul_precision("high")
            self.sample_actions = torch.compile(self.sample_actions, mode=config.compile_mode)
            self.forward = torch.compile(self.forward, mode=config.compile_mode)

    def sample_noise(self, shape, device) -> torch.Tensor:
        return global_batch.randn(shape, device)  # torch.normal(0, 1) outside a context, as LeRobot

    def _embed_tokens(self, tokens: torch.Tensor, bsize: int, device) -> torch.Tensor:
        return self.vlm_with_expert.embed_language_tokens(tokens.to(device)).unsqueeze(0).expand(bsize, -1, -1)

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks, state):
        embs, pad_masks, att_masks = [], [], []
        for img, img_mask in zip(images, img_masks):
            bsize, device = img.shape[0], img.device
            if self.config.add_image_special_tokens:
                start = self._embed_tokens(self.global_image_start_token, bsize, device)
                embs.append(start)
                pad_masks.append(torch.ones(start.shape[:2], dtype=torch.bool, device=device))
                att_masks += [0] * start.shape[1]
            img_emb = self.vlm_with_expert.embed_image(img)
            img_emb = img_emb * torch.tensor(img_emb.shape[-1] ** 0.5, dtype=img_emb.dtype, device=img_emb.device)
            num_img_embs = img_emb.shape[1]
            embs.append(img_emb)
            pad_masks.append(img_mask[:, None].expand(bsize, num_img_embs))
            att_masks += [0] * num_img_embs
            if self.config.add_image_special_tokens:
                end = self._embed_tokens(self.image_end_token, bsize, device)
                embs.append(end)
                pad_masks.append(torch.ones(end.shape[:2], dtype=torch.bool, device=device))
                att_masks += [0] * end.shape[1]
        lang_emb = self.vlm_with_expert.embed_language_tokens(lang_tokens)
        lang_emb = lang_emb * math.sqrt(lang_emb.shape[-1])
        embs.append(lang_emb)
        pad_masks.append(lang_masks)
        att_masks += [0] * lang_emb.shape[1]

        state_emb = self.state_proj(state)
        state_emb = state_emb[:, None, :] if state_emb.ndim == 2 else state_emb
        embs.append(state_emb)
        bsize, states_seq_len = state_emb.shape[:2]
        pad_masks.append(torch.ones(bsize, states_seq_len, dtype=torch.bool, device=state_emb.device))
        att_masks += [1] * states_seq_len  # images and language do not attend to the state

        embs = torch.cat(embs, dim=1)
        pad_masks = torch.cat(pad_masks, dim=1)
        att_masks = torch.tensor(att_masks, dtype=torch.bool, device=pad_masks.device)[None, :]
        if pad_masks.shape[1] < self.config.prefix_length:
            embs = pad_tensor(embs, self.config.prefix_length, 0)
            pad_masks = pad_tensor(pad_masks, self.config.prefix_length, 0)
            att_masks = pad_tensor(att_masks, self.config.prefix_length, 0)
        return embs, pad_masks, att_masks.expand(bsize, -1)

    def embed_suffix(self, noisy_actions, timestep):
        action_emb = self.action_in_proj(noisy_actions)
        bsize, device, dtype = action_emb.shape[0], action_emb.device, action_emb.dtype
        time_emb = create_sinusoidal_pos_embedding(timestep, self.vlm_with_expert.expert_hidden_size,
                                                   self.config.min_period, self.config.max_period).type(dtype)
        action_time_emb = torch.cat([action_emb, time_emb[:, None, :].expand_as(action_emb)], dim=2)
        action_time_emb = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(action_time_emb)))
        pad_masks = torch.ones(action_time_emb.shape[:2], dtype=torch.bool, device=device)
        # Actions attend to the prefix and each other; nothing before them attends to them.
        att_masks = torch.ones(bsize, self.config.chunk_size, dtype=action_time_emb.dtype, device=device)
        return action_time_emb, pad_masks, att_masks

    def forward(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise=None, time=None):
        """Per-element flow-matching loss (B, chunk, max_action_dim)."""
        if noise is None:
            noise = global_batch.randn(actions.shape, actions.device)
        if time is None:  # Beta(1.5, 1) by its inverse CDF, u ** (1 / 1.5), scaled into [0.001, 1)
            time = global_batch.rand((actions.shape[0],), actions.device).pow(1 / 1.5) * 0.999 + 0.001
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions
        prefix_embs, prefix_pad, prefix_att = self.embed_prefix(images, img_masks, lang_tokens, lang_masks, state)
        suffix_embs, suffix_pad, suffix_att = self.embed_suffix(x_t, time)
        pad_masks = torch.cat([prefix_pad, suffix_pad], dim=1)
        att_masks = torch.cat([prefix_att, suffix_att], dim=1)
        (_, suffix_out), _ = self.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad_masks, att_masks),
            position_ids=torch.cumsum(pad_masks, dim=1) - 1,
            past_key_values=None, inputs_embeds=[prefix_embs, suffix_embs], use_cache=False, fill_kv_cache=False,
        )
        v_t = self.action_out_proj(suffix_out[:, -self.config.chunk_size:].to(torch.float32))
        return F.mse_loss(u_t, v_t, reduction="none")

    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None) -> torch.Tensor:
        """Integrate the flow from noise (t=1) to actions (t=0) in `num_steps` Euler steps."""
        bsize, device = state.shape[0], state.device
        if noise is None:
            noise = self.sample_noise((bsize, self.config.chunk_size, self.config.max_action_dim), device)
        prefix = self.embed_prefix(images, img_masks, lang_tokens, lang_masks, state)
        past_key_values = None
        if self.config.use_cache:
            prefix_embs, prefix_pad, prefix_att = prefix
            _, past_key_values = self.vlm_with_expert.forward(
                attention_mask=make_att_2d_masks(prefix_pad, prefix_att),
                position_ids=torch.cumsum(prefix_pad, dim=1) - 1,
                past_key_values=None, inputs_embeds=[prefix_embs, None], use_cache=True, fill_kv_cache=True,
            )
        dt = -1.0 / self.config.num_steps
        x_t = noise
        for step in range(self.config.num_steps):
            time = torch.tensor(1.0 + step * dt, dtype=torch.float32, device=device).expand(bsize)
            x_t = x_t + dt * self.denoise_step(prefix, past_key_values, x_t, time)
        return x_t

    def denoise_step(self, prefix, past_key_values, x_t, timestep) -> torch.Tensor:
        """The velocity at `x_t`: from the cached prefix, or (use_cache=false) recomputing it."""
        prefix_embs, prefix_pad, prefix_att = prefix
        suffix_embs, suffix_pad, suffix_att = self.embed_suffix(x_t, timestep)
        if past_key_values is None:
            pad_masks = torch.cat([prefix_pad, suffix_pad], dim=1)
            att_masks = torch.cat([prefix_att, suffix_att], dim=1)
            (_, suffix_out), _ = self.vlm_with_expert.forward(
                attention_mask=make_att_2d_masks(pad_masks, att_masks),
                position_ids=torch.cumsum(pad_masks, dim=1) - 1,
                past_key_values=None, inputs_embeds=[prefix_embs, suffix_embs], use_cache=False,
                fill_kv_cache=False,
            )
        else:
            bsize, suffix_len, prefix_len = prefix_pad.shape[0], suffix_pad.shape[1], prefix_pad.shape[1]
            prefix_2d = prefix_pad[:, None, :].expand(bsize, suffix_len, prefix_len)
            full_mask = torch.cat([prefix_2d, make_att_2d_masks(suffix_pad, suffix_att)], dim=2)
            position_ids = torch.sum(prefix_pad, dim=-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
            (_, suffix_out), _ = self.vlm_with_expert.forward(
                attention_mask=full_mask, position_ids=position_ids, past_key_values=past_key_values,
                inputs_embeds=[None, suffix_embs], use_cache=True, fill_kv_cache=False,
            )
        return self.action_out_proj(suffix_out[:, -self.config.chunk_size:].to(torch.float32))


# -- Aloha conventions (LeRobot's adapt_to_pi_aloha) --------------------------------------------


def _normalize(x, lo, hi):
    return (x - lo) / (hi - lo)


def _unnormalize(x, lo, hi):
    return x * (hi - lo) + lo


def aloha_gripper_to_angular(value):
    value = _unnormalize(value, 0.01844, 0.05800)
    arm_length, horn_radius = 0.036, 0.022
    value = (horn_radius**2 + value**2 - arm_length**2) / (2 * horn_radius * value)
    return _normalize(torch.arcsin(torch.clamp(value, -1.0, 1.0)), 0.4, 1.5)


def aloha_gripper_from_angular(value):
    return _normalize(_unnormalize(value, 0.4, 1.5), -0.6213, 1.4910)


def aloha_gripper_from_angular_inv(value):
    return _normalize(_unnormalize(value, -0.6213, 1.4910), 0.4, 1.5)


def _aloha_convert(x: torch.Tensor, gripper) -> torch.Tensor:
    """Aloha's joint conventions <-> pi's (last dim: 14 joints): joints 1, 2, 8, 9 flip sign and
    the grippers (6, 13) go through `gripper`; a copy, any leading dims."""
    x = x.clone()
    for idx in (1, 2, 8, 9):
        x[..., idx] *= -1
    for idx in (6, 13):
        x[..., idx] = gripper(x[..., idx])
    return x


# -- the policy ---------------------------------------------------------------------------------


class SmolVLAPolicy(Policy):
    name = "smolvla"
    config_class = SmolVLAConfig
    inputs_may_be_absent = True  # empty cameras

    def __init__(self, config: SmolVLAConfig, stats):
        # LeRobot's validate_features: empty cameras are image inputs the batch never holds.
        for i in range(config.empty_cameras):
            config.input_features.setdefault(_EMPTY_CAMERA.format(i), {"type": "VISUAL", "shape": [3, 480, 640]})
        super().__init__(config, stats)
        self.image_keys, self.action_dim = vla.check_features(config, "SmolVLA")
        self.tokenizer = load_tokenizer(config.vlm_model_name)
        fake = _special_token_id(self.tokenizer, "fake_image_token", "<fake_token_around_image>")
        global_img = _special_token_id(self.tokenizer, "global_image_token", "<global-img>")
        self.model = VLAFlowMatching(config, fake, global_img)

    # -- inputs -----------------------------------------------------------------------------
    def tokenize(self, tasks: list[str] | str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """LeRobot's preprocessor: a newline after each task, then the backbone's tokenizer
        (right padding per `pad_language_to`, truncation to `tokenizer_max_length`)."""
        return vla.tokenize(self.tokenizer, tasks, self.config.tokenizer_max_length, self.config.pad_language_to,
                            device)

    def prepare_images(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Images resized with padding and mapped from [0, 1] to [-1, 1]; absent cameras (up to
        `empty_cameras`) become all -1 images with a false mask."""
        images, masks = [], []
        present = [k for k in self.image_keys if k in batch]
        missing = [k for k in self.image_keys if k not in batch]
        if not present:
            raise UserError(f"the batch holds none of the image inputs {self.image_keys}")
        for key in present:
            img = batch[key][:, -1] if batch[key].ndim == 5 else batch[key]
            if self.config.resize_imgs_with_padding is not None:
                img = resize_with_pad(img, *self.config.resize_imgs_with_padding, pad_value=0)
            img = img * 2.0 - 1.0
            mask_key = f"{key}_padding_mask"
            mask = batch[mask_key].bool() if mask_key in batch else torch.ones(img.shape[0], dtype=torch.bool,
                                                                                  device=img.device)
            images.append(img)
            masks.append(mask)
        for i in range(min(len(missing), self.config.empty_cameras)):
            images.append(torch.ones_like(images[0]) * -1)
            masks.append(torch.zeros_like(masks[0]))
        return images, masks

    def prepare_state(self, batch: dict[str, Any]) -> torch.Tensor:
        state = batch[OBS_STATE][:, -1, :] if batch[OBS_STATE].ndim > 2 else batch[OBS_STATE]
        if self.config.adapt_to_pi_aloha:
            state = _aloha_convert(state, aloha_gripper_to_angular)
        return pad_vector(state, self.config.max_state_dim)

    def _inputs(self, batch: dict[str, Any]):
        if "task" not in batch:
            raise UserError("SmolVLA needs the language instruction: the batch has no 'task'")
        images, img_masks = self.prepare_images(batch)
        state = self.prepare_state(batch)
        lang_tokens, lang_masks = self.tokenize(batch["task"], device=state.device)
        return images, img_masks, lang_tokens, lang_masks, state

    # -- training and acting ---------------------------------------------------------------
    def compute_loss(self, batch):
        images, img_masks, lang_tokens, lang_masks, state = self._inputs(batch)
        actions = batch[ACTION]
        if self.config.adapt_to_pi_aloha:
            actions = _aloha_convert(actions, aloha_gripper_from_angular_inv)
        losses = self.model(images, img_masks, lang_tokens, lang_masks, state,
                            pad_vector(actions, self.config.max_action_dim))
        return vla.action_loss(self, losses, batch, self.action_dim)

    def predict_chunk(self, batch):
        images, img_masks, lang_tokens, lang_masks, state = self._inputs(batch)
        actions = self.model.sample_actions(images, img_masks, lang_tokens, lang_masks, state)
        actions = actions[:, :, : self.action_dim]
        if self.config.adapt_to_pi_aloha:
            actions = _aloha_convert(actions, aloha_gripper_from_angular)
        return actions

    # -- fine-tuning defaults and the LeRobot folder -----------------------------------------
    def peft_defaults(self) -> dict[str, Any]:
        """LeRobot's SmolVLA adapter defaults: LoRA on the expert's q/v projections and on the
        state/action/time projections; nothing saved in full."""
        projections = "state_proj|action_in_proj|action_out_proj|action_time_mlp_in|action_time_mlp_out"
        return {"target_modules": rf"(model\.vlm_with_expert\.lm_expert\..*\.(q|v)_proj|model\.({projections}))",
                "modules_to_save": []}

    def preprocessor_steps(self) -> list[dict[str, Any]]:
        """LeRobot's SmolVLA pipeline: a newline appended to the task, then the tokenizer (so the
        normalizer's stats file is step 5)."""
        return [{"registry_name": "smolvla_new_line_processor", "config": {}},
                {"registry_name": "tokenizer_processor", "config": {
                    "max_length": self.config.tokenizer_max_length, "task_key": "task", "padding_side": "right",
                    "padding": self.config.pad_language_to, "truncation": True,
                    "tokenizer_name": self.config.vlm_model_name}}]


def _special_token_id(tokenizer, attribute: str, token: str) -> int:
    """SmolVLM's image tokens, from the tokenizer's named extra special tokens or its vocabulary."""
    token_id = getattr(tokenizer, f"{attribute}_id", None)
    if token_id is None:
        token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return 0  # only used with add_image_special_tokens
    return int(token_id)
