"""Models along the data's path: tokenizer (image <-> token grid or latent, plus its discriminator) and generator
(AR transformer over token grids, DiT over latents). Import from the subpackages: tokpost_fast.models.tokenizer /
.generator."""


def is_continuous(model) -> bool:
    """True for a continuous model: a KL tokenizer (latents, no codebook) or the DiT that models its latents;
    False for a VQ tokenizer and the AR generators. Each model class says so in its `is_continuous` attribute;
    objects without one (imported models of another layout) count as VQ / AR."""
    model = getattr(model, "module", model)   # a DeepSpeed engine or DDP wrapper
    return bool(getattr(model, "is_continuous", False))
