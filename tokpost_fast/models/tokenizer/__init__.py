"""Image tokenizers (METHOD.md A1): LlamaGen VQ-16 CNN and the paper's DINOv2 ViT, one VQTokenizer interface
(docs/INTERFACES.md, "Tokenizer"); the continuous KLTokenizer (SD-VAE layout, "Continuous tokenizer"); plus the
PatchGAN discriminator the GAN loss trains against."""

from tokpost_fast.models.tokenizer.checkpoint import (llamagen_config, load_llamagen_checkpoint, load_tokenizer,
                                                      save_tokenizer)
from tokpost_fast.models.tokenizer.config import TOKENIZER_PRESETS, TokenizerConfig, tokenizer_config
from tokpost_fast.models.tokenizer.discriminator import PatchGANDiscriminator, build_discriminator
from tokpost_fast.models.tokenizer.kl import (KLOutput, KLTokenizer, estimate_scaling_factor, gaussian_kl,
                                              gaussian_perturb)
from tokpost_fast.models.tokenizer.kl_checkpoint import load_sdvae_checkpoint, sdvae_config
from tokpost_fast.models.tokenizer.model import Tokenizer, VQTokenizer, build_tokenizer
from tokpost_fast.models.tokenizer.quantizer import VectorQuantizer

__all__ = [
    "KLOutput",
    "KLTokenizer",
    "PatchGANDiscriminator",
    "TOKENIZER_PRESETS",
    "Tokenizer",
    "TokenizerConfig",
    "VQTokenizer",
    "VectorQuantizer",
    "build_discriminator",
    "build_tokenizer",
    "estimate_scaling_factor",
    "gaussian_kl",
    "gaussian_perturb",
    "llamagen_config",
    "load_llamagen_checkpoint",
    "load_sdvae_checkpoint",
    "load_tokenizer",
    "save_tokenizer",
    "sdvae_config",
    "tokenizer_config",
]
