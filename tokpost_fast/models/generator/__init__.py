"""Class-conditional AR generator (SPEC A4): config and presets, the transformer, attention backends, sampling."""

from tokpost_fast.models.generator.attention import (
    KVCache,
    attention_reference,
    available_attention_backends,
    causal_attention,
    flash_attn_available,
)
from tokpost_fast.models.generator.config import GENERATOR_PRESETS, GeneratorConfig, generator_config
from tokpost_fast.models.generator.gpt import (
    GPT,
    build_generator,
    load_generator,
    load_state_strict,
    next_token_loss,
    read_generator_checkpoint,
    save_generator,
)
from tokpost_fast.models.generator.sampling import (
    cfg_schedule,
    draw_keep_mask,
    filter_logits,
    sample,
    sample_from_logits,
    teacher_forced_sample,
)

__all__ = [
    "GENERATOR_PRESETS",
    "GPT",
    "GeneratorConfig",
    "KVCache",
    "attention_reference",
    "available_attention_backends",
    "build_generator",
    "causal_attention",
    "cfg_schedule",
    "draw_keep_mask",
    "filter_logits",
    "flash_attn_available",
    "generator_config",
    "load_generator",
    "load_state_strict",
    "next_token_loss",
    "read_generator_checkpoint",
    "sample",
    "sample_from_logits",
    "save_generator",
    "teacher_forced_sample",
]
