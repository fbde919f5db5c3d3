"""RAR, the paper's generator (METHOD.md A4; Yu et al., "Randomized Autoregressive Visual Generation"), in
bytedance/1d-tokenizer's parameter layout (modeling/rar.py) so that its released weights (rar_b.bin ...) load
strictly. Read top to bottom: the randomized order and its anneal, the blocks, the model, released weights.

Sequence: slot 0 is a learned cls token, slot 1 the class, slot 2 + j the token at generation step j; the output
of slot 1 + j predicts the token of step j. Each slot carries
- the learned absolute position of the grid cell its own token sits in (pos_embed[2 + cell]; slots 0, 1: rows 0, 1),
- the target-aware position (target_aware_pos_embed[2 + cell]) of the cell it predicts next: in a permuted order
  the next cell is not implied by the current one, so the model is told which it is (the cls slot predicts
  nothing and gets none),
- an adaLN condition of its own: the class embedding plus a learned embedding of the slot (timesteps_embeddings).
Token ids share one table with the classes: [0, K) codes, K RAR's (unused) mask token, K + 1 + c class c, and
K + 1 + C the "no class" label (our label C).

Training (gen.order: rar): each sequence of a batch is, with probability r, a uniformly random permutation of the
raster order, else raster; r is annealed from 1 to 0 between two steps (rar.yaml: 125,000 and 187,500 of 250,000),
so the model ends as a raster-order model. Sampling is raster order, through the static KV cache (forward_cached
follows the position convention of models/generator/decoder.py; the cls slot makes the cache one row longer).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokpost_fast.models.generator.config import GeneratorConfig
from tokpost_fast.models.generator.decoder import TokenDecoder, init_rar_style
from tokpost_fast.models.generator.gpt import Attention, modulate
from tokpost_fast.models.tokenizer.state import load_state_dict_strict
from tokpost_fast.perturb import anneal_ratio, step_seed

# Rows beyond seq_len in RAR's position tables (its released files have them; only seq_len + 2 are ever read)
POS_PAD, STEP_PAD = 1024, 100
PREFIX = 2   # cls + class slots


# ---------------------------------------------------------------------------------------------------------------
# The randomized order
# ---------------------------------------------------------------------------------------------------------------
def random_ratio(step: int, start: int, end: int) -> float:
    """Probability r that a training sequence is permuted at `step` (optimizer steps done so far): 1 up to
    `start`, 0 from `end` on, linear in between (the official get_rar_random_ratio; start == end is a switch)."""
    return anneal_ratio(step, start, end, 0.0, ramp="continuous")


def order_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one rank's orders at one step: a function of (seed, step, rank) only, so a resumed run
    draws the same orders."""
    return torch.Generator().manual_seed(step_seed(seed, step, rank, stream="rar-order"))


def draw_orders(batch: int, seq_len: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """orders [batch, seq_len] int64 (CPU): row b is a uniform random permutation of 0 .. seq_len - 1 with
    probability `ratio`, else the raster order 0 .. seq_len - 1."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    permuted = torch.rand(batch, generator=generator) < ratio
    orders = torch.arange(seq_len).repeat(batch, 1)
    for row in permuted.nonzero().flatten().tolist():
        orders[row] = torch.randperm(seq_len, generator=generator)
    return orders


def permute_tokens(tokens: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """tokens [B, L] in raster order -> [B, L] in generation order (the targets of RAR.forward with orders)."""
    return tokens.gather(1, orders)


# ---------------------------------------------------------------------------------------------------------------
# Blocks (timm's Mlp and RAR's Block / FinalLayer, under their parameter names)
# ---------------------------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))     # exact GELU, as nn.GELU()


class Block(nn.Module):
    """Pre-norm block with adaLN-zero; unlike the GPT block its norms keep their affine (RAR's layout), and the
    condition is per slot ([B, S, D])."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg, bias=True)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x, cond, start_pos=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(cond).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), None, start_pos)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.width, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def forward(self, x, cond):
        scale, shift = self.adaLN_modulation(cond).chunk(2, dim=-1)     # RAR's order: scale first
        return modulate(self.norm_final(x), shift, scale)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class RAR(TokenDecoder):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        if cfg.arch != "rar":
            raise ValueError(f"RAR builds arch 'rar', got arch {cfg.arch!r} (build_generator picks the class)")
        self.config = cfg
        width, L = cfg.width, cfg.seq_len
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + POS_PAD, width))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, L + POS_PAD, width))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, L + STEP_PAD, width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.embeddings = nn.Embedding(cfg.vocab_size + 1 + cfg.num_classes + 1, width)
        self.adaln_before_head = FinalLayer(cfg)
        self.lm_head = nn.Linear(width, cfg.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # RAR's: the position tables truncated normal 0.02 too, the cls token zero
        init_rar_style(self, [b.adaLN_modulation for b in self.blocks] + [self.adaln_before_head.adaLN_modulation])
        for table in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(table, std=0.02)
        nn.init.zeros_(self.cls_token)

    def cache_slots(self, positions: int) -> int:
        return positions + 1        # the cls slot

    # -- forward ---------------------------------------------------------------------------------------------
    def _positions(self, first: int, end: int, orders):
        # -> (absolute, target-aware) position rows for slots first .. end - 1: [1 or B, S, D] each
        if orders is None:          # raster: slot s holds the token of cell s - 2 and predicts cell s - 1
            target = self.target_aware_pos_embed[:, first + 1:end + 1]
            if first == 0:
                target = torch.cat([torch.zeros_like(target[:, :1]), target[:, 1:]], dim=1)
            return self.pos_embed[:, first:end], target
        cells = orders + PREFIX                                              # [B, L] table rows, generation order
        prefix = torch.arange(PREFIX, device=orders.device).expand(orders.shape[0], -1)
        absolute = self.pos_embed[0][torch.cat([prefix, cells[:, :-1]], dim=1)]            # slots 0 .. L
        target = self.target_aware_pos_embed[0][cells]                                     # slots 1 .. L
        return absolute, torch.cat([torch.zeros_like(target[:, :1]), target], dim=1)

    def _logits(self, inputs, labels, start_pos: int, cached: bool, orders=None):
        # inputs: [B, s] token ids; at start_pos 0 the cls and class slots are prepended, later inputs fill the
        # slots start_pos + 1 ... labels: [B] -> logits [B, S, V] fp32 for positions start_pos .. (see decoder.py)
        cfg = self.config
        if start_pos == 0:
            self.check_labels(labels)
        class_emb = self.embeddings(labels + cfg.vocab_size + 1)[:, None]            # [B, 1, D]
        x = self.embeddings(inputs)
        first = 0 if start_pos == 0 else start_pos + 1
        if start_pos == 0:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), class_emb.to(x.dtype), x], dim=1)
        end = first + x.shape[1]
        if end > cfg.seq_len + 1:
            raise ValueError(f"positions {start_pos}..{end - 2} exceed seq_len {cfg.seq_len}")
        absolute, target = self._positions(first, end, orders)
        x = x + absolute + target
        cond = class_emb + self.timesteps_embeddings[:, first:end]                   # [B, S, D]
        for block in self.blocks:
            x = block(x, cond, first if cached else None)
        if start_pos == 0:                                   # the cls slot predicts nothing
            x, cond = x[:, 1:], cond[:, 1:]
        return self.lm_head(self.adaln_before_head(x, cond)).float()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor | None = None):
        """Teacher-forced pass. tokens: [B, n] in raster order, labels: [B].
        orders None: logits [B, n, V] fp32, logits[:, i] the distribution of token i given tokens[:, :i].
        orders [B, seq_len] (each row a permutation; n = seq_len): logits in generation order, logits[:, j] the
        distribution of token orders[:, j] given the tokens at orders[:, :j]; its targets are
        permute_tokens(tokens, orders)."""
        if orders is None:
            return self._logits(tokens[:, :-1], labels, 0, cached=False)
        if orders.shape != tokens.shape or tokens.shape[1] != self.config.seq_len:
            raise ValueError(f"orders {tuple(orders.shape)} must match tokens {tuple(tokens.shape)} of "
                             f"{self.config.seq_len} tokens")
        return self._logits(permute_tokens(tokens, orders)[:, :-1], labels, 0, cached=False, orders=orders)


# ---------------------------------------------------------------------------------------------------------------
# Released weights
# ---------------------------------------------------------------------------------------------------------------
def rar_config_from_state(state: dict, **overrides) -> GeneratorConfig:
    """The GeneratorConfig of a state dict in RAR's layout, its sizes read from the tensors (the heads from the
    qk-norm's width). overrides: fields the tensors do not fix (dropout, class_dropout, attn_backend)."""
    needed = ("cls_token", "timesteps_embeddings", "embeddings.weight", "lm_head.weight",
              "blocks.0.attn.q_norm.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"not a RAR state dict: missing {missing}")
    width = state["cls_token"].shape[-1]
    vocab = state["lm_head.weight"].shape[0]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    values = dict(arch="rar", vocab_size=vocab, seq_len=state["timesteps_embeddings"].shape[1] - STEP_PAD,
                  num_classes=state["embeddings.weight"].shape[0] - vocab - 2, width=width, depth=depth,
                  heads=width // state["blocks.0.attn.q_norm.weight"].shape[0],
                  mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width, dropout=0.1)
    values.update(overrides)
    return GeneratorConfig(**values)


def load_rar_weights(source, map_location="cpu", **overrides) -> RAR:
    """A RAR from bytedance/1d-tokenizer's released weights (rar_b.bin ... : a plain state dict) or such a state
    dict; strict keys and shapes, each mismatch named. Their tokens are MaskGIT-VQGAN's 1024 codes."""
    state = source
    if isinstance(source, (str, os.PathLike)):
        state = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
    model = RAR(rar_config_from_state(state, **overrides))
    source_name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state"
    load_state_dict_strict(model, state, what=f"{source_name} (generator)")
    return model.to(map_location).eval()
