"""Class-conditional generators: the AR transformer over token grids (METHOD.md A4) and the DiT rectified flow over
continuous latents; configs and presets, attention backends, sampling (generate.py: sample and decode),
checkpoints (io.py), the generator-tokenizer checks (fit.py). The AR transformer comes in two layouts:
GPT (LlamaGen-like, raster order) and RAR (the paper's, trained on randomly permuted orders annealed to raster)."""

from tokpost_fast.models.generator.attention import (
    KVCache,
    attention_reference,
    available_attention_backends,
    causal_attention,
    flash_attn_available,
    full_attention,
)
from tokpost_fast.models.generator.config import (DIT_PRESETS, GENERATOR_PRESETS, DiTConfig, GeneratorConfig,
                                                  config_from_dict, generator_config)
from tokpost_fast.models.generator.diffusion import denoise_from, flow_loss, flow_pair, sample_dit
from tokpost_fast.models.generator.dit import DiT
from tokpost_fast.models.generator.decoder import next_token_loss
from tokpost_fast.models.generator.fit import (check_generator_fits, check_pair, check_tokenizer_lineage,
                                               tokenizer_lineage)
from tokpost_fast.models.generator.generate import (DiTSampling, SamplingSettings, balanced_labels, decode_samples,
                                                    sample_codes, sample_decoded, sample_images)
from tokpost_fast.models.generator.gpt import GPT
from tokpost_fast.models.generator.io import (build_generator, load_generator, load_state_strict,
                                              read_generator_checkpoint, save_generator)
from tokpost_fast.models.generator.rar import (RAR, draw_orders, load_rar_weights, order_generator,
                                               permute_tokens, random_ratio)
from tokpost_fast.models.generator.sampling import (
    cfg_schedule,
    draw_keep_mask,
    filter_logits,
    sample,
    sample_from_logits,
    teacher_forced_sample,
)

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiTConfig",
    "DiTSampling",
    "GENERATOR_PRESETS",
    "GPT",
    "GeneratorConfig",
    "KVCache",
    "RAR",
    "SamplingSettings",
    "attention_reference",
    "available_attention_backends",
    "balanced_labels",
    "build_generator",
    "causal_attention",
    "cfg_schedule",
    "check_generator_fits",
    "check_pair",
    "check_tokenizer_lineage",
    "config_from_dict",
    "decode_samples",
    "denoise_from",
    "draw_keep_mask",
    "draw_orders",
    "filter_logits",
    "flash_attn_available",
    "flow_loss",
    "flow_pair",
    "full_attention",
    "generator_config",
    "load_generator",
    "load_rar_weights",
    "load_state_strict",
    "next_token_loss",
    "order_generator",
    "permute_tokens",
    "random_ratio",
    "read_generator_checkpoint",
    "sample",
    "sample_codes",
    "sample_decoded",
    "sample_dit",
    "sample_from_logits",
    "sample_images",
    "save_generator",
    "teacher_forced_sample",
    "tokenizer_lineage",
]
