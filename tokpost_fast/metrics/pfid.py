"""rFID and pFID (METHOD.md A3): features of decoded clean / perturbed token grids, one encode per image. For a
continuous tokenizer the same loop decodes clean / noised latents (metrics/latent_noise.py: our analogue).

pFID is the FID between real images and the decodes of their *perturbed* tokens: the A2 operator
(tokpost_fast.ops.perturb_codes) applied to every image (beta = 1) with a fixed rate alpha, neighbourhood delta
and seed. rFID is the same with no perturbation. Both go through the same nearest-code kernel, so pFID at
alpha = 0 is rFID bit for bit.

Randomness: the token at (image i of the pass, grid position t) has Philox position i * h * w + t, so the
perturbation does not depend on the batch size or the device, only on the image order and the seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tokpost_fast.atomic import atomic_write_json
from tokpost_fast import ops
from tokpost_fast.metrics.extractor import ExtractorInfo
from tokpost_fast.metrics.features import FeatureCollector, count_images, iter_image_batches
from tokpost_fast.metrics.latent_noise import continuous_decoder
from tokpost_fast.models import is_continuous
from tokpost_fast.models.tokenizer.quantizer import VectorQuantizer

PFID_CURVE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_PFID_ALPHA = 1.0
DEFAULT_PFID_DELTA = 100
DEFAULT_PFID_SEED = 0


@dataclass(frozen=True)
class Perturbation:
    """One decode setting: resample a token with probability `alpha` uniformly among its `delta` nearest codes."""

    alpha: float
    delta: int

    @property
    def clean(self) -> bool:
        return self.alpha == 0.0 or self.delta == 1

    def key(self):
        # every "nothing is resampled" setting decodes the same clean grid: decode it once
        return "clean" if self.clean else (float(self.alpha), int(self.delta))


CLEAN = Perturbation(0.0, 1)
# pFID curve x axes: (x label, y label) for the VQ pFID and the continuous analogue
CURVE_AXES = {"alpha": ("perturbation rate alpha", "pFID"),
              "noise": ("latent noise (x each image's latent std)", "perturbed-latent FID")}


def default_delta(codebook_size: int) -> int:
    """METHOD.md A7: delta defaults to the training value 100, capped by the codebook size."""
    return min(DEFAULT_PFID_DELTA, int(codebook_size))


def check_perturbation(alpha: float, delta: int, codebook_size: int) -> Perturbation:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"--pfid-alpha must be in [0, 1], got {alpha}")
    if isinstance(delta, bool) or int(delta) != delta or not 1 <= int(delta) <= codebook_size:
        raise ValueError(f"--pfid-delta must be an integer in [1, K={codebook_size}], got {delta}")
    return Perturbation(float(alpha), int(delta))


def _quantizer(model):
    """The tokenizer's VectorQuantizer submodule, or None (a model of another layout)."""
    return next((m for m in model.modules() if isinstance(m, VectorQuantizer)), None)


def tokenizer_codebook(model) -> torch.Tensor:
    """The codebook [K, D] as stored. With metric="cosine" perturb_codes normalises it exactly as the quantizer's
    own path does (ops.quantize), so the clean indices are bit-identical to model.encode's."""
    quantizer = _quantizer(model)
    if quantizer is not None:
        return quantizer.embedding.weight.detach()
    value = getattr(model, "codebook", None)
    if callable(value) and not isinstance(value, torch.nn.Module):
        value = value()
    if isinstance(value, torch.nn.Module):
        value = getattr(value, "weight", None)
    if torch.is_tensor(value) and value.dim() == 2:
        return value.detach()
    raise AttributeError(f"{type(model).__name__} exposes no codebook [K, D]")


def tokenizer_metric(model) -> str:
    """The quantizer's nearest-code metric: cosine (l2-normalised codes, METHOD.md A1) unless it says otherwise."""
    quantizer = _quantizer(model)
    if quantizer is not None:
        return quantizer.metric
    return "cosine" if getattr(model.config, "codebook_l2_norm", True) else "l2"


def tokenizer_backend(model) -> str:
    quantizer = _quantizer(model)
    return quantizer.backend if quantizer is not None else getattr(model.config, "quantizer_backend", "auto")


@torch.no_grad()
def decode_features(model, images, extractor, info: ExtractorInfo, settings: list, seed: int = 0,
                    num: int | None = None, device="cpu", collect_real: bool = False, progress: bool = False):
    """Encode each real image once; decode it under every setting; extract features.

    images: tensor [N, 3, H, W] in [-1, 1] or an iterable of batches (build_loader's (images, labels, indices)).
    settings: Perturbation (VQ tokenizers) or latent_noise.LatentNoise (continuous ones); CLEAN fits both.
    Returns ({setting: {layer: [N, d]}}, real features {layer: [N, d]} or None)."""
    was_training = model.training
    model.eval()
    try:
        if is_continuous(model):      # no codebook: its pFID is the latent-noise analogue (latent_noise.py)
            decode_batch = continuous_decoder(model, settings, seed)
        else:
            decode_batch = _vq_decoder(model, settings, seed, torch.device(device))
        return _decode_features(decode_batch, images, extractor, info, settings, num, torch.device(device),
                                collect_real, progress)
    finally:
        model.train(was_training)


def _vq_decoder(model, settings, seed, device):
    """decode_batch(x, first_image) -> {setting key: decodes of the clean / perturbed token grids}."""
    wrong = [s for s in settings if not isinstance(s, Perturbation)]
    if wrong:
        raise ValueError(f"{type(model).__name__} is a VQ tokenizer: pFID settings {wrong} are for continuous "
                         "latents; its pFID takes alpha and delta")
    codebook = tokenizer_codebook(model).to(device)
    metric = tokenizer_metric(model)
    backend = tokenizer_backend(model)

    def decode_batch(x: torch.Tensor, first_image: int) -> dict:
        z = model.encode_latent(x)                    # [B, C, h, w]
        tokens = z.permute(0, 2, 3, 1)                # [B, h, w, C]
        offset = first_image * tokens.shape[1] * tokens.shape[2]
        out = {}
        for setting in settings:
            key = setting.key()
            if key in out:
                continue
            if setting.clean:
                idx, _ = ops.perturb_codes(tokens, codebook, 0.0, 1, seed, metric=metric, backend=backend,
                                           position_offset=offset)
            else:
                _, idx = ops.perturb_codes(tokens, codebook, setting.alpha, setting.delta, seed, metric=metric,
                                           backend=backend, position_offset=offset)
            out[key] = model.decode_codes(idx)        # idx [B, h, w] -> [B, 3, H, W]
        return out

    return decode_batch


def _decode_features(decode_batch, images, extractor, info, settings, num, device, collect_real, progress):
    keys = {s: s.key() for s in settings}
    collectors = {key: FeatureCollector(extractor, info, device, "decoded images") for key in set(keys.values())}
    real = FeatureCollector(extractor, info, device, "real images") if collect_real else None
    seen = 0
    with tqdm(total=count_images(images, num), unit="img", desc="decode + features", disable=not progress) as bar:
        for batch in iter_image_batches(images):
            if num is not None:
                batch = batch[: num - seen]
            if batch.shape[0] == 0:
                break
            if real is not None:
                real.add(batch)
            elif not (batch.dim() == 4 and batch.shape[1] == 3):
                raise ValueError(f"real images: expected [B, 3, H, W], got {tuple(batch.shape)}")
            for key, decoded in decode_batch(batch.to(device, torch.float32), seen).items():
                collectors[key].add(decoded)
            seen += batch.shape[0]
            bar.update(batch.shape[0])
            if num is not None and seen >= num:
                break
    decoded = {setting: collectors[key].result() for setting, key in keys.items()}
    return decoded, (real.result() if real is not None else None)


def save_pfid_curve(points: list[dict], run_dir: str, payload: dict, proxy: bool, title: str,
                    stem: str = "pfid_curve", x: str = "alpha") -> dict:
    """points: [{x: value, "pfid": v, ...}, ...] -> RUN_DIR/<stem>.png (the plot) and RUN_DIR/<stem>.json
    ({**payload, "points": points}). x: "alpha" (VQ pFID) or "noise" (the continuous analogue). Returns both
    paths."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    os.makedirs(run_dir, exist_ok=True)
    json_path, png_path = os.path.join(run_dir, f"{stem}.json"), os.path.join(run_dir, f"{stem}.png")
    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    ax = fig.subplots()
    ax.plot([p[x] for p in points], [p["pfid"] for p in points], marker="o")
    ax.set_xlabel(CURVE_AXES[x][0])
    ax.set_ylabel(CURVE_AXES[x][1] + (" (proxy)" if proxy else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    write_json(json_path, {**payload, "points": points})
    return {"json": json_path, "png": png_path}


def write_json(path: str, payload: dict) -> None:
    atomic_write_json(path, payload, indent=2)
