"""Latent perturbation during main training (METHOD.md A2): the annealing schedule, how many samples of a local batch
are perturbed, and the per-step seed. The operator itself (top-delta resampling with in-kernel Philox draws) is
tokpost_fast.ops.perturb_codes, reached through the tokenizer's forward(perturb_samples=n).

Continuous tokenizers (arch kl_cnn) have no codes to resample; their analogue is Gaussian noise of relative scale
`noise` on the sampled latent (models/tokenizer/kl.py: gaussian_perturb), annealed by the same ratio r(e) as alpha
and applied to the same first floor(B_local * beta) samples. alpha / delta then do nothing, as noise does for VQ.

Everything here is a pure function of its arguments, so a resumed run draws exactly what a straight run draws.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

from tokpost_fast.checks import field_check

RAMPS = ("continuous", "robustok")


@dataclass
class PerturbConfig:
    alpha: float = 1.0           # probability that a token is resampled among its delta nearest codes
    beta: float = 0.1            # fraction of each local batch that decodes the perturbed latent (constant)
    delta: int = 100             # how many nearest codes a token may be resampled among (itself included)
    noise: float = 0.5           # continuous tokenizers only: sigma of the Gaussian added to a perturbed latent,
                                 # in units of that image's latent std (ours: no paper value; 0.5 = SNR 4)
    anneal_start: float = 40.0   # epoch s: r = 1 before it
    anneal_end: float = 120.0    # epoch t: r reaches end_ratio here and stays there
    end_ratio: float = 0.5       # r after t
    ramp: str = "robustok"       # "robustok" (METHOD.md A2, what the code ran): r = 1 - (e - s) / (t - s) * end_ratio
                                 # on [s, t]; "continuous": r falls linearly from 1 at s to end_ratio at t (the
                                 # two agree at the paper's end_ratio 0.5; otherwise "robustok" jumps at t)

    def __post_init__(self) -> None:
        check = field_check(self, "perturb")

        check("alpha", 0.0 <= self.alpha <= 1.0, "must be in [0, 1]")
        check("beta", 0.0 <= self.beta <= 1.0, "must be in [0, 1]")
        check("delta", self.delta >= 1, "must be >= 1 (1 = no perturbation)")
        check("noise", self.noise >= 0, "must be >= 0 (0 = no perturbation of continuous latents)")
        check("anneal_start", self.anneal_start >= 0, "must be >= 0")
        check("anneal_end", self.anneal_end >= self.anneal_start, "must be >= anneal_start")
        check("end_ratio", 0.0 <= self.end_ratio <= 1.0, "must be in [0, 1]")
        check("ramp", self.ramp in RAMPS, f"must be one of {RAMPS}")


class PerturbParams(NamedTuple):
    rate: float   # alpha_e
    topk: int     # delta_e
    beta: float
    noise: float = 0.0  # noise_e (continuous latents)


def anneal_ratio(epoch: float, start: float, end: float, end_ratio: float, ramp: str = "robustok") -> float:
    """r(e): 1 before `start`, `end_ratio` after `end`, and in between
    - "continuous": linear from 1 at `start` to `end_ratio` at `end`;
    - "robustok": 1 - (e - s) / (t - s) * end_ratio, as RobustTok's get_random_ratio (METHOD.md A2 writes it so), whose
      ramp ends at 1 - end_ratio: the same as "continuous" at the paper's end_ratio = 0.5, a jump at t otherwise.
    """
    if epoch < start:
        return 1.0
    if epoch > end or (epoch == end and ramp == "continuous"):   # also start == end: a step to end_ratio
        return float(end_ratio)
    progress = (epoch - start) / (end - start) if end > start else 1.0
    if ramp == "robustok":
        return 1.0 - progress * end_ratio
    if ramp != "continuous":
        raise ValueError(f"anneal_ratio: ramp must be one of {RAMPS}, got {ramp!r}")
    return 1.0 - progress * (1.0 - end_ratio)


def perturb_params(cfg: PerturbConfig, epoch: float) -> PerturbParams:
    """alpha_e = r * alpha, delta_e = int(r * delta) (at least 1, which means "no perturbation"), beta constant;
    noise_e = r * noise for continuous latents."""
    r = anneal_ratio(epoch, cfg.anneal_start, cfg.anneal_end, cfg.end_ratio, cfg.ramp)
    return PerturbParams(rate=r * cfg.alpha, topk=max(1, int(r * cfg.delta)), beta=cfg.beta, noise=r * cfg.noise)


def perturbed_samples(params: PerturbParams, local_batch: int, continuous: bool) -> int:
    """How many leading samples of this local batch are perturbed this step: floor(B * beta) while the operator
    of this tokenizer kind does anything (VQ: rate > 0 and delta > 1; continuous: noise > 0), else 0."""
    active = params.noise > 0 if continuous else params.rate > 0 and params.topk > 1
    return perturbed_count(local_batch, params.beta) if active else 0


def perturbed_count(local_batch: int, beta: float) -> int:
    """The first floor(B_local * beta) samples of a local batch are perturbed (METHOD.md A2 step 4). The epsilon keeps
    float products such as 10 * 0.3 = 2.9999999999999996 from losing a sample."""
    return int(math.floor(local_batch * beta + 1e-9))


def step_seed(seed: int, step: int, rank: int, stream: str = "perturb") -> int:
    """A 62-bit seed that depends only on (train seed, global step, rank, stream name): the Philox key of the
    perturbation draw, and the reseed of torch's global RNG (DiffAugment, dropout) at every step."""
    digest = hashlib.blake2b(f"{stream}:{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2
