"""Image tokenizers (SPEC A1): LlamaGen VQ-16 CNN and the paper's DINOv2 ViT, one VQTokenizer interface
(docs/INTERFACES.md, "Tokenizer"), plus the PatchGAN discriminator the GAN loss trains against."""

from tokpost_fast.models.tokenizer.checkpoint import (llamagen_config, load_llamagen_checkpoint, load_tokenizer,
                                                      save_tokenizer)
from tokpost_fast.models.tokenizer.config import TOKENIZER_PRESETS, TokenizerConfig, tokenizer_config
from tokpost_fast.models.tokenizer.discriminator import PatchGANDiscriminator, build_discriminator
from tokpost_fast.models.tokenizer.model import VQTokenizer, build_tokenizer
from tokpost_fast.models.tokenizer.quantizer import VectorQuantizer

__all__ = [
    "PatchGANDiscriminator",
    "TOKENIZER_PRESETS",
    "TokenizerConfig",
    "VQTokenizer",
    "VectorQuantizer",
    "build_discriminator",
    "build_tokenizer",
    "llamagen_config",
    "load_llamagen_checkpoint",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_config",
]
