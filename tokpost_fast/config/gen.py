"""The `gen` section of a run config: the generator training stage (stages/gen.py, METHOD.md A4), checked before any
work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from tokpost_fast.checks import field_check
from tokpost_fast.config.engine import EngineConfig
from tokpost_fast.models.generator import generator_config
from tokpost_fast.models.generator.config import CONFIG_CLASSES, PRESETS_BY_KIND

FROM_TOKENIZER = {"ar": ("vocab_size", "seq_len"), "dit": ("latent_channels", "grid_size")}
SET_BY_STAGE = {kind: keys + ("class_dropout",) for kind, keys in FROM_TOKENIZER.items()}  # gen.label_drop
DEFAULT_PRESETS = {"ar": "demo", "dit": "demo_dit"}
ORDERS = ("raster", "rar")
RAR_ANNEAL = (0.5, 0.75)   # rar.yaml: r anneals between steps 125,000 and 187,500 of 250,000


@dataclass
class GenStageConfig(EngineConfig):
    """Generator training (METHOD.md A4: AdamW lr 4e-4, betas (0.9, 0.96), wd 0.03, cosine, label dropout 0.1): the
    engine settings (config/engine.py) with the defaults below, plus the generator's own fields."""

    section: ClassVar[str] = "gen"
    zero_stage_why: ClassVar[str] = "stage 3 partitions the weights the rank-0 sample grids need whole"

    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.96)
    weight_decay: float = 0.03            # on weight matrices only, not on norms, biases or embeddings
    epochs: int = 400                     # RAR: 250k steps at batch 2048 on ImageNet
    ema_decay: float = 0.0                # 0: no EMA (RAR trains without)
    sample_interval: int = 0              # steps between sample grids (0: only at the end)

    generator: str = "ar"                 # "ar" (token grids, VQ tokenizer) | "dit" (latents, continuous tokenizer)
    preset: Optional[str] = None          # a preset of that kind (None: "demo" / "demo_dit")
    model: dict[str, Any] = field(default_factory=dict)   # config overrides (vocab_size and seq_len, or
                                          # latent_channels and grid_size, come from the tokenizer, num_classes
                                          # from the data set unless given)
    global_batch_size: int = 64           # over all ranks
    order: Optional[str] = None           # AR training order: "raster", or "rar" (RAR's permutations annealed to
                                          # raster; builds arch rar); None: the preset's arch's own (gpt: raster,
                                          # rar: rar)
    rar_anneal_start: Optional[int] = None  # step where r starts falling from 1 (None: half the run's steps)
    rar_anneal_end: Optional[int] = None    # step from which r = 0, raster only (None: three quarters of them)
    label_drop: float = 0.1
    flip: bool = True                     # also encode horizontal flips; each epoch picks one per image
    extract_batch_size: int = 64          # images per rank per encode call
    sample_classes: int = 4               # rows of the sample grid (the first classes)
    sample_cfg_scale: float = 4.0
    sample_cfg_power: float = 1.0         # AR only
    sample_steps: int = 50                # DiT only: Euler steps of the sample grids

    def __post_init__(self) -> None:
        check = field_check(self, self.section)

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
        check("label_drop", 0 <= self.label_drop < 1, "must be in [0, 1)")
        for name in ("extract_batch_size", "sample_classes", "sample_steps"):
            check(name, getattr(self, name) >= 1, "must be >= 1")
        super().__post_init__()

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
