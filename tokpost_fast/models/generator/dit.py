"""The class-conditional diffusion transformer over a continuous tokenizer's latent grid, read top to
bottom: embeddings, blocks, the model.

Key layout and initialisation are facebookresearch/DiT's (models.py): x_embedder.proj, pos_embed (a fixed 2-D
sin-cos table stored as a non-trainable parameter), t_embedder.mlp.{0,2}, y_embedder.embedding_table,
blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1} (norm1 / norm2 have no parameters),
final_layer.{linear, adaLN_modulation.1}; adaLN-Zero. So a DiT state dict of the same sizes loads strictly.
Two differences in meaning, not layout: the time is t in [0, 1] of a rectified flow (scaled by 1000 before DiT's
sinusoidal embedding, whose frequencies were chosen for 1000 DDPM steps), and the output is a velocity
(models/generator/diffusion.py), not DDPM's epsilon, so DiT's released weights are not a working flow model.
The "no class" label (id num_classes) always has a row, as in DiT's files trained with label dropout.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokpost_fast.models.generator.attention import full_attention
from tokpost_fast.models.generator.config import DiTConfig
from tokpost_fast.models.generator.diffusion import flow_loss, flow_pair
from tokpost_fast.models.tokenizer.state import load_state_dict_strict, read_state_dict

TIME_SCALE = 1000.0          # t in [0, 1] -> DiT's timestep range [0, 1000)
FREQUENCY_DIM = 256          # DiT's frequency_embedding_size


# ---------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: sin of the first dim/2 frequencies, then cos (MAE's / DiT's table), in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """[grid_size**2, dim] fp32 for the raster-ordered patches. DiT's table (meshgrid with w first): the first half
    of the channels encodes the column, the second half the row."""
    rows, cols = torch.arange(grid_size * grid_size).div(grid_size, rounding_mode="floor"), \
        torch.arange(grid_size * grid_size) % grid_size
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def timestep_frequencies(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps (DiT's units) -> [B, dim] fp32: cos of dim/2 frequencies, then sin (GLIDE's embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.latent_channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        # x: [B, C, h, w] -> [B, (h/p)*(w/p), D], patches in raster order
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        # t: [B] in [0, 1] -> [B, D]
        freqs = timestep_frequencies(t * TIME_SCALE)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)    # + the "no class" label

    def forward(self, labels):
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: [B, S, D]; shift / scale: [B, D]
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """timm's Attention as DiT uses it (fused qkv with bias, no qk-norm), through our attention backends."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.head_dim, self.backend = cfg.heads, cfg.head_dim, cfg.attn_backend
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        # x: [B, S, D]; qkv features are laid out (3, H, Dh), as timm's reshape reads them
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(dim=2)
        return self.proj(full_attention(q, k, v, self.backend).flatten(-2))


class Mlp(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning gives shift, scale and gate of both branches; the gates start at 0."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x, c):
        # x: [B, S, D], c: [B, D] (time + class embedding)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.width, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class DiT(nn.Module):
    kind = "dit"
    is_continuous = True    # models latents of a continuous tokenizer (tokpost_fast.models.is_continuous)

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.null_label = cfg.num_classes
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg.width)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.width)
        # DiT's fixed table: a parameter (so its key is in the state dict and DiT files load) that never trains
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DiT's initialize_weights: xavier for every linear (bias 0), the patch conv like a linear, N(0, 0.02)
        # for the label table and the time MLP, and zeros for every adaLN modulation and the output layer
        # (adaLN-Zero: each block starts as the identity, the model predicts 0).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.config.width, self.config.grid_size // self.config.patch_size)[None])
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, p*p*c] -> [B, c, h, w] (DiT's einsum nhwpqc -> nchpwq)
        p, c = self.config.patch_size, self.config.out_channels
        side = self.config.grid_size // p
        x = x.reshape(x.shape[0], side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, side * p, side * p)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x_t: [B, C, h, w] noisy latents, t: [B] in [0, 1], labels: [B] (num_classes = no class) ->
        velocity [B, C, h, w] fp32."""
        cfg = self.config
        if x_t.shape[1:] != (cfg.latent_channels, cfg.grid_size, cfg.grid_size):
            raise ValueError(f"x_t must be [B, {cfg.latent_channels}, {cfg.grid_size}, {cfg.grid_size}], "
                             f"got {tuple(x_t.shape)}")
        x = self.x_embedder(x_t) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(labels)
        for block in self.blocks:
            x = block(x, c)
        out = self.unpatchify(self.final_layer(x, c))
        return out[:, :cfg.latent_channels].float()

    def check_labels(self, labels: torch.Tensor) -> None:
        """Once per loss / sampling call (on a GPU the check synchronises; not once per Euler step)."""
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
            raise ValueError(f"labels must lie in [0, {self.null_label}] ({self.null_label} = no class)")

    def drop_labels(self, labels: torch.Tensor, p: float, generator: torch.Generator | None = None):
        """Class-label dropout for classifier-free guidance: each label becomes "no class" with probability p."""
        if p <= 0:
            return labels
        device = generator.device if generator is not None else labels.device   # a CPU generator, GPU labels
        drop = torch.rand(labels.shape, generator=generator, device=device).to(labels.device) < p
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def loss(self, x0, labels, label_drop: float | None = None, generator=None) -> torch.Tensor:
        """Rectified-flow loss on x0 = z * scaling_factor [B, C, h, w], with label dropout (default
        config.class_dropout); noise and times from `generator` (default: the global RNG)."""
        self.check_labels(labels)
        p = self.config.class_dropout if label_drop is None else label_drop
        x_t, t, target = flow_pair(x0, generator, self.config.time_sampling)
        return flow_loss(self(x_t, t, self.drop_labels(labels, p, generator)), target)

    @classmethod
    def from_config(cls, cfg: DiTConfig) -> "DiT":
        return cls(cfg)


def load_dit_weights(model: DiT, path: str | os.PathLike) -> DiT:
    """Weights from a facebookresearch/DiT file into `model`, strictly: the released files are a plain state dict,
    DiT's train.py saves {"model", "ema", "opt", "args"} (its EMA is taken, as DiT's sample.py does). A missing,
    unexpected or mis-shaped key is a ValueError naming it. Build the model with the file's sizes (DiT-XL/2 at
    256 px: generator_config("dit_xl", learn_sigma=True)); remember the weights predict DDPM noise, not a flow."""
    state = read_state_dict(os.fspath(path), containers=("ema", "model"))
    state = {k.removeprefix("module."): v for k, v in state.items()}     # saved from a DDP wrapper
    load_state_dict_strict(model, state, what=f"DiT file {os.fspath(path)}")
    return model
