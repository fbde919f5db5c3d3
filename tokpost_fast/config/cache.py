"""The `cache` section of a run config: how stages/cache.py builds the post-training set (METHOD.md A5.1, A7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tokpost_fast.checks import field_check
from tokpost_fast.config.engine import PRECISIONS


@dataclass
class CacheStageConfig:
    """Post-training set construction (METHOD.md A5.1, A7). Sampling defaults: the official post-training config
    (T 1.0, g 16, p 2.75); which settings produced the paper's set is an open point (METHOD.md A7)."""

    sigma: float = 0.7                  # P(keep the ground-truth token); 1 = reconstruction, 0 = pure generation
    num_images: Optional[int] = None    # images in the set (a seeded subset); None: all training images
    shard_size: int = 1024              # rows per shard file
    batch_size: int = 64                # rows per sampling call (part of the seed layout: recorded in the index)
    temperature: float = 1.0
    cfg_scale: float = 16.0             # classifier-free guidance g (METHOD.md A4 schedule)
    cfg_power: float = 2.75             # guidance schedule power p
    top_k: int = 0                      # 0: no top-k filter
    top_p: float = 1.0                  # 1.0: no nucleus filter
    # continuous tokenizer + DiT: the noise level each real latent is denoised from (0: the real
    # latent, 1: pure noise); 0.3 mirrors sigma = 0.7's 30 % generated tokens. Euler steps of the full [1, 0]
    # path (a partial denoise takes its share) and guidance on the velocity (DiT's FID setting 1.5).
    post_strength: float = 0.3
    denoise_steps: int = 50
    denoise_cfg_scale: float = 1.5
    seed: int = 0
    max_steps: Optional[int] = None     # build only shards [0, max_steps) (a shard is this stage's step)
    precision: str = "auto"             # auto: bf16 autocast on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        check = field_check(self, "cache")

        check("sigma", 0.0 <= self.sigma <= 1.0, "must be in [0, 1]")
        check("num_images", self.num_images is None or self.num_images >= 1, "must be None or >= 1")
        check("shard_size", self.shard_size >= 1, "must be >= 1")
        check("batch_size", self.batch_size >= 1, "must be >= 1")
        check("temperature", self.temperature >= 0, "must be >= 0 (0: greedy)")
        check("cfg_scale", self.cfg_scale >= 0, "must be >= 0")
        check("cfg_power", self.cfg_power > 0, "must be > 0")
        check("top_k", self.top_k >= 0, "must be >= 0")
        check("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]")
        check("post_strength", 0.0 <= self.post_strength <= 1.0, "must be in [0, 1]")
        check("denoise_steps", self.denoise_steps >= 1, "must be >= 1")
        check("denoise_cfg_scale", self.denoise_cfg_scale >= 0, "must be >= 0")
        check("seed", 0 <= self.seed < 2**62, "must be in [0, 2**62)")
        check("max_steps", self.max_steps is None or self.max_steps >= 0, "must be None or >= 0")
        check("precision", self.precision in PRECISIONS, "must be auto, fp32 or bf16")

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, cfg_scale=self.cfg_scale, cfg_power=self.cfg_power,
                    top_k=self.top_k, top_p=self.top_p)
