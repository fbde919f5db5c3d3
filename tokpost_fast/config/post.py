"""The `post` section of a run config: decoder post-training (stages/post.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tokpost_fast.checks import field_check
from tokpost_fast.config.engine import AutoencoderEngineConfig

INPUTS = ("tokens", "reencode")
GRIDS = ("generated", "clean")


@dataclass
class PostStageConfig(AutoencoderEngineConfig):
    """Decoder post-training (METHOD.md A5.2: lr 5e-5 both sides, cosine, global batch 1024, 100 epochs, EMA, GAN from
    step 0, encoder frozen, no perturbation): the engine settings (config/engine.py) with the defaults below, plus
    the post stage's own fields."""

    section: ClassVar[str] = "post"

    lr: float = 5e-5                     # decoder side
    disc_lr: float = 5e-5
    epochs: int = 100
    sample_interval: int = 0             # steps between sample grids (0: only at the end)

    input: str = "tokens"                # "tokens" (the cached grids, or latents) | "reencode" (stages/post.py)
    # which grids of the cache the decoder learns from: "generated" (the method: the teacher-forced grids, sigma of
    # the cache) or "clean" (the control arm: the same images' ground-truth grids, i.e. sigma = 1: "just more
    # decoder training" with the same recipe and steps)
    grids: str = "generated"
    name: str = "post"                   # RUN/<name>/ (checkpoints, log, samples) and RUN/tokenizer_<name>.pt
    train_codebook: bool = False         # METHOD.md A7: the official code leaves it trainable; we freeze it
    global_batch_size: int = 1024        # over all ranks
    disc_start: int = 0                  # replaces loss.disc_start: GAN from step 0 (fresh discriminator)

    def __post_init__(self) -> None:
        check = field_check(self, self.section)

        check("input", self.input in INPUTS, f"must be one of {INPUTS}")
        check("grids", self.grids in GRIDS, f"must be one of {GRIDS}")
        check("name", self.name.replace("_", "").replace("-", "").isalnum() and self.name not in ("cache", "gen"),
              "letters, digits, _ and - only, not cache or gen (it names RUN/<name>/ and tokenizer_<name>.pt)")
        check("global_batch_size", self.global_batch_size >= 1, "must be >= 1")
        check("disc_start", self.disc_start >= 0, "must be >= 0")
        super().__post_init__()
