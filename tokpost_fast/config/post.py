"""The `post` section of a run config (stages/post.py). Apart from the stage because config.py imports it while
stages/post.py imports stages/main.py, which imports config.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tokpost_fast.checks import field_check

INPUTS = ("tokens", "reencode")
GRIDS = ("generated", "clean")


@dataclass
class PostStageConfig:
    """Decoder post-training (SPEC A5.2: lr 5e-5 both sides, cosine, global batch 1024, 100 epochs, EMA, GAN from
    step 0, encoder frozen, no perturbation)."""

    input: str = "tokens"                # "tokens" (the cached grids, or latents) | "reencode" (stages/post.py)
    # which grids of the cache the decoder learns from: "generated" (the method: the teacher-forced grids, sigma of
    # the cache) or "clean" (the control arm: the same images' ground-truth grids, i.e. sigma = 1: "just more
    # decoder training" with the same recipe and steps)
    grids: str = "generated"
    name: str = "post"                   # RUN/<name>/ (checkpoints, log, samples) and RUN/tokenizer_<name>.pt
    train_codebook: bool = False         # SPEC A7: the official code leaves it trainable; we freeze it
    lr: float = 5e-5                     # decoder side
    disc_lr: float = 5e-5
    min_lr: float = 1e-5                 # cosine floor (the discriminator's is scaled alike)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    disc_weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    epochs: int = 100
    max_steps: Optional[int] = None      # stop early; the LR schedule never depends on it
    global_batch_size: int = 1024        # over all ranks
    disc_start: int = 0                  # replaces loss.disc_start: GAN from step 0 (fresh discriminator)
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_interval: int = 10
    sample_interval: int = 0             # steps between sample grids (0: only at the end)
    ckpt_interval: int = 1000
    keep_checkpoints: int = 2
    sample_images: int = 8
    seed: int = 0
    zero_stage: int = 2
    precision: str = "auto"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    max_bad_steps: int = 10

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)

        check = field_check(self, "post")

        check("input", self.input in INPUTS, f"must be one of {INPUTS}")
        check("grids", self.grids in GRIDS, f"must be one of {GRIDS}")
        check("name", self.name.replace("_", "").replace("-", "").isalnum() and self.name not in ("cache", "gen"),
              "letters, digits, _ and - only, not cache or gen (it names RUN/<name>/ and tokenizer_<name>.pt)")
        check("lr", self.lr > 0, "must be > 0")
        check("disc_lr", self.disc_lr > 0, "must be > 0")
        check("min_lr", 0 <= self.min_lr <= self.lr, "must be in [0, lr]")
        check("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two values in [0, 1)")
        check("weight_decay", self.weight_decay >= 0, "must be >= 0")
        check("disc_weight_decay", self.disc_weight_decay >= 0, "must be >= 0")
        check("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0")
        check("epochs", self.epochs >= 1, "must be >= 1")
        check("max_steps", self.max_steps is None or self.max_steps >= 0, "must be None or >= 0")
        check("disc_start", self.disc_start >= 0, "must be >= 0")
        check("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)")
        check("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables)")
        for name in ("global_batch_size", "log_interval", "ckpt_interval", "keep_checkpoints", "sample_images",
                     "max_bad_steps"):
            check(name, getattr(self, name) >= 1, "must be >= 1")
        check("sample_interval", self.sample_interval >= 0, "must be >= 0")
        check("seed", 0 <= self.seed < 2**62, "must be in [0, 2**62)")
        check("zero_stage", self.zero_stage in (0, 1, 2), "must be 0, 1 or 2")
        check("precision", self.precision in ("auto", "fp32", "bf16"), "must be auto, fp32 or bf16")
