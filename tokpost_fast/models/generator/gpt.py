"""The LlamaGen-like class-conditional decoder-only transformer (arch "gpt", METHOD.md A4), read top to bottom:
positions, blocks, the model (construction and checkpoints of every generator: models/generator/io.py).

Sequence layout: the model's input is [class, t_0, t_1, ..., t_{L-2}] and the output at position p is the
distribution of token t_p (raster order over the grid_size x grid_size token grid). Label id `num_classes` is the
"no class" label: label dropout during training and the unconditional half of classifier-free guidance use it.
It trains in raster order only; RAR (models/generator/rar.py, arch "rar") also trains on permuted orders.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokpost_fast.models.generator.attention import KVCache, causal_attention
from tokpost_fast.models.generator.config import GeneratorConfig
from tokpost_fast.models.generator.decoder import TokenDecoder, init_rar_style


# ---------------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------------
def rope2d_tables(grid_size: int, head_dim: int, base: float = 10000.0):
    """cos, sin: [grid_size**2, head_dim // 2] fp32 for the input positions 0 .. L-1 (LlamaGen's 2-D RoPE: half of
    the rotated pairs turn with the row, half with the column). Position 0, the class token, is not rotated;
    position p >= 1 holds token p - 1 at cell divmod(p - 1, grid_size)."""
    quarter = head_dim // 4
    freqs = 1.0 / (base ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    cell = torch.arange(grid_size * grid_size - 1)
    rows, cols = (cell // grid_size).float(), (cell % grid_size).float()
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)    # [L-1, Dh/2]
    angles = torch.cat([torch.zeros(1, 2 * quarter), angles])                     # class token: identity
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, S, H, Dh]; cos/sin: [S, Dh/2]; consecutive pairs (x_2i, x_2i+1) are rotated, in fp32
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None], sin[None, :, None]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention with qk-norm and the KV cache; `bias`: biased projections (RAR's layout)."""

    def __init__(self, cfg: GeneratorConfig, bias: bool = False):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.backend, self.dropout = cfg.attn_backend, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=bias)    # one fused projection
        self.proj = nn.Linear(cfg.width, cfg.width, bias=bias)
        # qk-norm (RAR): LayerNorm over each head's q and k keeps attention logits bounded in bf16
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.cache: KVCache | None = None

    def forward(self, x, rope=None, start_pos: int | None = None):
        # x: [B, S, D] -> [B, S, D]; start_pos None: full causal pass, else the cached decoding path
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(dim=2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # under autocast the LayerNorms of qk-norm return fp32 while v is bf16; the fused kernels need one dtype
        q, k = q.to(v.dtype), k.to(v.dtype)
        if start_pos is None:
            out = causal_attention(q, k, v, self.backend, self.dropout if self.training else 0.0)
        else:
            out = self.cache.attend(q, k, v, start_pos, self.backend)
        return self.resid_drop(self.proj(out.flatten(-2)))


class MLP(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        hidden = int(cfg.mlp_ratio * cfg.width)
        if self.gated:  # 2/3 keeps the parameter count of the ungated MLP; multiple of 64 for tensor cores
            hidden = -(-int(2 * hidden / 3) // 64) * 64
            self.gate = nn.Linear(cfg.width, hidden, bias=False)
        self.up = nn.Linear(cfg.width, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.width, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.gated else F.gelu(self.up(x), approximate="tanh")
        return self.drop(self.down(h))


class Block(nn.Module):
    """Pre-norm transformer block; with cond="adaln" the norms lose their affine and a zero-initialised
    modulation from the class embedding gives shift, scale and gate for both branches (adaLN-zero, DiT/RAR)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.adaln = cfg.cond == "adaln"
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6, elementwise_affine=not self.adaln)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6, elementwise_affine=not self.adaln)
        self.mlp = MLP(cfg)
        if self.adaln:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x, cond=None, rope=None, start_pos=None):
        # x: [B, S, D], cond: [B, 1, D] class embedding (used by adaln only)
        if not self.adaln:
            x = x + self.attn(self.norm1(x), rope, start_pos)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope, start_pos)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class GPT(TokenDecoder):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        if cfg.arch != "gpt":
            raise ValueError(f"GPT builds arch 'gpt', got arch {cfg.arch!r} (build_generator picks the class)")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.width)   # + the "no class" label
        if cfg.positions == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(cfg.seq_len, cfg.width))
        else:
            cos, sin = rope2d_tables(cfg.grid_size, cfg.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6, elementwise_affine=cfg.cond != "adaln")
        if cfg.cond == "adaln":
            self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.head = nn.Linear(cfg.width, cfg.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        modulations = [b.modulation for b in self.blocks if b.adaln] + [getattr(self, "final_modulation", None)]
        init_rar_style(self, [m for m in modulations if m is not None])
        if self.config.positions == "learned":
            nn.init.trunc_normal_(self.pos_emb, std=0.02)

    # -- forward ---------------------------------------------------------------------------------------------
    def _logits(self, inputs, labels, start_pos: int, cached: bool):
        # inputs: [B, s] token ids at input positions max(start_pos, 1) ..; at start_pos 0 the class token is
        # prepended. labels: [B]. -> logits [B, S, V] fp32 for positions start_pos .. start_pos + S - 1
        cfg = self.config
        if start_pos == 0:
            self.check_labels(labels)
        cond = self.class_emb(labels)[:, None]                               # [B, 1, D]
        x = self.tok_emb(inputs)
        if start_pos == 0:
            x = torch.cat([cond.to(x.dtype), x], dim=1)
        end = start_pos + x.shape[1]
        if end > cfg.seq_len:
            raise ValueError(f"positions {start_pos}..{end - 1} exceed seq_len {cfg.seq_len}")
        rope = None
        if cfg.positions == "learned":
            x = x + self.pos_emb[start_pos:end]
        else:
            rope = (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cond, rope, start_pos if cached else None)
        x = self.norm(x)
        if cfg.cond == "adaln":
            shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return self.head(x).float()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass. tokens: [B, n] (n <= seq_len), labels: [B] -> logits [B, n, V] fp32, where
        logits[:, i] is the distribution of token i given the label and tokens[:, :i]."""
        return self._logits(tokens[:, :-1], labels, 0, cached=False)
