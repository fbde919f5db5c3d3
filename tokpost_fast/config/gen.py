"""gen.* settings: the generator training stage's config (SPEC A4), checked before any work.

Kept apart from stages/gen.py (the stage itself) as post_config.py is from post.py; the run configuration
(tokpost_fast/config/__init__.py) imports it from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from tokpost_fast.checks import field_check
from tokpost_fast.models.generator import generator_config
from tokpost_fast.models.generator.config import CONFIG_CLASSES, PRESETS_BY_KIND

FROM_TOKENIZER = {"ar": ("vocab_size", "seq_len"), "dit": ("latent_channels", "grid_size")}
SET_BY_STAGE = {kind: keys + ("class_dropout",) for kind, keys in FROM_TOKENIZER.items()}  # gen.label_drop
DEFAULT_PRESETS = {"ar": "demo", "dit": "demo_dit"}
ORDERS = ("raster", "rar")
RAR_ANNEAL = (0.5, 0.75)   # rar.yaml: r anneals between steps 125,000 and 187,500 of 250,000


@dataclass
class GenStageConfig:
    """Generator training (SPEC A4: AdamW lr 4e-4, betas (0.9, 0.96), wd 0.03, cosine, label dropout 0.1)."""

    generator: str = "ar"                 # "ar" (token grids, VQ tokenizer) | "dit" (latents, continuous tokenizer)
    preset: Optional[str] = None          # a preset of that kind (None: "demo" / "demo_dit")
    model: dict[str, Any] = field(default_factory=dict)   # config overrides (vocab_size and seq_len, or
                                          # latent_channels and grid_size, come from the tokenizer, num_classes
                                          # from the data set unless given)
    global_batch_size: int = 64           # over all ranks
    lr: float = 4e-4
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.96)
    weight_decay: float = 0.03            # on weight matrices only, not on norms, biases or embeddings
    warmup_epochs: float = 1.0
    epochs: int = 400                     # RAR: 250k steps at batch 2048 on ImageNet
    max_steps: Optional[int] = None       # stop early; the LR schedule never depends on it
    order: Optional[str] = None           # AR training order: "raster", or "rar" (RAR's permutations annealed to
                                          # raster; builds arch rar); None: the preset's arch's own (gpt: raster,
                                          # rar: rar)
    rar_anneal_start: Optional[int] = None  # step where r starts falling from 1 (None: half the run's steps)
    rar_anneal_end: Optional[int] = None    # step from which r = 0, raster only (None: three quarters of them)
    label_drop: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.0                # 0: no EMA (RAR trains without)
    flip: bool = True                     # also encode horizontal flips; each epoch picks one per image
    extract_batch_size: int = 64          # images per rank per encode call
    log_interval: int = 10
    sample_interval: int = 0              # steps between sample grids (0: only at the end)
    ckpt_interval: int = 1000
    keep_checkpoints: int = 2
    sample_classes: int = 4               # rows of the sample grid (the first classes)
    sample_images: int = 8                # images per row
    sample_cfg_scale: float = 4.0
    sample_cfg_power: float = 1.0         # AR only
    sample_steps: int = 50                # DiT only: Euler steps of the sample grids
    seed: int = 0
    zero_stage: int = 2
    precision: str = "auto"               # auto: bf16 autocast on GPU, fp32 on CPU
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    max_bad_steps: int = 10

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)

        check = field_check(self, "gen")

        check("generator", self.generator in PRESETS_BY_KIND, f"must be one of {sorted(PRESETS_BY_KIND)}")
        if self.preset is None:
            self.preset = DEFAULT_PRESETS[self.generator]
        presets = PRESETS_BY_KIND[self.generator]
        check("preset", self.preset in presets, f"must be a {self.generator!r} preset: one of {sorted(presets)}")
        known = {f.name for f in dataclasses.fields(CONFIG_CLASSES[self.generator])} - set(SET_BY_STAGE[self.generator])
        unknown = sorted(set(self.model) - known)
        check("model", not unknown, f"unknown or stage-set keys {unknown} ({', '.join(FROM_TOKENIZER[self.generator])}"
                                    f": from the tokenizer; class_dropout: gen.label_drop); valid: {sorted(known)}")
        # the model's own checks, now rather than mid-run; a DiT's patch must divide the tokenizer's grid, which
        # only the run knows, so that one check waits (here the grid is set to a multiple of the patch)
        sizes = {}
        if self.generator == "dit":
            patch = self.model.get("patch_size", presets[self.preset].patch_size)
            sizes = {"grid_size": patch if isinstance(patch, int) and patch >= 1 else 1}
        check("order", self.order is None or (self.generator == "ar" and self.order in ORDERS),
              f"must be None or, for the AR generator, one of {ORDERS}")
        if self.generator == "ar" and self.order == "rar" and self.model.get("arch", "rar") != "rar":
            check("order", False, "needs gen.model.arch=rar: only RAR's layout has the target-aware position")
        for name in ("rar_anneal_start", "rar_anneal_end"):
            check(name, getattr(self, name) is None or getattr(self, name) >= 0, "must be None or >= 0")
        if self.rar_anneal_start is not None and self.rar_anneal_end is not None:
            check("rar_anneal_end", self.rar_anneal_end >= self.rar_anneal_start, "must be >= gen.rar_anneal_start")
        generator_config(self.preset, **self.model_overrides(), **sizes)
        check("global_batch_size", self.global_batch_size >= 1, "must be >= 1")
        check("lr", self.lr > 0, "must be > 0")
        check("min_lr", 0 <= self.min_lr <= self.lr, "must be in [0, lr]")
        check("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two values in [0, 1)")
        check("weight_decay", self.weight_decay >= 0, "must be >= 0")
        check("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0")
        check("epochs", self.epochs >= 1, "must be >= 1")
        check("max_steps", self.max_steps is None or self.max_steps >= 0, "must be None or >= 0")
        check("label_drop", 0 <= self.label_drop < 1, "must be in [0, 1)")
        check("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables)")
        check("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)")
        for name in ("extract_batch_size", "log_interval", "ckpt_interval", "keep_checkpoints", "sample_classes",
                     "sample_images", "sample_steps", "max_bad_steps"):
            check(name, getattr(self, name) >= 1, "must be >= 1")
        check("sample_interval", self.sample_interval >= 0, "must be >= 0")
        check("zero_stage", self.zero_stage in (0, 1, 2),
              "must be 0, 1 or 2 (stage 3 partitions the weights the rank-0 sample grids need whole)")
        check("precision", self.precision in ("auto", "fp32", "bf16"), "must be auto, fp32 or bf16")

    def model_overrides(self) -> dict:
        """gen.model, plus arch rar when order is rar and the preset is a GPT (RAR's permutations need its layout)."""
        if self.order == "rar" and "arch" not in self.model:
            return {**self.model, "arch": "rar"}
        return dict(self.model)

    def training_order(self, arch: str) -> str:
        """The AR model's training order: gen.order, else its arch's own."""
        return self.order or ("rar" if arch == "rar" else "raster")

    def rar_anneal(self, total_steps: int) -> tuple[int, int]:
        """(start, end) steps of the randomness anneal for a run of total_steps."""
        start = self.rar_anneal_start
        end = self.rar_anneal_end
        start = round(RAR_ANNEAL[0] * total_steps) if start is None else start
        end = max(start, round(RAR_ANNEAL[1] * total_steps)) if end is None else end
        return start, end
