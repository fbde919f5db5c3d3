"""The settings every training stage's engine shares (optimizer, schedule, EMA, ZeRO, precision, checkpoints,
logging, seed, NaN guard), declared and checked once.

    @dataclass
    class GenStageConfig(EngineConfig):
        section: ClassVar[str] = "gen"     # names the fields in errors: gen.lr=0: must be > 0
        lr: float = 4e-4                   # a stage changes a default by declaring the field again
        label_drop: float = 0.1            # ... and adds its own fields after the shared ones

A stage with checks of its own runs them in its __post_init__ and then calls super().__post_init__().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from tokpost_fast.checks import field_check

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class EngineConfig:
    """Defaults are the main stage's (METHOD.md A1); gen and post declare their own where they differ."""

    section: ClassVar[str] = "engine"   # the config section's name, as errors show it
    zero_stage_why: ClassVar[str] = ""  # why the stage refuses ZeRO-3, appended to that error

    lr: float = 3e-5
    min_lr: float = 1e-5                # cosine floor (a discriminator's is scaled alike)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    epochs: int = 200
    max_steps: Optional[int] = None     # stop after this many optimizer steps in total; the LR schedule never
                                        # depends on it, so a run cut at N steps and resumed is the same run
    grad_clip: float = 1.0              # global grad-norm clip per engine; 0 disables
    ema_decay: float = 0.999            # EMA of the trained weights (0: none); the EMA model is what is exported
    log_interval: int = 10              # steps between log.jsonl rows
    sample_interval: int = 500          # steps between sample grids (0: only at the end)
    ckpt_interval: int = 1000           # steps between checkpoints (and always at the end)
    keep_checkpoints: int = 2           # newest checkpoints kept on disk
    sample_images: int = 8              # images per row of the sample grid
    seed: int = 0
    zero_stage: int = 2
    precision: str = "auto"             # auto: bf16 autocast on GPU, fp32 on CPU
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    max_bad_steps: int = 10             # consecutive non-finite losses before the run stops

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)

        check = field_check(self, self.section)

        check("lr", self.lr > 0, "must be > 0")
        check("min_lr", 0 <= self.min_lr <= self.lr, "must be in [0, lr]")
        check("betas", len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "two values in [0, 1)")
        check("weight_decay", self.weight_decay >= 0, "must be >= 0")
        check("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0")
        check("epochs", self.epochs >= 1, "must be >= 1")
        check("max_steps", self.max_steps is None or self.max_steps >= 0, "must be None or >= 0")
        check("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables)")
        check("ema_decay", 0.0 <= self.ema_decay < 1.0, "must be in [0, 1)")
        for name in ("log_interval", "ckpt_interval", "keep_checkpoints", "sample_images", "max_bad_steps"):
            check(name, getattr(self, name) >= 1, "must be >= 1")
        check("sample_interval", self.sample_interval >= 0, "must be >= 0")
        check("seed", 0 <= self.seed < 2**62, "must be in [0, 2**62)")
        check("zero_stage", self.zero_stage in (0, 1, 2),
              "must be 0, 1 or 2" + (f" ({self.zero_stage_why})" if self.zero_stage_why else ""))
        check("precision", self.precision in PRECISIONS, "must be auto, fp32 or bf16")


@dataclass
class AutoencoderEngineConfig(EngineConfig):
    """The shared settings plus the discriminator's optimizer: the stages that train a tokenizer (main, post)."""

    disc_lr: float = 1e-4
    disc_weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        check = field_check(self, self.section)

        check("disc_lr", self.disc_lr > 0, "must be > 0")
        check("disc_weight_decay", self.disc_weight_decay >= 0, "must be >= 0")
        super().__post_init__()
