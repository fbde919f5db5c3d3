"""The `train` section of a run config: the main stage's optimisation (METHOD.md A1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from tokpost_fast.checks import field_check
from tokpost_fast.config.engine import AutoencoderEngineConfig


@dataclass
class TrainConfig(AutoencoderEngineConfig):
    """Main-stage optimisation (METHOD.md A1): the engine settings (config/engine.py, whose defaults are this stage's)
    plus the fields below. Epoch-based schedule; max_steps only stops early."""

    section: ClassVar[str] = "train"
    zero_stage_why: ClassVar[str] = "stage 3 partitions the parameters the adaptive GAN weight needs whole"

    global_batch: Optional[int] = None  # images per step over all ranks; sets data.batch_size = global / world
    usage_window: int = 100          # steps of code indices behind the codebook usage / perplexity numbers
    time_split: bool = True          # per-phase timings in the log (synchronises the GPU between phases)

    def __post_init__(self) -> None:
        check = field_check(self, self.section)

        check("global_batch", self.global_batch is None or self.global_batch >= 1, "must be None or >= 1")
        check("usage_window", self.usage_window >= 1, "must be >= 1")
        super().__post_init__()
