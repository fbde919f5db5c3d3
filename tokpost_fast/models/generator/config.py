"""Generator configuration and the size presets (SPEC A4).

The paper's generator is RAR: a class-conditional decoder-only transformer with adaLN conditioning and qk-norm,
raster order at sampling. RAR-B is 768 x 24 x 16 (~261M parameters), RAR-L 1024 x 24 x 16 (~461M); both use a
GELU MLP of ratio 4, so a block holds 4 d^2 (attention) + 8 d^2 (MLP) + 6 d^2 (adaLN) weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CONDITIONINGS = ("token", "adaln")
POSITIONS = ("rope2d", "learned")
MLPS = ("swiglu", "gelu")
ATTN_BACKENDS = ("auto", "flash", "sdpa", "math")


@dataclass
class GeneratorConfig:
    vocab_size: int = 4096          # the tokenizer's codebook size K
    seq_len: int = 256              # tokens per image = grid_size ** 2 (raster order)
    num_classes: int = 1000         # class labels; id num_classes is the "no class" label used for CFG
    width: int = 768
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.0            # residual and attention dropout (RAR trains with 0.1)
    class_dropout: float = 0.1      # label dropout for classifier-free guidance (SPEC A4)
    cond: str = "adaln"             # "token": class embedding as the first token only (LlamaGen);
                                    # "adaln": first token + adaLN-zero modulation in every block (RAR)
    qk_norm: bool = True
    pos: str = "rope2d"             # 2-D rotary over the token grid (LlamaGen) or a learned table (RAR)
    mlp: str = "gelu"
    attn_backend: str = "auto"      # see models/generator/attention.py

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, why: str) -> None:
            if not ok:
                raise ValueError(f"GeneratorConfig.{name}={getattr(self, name)!r}: {why}")

        check("vocab_size", self.vocab_size >= 1, "must be >= 1")
        check("seq_len", self.seq_len >= 1, "must be >= 1")
        check("num_classes", self.num_classes >= 1, "must be >= 1")
        check("heads", self.heads >= 1 and self.width % self.heads == 0, "width must be a multiple of heads")
        check("mlp_ratio", self.mlp_ratio > 0, "must be > 0")
        check("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        check("class_dropout", 0.0 <= self.class_dropout < 1.0, "must be in [0, 1)")
        check("cond", self.cond in CONDITIONINGS, f"must be one of {CONDITIONINGS}")
        check("pos", self.pos in POSITIONS, f"must be one of {POSITIONS}")
        check("mlp", self.mlp in MLPS, f"must be one of {MLPS}")
        check("attn_backend", self.attn_backend in ATTN_BACKENDS, f"must be one of {ATTN_BACKENDS}")
        if self.pos == "rope2d":
            grid = round(self.seq_len ** 0.5)
            check("seq_len", grid * grid == self.seq_len, "rope2d needs a square token grid")
            check("heads", (self.width // self.heads) % 4 == 0, "rope2d needs a head dim divisible by 4")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        return round(self.seq_len ** 0.5)

    @classmethod
    def from_dict(cls, values: dict) -> "GeneratorConfig":
        """Strict: an unknown key is an error naming it (checkpoints and YAML both come through here)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GeneratorConfig keys: {unknown}")
        return cls(**values)


# Architecture presets; vocab_size / seq_len / num_classes default to the paper's (K=4096, 16x16, ImageNet) and
# are overridden from the tokenizer and data set (generator_config(name, vocab_size=..., ...)).
GENERATOR_PRESETS: dict[str, GeneratorConfig] = {
    # tiny, for CPU tests and `make demo` (2 cores, minutes); sized for the demo tokenizer's 8x8 grid, K = 1024
    "demo": GeneratorConfig(width=128, depth=4, heads=4, mlp_ratio=4.0, num_classes=10, vocab_size=1024, seq_len=64),
    "B": GeneratorConfig(width=768, depth=24, heads=16, dropout=0.1),    # RAR-B, ~261M
    "L": GeneratorConfig(width=1024, depth=24, heads=16, dropout=0.1),   # RAR-L, ~461M
}


def generator_config(preset: str, **overrides) -> GeneratorConfig:
    """A preset with fields replaced, e.g. generator_config("B", vocab_size=tok.codebook_size, seq_len=256)."""
    if preset not in GENERATOR_PRESETS:
        raise ValueError(f"unknown generator preset {preset!r}; choose from {sorted(GENERATOR_PRESETS)}")
    return dataclasses.replace(GENERATOR_PRESETS[preset], **overrides)
