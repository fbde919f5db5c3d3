"""Public fused quantizer ops (METHOD.md B2). Each is a torch.library custom op with a fake kernel (and an autograd
rule where gradients exist), so modules calling them compile with torch.compile(fullgraph=True)."""

from tokpost_fast.ops._backends import BACKENDS, available_backends
from tokpost_fast.ops.codebook_lookup import codebook_lookup, codebook_lookup_backward_reference, codebook_lookup_reference
from tokpost_fast.ops.kmeans import KMeansOutput, kmeans, kmeans_reference
from tokpost_fast.ops.nearest_codes import nearest_codes, nearest_codes_reference
from tokpost_fast.ops.perturb_codes import perturb_codes, perturb_codes_reference
from tokpost_fast.ops.philox import perturb_ranks, rate_threshold
from tokpost_fast.ops.quantize import QuantizeOutput, quantize

__all__ = [
    "BACKENDS",
    "KMeansOutput",
    "QuantizeOutput",
    "available_backends",
    "codebook_lookup",
    "codebook_lookup_backward_reference",
    "codebook_lookup_reference",
    "kmeans",
    "kmeans_reference",
    "nearest_codes",
    "nearest_codes_reference",
    "perturb_codes",
    "perturb_codes_reference",
    "perturb_ranks",
    "quantize",
    "rate_threshold",
]
