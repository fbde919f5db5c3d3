"""Does a generator model this tokenizer's output? An AR generator models a VQ tokenizer's token grids (same
vocabulary and grid), a DiT a continuous tokenizer's latents (same channels and grid). The one check behind
`sample`, `evaluate` and the `cache` stage; which tokenizer *file* the generator was trained on (its recorded
sha256) is checked by each of them, since they accept different lineages."""

from __future__ import annotations


def check_generator_fits(generator, tokenizer, source: str = "the generator") -> None:
    """ValueError naming `source` when the generator's kind or sizes do not fit the tokenizer."""
    kind = getattr(generator, "kind", "ar")
    continuous = bool(getattr(tokenizer, "is_continuous", False))
    if continuous != (kind == "dit"):
        needs = ("continuous: it needs a DiT (--stage gen --generator dit)" if continuous else
                 "a VQ one: it needs the AR generator (--stage gen)")
        raise ValueError(f"{source} is a {kind!r} generator, but the tokenizer is {needs}")
    cfg, grid = generator.config, tokenizer.grid_size
    if kind == "dit":
        if (cfg.latent_channels, cfg.grid_size) != (tokenizer.latent_channels, grid):
            raise ValueError(f"{source}: DiT ({cfg.latent_channels}-channel {cfg.grid_size}x{cfg.grid_size} latents) "
                             f"does not match the tokenizer ({tokenizer.latent_channels}-channel {grid}x{grid} "
                             "latents)")
    elif cfg.vocab_size != tokenizer.codebook_size or cfg.seq_len != grid * grid:
        raise ValueError(f"{source}: generator (vocab {cfg.vocab_size}, {cfg.seq_len} tokens) does not match the "
                         f"tokenizer (K={tokenizer.codebook_size}, {grid}x{grid} grid)")
