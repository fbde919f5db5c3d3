"""Models along the data's path: tokenizer (image <-> token grid, plus its discriminator) and generator (AR
transformer over token grids). Import from the subpackages: tokpost_fast.models.tokenizer / .generator."""
