"""ACT: the Action Chunking Transformer (Zhao et al. 2023, https://arxiv.org/abs/2304.13705),
built to be checkpoint-compatible with LeRobot's `ACTPolicy` (lerobot 0.4.4) both ways.

Same architecture, math and module names as LeRobot's `modeling_act.py`, so `state_dict()` has
exactly LeRobot's keys, shapes and buffers (`model.vae_encoder_pos_enc`, the backbone's frozen
batch-norm statistics), and `config.json` has exactly LeRobot's fields in LeRobot's order:

    model.vae_encoder            VAE encoder (training only): [cls, state, *actions] -> latent
                                 distribution (mean, 2 log sigma) read off the cls token
    model.backbone               ResNet-18 up to layer4, FrozenBatchNorm2d (robotrain.policies.resnet)
    model.encoder / .decoder     transformer: tokens [latent, state, env_state, *image pixels]
                                 -> chunk_size queries (DETR-style learned `decoder_pos_embed`)
    model.action_head            decoder output -> actions

Loss: masked L1 on the normalized action chunk (padded targets zeroed, then the mean over all
elements, as LeRobot) + kl_weight * KL(latent || N(0, I)). At inference the latent is zero.

Differences from LeRobot, none of which touch checkpoints: normalization runs inside the
policy (stats come from the processor files, as for every robotrain policy); robotrain's
optimizer is global (`conf/optim`), so `optimizer_lr*` are kept in the config for LeRobot but
not used; `pretrained_backbone_weights` downloads torchvision's ImageNet weights with
`torch.hub` (hash-checked, `weights_only` unpickling) since torchvision itself is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robotrain import global_batch
from robotrain.errors import UserError
from robotrain.policies.base import PER_SAMPLE_LOSS, Policy, PolicyConfig
from robotrain.policies.resnet import ResNet18

#: torchvision weight enums that `pretrained_backbone_weights` accepts -> their download URL.
BACKBONE_WEIGHTS = {
    "ResNet18_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "ResNet18_Weights.DEFAULT": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
}

#: config.json's leading keys, in LeRobot's order (PreTrainedConfig's fields, then ACTConfig's).
@dataclass
class ACTConfig(PolicyConfig):
    """LeRobot's ACTConfig: same field names, defaults and config.json layout."""

    type: str = "act"
    """Policy type."""
    chunk_size: int = 100
    """Actions predicted per forward pass (the decoder's number of queries)."""
    n_action_steps: int = 100
    """Actions of each chunk executed before predicting again (1 with temporal ensembling)."""
    vision_backbone: str = "resnet18"
    """Image encoder: torchvision's resnet18 (the only one built here)."""
    pretrained_backbone_weights: Optional[str] = "ResNet18_Weights.IMAGENET1K_V1"
    """torchvision weights to start the backbone from (downloaded once); null: random init."""
    replace_final_stride_with_dilation: bool = False
    """Replace layer4's stride 2 with dilation (a 2x larger final feature map)."""
    pre_norm: bool = False
    """LayerNorm before (true) or after (false) each attention / feed-forward block."""
    dim_model: int = 512
    """Transformer hidden size."""
    n_heads: int = 8
    """Attention heads; must divide dim_model."""
    dim_feedforward: int = 3200
    """Hidden size of the transformer feed-forward layers."""
    feedforward_activation: str = "relu"
    """Feed-forward activation: relu or gelu."""
    n_encoder_layers: int = 4
    """Transformer encoder layers."""
    n_decoder_layers: int = 1
    """Transformer decoder layers (1, as the original code effectively uses)."""
    use_vae: bool = True
    """Train with the variational objective (the VAE encoder over the action chunk)."""
    latent_dim: int = 32
    """Size of the VAE latent."""
    n_vae_encoder_layers: int = 4
    """VAE encoder transformer layers."""
    temporal_ensemble_coeff: Optional[float] = None
    """Temporal ensembling weight exp(-coeff * i), oldest first (ACT used 0.01); null: off."""
    dropout: float = 0.1
    """Dropout in the transformer layers."""
    kl_weight: float = 10.0
    """Weight of the KL term: loss = l1 + kl_weight * kld."""
    optimizer_lr: float = 1e-5
    """LeRobot's optimizer preset (kept for LeRobot; robotrain uses optim.lr)."""
    optimizer_weight_decay: float = 1e-4
    """LeRobot's optimizer preset (kept for LeRobot; robotrain uses optim.weight_decay)."""
    optimizer_lr_backbone: float = 1e-5
    """LeRobot's backbone learning rate (kept for LeRobot; robotrain uses optim.lr for all)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_obs_steps != 1:
            raise UserError(f"policy.n_obs_steps must be 1 for ACT, got {self.n_obs_steps}")
        if self.vision_backbone != "resnet18":
            raise UserError(f"policy.vision_backbone must be 'resnet18' (the only backbone built), got {self.vision_backbone!r}")
        if self.pretrained_backbone_weights is not None and self.pretrained_backbone_weights not in BACKBONE_WEIGHTS:
            raise UserError(f"policy.pretrained_backbone_weights must be null or one of {', '.join(BACKBONE_WEIGHTS)}, "
                            f"got {self.pretrained_backbone_weights!r}")
        if self.temporal_ensemble_coeff is not None and self.n_action_steps != 1:
            raise UserError(f"policy.n_action_steps must be 1 with temporal ensembling, got {self.n_action_steps}")
        for name in ("dim_model", "n_heads", "dim_feedforward", "n_encoder_layers", "n_decoder_layers",
                     "latent_dim", "n_vae_encoder_layers"):
            if getattr(self, name) <= 0:
                raise UserError(f"policy.{name} must be > 0, got {getattr(self, name)}")
        if self.dim_model % self.n_heads:
            raise UserError(f"policy.n_heads={self.n_heads} must divide policy.dim_model={self.dim_model}")
        if self.feedforward_activation not in ("relu", "gelu"):
            raise UserError(f"policy.feedforward_activation must be relu or gelu, got {self.feedforward_activation!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"policy.dropout must be in [0, 1), got {self.dropout}")
        if self.kl_weight < 0:
            raise UserError(f"policy.kl_weight must be >= 0, got {self.kl_weight}")


class ACTPolicy(Policy):
    """ACT on normalized tensors; the base class normalizes, queues actions and saves."""

    name = "act"
    config_class = ACTConfig
    # LeRobot's ACT reads these embeddings' `.weight` directly as learned tables (CLS token,
    # positions of the 1-D tokens and of the action queries).
    fsdp_gathered_with_policy = ("model.vae_encoder_cls_embed", "model.encoder_1d_feature_pos_embed",
                                 "model.decoder_pos_embed")

    def peft_defaults(self) -> dict:
        """Adapters on the transformer's feed-forward projections (encoder and decoder); the
        action head, which maps to this dataset's actions, is trained in full. The backbone
        and the VAE encoder (training-time only) stay frozen. Attention is not adapted:
        nn.MultiheadAttention reads its projections' weights without calling them."""
        return {"target_modules": r"model\.(encoder|decoder)\.layers\.\d+\.(linear1|linear2)",
                "modules_to_save": ["model.action_head"]}

    def __init__(self, config: ACTConfig, stats):
        super().__init__(config, stats)
        self.model = ACT(config)
        self.temporal_ensembler = (ACTTemporalEnsembler(config.temporal_ensemble_coeff, config.chunk_size)
                                   if config.temporal_ensemble_coeff is not None else None)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # Metrics stay 0-d tensors: .item() here would wait for the device on every training step.
        actions_hat, (mu, log_sigma_x2) = self.model(batch)
        valid = ~batch["action_is_pad"].unsqueeze(-1)
        l1_entries = F.l1_loss(batch["action"], actions_hat, reduction="none") * valid
        l1_loss = l1_entries.mean()
        # As the loss: padded entries count as zeros.
        metrics = {"l1_loss": l1_loss.detach(), **self._per_sample_loss(l1_entries)}
        if mu is None:  # no VAE, or evaluated in eval mode (the latent is then zero)
            return l1_loss, metrics
        # KL(N(mu, sigma^2) || N(0, 1)) summed over the latent, averaged over the batch.
        kld_per_sample = (-0.5 * (1 + log_sigma_x2 - mu.pow(2) - log_sigma_x2.exp())).sum(-1)
        kld = kld_per_sample.mean()
        metrics["kld_loss"] = kld.detach()
        if PER_SAMPLE_LOSS in metrics:
            metrics[PER_SAMPLE_LOSS] = metrics[PER_SAMPLE_LOSS] + self.config.kl_weight * kld_per_sample.detach()
        return l1_loss + self.config.kl_weight * kld, metrics

    def predict_chunk(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(batch)[0]

    def reset(self) -> None:
        super().reset()
        if self.temporal_ensembler is not None:
            self.temporal_ensembler.reset()

    @torch.no_grad()
    def select_action(self, observation: dict[str, Tensor]) -> Tensor:
        """Next action (B, action_dim): the queue of the base class, or, with
        `temporal_ensemble_coeff`, a new chunk every call averaged with the earlier ones."""
        if self.temporal_ensembler is None:
            return super().select_action(observation)
        return self.temporal_ensembler.update(self.predict_action_chunk(observation))


class ACTTemporalEnsembler:
    """Temporal ensembling (Algorithm 2 of the ACT paper), computed online as LeRobot does.

    Every step adds a new chunk; the action for time t is the average of all predictions made
    for t, weighted w_i = exp(-coeff * i) with w_0 the oldest (coeff > 0 favours older ones)."""

    def __init__(self, coeff: float, chunk_size: int):
        self.chunk_size = chunk_size
        self.weights = torch.exp(-coeff * torch.arange(chunk_size))
        self.weights_cumsum = torch.cumsum(self.weights, dim=0)
        self.reset()

    def reset(self) -> None:
        self.actions: Tensor | None = None  # (B, remaining, A): running weighted averages
        self.counts: Tensor | None = None  # (remaining, 1): predictions averaged so far per step

    def update(self, actions: Tensor) -> Tensor:
        """Add a (B, chunk, A) prediction; pop and return the next (B, A) action."""
        weights = self.weights.to(actions.device)
        cumsum = self.weights_cumsum.to(actions.device)
        if self.actions is None:
            self.actions = actions.clone()
            self.counts = torch.ones((self.chunk_size, 1), dtype=torch.long, device=actions.device)
        else:
            self.actions = self.actions * cumsum[self.counts - 1]
            self.actions = (self.actions + actions[:, :-1] * weights[self.counts]) / cumsum[self.counts]
            self.counts = torch.clamp(self.counts + 1, max=self.chunk_size)
            self.actions = torch.cat([self.actions, actions[:, -1:]], dim=1)
            self.counts = torch.cat([self.counts, torch.ones_like(self.counts[-1:])])
        action, self.actions, self.counts = self.actions[:, 0], self.actions[:, 1:], self.counts[1:]
        return action


class ACT(nn.Module):
    """The network (LeRobot's `ACT`): module names and registration order are LeRobot's, so the
    state dict's keys and their order are too."""

    def __init__(self, config: ACTConfig):
        super().__init__()
        self.config = config
        inputs = config.input_features
        self.state_key = "observation.state" if inputs.get("observation.state", {}).get("type") == "STATE" else None
        self.env_key = next((k for k, ft in inputs.items() if ft["type"] == "ENV"), None)
        self.image_keys = list(config.image_features)
        action = config.output_features.get("action")
        if action is None or action["type"] != "ACTION":
            raise UserError("ACT needs an 'action' output feature of type ACTION")
        if not self.image_keys and self.env_key is None:
            raise UserError("ACT needs at least one camera image or observation.environment_state among the inputs")
        if self.image_keys and config.dim_model % 4:
            raise UserError(f"policy.dim_model must be a multiple of 4 with image inputs, got {config.dim_model}")
        dim, action_dim = config.dim_model, action["shape"][0]
        state_dim = inputs[self.state_key]["shape"][0] if self.state_key else 0

        if config.use_vae:
            self.vae_encoder = ACTEncoder(config, config.n_vae_encoder_layers)
            self.vae_encoder_cls_embed = nn.Embedding(1, dim)
            if self.state_key:
                self.vae_encoder_robot_state_input_proj = nn.Linear(state_dim, dim)
            self.vae_encoder_action_input_proj = nn.Linear(action_dim, dim)
            self.vae_encoder_latent_output_proj = nn.Linear(dim, config.latent_dim * 2)
            num_tokens = 1 + config.chunk_size + (1 if self.state_key else 0)
            self.register_buffer("vae_encoder_pos_enc", sinusoidal_pos_embedding(num_tokens, dim).unsqueeze(0))

        if self.image_keys:
            dilation = (False, False, bool(config.replace_final_stride_with_dilation))
            self.backbone = ResNet18(norm="frozen_bn", replace_stride_with_dilation=dilation)
            feature_channels = self.backbone.fc.in_features
            if config.pretrained_backbone_weights:
                load_backbone_weights(self.backbone, config.pretrained_backbone_weights)
            del self.backbone.avgpool, self.backbone.fc  # LeRobot keeps the layers up to layer4 only

        self.encoder = ACTEncoder(config, config.n_encoder_layers)
        self.decoder = ACTDecoder(config)
        if self.state_key:
            self.encoder_robot_state_input_proj = nn.Linear(state_dim, dim)
        if self.env_key:
            self.encoder_env_state_input_proj = nn.Linear(inputs[self.env_key]["shape"][0], dim)
        self.encoder_latent_input_proj = nn.Linear(config.latent_dim, dim)
        if self.image_keys:
            self.encoder_img_feat_input_proj = nn.Conv2d(feature_channels, dim, kernel_size=1)
        n_1d_tokens = 1 + (1 if self.state_key else 0) + (1 if self.env_key else 0)  # latent, state, env
        self.encoder_1d_feature_pos_embed = nn.Embedding(n_1d_tokens, dim)
        self.decoder_pos_embed = nn.Embedding(config.chunk_size, dim)
        self.action_head = nn.Linear(dim, action_dim)

        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:  # as the original code
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor] | tuple[None, None]]:
        """(B, chunk_size, action_dim) normalized actions, and the latent's (mean, 2 log sigma)
        (None, None when the latent is not sampled: eval mode, no VAE, or no actions given)."""
        cfg = self.config
        first = batch[self.image_keys[0]] if self.image_keys else batch[self.env_key]
        batch_size, device = first.shape[0], first.device

        if cfg.use_vae and self.training and "action" in batch:
            # VAE encoder over [cls, state, *actions]; the cls output holds the latent's parameters.
            tokens = [self.vae_encoder_cls_embed.weight.unsqueeze(0).expand(batch_size, -1, -1)]
            if self.state_key:
                tokens.append(self.vae_encoder_robot_state_input_proj(batch[self.state_key]).unsqueeze(1))
            tokens.append(self.vae_encoder_action_input_proj(batch["action"]))
            tokens = torch.cat(tokens, dim=1)  # (B, S, D)
            not_pad = torch.zeros(batch_size, tokens.shape[1] - cfg.chunk_size, dtype=torch.bool, device=device)
            key_padding_mask = torch.cat([not_pad, batch["action_is_pad"]], dim=1)
            cls_out = self.vae_encoder(tokens.transpose(0, 1), pos_embed=self.vae_encoder_pos_enc.transpose(0, 1),
                                       key_padding_mask=key_padding_mask)[0]
            latent_params = self.vae_encoder_latent_output_proj(cls_out)
            mu, log_sigma_x2 = latent_params[:, : cfg.latent_dim], latent_params[:, cfg.latent_dim:]
            latent = mu + log_sigma_x2.div(2).exp() * global_batch.randn(mu.shape, mu.device, mu.dtype)  # reparameterization
        else:
            mu = log_sigma_x2 = None
            latent = torch.zeros(batch_size, cfg.latent_dim, dtype=torch.float32, device=device)

        # Encoder tokens (S, B, D): [latent, state, env_state, *pixels of each camera].
        tokens = [self.encoder_latent_input_proj(latent)]
        if self.state_key:
            tokens.append(self.encoder_robot_state_input_proj(batch[self.state_key]))
        if self.env_key:
            tokens.append(self.encoder_env_state_input_proj(batch[self.env_key]))
        tokens = [torch.stack(tokens)]
        pos_embed = [self.encoder_1d_feature_pos_embed.weight.unsqueeze(1)]  # (n_1d, 1, D)
        for key in self.image_keys:
            features = self.backbone.features(batch[key])  # (B, 512, h, w)
            pos_embed.append(sinusoidal_pos_embedding_2d(features, cfg.dim_model // 2).to(features.dtype)
                             .flatten(2).permute(2, 0, 1))  # (h*w, 1, D)
            tokens.append(self.encoder_img_feat_input_proj(features).flatten(2).permute(2, 0, 1))  # (h*w, B, D)
        tokens, pos_embed = torch.cat(tokens), torch.cat(pos_embed)

        encoder_out = self.encoder(tokens, pos_embed=pos_embed)
        decoder_in = torch.zeros((cfg.chunk_size, batch_size, cfg.dim_model), dtype=pos_embed.dtype, device=device)
        decoder_out = self.decoder(decoder_in, encoder_out, encoder_pos_embed=pos_embed,
                                   decoder_pos_embed=self.decoder_pos_embed.weight.unsqueeze(1))
        return self.action_head(decoder_out.transpose(0, 1)), (mu, log_sigma_x2)


class ACTEncoder(nn.Module):
    """A stack of encoder layers, then LayerNorm with pre_norm (Identity otherwise)."""

    def __init__(self, config: ACTConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([ACTEncoderLayer(config) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(config.dim_model) if config.pre_norm else nn.Identity()

    def forward(self, x: Tensor, pos_embed: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos_embed=pos_embed, key_padding_mask=key_padding_mask)
        return self.norm(x)


class ACTEncoderLayer(nn.Module):
    def __init__(self, config: ACTConfig):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(config.dim_model, config.n_heads, dropout=config.dropout)
        self.linear1 = nn.Linear(config.dim_model, config.dim_feedforward)
        self.dropout = nn.Dropout(config.dropout)
        self.linear2 = nn.Linear(config.dim_feedforward, config.dim_model)
        self.norm1 = nn.LayerNorm(config.dim_model)
        self.norm2 = nn.LayerNorm(config.dim_model)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)
        self.activation = F.relu if config.feedforward_activation == "relu" else F.gelu
        self.pre_norm = config.pre_norm

    def forward(self, x: Tensor, pos_embed: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        skip = x
        if self.pre_norm:
            x = self.norm1(x)
        q = k = x if pos_embed is None else x + pos_embed
        x = skip + self.dropout1(self.self_attn(q, k, value=x, key_padding_mask=key_padding_mask)[0])
        if self.pre_norm:
            skip, x = x, self.norm2(x)
        else:
            x = skip = self.norm1(x)
        x = skip + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return x if self.pre_norm else self.norm2(x)


class ACTDecoder(nn.Module):
    """A stack of decoder layers, then LayerNorm."""

    def __init__(self, config: ACTConfig):
        super().__init__()
        self.layers = nn.ModuleList([ACTDecoderLayer(config) for _ in range(config.n_decoder_layers)])
        self.norm = nn.LayerNorm(config.dim_model)

    def forward(self, x: Tensor, encoder_out: Tensor, decoder_pos_embed: Tensor | None = None,
                encoder_pos_embed: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, encoder_out, decoder_pos_embed=decoder_pos_embed, encoder_pos_embed=encoder_pos_embed)
        return self.norm(x)


class ACTDecoderLayer(nn.Module):
    def __init__(self, config: ACTConfig):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(config.dim_model, config.n_heads, dropout=config.dropout)
        self.multihead_attn = nn.MultiheadAttention(config.dim_model, config.n_heads, dropout=config.dropout)
        self.linear1 = nn.Linear(config.dim_model, config.dim_feedforward)
        self.dropout = nn.Dropout(config.dropout)
        self.linear2 = nn.Linear(config.dim_feedforward, config.dim_model)
        self.norm1 = nn.LayerNorm(config.dim_model)
        self.norm2 = nn.LayerNorm(config.dim_model)
        self.norm3 = nn.LayerNorm(config.dim_model)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)
        self.dropout3 = nn.Dropout(config.dropout)
        self.activation = F.relu if config.feedforward_activation == "relu" else F.gelu
        self.pre_norm = config.pre_norm

    def forward(self, x: Tensor, encoder_out: Tensor, decoder_pos_embed: Tensor | None = None,
                encoder_pos_embed: Tensor | None = None) -> Tensor:
        """x: (chunk, B, D) queries; encoder_out: (S, B, D); pos embeds broadcast over B."""

        def with_pos(t: Tensor, pos: Tensor | None) -> Tensor:
            return t if pos is None else t + pos

        skip = x
        if self.pre_norm:
            x = self.norm1(x)
        q = k = with_pos(x, decoder_pos_embed)
        x = skip + self.dropout1(self.self_attn(q, k, value=x)[0])
        if self.pre_norm:
            skip, x = x, self.norm2(x)
        else:
            x = skip = self.norm1(x)
        x = self.multihead_attn(query=with_pos(x, decoder_pos_embed), key=with_pos(encoder_out, encoder_pos_embed),
                                value=encoder_out)[0]
        x = skip + self.dropout2(x)
        if self.pre_norm:
            skip, x = x, self.norm3(x)
        else:
            x = skip = self.norm2(x)
        x = skip + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return x if self.pre_norm else self.norm3(x)


def sinusoidal_pos_embedding(num_positions: int, dimension: int) -> Tensor:
    """(num_positions, dimension) 1-D sinusoidal embedding of "Attention Is All You Need":
    sin on even channels, cos on odd ones; computed in float64 as LeRobot, then float32."""
    position = np.arange(num_positions, dtype=np.float64)[:, None]
    channel = np.arange(dimension)[None, :]
    table = position / np.power(10000, 2 * (channel // 2) / dimension)
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.from_numpy(table).float()


def sinusoidal_pos_embedding_2d(features: Tensor, dimension: int) -> Tensor:
    """(1, 2 * dimension, H, W) 2-D sinusoidal embedding of a (B, C, H, W) feature map:
    `dimension` channels for y then `dimension` for x, sin/cos interleaved, positions
    1..H and 1..W scaled to (0, 2 pi] (LeRobot's ACTSinusoidalPositionEmbedding2d)."""
    ones = torch.ones_like(features[0, :1])  # (1, H, W)
    y = ones.cumsum(1, dtype=torch.float32)
    x = ones.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = x / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    inverse_frequency = 10000 ** (2 * (torch.arange(dimension, dtype=torch.float32, device=features.device) // 2)
                                  / dimension)
    x = x.unsqueeze(-1) / inverse_frequency  # (1, H, W, dimension)
    y = y.unsqueeze(-1) / inverse_frequency
    pos_x = torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(3)
    pos_y = torch.stack((y[..., 0::2].sin(), y[..., 1::2].cos()), dim=-1).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def load_backbone_weights(backbone: ResNet18, weights: str) -> None:
    """torchvision's pretrained ResNet-18 weights into `backbone` (torchvision names; its
    `num_batches_tracked` counters are dropped, as FrozenBatchNorm2d does). Downloaded once
    into torch.hub's cache, hash-checked, unpickled with `weights_only=True`."""
    try:
        state = torch.hub.load_state_dict_from_url(BACKBONE_WEIGHTS[weights], progress=False, check_hash=True,
                                                   weights_only=True, map_location="cpu")
    except Exception as err:  # offline, proxy, bad hash: all end the same way for the user
        detail = " ".join(str(err).split())[:200]
        raise UserError(f"could not get the {weights} backbone weights ({detail}); "
                        f"set policy.pretrained_backbone_weights=null to start from random weights") from None
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    backbone.load_state_dict(state, strict=True)
