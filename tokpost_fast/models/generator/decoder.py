"""What every autoregressive token generator (GPT, RAR) shares: the "no class" label, label dropout, the loss, and
the static KV cache that sampling (models/generator/sampling.py) and the cache stage drive through
`forward_cached`. A subclass defines `config`, `blocks` (each with `.attn.cache`) and
`_logits(inputs, labels, start_pos, cached)`.

Positions follow one convention for both layouts: the output at position p is the distribution of token p in
raster order (p = 0 .. seq_len - 1); the input at position 0 is the class, at p >= 1 token p - 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokpost_fast.models.generator.attention import KVCache


class TokenDecoder(nn.Module):
    kind = "ar"
    is_continuous = False   # models token grids of a VQ tokenizer (tokpost_fast.models.is_continuous)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def param_device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_labels(self, labels: torch.Tensor) -> None:
        # called once per sequence (at position 0), not per decoding step: on a GPU the check synchronises
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
            raise ValueError(f"labels must lie in [0, {self.null_label}] ({self.null_label} = no class)")

    def forward_cached(self, inputs: torch.Tensor, labels: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Decoding step through the KV cache (setup_cache first). At start_pos 0, inputs holds tokens
        t_0 .. t_{s-1} after the class (s may be 0); later, the tokens t_{start_pos-1} .. (usually one).
        Returns logits [B, S, V] for positions start_pos .. start_pos + S - 1 (S = s + 1 at start_pos 0, else s)."""
        if self.blocks[0].attn.cache is None:
            raise RuntimeError("forward_cached needs setup_cache(batch, max_len, dtype) first")
        return self._logits(inputs, labels, start_pos, cached=True)

    def drop_labels(self, labels: torch.Tensor, p: float, generator: torch.Generator | None = None):
        """Class-label dropout for classifier-free guidance: each label becomes "no class" with probability p."""
        if p <= 0:
            return labels
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def loss(self, tokens, labels, label_drop: float | None = None, generator=None) -> torch.Tensor:
        """Mean next-token cross entropy (raster order) with label dropout (default config.class_dropout)."""
        p = self.config.class_dropout if label_drop is None else label_drop
        return next_token_loss(self(tokens, self.drop_labels(labels, p, generator)), tokens)

    # -- KV cache --------------------------------------------------------------------------------------------
    def cache_slots(self, positions: int) -> int:
        """Cache rows needed for `positions` decoding positions (RAR adds its cls token)."""
        return positions

    def setup_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Pre-allocate every layer's keys and values for max_len positions (default: seq_len) in `dtype`
        (default: the parameters'). Reuses the buffers when they already match."""
        slots = self.cache_slots(max_len or self.config.seq_len)
        dtype = dtype or self.param_dtype
        device = self.param_device
        current = self.blocks[0].attn.cache
        if current is not None and (current.batch, current.max_len, current.k.dtype, current.k.device) == (
                batch, slots, dtype, device):
            return
        for block in self.blocks:
            block.attn.cache = KVCache(batch, slots, self.config.heads, self.config.head_dim, dtype, device)

    def reset_cache(self) -> None:
        for block in self.blocks:
            if block.attn.cache is not None:
                block.attn.cache.reset()

    def free_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg)


def init_rar_style(model: nn.Module, modulations) -> None:
    """RAR's init: truncated normal 0.02 for every linear and embedding weight, zero biases, unit affine
    LayerNorms, and the last linear of each adaLN modulation at zero (adaLN-zero: every block starts as the
    identity). Position tables and extra tokens are the caller's."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for modulation in modulations:
        nn.init.zeros_(modulation[-1].weight)
        nn.init.zeros_(modulation[-1].bias)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # logits: [B, L, V] from forward, tokens: [B, L] (the targets in the logits' order) -> scalar mean cross entropy
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
