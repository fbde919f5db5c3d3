"""Does a generator belong with this tokenizer? Two checks, used by `sample`, `evaluate`, the gen stage's
consumers and the `cache` stage:

- check_generator_fits: the generator models this tokenizer's output. An AR generator models a VQ tokenizer's
  token grids (same vocabulary and grid), a DiT a continuous tokenizer's latents (same channels and grid).
- check_tokenizer_lineage: the tokenizer *file* is the one the generator was trained on (the sha256 the gen stage
  recorded in generator.pt) or was post-trained from it (tokenizer_post.pt records its source's sha256).
"""

from __future__ import annotations

import torch

from tokpost_fast.atomic import file_sha256
from tokpost_fast.models import is_continuous


def check_generator_fits(generator, tokenizer, source: str = "the generator") -> None:
    """ValueError naming `source` when the generator's kind or sizes do not fit the tokenizer."""
    kind = getattr(generator, "kind", "ar")
    continuous = is_continuous(tokenizer)
    if continuous != is_continuous(generator):
        needs = ("continuous: it needs a DiT (--stage gen --generator dit)" if continuous else
                 "a VQ one: it needs the AR generator (--stage gen)")
        raise ValueError(f"{source} is a {kind!r} generator, but the tokenizer is {needs}")
    cfg, grid = generator.config, tokenizer.grid_size
    if continuous:
        if (cfg.latent_channels, cfg.grid_size) != (tokenizer.latent_channels, grid):
            raise ValueError(f"{source}: DiT ({cfg.latent_channels}-channel {cfg.grid_size}x{cfg.grid_size} latents) "
                             f"does not match the tokenizer ({tokenizer.latent_channels}-channel {grid}x{grid} "
                             "latents)")
    elif cfg.vocab_size != tokenizer.codebook_size or cfg.seq_len != grid * grid:
        raise ValueError(f"{source}: generator (vocab {cfg.vocab_size}, {cfg.seq_len} tokens) does not match the "
                         f"tokenizer (K={tokenizer.codebook_size}, {grid}x{grid} grid)")


def tokenizer_lineage(tokenizer_path) -> list[str]:
    """sha256 of the tokenizer file and, for a post-trained export (tokenizer_post.pt), of the tokenizer it was
    post-trained from: a generator trained on either emits codes this decoder means to read."""
    hashes = [file_sha256(tokenizer_path)]
    try:                 # mmap: only the small dict of extras is read, not the weights
        payload = torch.load(tokenizer_path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be mapped
        payload = torch.load(tokenizer_path, map_location="cpu", weights_only=False)
    source = payload.get("source_tokenizer") if isinstance(payload, dict) else None
    if isinstance(source, dict) and source.get("sha256"):
        hashes.append(source["sha256"])
    return hashes


def check_tokenizer_lineage(generator, tokenizer_path) -> None:
    """Refuse a generator whose recorded tokenizer_hash (written by the gen stage) is not this tokenizer's nor the
    one it was post-trained from; generators without a record (imported ones) pass."""
    recorded = getattr(generator, "checkpoint_extra", {}).get("tokenizer_hash")
    if recorded is None or tokenizer_path is None:
        return
    if recorded not in tokenizer_lineage(tokenizer_path):
        raise ValueError(f"{tokenizer_path} is not the tokenizer this generator was trained on, nor post-trained "
                         f"from it (generator.pt records tokenizer_hash {recorded[:12]}...)")


def check_pair(generator, tokenizer, tokenizer_path=None) -> None:
    """The generator must model this tokenizer's output (kind and sizes) and, when it records one, have been
    trained on this tokenizer or the one it was post-trained from."""
    check_generator_fits(generator, tokenizer)
    check_tokenizer_lineage(generator, tokenizer_path)
