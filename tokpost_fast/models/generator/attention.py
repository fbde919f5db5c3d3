"""Self-attention backends (causal for the AR generator, bidirectional for DiT) and the static KV cache.

Layout everywhere is flash-attn's, q/k/v: [B, S, H, Dh]; SDPA and the reference get transposed views.
Backends:
- "flash": flash_attn_func (training, prefill) and flash_attn_with_kvcache (sampling; it writes the new keys into
  the cache itself). GPU only, fp16/bf16, and only when the flash_attn package imports.
- "sdpa": torch.nn.functional.scaled_dot_product_attention. On GPU the fused cuDNN / flash / memory-efficient
  kernels are chosen explicitly (torch.nn.attention.sdpa_kernel), so an unsupported case is an error, not a silent
  fall back to the O(S^2)-memory math kernel. On CPU torch picks its own (flash-style CPU kernel or math).
- "math": `attention_reference`, explicit softmax in fp32; the ground truth for tests.
- "auto": flash when it can run on these tensors, else sdpa.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("tokpost_fast.generator")

# fused GPU SDPA kernels in priority order (cuDNN is the fastest on Hopper for these shapes)
_GPU_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


@functools.lru_cache(maxsize=None)
def _flash_attn():
    """The flash_attn module, or None when it does not import (CPU machines, no wheel for this torch)."""
    try:
        import flash_attn
    except Exception as err:  # ImportError, or an ABI error from a wheel built for another torch
        log.debug("flash_attn not importable: %s", err)
        return None
    return flash_attn


def flash_attn_available() -> bool:
    return _flash_attn() is not None


def available_attention_backends(device: str | torch.device | None = None) -> dict[str, bool]:
    """Which attention backends can run on `device` (default: cuda when present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {"flash": device.type == "cuda" and flash_attn_available(), "sdpa": True, "math": True}


def _flash_can_run(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and flash_attn_available())


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The concrete backend for these tensors; asking by name for one that cannot run is an error."""
    if backend == "auto":
        return "flash" if _flash_can_run(q) else "sdpa"
    if backend == "flash" and not _flash_can_run(q):
        raise RuntimeError(
            f"attn_backend='flash' needs the flash_attn package (importable: {flash_attn_available()}) and CUDA "
            f"fp16/bf16 tensors with head dim <= 256; got device={q.device}, dtype={q.dtype}, "
            f"head dim={q.shape[-1]}. Use attn_backend='auto' or 'sdpa'.")
    if backend not in ("flash", "sdpa", "math"):
        raise ValueError(f"attn_backend must be one of ('auto', 'flash', 'sdpa', 'math'), got {backend!r}")
    return backend


def causal_mask(q_len: int, k_len: int, q_offset: int, device) -> torch.Tensor:
    """[q_len, k_len] bool, True where query i (absolute position q_offset + i) may attend key j."""
    query_pos = torch.arange(q_offset, q_offset + q_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= query_pos[:, None]


def attention_reference(q, k, v, q_offset: int = 0, dropout_p: float = 0.0, causal: bool = True):
    """Plain attention in fp32. q: [B, S, H, Dh], k/v: [B, T, H, Dh] -> [B, S, H, Dh] in q's dtype.
    Causal: query i sits at absolute position q_offset + i and sees keys 0 .. q_offset + i; else every key."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) * scale
    if causal:
        mask = causal_mask(q.shape[1], k.shape[1], q_offset, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.einsum("bhst,bthd->bshd", probs, v.float()).to(q.dtype)


def _sdpa(q, k, v, q_offset: int, dropout_p: float):
    # SDPA's is_causal aligns the mask top-left, right only when the query block starts at key 0; a single
    # decoding query sees every cached key, so it needs no mask at all.
    s, t = q.shape[1], k.shape[1]
    is_causal, mask = False, None
    if q_offset == 0 and s == t:
        is_causal = s > 1
    elif s > 1:
        mask = causal_mask(s, t, q_offset, q.device)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if q.is_cuda:
        with sdpa_kernel(_GPU_SDPA_BACKENDS, set_priority=True):
            out = F.scaled_dot_product_attention(*args, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    else:
        out = F.scaled_dot_product_attention(*args, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    return out.transpose(1, 2)


def causal_attention(q, k, v, backend: str = "auto", dropout_p: float = 0.0):
    """Full causal self-attention (training, or recompute-the-prefix sampling). q/k/v: [B, S, H, Dh]."""
    backend = resolve_backend(backend, q)
    if backend == "flash":
        return _flash_attn().flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
    if backend == "sdpa":
        return _sdpa(q, k, v, 0, dropout_p)
    return attention_reference(q, k, v, 0, dropout_p)


def full_attention(q, k, v, backend: str = "auto", dropout_p: float = 0.0):
    """Bidirectional self-attention (DiT: every latent patch sees every other). q/k/v: [B, S, H, Dh]."""
    backend = resolve_backend(backend, q)
    if backend == "flash":
        return _flash_attn().flash_attn_func(q, k, v, dropout_p=dropout_p, causal=False)
    if backend == "sdpa":
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if q.is_cuda:
            with sdpa_kernel(_GPU_SDPA_BACKENDS, set_priority=True):
                return F.scaled_dot_product_attention(*args, dropout_p=dropout_p).transpose(1, 2)
        return F.scaled_dot_product_attention(*args, dropout_p=dropout_p).transpose(1, 2)
    return attention_reference(q, k, v, 0, dropout_p, causal=False)


class KVCache:
    """Static, pre-allocated keys and values of one attention layer: [batch, max_len, H, Dh] each.

    Not a module and not in the state dict: it is sampling state, allocated by GPT.setup_cache. Positions are
    passed explicitly (start_pos), so reset() is only needed to scrub stale values, never for correctness.
    """

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, max_len, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def attend(self, q, k_new, v_new, start_pos: int, backend: str = "auto"):
        """Write k_new/v_new at positions start_pos .. start_pos + S - 1, then attend q to every key up to its own
        position. q, k_new, v_new: [B, S, H, Dh] with B <= batch -> [B, S, H, Dh]."""
        b, s = q.shape[:2]
        end = start_pos + s
        if end > self.max_len or b > self.batch:
            raise ValueError(f"KV cache holds batch {self.batch} x {self.max_len} positions; "
                             f"asked for batch {b}, positions {start_pos}..{end - 1}")
        backend = resolve_backend(backend, q)
        if backend == "flash" and self.k.dtype == q.dtype:
            seqlens = torch.full((b,), start_pos, dtype=torch.int32, device=q.device)
            return _flash_attn().flash_attn_with_kvcache(
                q, self.k[:b], self.v[:b], k=k_new, v=v_new, cache_seqlens=seqlens, causal=True)
        self.k[:b, start_pos:end] = k_new.to(self.k.dtype)
        self.v[:b, start_pos:end] = v_new.to(self.v.dtype)
        keys, values = self.k[:b, :end].to(q.dtype), self.v[:b, :end].to(q.dtype)
        if backend == "math":
            return attention_reference(q, keys, values, start_pos)
        return _sdpa(q, keys, values, start_pos, 0.0)
