"""iFID, the interpolated FID of a continuous tokenizer (Xu et al. 2026, "Making Reconstruction FID Predictive of
Diffusion Generation FID", arXiv 2603.05630): for each image, its nearest neighbour among the data set's latents,
the interpolation of the two latents, the decode of that, and the FID of the decodes against the real images.

    z_i = encode_latent(x_i)                      (the posterior mean, as rFID uses)
    j(i) = argmin_{j != i} dist(z_i, z_j)          over the flattened latents of the reference set
    x'_i = decode(interp(z_i, z_j(i), t))          iFID = FID({x'_i}, {x_i})

The settings follow the authors' evaluation script (evalvae.py of github.com/tongdaxu/Making-rFID-Predictive-of-
Diffusion-gFID; the abstract gives neither): spherical interpolation ("slerp") at t = 0.5, neighbours by cosine
distance of the flattened latents; "linear" interpolation with l2 neighbours is their other mode. Two choices are
ours and are flags: (1) their script looks the neighbour up among the TRAIN split's latents for each val image and
samples one of the 10 nearest with softmax(-mean squared distance) weights; we take the single nearest (the
paper's text: "its nearest neighbour"), deterministic, and by default among the measured (held-out) images
themselves, excluding the image itself, so no metric reads the train split; `reference` takes another set.
(2) The neighbour search is our fused op (tokpost_fast.ops.nearest_codes, the reference set as its "codebook",
k = 2 so the image itself can be dropped). iFID is a number for continuous latents only; a VQ tokenizer's
interpolated latent is not a code (its pFID is the VQ analogue).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from tokpost_fast.metrics.features import FeatureCollector, iter_image_batches
from tokpost_fast.models import is_continuous
from tokpost_fast.ops import nearest_codes

INTERPOLATIONS = ("slerp", "linear")
DISTANCES = ("cosine", "l2")
SLERP_EPS = 1e-7


@dataclass(frozen=True)
class IFIDSettings:
    """t: the weight of the neighbour (0 = rFID's decode, 0.5 = the midpoint); interpolation: slerp or linear;
    distance: cosine or l2 (of the flattened latents)."""

    t: float = 0.5
    interpolation: str = "slerp"
    distance: str = "cosine"

    def __post_init__(self) -> None:
        if isinstance(self.t, bool) or not 0.0 <= float(self.t) <= 1.0:      # also refuses NaN
            raise ValueError(f"ifid t must be in [0, 1], got {self.t}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"ifid interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"ifid distance must be one of {DISTANCES}, got {self.distance!r}")

    def as_dict(self) -> dict:
        return {**asdict(self), "neighbour": "nearest (k = 1), the image itself excluded",
                "paper": "arXiv 2603.05630 (iFID); its script's defaults: slerp, t = 0.5, cosine neighbours"}


def nearest_neighbours(z: torch.Tensor, reference: Optional[torch.Tensor] = None, distance: str = "cosine",
                       backend: str = "auto") -> torch.Tensor:
    """z [N, ...] -> [N] int64: the index of each row's nearest row of `reference` [M, ...] (same trailing shape),
    by the fused nearest_codes op. reference None: z itself, each row's own index excluded (with exact duplicates
    the lowest-index other copy)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    flat = z.detach().reshape(z.shape[0], -1).float().contiguous()
    if reference is None:
        if flat.shape[0] < 2:
            raise ValueError(f"iFID needs at least 2 images to find a neighbour, got {flat.shape[0]}")
        _, idx = nearest_codes(flat, flat, k=2, metric=distance, backend=backend)       # [N, 2]
        own = torch.arange(flat.shape[0], device=idx.device)
        # ties go to the lowest index, so a row equal to an earlier row finds that one first; drop itself
        return torch.where(idx[:, 0] == own, idx[:, 1], idx[:, 0])
    ref = reference.detach().reshape(reference.shape[0], -1).float().contiguous()
    if ref.shape[1] != flat.shape[1]:
        raise ValueError(f"reference latents have {ref.shape[1]} values per row, the images' {flat.shape[1]}")
    _, idx = nearest_codes(flat, ref, k=1, metric=distance, backend=backend)
    return idx[:, 0]


def interpolate(a: torch.Tensor, b: torch.Tensor, t: float, interpolation: str = "slerp") -> torch.Tensor:
    """Row-wise interpolation of latents a, b [N, ...] at weight t of b: (1 - t) a + t b, or the spherical path
    (sin((1 - t) theta) a + sin(t theta) b) / sin(theta), theta the angle of the flattened rows (linear where
    sin(theta) < 1e-6)."""
    if interpolation == "linear":
        return torch.lerp(a, b, t)
    if interpolation != "slerp":
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    af, bf = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    cos = ((af / (af.norm(dim=1, keepdim=True) + SLERP_EPS)) * (bf / (bf.norm(dim=1, keepdim=True) + SLERP_EPS)))
    theta = torch.acos(cos.sum(dim=1).clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    wa = (torch.sin((1.0 - t) * theta) / (sin + SLERP_EPS))[:, None]
    wb = (torch.sin(t * theta) / (sin + SLERP_EPS))[:, None]
    out = torch.where((sin < 1e-6)[:, None], torch.lerp(af, bf, t), wa * af + wb * bf)
    return out.reshape(a.shape)


def interpolated_latents(z: torch.Tensor, settings: IFIDSettings = IFIDSettings(),
                         reference: Optional[torch.Tensor] = None, backend: str = "auto") -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """(interpolated latents [N, ...], neighbour indices [N]) of latents z [N, ...]."""
    idx = nearest_neighbours(z, reference, settings.distance, backend)
    partner = (z if reference is None else reference)[idx.to(z.device)]
    return interpolate(z.float(), partner.float(), settings.t, settings.interpolation), idx


def interpolated_latents_reference(z: torch.Tensor, settings: IFIDSettings = IFIDSettings(),
                                   reference: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch ground truth of interpolated_latents: the full distance matrix in float64, the diagonal
    masked when the reference is z itself, the first minimum; the interpolation written out per row."""
    zf = z.reshape(z.shape[0], -1).double()
    rf = zf if reference is None else reference.reshape(reference.shape[0], -1).double()
    if settings.distance == "cosine":
        dist = 1.0 - torch.nn.functional.normalize(zf, dim=1) @ torch.nn.functional.normalize(rf, dim=1).T
    else:
        dist = ((zf[:, None, :] - rf[None, :, :]) ** 2).sum(-1)
    if reference is None:
        dist.fill_diagonal_(float("inf"))
    idx = dist.argmin(dim=1)
    rows = []
    for i, j in enumerate(idx.tolist()):
        a, b = zf[i], rf[j]
        t = settings.t
        if settings.interpolation == "linear":
            rows.append(a + t * (b - a))
            continue
        theta = torch.arccos(torch.clamp(torch.dot(a, b) / (a.norm() * b.norm()), -1.0, 1.0))
        if torch.sin(theta) < 1e-6:
            rows.append(a + t * (b - a))
        else:
            rows.append((torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta))
    return torch.stack(rows).reshape(z.shape).float(), idx


@torch.no_grad()
def ifid_features(model, images, extractor, info, settings: IFIDSettings = IFIDSettings(), num: Optional[int] = None,
                  batch_size: int = 64, device="cpu", reference: Optional[torch.Tensor] = None,
                  progress: bool = False) -> dict:
    """Features {layer: [N, d]} of the decoded interpolations of a continuous tokenizer's latents of `images` (a
    tensor [N, 3, H, W] in [-1, 1] or an iterable of batches, as decode_features takes), and the neighbour record.
    All N latents are encoded first: every image's neighbour is searched among all of them."""
    if not is_continuous(model):
        raise ValueError(f"{type(model).__name__} is a VQ tokenizer: iFID interpolates continuous latents (a VQ "
                         "tokenizer's interpolated latent is no code; its robustness metric is pFID)")
    was_training = model.training
    model.eval()
    try:
        device = torch.device(device)
        latents, seen = [], 0
        for batch in iter_image_batches(images):
            batch = batch if num is None else batch[: num - seen]
            for start in range(0, batch.shape[0], batch_size):
                latents.append(model.encode_latent(batch[start:start + batch_size].to(device, torch.float32)).float())
            seen += batch.shape[0]
            if num is not None and seen >= num:
                break
        z = torch.cat(latents)
        mixed, idx = interpolated_latents(z, settings, reference)
        collector = FeatureCollector(extractor, info, device, "interpolated decodes")
        for start in tqdm(range(0, z.shape[0], batch_size), desc="iFID decode", disable=not progress):
            collector.add(model.decode(mixed[start:start + batch_size]).clamp(-1, 1))
    finally:
        model.train(was_training)
    return {"features": collector.result(), "neighbours": idx.cpu(), "num": int(z.shape[0])}
