"""Generator configurations and the size presets (METHOD.md A4).

Two kinds, told apart by the class attribute `kind` (saved as config["kind"]; files without one are "ar"):
- "ar", GeneratorConfig: a class-conditional decoder-only transformer over the token grid, raster order at
  sampling, in one of two layouts (`arch`):
  "rar": the paper's RAR (models/generator/rar.py), bytedance/1d-tokenizer's layout, so its released weights load:
         adaLN, qk-norm, learned absolute positions plus the target-aware positional embedding that lets it train
         on permuted orders (gen.order: rar). RAR-B is 768 x 24 x 16 (~261M parameters), RAR-L 1024 x 24 x 16
         (~461M); both use a GELU MLP of ratio 4, so a block holds 4 d^2 (attention) + 8 d^2 (MLP) + 6 d^2 (adaLN)
         weights.
  "gpt": LlamaGen-like (models/generator/gpt.py): 2-D RoPE or a learned table, raster order only.
- "dit", DiTConfig: a class-conditional DiT (Peebles & Xie) over a continuous tokenizer's latent grid, trained
  as a rectified flow (models/generator/diffusion.py). DiT-B/2 is 768 x 12 x 12 (~130M), DiT-XL/2 1152 x 28 x 16
  (~675M).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from tokpost_fast.checks import ConfigError, build_section, field_check

ARCHS = ("gpt", "rar")
CONDITIONINGS = ("token", "adaln")
POSITIONS = ("rope2d", "learned")
ARCH_POSITIONS = {"gpt": "rope2d", "rar": "learned"}    # pos None: the arch's own
MLPS = ("swiglu", "gelu")
ATTN_BACKENDS = ("auto", "flash", "sdpa", "math")


def _strict_from_dict(cls, values: dict):
    """A saved generator config (a checkpoint's "config"): "kind" must be cls.kind (or absent); the rest is built
    strictly by tokpost_fast.checks.build_section (unknown keys and wrong types are a ConfigError naming them)."""
    values = dict(values)
    kind = values.pop("kind", cls.kind)
    if kind != cls.kind:
        raise ConfigError(f"{cls.__name__} is the {cls.kind!r} generator config; got kind {kind!r}")
    return build_section(cls, values, cls.__name__)


@dataclass
class GeneratorConfig:
    kind: ClassVar[str] = "ar"
    arch: str = "gpt"               # "gpt" (LlamaGen-like, raster only) | "rar" (RAR's layout, see above)
    vocab_size: int = 4096          # the tokenizer's codebook size K
    seq_len: int = 256              # tokens per image = grid_size ** 2 (raster order)
    num_classes: int = 1000         # class labels; id num_classes is the "no class" label used for CFG
    width: int = 768
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.0            # residual and attention dropout (RAR trains with 0.1)
    class_dropout: float = 0.1      # label dropout for classifier-free guidance (METHOD.md A4)
    cond: str = "adaln"             # "token": class embedding as the first token only (LlamaGen);
                                    # "adaln": first token + adaLN-zero modulation in every block (RAR)
    qk_norm: bool = True
    pos: Optional[str] = None       # "rope2d": 2-D rotary over the token grid (LlamaGen); "learned": a learned
                                    # table (RAR's, plus its target-aware table); None: the arch's own
    mlp: str = "gelu"
    attn_backend: str = "auto"      # see models/generator/attention.py

    def __post_init__(self) -> None:
        check = field_check(self, "GeneratorConfig")

        check("arch", self.arch in ARCHS, f"must be one of {ARCHS}")
        check("vocab_size", self.vocab_size >= 1, "must be >= 1")
        check("seq_len", self.seq_len >= 1, "must be >= 1")
        check("num_classes", self.num_classes >= 1, "must be >= 1")
        check("heads", self.heads >= 1 and self.width % self.heads == 0, "width must be a multiple of heads")
        check("mlp_ratio", self.mlp_ratio > 0, "must be > 0")
        check("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        check("class_dropout", 0.0 <= self.class_dropout < 1.0, "must be in [0, 1)")
        check("cond", self.cond in CONDITIONINGS, f"must be one of {CONDITIONINGS}")
        check("pos", self.pos is None or self.pos in POSITIONS, f"must be None or one of {POSITIONS}")
        check("mlp", self.mlp in MLPS, f"must be one of {MLPS}")
        check("attn_backend", self.attn_backend in ATTN_BACKENDS, f"must be one of {ATTN_BACKENDS}")
        if self.arch == "rar":   # RAR's layout fixes these (its released weights have no place for others)
            check("pos", self.positions == "learned", "arch rar has learned positions (leave pos unset)")
            check("cond", self.cond == "adaln", "arch rar conditions with adaLN")
            check("mlp", self.mlp == "gelu", "arch rar has a GELU MLP")
            check("qk_norm", self.qk_norm, "arch rar has qk-norm")
        if self.positions == "rope2d":
            grid = round(self.seq_len ** 0.5)
            check("seq_len", grid * grid == self.seq_len, "rope2d needs a square token grid")
            check("heads", (self.width // self.heads) % 4 == 0, "rope2d needs a head dim divisible by 4")

    @property
    def positions(self) -> str:
        """The position encoding in use: pos, or the arch's own when pos is None."""
        return self.pos or ARCH_POSITIONS[self.arch]

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        return round(self.seq_len ** 0.5)

    @classmethod
    def from_dict(cls, values: dict) -> "GeneratorConfig":
        """Strict: an unknown key is an error naming it (checkpoints and YAML both come through here)."""
        return _strict_from_dict(cls, values)


TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class DiTConfig:
    """facebookresearch/DiT's hyper-parameters under our names (DiT's: input_size = grid_size, in_channels =
    latent_channels, hidden_size = width, num_heads = heads, class_dropout_prob = class_dropout)."""

    kind: ClassVar[str] = "dit"
    latent_channels: int = 4        # the continuous tokenizer's latent channels C
    grid_size: int = 32             # latent h == w (SD-VAE f8 at 256 px: 32)
    patch_size: int = 2
    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000         # class labels; id num_classes is the "no class" label used for CFG
    class_dropout: float = 0.1      # label dropout for classifier-free guidance
    learn_sigma: bool = False       # True only keeps the layout of DiT's released files (2C output channels, of
                                    # which the flow uses the first C): those predict a DDPM variance too
    time_sampling: str = "uniform"  # training t ~ U(0, 1), or logit-normal (SD3's, mean 0, std 1)
    attn_backend: str = "auto"      # see models/generator/attention.py (non-causal here)

    def __post_init__(self) -> None:
        check = field_check(self, "DiTConfig")

        check("latent_channels", self.latent_channels >= 1, "must be >= 1")
        check("grid_size", self.grid_size >= 1, "must be >= 1")
        check("patch_size", self.patch_size >= 1 and self.grid_size % self.patch_size == 0,
              f"must be >= 1 and divide grid_size={self.grid_size}")
        check("width", self.width >= 4 and self.width % 4 == 0,
              "must be a multiple of 4 (the 2-D sin-cos position table splits it in four)")
        check("depth", self.depth >= 1, "must be >= 1")
        check("heads", self.heads >= 1 and self.width % self.heads == 0, "width must be a multiple of heads")
        check("mlp_ratio", self.mlp_ratio > 0, "must be > 0")
        check("num_classes", self.num_classes >= 1, "must be >= 1")
        check("class_dropout", 0.0 <= self.class_dropout < 1.0, "must be in [0, 1)")
        check("time_sampling", self.time_sampling in TIME_SAMPLINGS, f"must be one of {TIME_SAMPLINGS}")
        check("attn_backend", self.attn_backend in ATTN_BACKENDS, f"must be one of {ATTN_BACKENDS}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def num_patches(self) -> int:
        return (self.grid_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return 2 * self.latent_channels if self.learn_sigma else self.latent_channels

    @classmethod
    def from_dict(cls, values: dict) -> "DiTConfig":
        return _strict_from_dict(cls, values)


AnyGeneratorConfig = Union[GeneratorConfig, DiTConfig]
CONFIG_CLASSES = {"ar": GeneratorConfig, "dit": DiTConfig}


def config_from_dict(values: dict) -> AnyGeneratorConfig:
    """A saved config dict -> its config; files written before generators had kinds are "ar"."""
    kind = values.get("kind", "ar")
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"unknown generator kind {kind!r}; known: {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[kind].from_dict(values)


def config_to_dict(cfg: AnyGeneratorConfig) -> dict:
    return {"kind": cfg.kind, **dataclasses.asdict(cfg)}


# Architecture presets; vocab_size / seq_len / num_classes default to the paper's (K=4096, 16x16, ImageNet) and
# are overridden from the tokenizer and data set (generator_config(name, vocab_size=..., ...)).
GENERATOR_PRESETS: dict[str, GeneratorConfig] = {
    # tiny, for CPU tests and `make demo` (2 cores, minutes); sized for the demo tokenizer's 8x8 grid, K = 1024
    "demo": GeneratorConfig(width=128, depth=4, heads=4, mlp_ratio=4.0, num_classes=10, vocab_size=1024, seq_len=64),
    "B": GeneratorConfig(arch="rar", width=768, depth=24, heads=16, dropout=0.1),    # RAR-B, ~261M
    "L": GeneratorConfig(arch="rar", width=1024, depth=24, heads=16, dropout=0.1),   # RAR-L, ~461M
}


# DiT presets; latent_channels / grid_size come from the continuous tokenizer, num_classes from the data set.
DIT_PRESETS: dict[str, DiTConfig] = {
    # tiny, for CPU tests and demos (2 cores, minutes): ~1.2M parameters; sized for the demo_kl tokenizer's
    # 16x16 x 4 latents at 64 px, patch 2 -> 64 tokens (the demo AR generator's sequence length)
    "demo_dit": DiTConfig(latent_channels=4, grid_size=16, patch_size=2, width=128, depth=4, heads=4,
                          num_classes=10),
    "dit_b": DiTConfig(width=768, depth=12, heads=12, patch_size=2),      # DiT-B/2, ~130M
    "dit_xl": DiTConfig(width=1152, depth=28, heads=16, patch_size=2),    # DiT-XL/2, ~675M
}
PRESETS_BY_KIND: dict[str, dict] = {"ar": GENERATOR_PRESETS, "dit": DIT_PRESETS}


def generator_config(preset: str, **overrides) -> AnyGeneratorConfig:
    """A preset (of either kind) with fields replaced, e.g. generator_config("B", vocab_size=K, seq_len=256) or
    generator_config("dit_b", latent_channels=4, grid_size=32)."""
    for presets in PRESETS_BY_KIND.values():
        if preset in presets:
            return dataclasses.replace(presets[preset], **overrides)
    known = sorted(name for presets in PRESETS_BY_KIND.values() for name in presets)
    raise ValueError(f"unknown generator preset {preset!r}; choose from {known}")
