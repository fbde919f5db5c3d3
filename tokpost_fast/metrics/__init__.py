"""Evaluation (METHOD.md A3, B3): rFID, pFID, gFID, IS, precision / recall on torch-fidelity.

torch-fidelity does the feature extraction (its "inception-v3-compat" FID Inception, or our registered offline
proxy "tokpost-proxy-v1") and the statistics; this package adds what it cannot do: decoding token batches (clean,
perturbed, generated) into images, and caching real-image statistics per dataset and extractor. A continuous (KL)
tokenizer with a DiT generator is evaluated the same way: rFID, the perturbed-latent FID (our analogue of pFID,
latent_noise.py), and gFID of DiT samples.
CLI: `python -m tokpost_fast.evaluate`.

Names are imported lazily, so importing one module of the package does not pull in torch-fidelity. The run
config's `eval` section (EvalConfig) is tokpost_fast/config/eval.py; the printed table and the pipeline report
are tokpost_fast/report/.
"""

import importlib

_EXPORTS = {
    "extractor": ("INCEPTION_NAME", "PROXY_NAME", "ExtractorInfo", "ProxyFeatureExtractor", "build_extractor",
                  "check_inception_weights"),
    "features": ("FIDStats", "extract_features", "fid_between", "fid_statistics", "frechet_distance",
                 "images_to_uint8"),
    "generation": ("DiTSampling", "SamplingSettings", "generated_features"),
    "latent_noise": ("PFID_CURVE_NOISES", "LatentNoise", "check_noise"),
    "pfid": ("PFID_CURVE_ALPHAS", "Perturbation", "decode_features", "default_delta"),
    "run": ("evaluate_run", "pfid_curve"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"tokpost_fast.metrics.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'tokpost_fast.metrics' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
