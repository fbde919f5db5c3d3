"""The perturbed-latent FID of a continuous (KL) tokenizer: OUR ANALOGUE of pFID, not the paper's pFID.

The paper's pFID (METHOD.md A3) resamples the codes of a VQ latent (alpha, delta); a continuous latent has no codes.
Our analogue applies the main stage's continuous perturbation (docs/INTERFACES.md, "Continuous tokenizer";
models/tokenizer/kl.py: gaussian_perturb) to every image (beta = 1) and takes the FID of the decodes:

    z_b = encode_latent(x_b)                        (the posterior mean, as rFID uses)
    x'_b = decode(z_b + noise * std(z_b) * eps_b),   eps_b ~ N(0, I)

std(z_b) is the image's own latent std over (C, h, w), so the setting means the same for any latent scale
(scaling_factor), and `noise` is the training operator's own unit (perturb.noise, default 0.5 = SNR 4).
eps_b is drawn from a CPU generator keyed by (seed, image ordinal), so the result depends on the image order and
the seed only, never on the batch size or the device. noise = 0 is rFID bit for bit. It is reported under the
same pfid key as the VQ pFID, with settings {"kind": "gaussian", "noise": ...} beside it so no one reads it as
the paper's number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from tokpost_fast.models.tokenizer.kl import gaussian_perturb

PFID_CURVE_NOISES = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_PFID_NOISE = 0.5
ANALOGUE_NOTE = ("perturbed-latent FID: our continuous analogue of pFID (Gaussian noise on every image's latent), "
                 "not the paper's VQ pFID")


@dataclass(frozen=True)
class LatentNoise:
    """One decode setting of a continuous tokenizer: Gaussian noise of relative scale `noise` on every latent."""

    noise: float

    @property
    def clean(self) -> bool:
        return self.noise == 0.0

    def key(self):
        # shares "clean" with the VQ settings: rFID's decode (CLEAN) is the noise-0 decode, done once
        return "clean" if self.clean else ("gaussian", float(self.noise))


def check_noise(noise: float) -> LatentNoise:
    if isinstance(noise, bool) or not float(noise) >= 0.0:   # also refuses NaN
        raise ValueError(f"--pfid-noise must be >= 0, got {noise}")
    return LatentNoise(float(noise))


def noise_settings(setting: LatentNoise, seed: int) -> dict:
    """What metrics.json records next to a perturbed-latent FID."""
    return {"kind": "gaussian", "noise": setting.noise, "seed": seed, "beta": 1.0,
            "relative_to": "each image's latent std", "note": ANALOGUE_NOTE}


def image_noise_seed(seed: int, image: int) -> int:
    """62-bit seed of image `image`'s eps: a function of (seed, image ordinal) only."""
    digest = hashlib.blake2b(f"pfid-noise:{seed}:{image}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def perturb_latents(z: torch.Tensor, noise: float, seed: int, first_image: int) -> torch.Tensor:
    """z [B, C, h, w] of images first_image .. first_image + B - 1 -> z + noise * std(z_b) * eps_b, row by row
    (the training operator, gaussian_perturb, with one seed per image)."""
    if noise == 0.0:
        return z
    return torch.cat([gaussian_perturb(z[b:b + 1], noise, seed=image_noise_seed(seed, first_image + b))
                      for b in range(z.shape[0])])


def continuous_decoder(model, settings, seed: int):
    """decode_batch(x, first_image) -> {setting key: decoded images} for pfid.decode_features. Any "clean"
    setting (CLEAN or noise 0) decodes the unperturbed latent; a VQ setting that perturbs is refused."""
    perturbing = [s for s in settings if not s.clean]
    wrong = [s for s in perturbing if not isinstance(s, LatentNoise)]
    if wrong:
        raise ValueError(f"{type(model).__name__} is continuous (no codebook): pFID settings {wrong} resample VQ "
                         "codes; its analogue is the latent noise (--pfid-noise)")

    def decode_batch(x: torch.Tensor, first_image: int) -> dict:
        z = model.encode_latent(x)                                 # [B, C, h, w]
        out = {}
        for setting in settings:
            key = setting.key()
            if key not in out:
                latent = z if setting.clean else perturb_latents(z, setting.noise, seed, first_image)
                out[key] = model.decode(latent)                    # [B, 3, H, W]
        return out

    return decode_batch
