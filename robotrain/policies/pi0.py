"""pi0 and pi0.5: a PaliGemma backbone plus a Gemma flow-matching action expert (LeRobot's
`pi0` and `pi05`, ports of Physical Intelligence's openpi).

Checkpoint-compatible with LeRobot 0.6.1 both ways:

- `config.json` has LeRobot's `PI0Config`/`PI05Config` keys in LeRobot's order, and every field
  LeRobot writes is accepted when loading one.
- `model.safetensors` keys, shapes and dtypes are LeRobot's:
  `model.paligemma_with_expert.paligemma.{lm_head, model.vision_tower.vision_model.*,
  model.multi_modal_projector.linear, model.language_model.*}`,
  `model.paligemma_with_expert.gemma_expert.{lm_head, model.layers.*, model.norm}` and the
  projections (`state_proj`, `action_in_proj`, `action_out_proj`, `action_time_mlp_{in,out}`;
  pi0.5: `time_mlp_{in,out}` and no `state_proj`, its expert's norms are adaptive: `*.dense.*`).
  `dtype=bfloat16` keeps what LeRobot keeps in float32 (vision tower, projector, norms) and
  saves the rest in bfloat16, as LeRobot does. `tests/test_policy_pi0.py` checks the full key
  lists of the real `gemma_300m` variants (built on the meta device) against LeRobot's.
- The processor files are LeRobot's pipelines (pi0: rename, to_batch, `pi0_new_line_processor`,
  `tokenizer_processor`, device, `relative_actions_processor`, normalizer; pi0.5: rename,
  to_batch, `relative_actions_processor`, normalizer, `pi05_prepare_state_tokenizer_processor_step`,
  `tokenizer_processor`, device), with the normalizer's stats file named after its step.

The computation is LeRobot's, op for op: prefix (SigLIP image tokens, then the scaled language
embeddings) and suffix (pi0: state token then action+time tokens; pi0.5: action tokens, time
through adaRMS) go through both Gemmas layer by layer with one joint attention, and sampling
caches the prefix's keys and values. Noise and flow-matching times are drawn in LeRobot's order
and from the same distributions (times: `Beta(1.5, 1)` by `torch.distributions`), so the same
weights, observation and seed give LeRobot's action chunk.

Where robotrain differs from LeRobot 0.6.1:

- The loss ignores targets past the episode end (`action_is_pad`), as robotrain's SmolVLA does
  (LeRobot's pi0 averages over them).
- Tokenization happens in the policy: `tokenizer_name` (a robotrain field, LeRobot hard-codes
  `google/paligemma-3b-pt-224`) is written into, and read back from, the tokenizer step of
  `policy_preprocessor.json`.
- `paligemma_variant=dummy` / `action_expert_variant=dummy` is openpi's test-size Gemma (width 64,
  4 layers) with a test-size SigLIP and vocabulary: robotrain's tests train it; LeRobot refuses
  that name, so its checkpoints stay robotrain's.
- Relative actions (`use_relative_actions=true`) and real-time chunking are not implemented; they
  are refused when the config is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from robotrain import global_batch
from robotrain.errors import UserError
from robotrain.policies import vla
from robotrain.policies.base import DEVICE, NORMALIZER, UNNORMALIZER, Policy, PolicyConfig, StepSpec
from robotrain.policies.vla import create_sinusoidal_pos_embedding, make_att_2d_masks, pad_vector

OBS_STATE = "observation.state"
ACTION = "action"
PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"
#: openpi's additive mask value for positions a token may not attend to (LeRobot's
#: OPENPI_ATTENTION_MASK_VALUE).
MASK_VALUE = -2.3819763e38


class Gemma(NamedTuple):
    """One Gemma size (openpi `gemma.py: Config`)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


VARIANTS = {
    "gemma_300m": Gemma(1024, 18, 4096, 8, 1, 256),
    "gemma_2b": Gemma(2048, 18, 16_384, 8, 1, 256),
    "dummy": Gemma(64, 4, 128, 8, 1, 16),  # openpi's test size; robotrain only
}
#: PaliGemma's vocabulary and SigLIP So400m; the dummy variant's are test-sized.
VOCAB_SIZE, DUMMY_VOCAB_SIZE = 257_152, 1024
SIGLIP_DUMMY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


@dataclass
class PI0Config(PolicyConfig):
    """pi0, with LeRobot's field names and defaults (lerobot 0.6.1 `PI0Config`)."""

    type: str = "pi0"
    """Policy type."""
    paligemma_variant: str = "gemma_2b"
    """The VLM's Gemma: gemma_2b (pi0's), gemma_300m, or dummy (test size, robotrain only)."""
    action_expert_variant: str = "gemma_300m"
    """The action expert's Gemma: gemma_300m (pi0's), gemma_2b, or dummy."""
    dtype: str = "float32"
    """bfloat16: the Gemma weights in bfloat16 (vision tower, projector and norms stay float32); float32."""
    chunk_size: int = 50
    """Actions predicted per forward pass."""
    n_action_steps: int = 50
    """Actions of each predicted chunk executed before predicting again."""
    max_state_dim: int = 32
    """State vectors are zero-padded to this size."""
    max_action_dim: int = 32
    """Action vectors are zero-padded to this size."""
    num_inference_steps: int = 10
    """Euler steps of the flow-matching sampler at inference."""
    time_sampling_beta_alpha: float = 1.5
    """Training times are Beta(alpha, beta) * scale + offset."""
    time_sampling_beta_beta: float = 1.0
    """See time_sampling_beta_alpha."""
    time_sampling_scale: float = 0.999
    """See time_sampling_beta_alpha."""
    time_sampling_offset: float = 0.001
    """See time_sampling_beta_alpha."""
    min_period: float = 4e-3
    """Shortest period of the sine-cosine time embedding."""
    max_period: float = 4.0
    """Longest period of the sine-cosine time embedding."""
    use_relative_actions: bool = False
    """Train on actions relative to the state (LeRobot's relative_actions_processor); not supported."""
    relative_exclude_joints: list[str] = field(default_factory=lambda: ["gripper"])
    """Joints kept absolute with use_relative_actions."""
    action_feature_names: Optional[list[str]] = None
    """Action dimension names (LeRobot fills them from the dataset for relative actions)."""
    rtc_config: Optional[dict[str, Any]] = None
    """LeRobot's real-time chunking settings; accepted, but enabling it is not supported."""
    image_resolution: list[int] = field(default_factory=lambda: [224, 224])
    """Images are resized to this [height, width] (square), keeping aspect ratio, padded around."""
    empty_cameras: int = 0
    """Extra all-padding cameras added to the inputs."""
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    """Normalization per feature type; images stay in [0, 1] (the model maps them to [-1, 1])."""
    gradient_checkpointing: bool = False
    """Recompute each transformer layer (both Gemmas) and the image embedding in the backward pass."""
    compile_model: bool = False
    """torch.compile the model's forward and sampler."""
    compile_mode: str = "max-autotune"
    """torch.compile mode."""
    freeze_vision_encoder: bool = False
    """Keep the vision encoder's weights fixed (and it in eval mode)."""
    train_expert_only: bool = False
    """Keep the whole VLM fixed; train the action expert and projections only."""
    optimizer_lr: float = 2.5e-5
    """LeRobot's preset learning rate (robotrain uses `optim.lr`)."""
    optimizer_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """LeRobot's preset AdamW betas (robotrain uses `optim.betas`)."""
    optimizer_eps: float = 1e-8
    """LeRobot's preset AdamW eps (robotrain uses `optim.eps`)."""
    optimizer_weight_decay: float = 0.01
    """LeRobot's preset weight decay (robotrain uses `optim.weight_decay`)."""
    optimizer_grad_clip_norm: float = 1.0
    """LeRobot's preset gradient clipping (robotrain uses `optim.grad_clip_norm`)."""
    scheduler_warmup_steps: int = 1_000
    """LeRobot's preset warmup steps (robotrain uses `scheduler.warmup_steps`)."""
    scheduler_decay_steps: int = 30_000
    """LeRobot's preset cosine decay steps (robotrain decays over `steps`)."""
    scheduler_decay_lr: float = 2.5e-6
    """LeRobot's preset final learning rate (robotrain uses `scheduler.min_lr_ratio`)."""
    tokenizer_max_length: int = 48
    """Language tokens per task: padded to, and truncated at, this length."""
    tokenizer_name: str = PALIGEMMA_TOKENIZER
    """The PaliGemma tokenizer: a Hub repo id or a local folder (robotrain field; saved in the processor files)."""

    #: LeRobot 0.6.1's config has pretrained_revision (0.4.4's, the other policies' reference, had not).
    robotrain_fields: ClassVar[tuple[str, ...]] = ("tokenizer_name",)
    #: LeRobot's config.json order of the fields that follow PreTrainedConfig's.
    lerobot_order: ClassVar[tuple[str, ...]] = (
        "paligemma_variant", "action_expert_variant", "dtype", "chunk_size", "n_action_steps", "max_state_dim",
        "max_action_dim", "num_inference_steps", "time_sampling_beta_alpha", "time_sampling_beta_beta",
        "time_sampling_scale", "time_sampling_offset", "min_period", "max_period", "use_relative_actions",
        "relative_exclude_joints", "action_feature_names", "rtc_config", "image_resolution", "empty_cameras",
        "normalization_mapping", "gradient_checkpointing", "compile_model", "compile_mode", "freeze_vision_encoder",
        "train_expert_only", "optimizer_lr", "optimizer_betas", "optimizer_eps", "optimizer_weight_decay",
        "optimizer_grad_clip_norm", "scheduler_warmup_steps", "scheduler_decay_steps", "scheduler_decay_lr",
        "tokenizer_max_length",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("paligemma_variant", "action_expert_variant"):
            if getattr(self, name) not in VARIANTS:
                raise UserError(f"policy.{name} must be one of {', '.join(VARIANTS)}, got {getattr(self, name)!r}")
        vlm, expert = VARIANTS[self.paligemma_variant], VARIANTS[self.action_expert_variant]
        if (vlm.head_dim, vlm.num_heads, vlm.depth) != (expert.head_dim, expert.num_heads, expert.depth):
            raise UserError(f"policy.paligemma_variant={self.paligemma_variant} and action_expert_variant="
                            f"{self.action_expert_variant} cannot attend jointly (head sizes or depths differ); "
                            "the dummy variant pairs only with itself")
        if self.dtype not in ("bfloat16", "float32"):
            raise UserError(f"policy.dtype must be bfloat16 or float32, got {self.dtype!r}")
        for name in ("max_state_dim", "max_action_dim", "tokenizer_max_length", "num_inference_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"policy.{name} must be > 0, got {getattr(self, name)}")
        if len(self.image_resolution) != 2 or self.image_resolution[0] != self.image_resolution[1] \
                or self.image_resolution[0] <= 0:
            raise UserError(f"policy.image_resolution must be square, [n, n] with n > 0 (PaliGemma), "
                            f"got {self.image_resolution}")
        if self.time_sampling_beta_alpha <= 0 or self.time_sampling_beta_beta <= 0:
            raise UserError("policy.time_sampling_beta_alpha and time_sampling_beta_beta must be > 0")
        if self.empty_cameras < 0:
            raise UserError(f"policy.empty_cameras must be >= 0, got {self.empty_cameras}")
        if not 0 < self.min_period < self.max_period:
            raise UserError(f"policy.min_period must be in (0, max_period={self.max_period}), got {self.min_period}")
        if self.use_relative_actions:
            raise UserError("policy.use_relative_actions=true is not supported by robotrain; set it to false")
        if isinstance(self.rtc_config, dict) and self.rtc_config.get("enabled"):
            raise UserError("policy.rtc_config: real-time chunking is not supported by robotrain; set it to null")
        if not self.tokenizer_name:
            raise UserError("policy.tokenizer_name must be set: a Hub repo id or a local PaliGemma tokenizer folder")

    def to_lerobot_dict(self) -> dict[str, Any]:
        body = super().to_lerobot_dict()
        head = {k: v for k, v in body.items() if k not in self.lerobot_order and k != "pretrained_revision"}
        head["pretrained_revision"] = body["pretrained_revision"]
        return {**head, **{k: body[k] for k in self.lerobot_order}}

    @classmethod
    def fields_from_folder(cls, directory: Path) -> dict[str, Any]:
        """The tokenizer named in the folder's tokenizer step (LeRobot keeps it there, not in config.json)."""
        return tokenizer_in_processor(directory)

    @property
    def is_pi05(self) -> bool:
        return False


@dataclass
class PI05Config(PI0Config):
    """pi0.5, with LeRobot's field names and defaults (lerobot 0.6.1 `PI05Config`)."""

    type: str = "pi05"
    """Policy type."""
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"}
    )
    """Normalization per feature type; state and actions by their 1st-99th percentiles, to [-1, 1]."""
    tokenizer_max_length: int = 200
    """Prompt tokens (task, then the discretized state): padded to, and truncated at, this length."""

    lerobot_order: ClassVar[tuple[str, ...]] = tuple(
        name for field_name in PI0Config.lerobot_order if field_name != "tokenizer_max_length"
        for name in ((field_name, "tokenizer_max_length") if field_name == "empty_cameras" else (field_name,)))

    @property
    def is_pi05(self) -> bool:
        return True


def tokenizer_in_processor(directory: Path) -> dict[str, Any]:
    """{"tokenizer_name": ...} from a pretrained_model/ folder's tokenizer step, or {}."""
    pipeline = Path(directory) / "policy_preprocessor.json"
    if not pipeline.is_file():
        return {}
    for step in json.loads(pipeline.read_text()).get("steps", []):
        if step.get("registry_name") == "tokenizer_processor" and step.get("config", {}).get("tokenizer_name"):
            return {"tokenizer_name": step["config"]["tokenizer_name"]}
    return {}


# -- the Gemmas (LeRobot's pi_gemma.py) ---------------------------------------------------------


class PiGemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm (`weight`, zero-initialized, scales by 1 + weight); with `cond_dim`, adaRMS:
    a `dense` layer maps the condition to scale, shift and the gate of the residual it feeds."""

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.eps, self.dim, self.cond_dim = eps, dim, cond_dim
        if cond_dim is not None:
            self.dense = nn.Linear(cond_dim, dim * 3, bias=True)
            nn.init.zeros_(self.dense.weight)
        else:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        """(normed x, gate or None)."""
        var = torch.mean(torch.square(x.float()), dim=-1, keepdim=True)
        normed = x * torch.rsqrt(var + self.eps)
        if cond is None or self.dense is None:
            return (normed * (1.0 + self.weight.float())).type_as(x), None
        modulation = self.dense(cond)
        if x.dim() == 3:
            modulation = modulation.unsqueeze(1)
        scale, shift, gate = modulation.chunk(3, dim=-1)
        normed = normed * (1 + scale.float()) + shift.float()
        return normed.to(x.dtype), gate.to(x.dtype)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class PiGemmaDecoderLayer(nn.Module):
    """A Gemma decoder layer's modules with (adaptive) PiGemmaRMSNorms; run by `_joint_layer`."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        from transformers.models.gemma import modeling_gemma

        cond_dim = config.adarms_cond_dim if getattr(config, "use_adarms", False) else None
        self.self_attn = modeling_gemma.GemmaAttention(config=config, layer_idx=layer_idx)
        self.mlp = modeling_gemma.GemmaMLP(config)
        self.input_layernorm = PiGemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, cond_dim=cond_dim)
        self.post_attention_layernorm = PiGemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                                       cond_dim=cond_dim)


def _pi_gemma(model, config) -> None:
    """Turn a transformers GemmaModel into LeRobot's PiGemmaModel: same embedding and rotary
    embedding, PiGemmaDecoderLayers and a (adaptive) PiGemmaRMSNorm final norm."""
    cond_dim = config.adarms_cond_dim if getattr(config, "use_adarms", False) else None
    model.layers = nn.ModuleList([PiGemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
    model.norm = PiGemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, cond_dim=cond_dim)


class VisionTower(nn.Module):
    """SigLIP under `vision_model`, where LeRobot's keys have it (transformers < 5.6 nests the
    vision transformer there; later releases flatten it into the SiglipVisionModel)."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, *args, **kwargs):
        return self.vision_model(*args, **kwargs)


#: Parameters LeRobot keeps in float32 when `dtype=bfloat16` (names containing one of these).
KEEP_FLOAT32 = ("vision_tower", "multi_modal_projector", "input_layernorm", "post_attention_layernorm", "model.norm")


class PaliGemmaWithExpert(nn.Module):
    """PaliGemma (SigLIP + Gemma) and the Gemma action expert, run side by side."""

    def __init__(self, config: PI0Config):
        super().__init__()
        transformers = vla.transformers_module(config.type)
        vlm, expert = VARIANTS[config.paligemma_variant], VARIANTS[config.action_expert_variant]
        dummy = config.paligemma_variant == "dummy"
        vocab = DUMMY_VOCAB_SIZE if dummy else VOCAB_SIZE
        vlm_config = transformers.PaliGemmaConfig()
        vlm_config._vocab_size = vocab
        vlm_config.image_token_index = vocab
        text = vlm_config.text_config
        text.hidden_size, text.intermediate_size, text.num_attention_heads = vlm.width, vlm.mlp_dim, vlm.num_heads
        text.head_dim, text.num_hidden_layers, text.num_key_value_heads = vlm.head_dim, vlm.depth, vlm.num_kv_heads
        text.hidden_activation, text.dtype, text.vocab_size = "gelu_pytorch_tanh", "float32", vocab
        text.use_adarms, text.adarms_cond_dim = False, None
        vision = vlm_config.vision_config
        vision.image_size, vision.intermediate_size = config.image_resolution[0], 4304
        vision.projection_dim, vision.projector_hidden_act, vision.dtype = 2048, "gelu_fast", "float32"
        if dummy:
            for name, value in SIGLIP_DUMMY.items():
                setattr(vision, name, value)
            vision.projection_dim = vlm.width
        expert_config = transformers.GemmaConfig(
            head_dim=expert.head_dim, hidden_size=expert.width, intermediate_size=expert.mlp_dim,
            num_attention_heads=expert.num_heads, num_hidden_layers=expert.depth,
            num_key_value_heads=expert.num_kv_heads, vocab_size=vocab, hidden_activation="gelu_pytorch_tanh",
            dtype="float32", use_adarms=config.is_pi05, adarms_cond_dim=expert.width if config.is_pi05 else None,
        )
        self.paligemma = transformers.PaliGemmaForConditionalGeneration(config=vlm_config)
        if not hasattr(self.paligemma.model.vision_tower, "vision_model"):
            self.paligemma.model.vision_tower = VisionTower(self.paligemma.model.vision_tower)
        _pi_gemma(self.paligemma.model.language_model, text)
        self.gemma_expert = transformers.GemmaForCausalLM(config=expert_config)
        _pi_gemma(self.gemma_expert.model, expert_config)
        self.gemma_expert.model.embed_tokens = None  # the expert reads embeddings, never token ids
        # LeRobot builds a new language model after transformers tied lm_head to the old one's
        # embedding: the two are separate parameters, saved under both keys.
        self.paligemma.lm_head.weight = nn.Parameter(self.paligemma.lm_head.weight.detach().clone())
        self.vocab_size = vocab
        if config.dtype == "bfloat16":
            self.to(dtype=torch.bfloat16)
            for name, param in self.named_parameters():
                if any(keep in name for keep in KEEP_FLOAT32):
                    param.data = param.data.to(dtype=torch.float32)
        self.freeze_vision_encoder = config.freeze_vision_encoder
        self.train_expert_only = config.train_expert_only
        self.gradient_checkpointing = config.gradient_checkpointing
        if self.freeze_vision_encoder:
            self.paligemma.model.vision_tower.requires_grad_(False)
        if self.train_expert_only:
            self.paligemma.requires_grad_(False)
        self._freeze_what_the_loss_never_reaches()
        self.train()

    def _freeze_what_the_loss_never_reaches(self) -> None:
        """The lm_heads, the VLM's final norm and its last layer's attention output and MLP only
        compute the prefix's outputs, which the loss never reads (the suffix reads the prefix's
        keys and values). They get no gradient, in LeRobot too, so freezing them changes nothing
        in training, and lets DDP expect a gradient for every trainable parameter."""
        last = self.language_model.layers[-1]
        for module in (self.paligemma.lm_head, self.gemma_expert.lm_head, self.language_model.norm,
                       last.self_attn.o_proj, last.post_attention_layernorm, last.mlp):
            module.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision_encoder:
            self.paligemma.model.vision_tower.eval()
        if self.train_expert_only:
            self.paligemma.eval()
        return self

    @property
    def language_model(self):
        return self.paligemma.model.language_model

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        out_dtype = image.dtype
        features = self.paligemma.model.get_image_features(image.to(torch.float32)).pooler_output
        return features.to(out_dtype)

    def embed_language_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(tokens)  # scaled by sqrt(width), as Gemma's

    def forward(self, attention_mask, position_ids, inputs_embeds, kv_cache=None, fill_kv_cache=False,
                adarms_cond=(None, None)):
        """Run [prefix or None, suffix or None] through both Gemmas, layer by layer, with one joint
        attention (`attention_mask`: additive, [B, 1, Lq, Lk]). `kv_cache` (a dict) is filled with
        the prefix's keys/values (`fill_kv_cache`) or read for a suffix-only pass. Returns the
        streams' final-normed outputs."""
        stacks = [self.language_model, self.gemma_expert.model]
        present = [i for i, h in enumerate(inputs_embeds) if h is not None]
        dtype = stacks[present[0]].layers[0].self_attn.q_proj.weight.dtype
        hiddens = [h.to(dtype) if h is not None and dtype == torch.bfloat16 else h for h in inputs_embeds]
        rotary = stacks[present[0]].rotary_emb
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for idx in range(len(stacks[present[0]].layers)):
            layers = [stacks[i].layers[idx] if i in present else None for i in range(2)]
            args = (hiddens, attention_mask, position_ids, adarms_cond, layers, rotary, kv_cache, fill_kv_cache, idx)
            hiddens = checkpoint(_joint_layer, *args, use_reentrant=False, preserve_rng_state=False) if recompute \
                else _joint_layer(*args)
        return [stacks[i].norm(h, adarms_cond[i])[0] if h is not None else None for i, h in enumerate(hiddens)]


def _joint_layer(hiddens, attention_mask, position_ids, adarms_cond, layers, rotary, kv_cache, fill_kv_cache, idx):
    """One layer of both streams (LeRobot's `compute_layer_complete`; a stream that is None passes
    through): queries, keys and values of both are concatenated for one attention."""
    from transformers.models.gemma import modeling_gemma

    queries, keys, values, gates = [], [], [], []
    for hidden, layer, cond in zip(hiddens, layers, adarms_cond):
        if hidden is None:
            gates.append(None)
            continue
        normed, gate = layer.input_layernorm(hidden, cond)
        gates.append(gate)
        shape = (*normed.shape[:-1], -1, layer.self_attn.head_dim)
        queries.append(layer.self_attn.q_proj(normed).view(shape).transpose(1, 2))
        keys.append(layer.self_attn.k_proj(normed).view(shape).transpose(1, 2))
        values.append(layer.self_attn.v_proj(normed).view(shape).transpose(1, 2))
    query, key, value = torch.cat(queries, dim=2), torch.cat(keys, dim=2), torch.cat(values, dim=2)
    dummy = torch.zeros(query.shape[0], query.shape[2], query.shape[-1], device=query.device, dtype=query.dtype)
    cos, sin = rotary(dummy, position_ids)
    query, key = modeling_gemma.apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
    if kv_cache is not None:
        if fill_kv_cache:
            kv_cache[idx] = (key, value)
        else:
            key = torch.cat([kv_cache[idx][0], key], dim=2)
            value = torch.cat([kv_cache[idx][1], value], dim=2)
    attn = next(layer for layer in layers if layer is not None).self_attn
    out, _ = modeling_gemma.eager_attention_forward(attn, query, key, value, attention_mask, attn.scaling)
    out = out.reshape(out.shape[0], out.shape[1], -1)
    outputs, start = [], 0
    for hidden, layer, gate, cond in zip(hiddens, layers, gates, adarms_cond):
        if hidden is None:
            outputs.append(None)
            continue
        end = start + hidden.shape[1]
        emb = _gated_residual(hidden, layer.self_attn.o_proj(out[:, start:end].to(layer.self_attn.o_proj.weight.dtype)),
                              gate)
        residual = emb.clone()
        emb, gate = layer.post_attention_layernorm(emb, cond)
        if layer.mlp.up_proj.weight.dtype == torch.bfloat16:
            emb = emb.to(dtype=torch.bfloat16)
        outputs.append(_gated_residual(residual, layer.mlp(emb), gate))
        start = end
    return outputs


def attention_mask_4d(att_2d_masks: torch.Tensor) -> torch.Tensor:
    """Boolean [B, Lq, Lk] -> openpi's additive float mask [B, 1, Lq, Lk]."""
    return torch.where(att_2d_masks[:, None, :, :], 0.0, MASK_VALUE)


# -- flow matching (LeRobot's PI0Pytorch / PI05Pytorch) ----------------------------------------


class PI0FlowMatching(nn.Module):
    """The backbone with the expert and the action/state/time projections; `forward` is the
    per-element flow-matching loss, `sample_actions` integrates the flow from noise."""

    def __init__(self, config: PI0Config):
        super().__init__()
        self.config = config
        width = VARIANTS[config.action_expert_variant].width
        self.paligemma_with_expert = PaliGemmaWithExpert(config)
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)
        if config.is_pi05:
            self.time_mlp_in = nn.Linear(width, width)
            self.time_mlp_out = nn.Linear(width, width)
        else:
            self.state_proj = nn.Linear(config.max_state_dim, width)
            self.action_time_mlp_in = nn.Linear(2 * width, width)
            self.action_time_mlp_out = nn.Linear(width, width)
        if config.compile_model:  # as LeRobot: the training forward and the sampler
            torch.set_float32_matmul_precision("high")
            self.sample_actions = torch.compile(self.sample_actions, mode=config.compile_mode)
            self.forward = torch.compile(self.forward, mode=config.compile_mode)

    def _maybe_checkpoint(self, func, *args):
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(func, *args, use_reentrant=False, preserve_rng_state=False)
        return func(*args)

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks):
        """Image tokens then language tokens, all attending to each other."""
        embs, pad_masks, num_tokens = [], [], 0
        for img, img_mask in zip(images, img_masks):
            img_emb = self._maybe_checkpoint(self.paligemma_with_expert.embed_image, img)
            bsize, num_img_embs = img_emb.shape[:2]
            embs.append(img_emb)
            pad_masks.append(img_mask[:, None].expand(bsize, num_img_embs))
            num_tokens += num_img_embs
        lang_emb = self._maybe_checkpoint(self.paligemma_with_expert.embed_language_tokens, lang_tokens)
        if embs and embs[0].shape[-1] != lang_emb.shape[-1]:
            raise UserError(f"policy.paligemma_variant={self.config.paligemma_variant} cannot run: LeRobot's layout "
                            f"projects images to {embs[0].shape[-1]} values for a {lang_emb.shape[-1]}-wide language "
                            "model (LeRobot 0.6.1 fails alike); use gemma_2b, or dummy for tests")
        embs.append(lang_emb)
        pad_masks.append(lang_masks)
        pad_masks = torch.cat(pad_masks, dim=1)
        att_masks = torch.zeros(num_tokens + lang_emb.shape[1], dtype=torch.bool, device=pad_masks.device)
        return torch.cat(embs, dim=1), pad_masks, att_masks[None, :].expand(pad_masks.shape[0], -1)

    def embed_suffix(self, state, noisy_actions, timestep):
        """pi0: the state token, then action tokens fused with the time embedding by an MLP;
        pi0.5: action tokens, and the time (through an MLP) as the expert's adaRMS condition.
        Nothing before the suffix attends to it; actions attend to each other."""
        time_emb = create_sinusoidal_pos_embedding(timestep, self.action_in_proj.out_features,
                                                   self.config.min_period, self.config.max_period)
        time_emb = time_emb.type(dtype=timestep.dtype)
        action_emb = self._maybe_checkpoint(self.action_in_proj, noisy_actions)
        bsize, chunk = action_emb.shape[:2]
        device = timestep.device
        if self.config.is_pi05:
            cond = self._maybe_checkpoint(self._time_mlp, time_emb)
            att = [1] + [0] * (self.config.chunk_size - 1)
            att_masks = torch.tensor(att, dtype=action_emb.dtype, device=action_emb.device)[None, :].expand(bsize, -1)
            return action_emb, torch.ones(bsize, chunk, dtype=torch.bool, device=device), att_masks, cond
        if self.state_proj.weight.dtype == torch.float32:
            state = state.to(torch.float32)
        state_emb = self._maybe_checkpoint(self.state_proj, state)
        action_time = torch.cat([action_emb, time_emb[:, None, :].expand_as(action_emb)], dim=2)
        action_time = self._maybe_checkpoint(self._action_time_mlp, action_time)
        embs = torch.cat([state_emb[:, None, :], action_time], dim=1)
        pad_masks = torch.ones(bsize, 1 + chunk, dtype=torch.bool, device=device)
        att = [1, 1] + [0] * (self.config.chunk_size - 1)
        att_masks = torch.tensor(att, dtype=embs.dtype, device=embs.device)[None, :].expand(bsize, -1)
        return embs, pad_masks, att_masks, None

    def _time_mlp(self, time_emb):
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))

    def _action_time_mlp(self, action_time):
        return self.action_time_mlp_out(F.silu(self.action_time_mlp_in(action_time)))

    def forward(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise, time) -> torch.Tensor:
        """Per-element flow-matching loss (B, chunk, max_action_dim) at times `time` with `noise`."""
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions
        prefix_embs, prefix_pad, prefix_att = self.embed_prefix(images, img_masks, lang_tokens, lang_masks)
        suffix_embs, suffix_pad, suffix_att, cond = self.embed_suffix(state, x_t, time)
        pad_masks = torch.cat([prefix_pad, suffix_pad], dim=1)
        att_masks = torch.cat([prefix_att, suffix_att], dim=1)
        _, suffix_out = self.paligemma_with_expert(
            attention_mask_4d(make_att_2d_masks(pad_masks, att_masks)), torch.cumsum(pad_masks, dim=1) - 1,
            [prefix_embs, suffix_embs], adarms_cond=(None, cond))
        v_t = self._maybe_checkpoint(self.action_out_proj, suffix_out[:, -self.config.chunk_size:].to(torch.float32))
        return F.mse_loss(u_t, v_t, reduction="none")

    @torch.no_grad()
    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None) -> torch.Tensor:
        """Integrate the flow from noise (t=1) to actions (t=0) in `num_inference_steps` Euler
        steps, the prefix's keys and values computed once."""
        bsize, device = lang_tokens.shape[0], lang_tokens.device
        if noise is None:
            noise = global_batch.randn((bsize, self.config.chunk_size, self.config.max_action_dim), device)
        prefix_embs, prefix_pad, prefix_att = self.embed_prefix(images, img_masks, lang_tokens, lang_masks)
        kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.paligemma_with_expert(attention_mask_4d(make_att_2d_masks(prefix_pad, prefix_att)),
                                   torch.cumsum(prefix_pad, dim=1) - 1, [prefix_embs, None], kv_cache=kv_cache,
                                   fill_kv_cache=True)
        dt = -1.0 / self.config.num_inference_steps
        x_t = noise
        for step in range(self.config.num_inference_steps):
            time = torch.tensor(1.0 + step * dt, dtype=torch.float32, device=device).expand(bsize)
            x_t = x_t + dt * self.denoise_step(state, prefix_pad, kv_cache, x_t, time)
        return x_t

    def denoise_step(self, state, prefix_pad, kv_cache, x_t, timestep) -> torch.Tensor:
        """The velocity at `x_t`, the suffix attending to the cached prefix."""
        suffix_embs, suffix_pad, suffix_att, cond = self.embed_suffix(state, x_t, timestep)
        bsize, suffix_len, prefix_len = prefix_pad.shape[0], suffix_pad.shape[1], prefix_pad.shape[1]
        prefix_2d = prefix_pad[:, None, :].expand(bsize, suffix_len, prefix_len)
        full_mask = torch.cat([prefix_2d, make_att_2d_masks(suffix_pad, suffix_att)], dim=2)
        position_ids = torch.sum(prefix_pad, dim=-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
        _, suffix_out = self.paligemma_with_expert(attention_mask_4d(full_mask), position_ids, [None, suffix_embs],
                                                   kv_cache=kv_cache, adarms_cond=(None, cond))
        return self.action_out_proj(suffix_out[:, -self.config.chunk_size:].to(torch.float32))


# -- the policies -------------------------------------------------------------------------------


def resize_with_center_pad(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """openpi's `resize_with_pad_torch` on (B, C, H, W) floats in [0, 1]: bilinear resize keeping
    aspect ratio, clamped to [0, 1], padded with 0 evenly around (the extra pixel after)."""
    cur_height, cur_width = img.shape[2:]
    ratio = max(cur_width / width, cur_height / height)
    resized_height, resized_width = int(cur_height / ratio), int(cur_width / ratio)
    img = F.interpolate(img, size=(resized_height, resized_width), mode="bilinear", align_corners=False)
    img = img.clamp(0.0, 1.0)
    pad_h0, rem_h = divmod(height - resized_height, 2)
    pad_w0, rem_w = divmod(width - resized_width, 2)
    return F.pad(img, (pad_w0, pad_w0 + rem_w, pad_h0, pad_h0 + rem_h), mode="constant", value=0.0)


class PI0Policy(Policy):
    name = "pi0"
    config_class = PI0Config
    #: LeRobot's pi0_new_line_processor ends each task with a newline; pi0.5's prompt has its own end.
    newline_after_task: ClassVar[bool] = True
    inputs_may_be_absent = True  # empty cameras

    def __init__(self, config: PI0Config, stats):
        # LeRobot's validate_features: empty cameras are image inputs the batch never holds.
        for i in range(config.empty_cameras):
            config.input_features.setdefault(f"observation.images.empty_camera_{i}",
                                             {"type": "VISUAL", "shape": [3, *config.image_resolution]})
        super().__init__(config, stats)
        self.image_keys, self.action_dim = vla.check_features(config, self.name)
        self.tokenizer = vla.load_tokenizer(config.tokenizer_name, "policy.tokenizer_name", self.name)
        self.model = PI0FlowMatching(config)
        vocab = self.model.paligemma_with_expert.vocab_size
        if len(self.tokenizer) > vocab:
            raise UserError(f"policy.tokenizer_name={config.tokenizer_name} has {len(self.tokenizer)} tokens, more than "
                            f"the {vocab} of policy.paligemma_variant={config.paligemma_variant}")

    # -- inputs -----------------------------------------------------------------------------
    def prepare_images(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Images resized with centered padding to `image_resolution` and mapped from [0, 1] to
        [-1, 1]; each camera absent from the batch becomes an all -1 image with a false mask."""
        present = [k for k in self.image_keys if k in batch]
        if not present:
            raise UserError(f"the batch holds none of the image inputs {self.image_keys}")
        images, masks = [], []
        for key in present:
            img = batch[key][:, -1] if batch[key].ndim == 5 else batch[key]
            img = img.to(torch.float32)
            if tuple(img.shape[2:]) != tuple(self.config.image_resolution):
                img = resize_with_center_pad(img, *self.config.image_resolution)
            images.append(img * 2.0 - 1.0)
            masks.append(torch.ones(img.shape[0], dtype=torch.bool, device=img.device))
        for _ in range(len(self.image_keys) - len(present)):
            images.append(torch.ones_like(images[-1]) * -1)
            masks.append(torch.zeros_like(masks[-1]))
        return images, masks

    def prompts(self, batch: dict[str, Any]) -> list[str]:
        """pi0's prompt is the task (LeRobot's pi0_new_line_processor adds the newline)."""
        tasks = batch["task"]
        return [tasks] if isinstance(tasks, str) else list(tasks)

    def _inputs(self, batch: dict[str, Any]):
        if "task" not in batch:
            raise UserError(f"{self.name} needs the language instruction: the batch has no 'task'")
        images, img_masks = self.prepare_images(batch)
        state = batch[OBS_STATE][:, -1, :] if batch[OBS_STATE].ndim > 2 else batch[OBS_STATE]
        tokens, masks = vla.tokenize(self.tokenizer, self.prompts({**batch, OBS_STATE: state}),
                                     self.config.tokenizer_max_length, "max_length", device=state.device,
                                     newline=self.newline_after_task)
        return images, img_masks, tokens, masks, pad_vector(state, self.config.max_state_dim)

    # -- training and acting ---------------------------------------------------------------
    def compute_loss(self, batch):
        images, img_masks, tokens, masks, state = self._inputs(batch)
        actions = pad_vector(batch[ACTION], self.config.max_action_dim)
        noise = global_batch.randn(actions.shape, actions.device)  # LeRobot's order: noise, then time
        time = global_batch.beta(self.config.time_sampling_beta_alpha, self.config.time_sampling_beta_beta,
                                 actions.shape[0], actions.device)
        time = (time * self.config.time_sampling_scale + self.config.time_sampling_offset).to(torch.float32)
        losses = self.model(images, img_masks, tokens, masks, state, actions, noise, time)
        return vla.action_loss(self, losses, batch, self.action_dim)

    def predict_chunk(self, batch):
        images, img_masks, tokens, masks, state = self._inputs(batch)
        return self.model.sample_actions(images, img_masks, tokens, masks, state)[:, :, : self.action_dim]

    # -- fine-tuning defaults and the LeRobot folder -----------------------------------------
    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LeRobot's `_fix_pytorch_state_dict_keys` for files converted from openpi (such as
        lerobot/pi0_base): the time MLP under this policy's names, the language model's embedding
        taken from lm_head where only that was saved, and (pi0.5) no state_proj."""
        ours, theirs = ("time_mlp", "action_time_mlp") if self.config.is_pi05 else ("action_time_mlp", "time_mlp")
        fixed = {}
        for key, value in state.items():
            if key.startswith(f"model.{theirs}_"):
                key = key.replace(f"model.{theirs}_", f"model.{ours}_", 1)
            if self.config.is_pi05 and key.startswith("model.state_proj."):
                continue
            fixed[key] = value
        lm_head = "model.paligemma_with_expert.paligemma.lm_head.weight"
        embed = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
        if embed not in fixed and lm_head in fixed:
            fixed[embed] = fixed[lm_head].clone()
        return fixed

    def peft_defaults(self) -> dict[str, Any]:
        """LeRobot's pi0/pi0.5 adapter defaults: LoRA on the expert's q/v projections and on the
        state/action/time projections; nothing saved in full."""
        projections = "state_proj|action_in_proj|action_out_proj|action_time_mlp_in|action_time_mlp_out"
        return {"target_modules": rf"(.*\.gemma_expert\..*\.self_attn\.(q|v)_proj|model\.({projections}))",
                "modules_to_save": []}

    def _tokenizer_step(self) -> dict[str, Any]:
        return {"registry_name": "tokenizer_processor", "config": {
            "max_length": self.config.tokenizer_max_length, "task_key": "task", "padding_side": "right",
            "padding": "max_length", "truncation": True, "tokenizer_name": self.config.tokenizer_name}}

    def _relative_steps(self) -> tuple[dict[str, Any], dict[str, Any]]:
        relative = {"registry_name": "relative_actions_processor", "config": {
            "enabled": False, "exclude_joints": list(self.config.relative_exclude_joints),
            "action_names": self.config.action_feature_names}}
        return relative, {"registry_name": "absolute_actions_processor", "config": {"enabled": False}}

    def processor_steps(self) -> tuple[list[StepSpec], list[StepSpec]]:
        """LeRobot's pi0 pipeline: newline, tokenizer, device, relative actions (off), normalizer."""
        relative, absolute = self._relative_steps()
        newline = {"registry_name": "pi0_new_line_processor", "config": {}}
        return [newline, self._tokenizer_step(), DEVICE, relative, NORMALIZER], [UNNORMALIZER, absolute, DEVICE]


class PI05Policy(PI0Policy):
    name = "pi05"
    config_class = PI05Config
    newline_after_task = False

    def prompts(self, batch: dict[str, Any]) -> list[str]:
        """LeRobot's `pi05_prepare_state_tokenizer_processor_step`: the task cleaned, then the
        normalized state discretized into 256 bins over [-1, 1]."""
        state = batch[OBS_STATE].detach().to("cpu", torch.float32).numpy()
        discretized = (np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1).tolist()
        prompts = []
        for task, values in zip(super().prompts(batch), discretized):
            cleaned = task.strip().replace("_", " ").replace("\n", " ")
            prompts.append(f"Task: {cleaned}, State: {' '.join(map(str, values))};\nAction: ")
        return prompts

    def processor_steps(self) -> tuple[list[StepSpec], list[StepSpec]]:
        """LeRobot's pi0.5 pipeline: relative actions (off), normalizer, state into the prompt,
        tokenizer, device."""
        relative, absolute = self._relative_steps()
        prompt = {"registry_name": "pi05_prepare_state_tokenizer_processor_step",
                  "config": {"max_state_dim": self.config.max_state_dim, "task_key": "task"}}
        return [relative, NORMALIZER, prompt, self._tokenizer_step(), DEVICE], [UNNORMALIZER, absolute, DEVICE]
