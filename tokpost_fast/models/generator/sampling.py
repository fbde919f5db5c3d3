"""Autoregressive sampling (METHOD.md A4) and teacher-forced sampling for the post-training set (METHOD.md A5.1).

One token per step in raster order, through the static KV cache, for either AR layout (GPT, or RAR in whatever
order it was trained). Classifier-free guidance runs the conditional and the unconditional ("no class" label)
halves as one doubled batch and mixes them with RAR's schedule
    cfg(k) = 1 + (g - 1) * (1 - cos(pi * (k / L) ** p)) / 2,   logits = u + cfg(k) * (c - u),
k = 0 .. L-1 the step, so guidance starts at 1 and rises towards g. Then temperature, top-k, top-p.

Randomness: each step draws exactly one uniform per image from `generator` and picks the token by inverting the
filtered distribution's CDF. The stream therefore does not depend on the logits, so runs that differ only in which
tokens are forced (teacher_forced_sample with sigma = 0 vs sample) draw the same numbers.
"""

from __future__ import annotations

import math

import torch

from tokpost_fast.models.generator.gpt import GPT

# keeps the keep-mask stream apart from the sampling stream drawn with the same seed (golden-ratio constant)
_MASK_SEED_MIX = 0x9E3779B97F4A7C15


def cfg_schedule(step: int, seq_len: int, scale: float, power: float = 1.0) -> float:
    """Guidance at step k of L: 1 at k = 0, `scale` at k = L (METHOD.md A4)."""
    return 1.0 + (scale - 1.0) * (1.0 - math.cos(math.pi * (step / seq_len) ** power)) / 2.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) support to -inf. logits: [B, V] -> [B, V].
    top_k 0 and top_p 1.0 keep everything; ties at the k-th value are all kept; top-p keeps the smallest set of
    most likely tokens whose mass reaches p (always at least the most likely one)."""
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits, uniform, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Inverse-CDF sampling. logits: [B, V], uniform: [B] in [0, 1) -> token ids [B] int64.
    temperature 0 is greedy (the uniform is still consumed by the caller, keeping the stream aligned)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = (uniform.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    # target can round up to the total mass: never step past the last token with probability > 0
    last_positive = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(idx, last_positive)


def _cache_dtype(gpt: GPT, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return gpt.param_dtype


@torch.no_grad()
def _autoregress(gpt: GPT, labels, cfg_scale, cfg_power, temperature, top_k, top_p, generator, use_cache,
                 forced_tokens=None, keep_mask=None):
    cfg = gpt.config
    batch, seq_len, device = labels.shape[0], cfg.seq_len, labels.device
    guided = cfg_scale != 1.0
    run_labels = torch.cat([labels, torch.full_like(labels, gpt.null_label)]) if guided else labels
    tokens = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    was_training = gpt.training
    gpt.eval()
    if use_cache:
        gpt.setup_cache(run_labels.shape[0], seq_len, _cache_dtype(gpt, device))
    try:
        for step in range(seq_len):
            if use_cache:
                inputs = tokens[:, step - 1:step] if step > 0 else tokens[:, :0]
                inputs = torch.cat([inputs, inputs]) if guided else inputs
                logits = gpt.forward_cached(inputs, run_labels, step)[:, -1]
            else:  # recompute the whole prefix; position `step` of `tokens` is a placeholder forward drops
                prefix = tokens[:, :step + 1]
                logits = gpt(torch.cat([prefix, prefix]) if guided else prefix, run_labels)[:, -1]
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_schedule(step, seq_len, cfg_scale, cfg_power) * (cond - uncond)
            uniform = torch.rand(batch, generator=generator,
                                 device=generator.device if generator is not None else device)
            chosen = sample_from_logits(logits, uniform, temperature, top_k, top_p)
            if forced_tokens is not None:
                chosen = torch.where(keep_mask[:, step], forced_tokens[:, step], chosen)
            tokens[:, step] = chosen
    finally:
        gpt.train(was_training)
    return tokens


def sample(gpt: GPT, labels: torch.Tensor, cfg_scale: float = 1.0, cfg_power: float = 1.0,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Class-conditional samples. labels: [B] on the model's device -> tokens [B, seq_len] int64 (raster order;
    reshape to [B, grid, grid] for the tokenizer). use_cache=False recomputes the prefix each step (benchmarks)."""
    return _autoregress(gpt, labels, cfg_scale, cfg_power, temperature, top_k, top_p, generator, use_cache)


def draw_keep_mask(batch: int, seq_len: int, sigma: float, seed: int) -> torch.Tensor:
    """keep_mask [batch, seq_len] bool, m_i ~ Bernoulli(sigma), drawn once per image on the CPU from its own
    generator (so it is the same on every device and independent of the sampling stream)."""
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must be in [0, 1], got {sigma}")
    mask_gen = torch.Generator().manual_seed((seed * _MASK_SEED_MIX + 1) % 2**63)
    return torch.rand(batch, seq_len, generator=mask_gen) < sigma


def teacher_forced_sample(gpt: GPT, labels: torch.Tensor, gt_tokens: torch.Tensor, sigma: float, seed: int,
                          generator: torch.Generator | None = None, **sampling):
    """METHOD.md A5.1: at step i take gt_tokens[:, i] where keep_mask[:, i] else the generator's sample; the chosen
    token joins the context. labels: [B], gt_tokens: [B, seq_len] (or [B, h, w]) ->
    (tokens [B, seq_len] int64, keep_mask [B, seq_len] bool).
    The sampling stream is torch.Generator(device).manual_seed(seed) unless `generator` is given, so sigma = 0
    reproduces sample(..., generator=torch.Generator(device).manual_seed(seed)); sigma = 1 returns gt_tokens."""
    gt_tokens = gt_tokens.reshape(gt_tokens.shape[0], -1).to(labels.device, torch.long)
    if gt_tokens.shape != (labels.shape[0], gpt.config.seq_len):
        raise ValueError(f"gt_tokens must hold {gpt.config.seq_len} tokens per label, got {tuple(gt_tokens.shape)}")
    keep_mask = draw_keep_mask(labels.shape[0], gpt.config.seq_len, sigma, seed).to(labels.device)
    if generator is None:
        generator = torch.Generator(device=labels.device).manual_seed(seed)
    settings = dict(cfg_scale=1.0, cfg_power=1.0, temperature=1.0, top_k=0, top_p=1.0, use_cache=True)
    unknown = sorted(set(sampling) - set(settings))
    if unknown:
        raise TypeError(f"teacher_forced_sample got unknown sampling settings {unknown}")
    settings.update(sampling)
    tokens = _autoregress(gpt, labels, generator=generator, forced_tokens=gt_tokens, keep_mask=keep_mask,
                          **settings)
    return tokens, keep_mask
