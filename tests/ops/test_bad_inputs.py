"""Every bad input of METHOD.md B2 is a ValueError that names the argument."""

import pytest
import torch

from tokpost_fast import ops

Z = torch.randn(5, 4)
CB = torch.randn(7, 4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.nearest_codes(torch.randn(5, 3), CB), "z's last dim"),
        (lambda: ops.nearest_codes(Z, torch.randn(0, 4)), "codebook is empty"),
        (lambda: ops.nearest_codes(Z, torch.randn(7)), "codebook must be 2-D"),
        (lambda: ops.nearest_codes(Z, CB, k=8), r"k \(8\) must be <="),
        (lambda: ops.nearest_codes(Z, CB, k=0), "k must be >= 1"),
        (lambda: ops.nearest_codes(Z, CB, k=2.0), "k must be an int"),
        (lambda: ops.nearest_codes(Z.double(), CB), "z must be float32"),
        (lambda: ops.nearest_codes(Z.long(), CB), "z must be float32"),
        (lambda: ops.nearest_codes(Z, CB.int()), "codebook must be float32"),
        (lambda: ops.nearest_codes(Z, CB, metric="dot"), "metric must be one of"),
        (lambda: ops.nearest_codes(Z, CB, backend="fast"), "backend must be one of"),
        (lambda: ops.perturb_codes(Z, CB, 1.5, 2, seed=0), r"rate must be in \[0, 1\]"),
        (lambda: ops.perturb_codes(Z, CB, -0.1, 2, seed=0), r"rate must be in \[0, 1\]"),
        (lambda: ops.perturb_codes(Z, CB, float("nan"), 2, seed=0), r"rate must be in \[0, 1\]"),
        (lambda: ops.perturb_codes(Z, CB, 0.5, 8, seed=0), r"topk \(8\) must be <="),
        (lambda: ops.perturb_codes(Z, CB, 0.5, 0, seed=0), "topk must be >= 1"),
        (lambda: ops.perturb_codes(Z, CB, 0.5, 2, seed=-1), "seed must be in"),
        (lambda: ops.perturb_codes(Z, CB, 0.5, 2, seed=1.5), "seed must be an int"),
        (lambda: ops.perturb_codes(Z, CB, 0.5, 2, seed=0, position_offset=-3), "position_offset"),
        (lambda: ops.codebook_lookup(torch.tensor([0, 1.0]), CB), "idx must be an int64 or int32"),
        (lambda: ops.codebook_lookup(torch.tensor([0, 7]), CB), r"idx holds values in \[0, 7\]"),
        (lambda: ops.codebook_lookup(torch.tensor([-1, 2]), CB), r"idx holds values in \[-1, 2\]"),
        (lambda: ops.codebook_lookup(torch.tensor([0]), torch.randn(0, 4)), "codebook is empty"),
        (lambda: ops.quantize(Z, CB, rate=2.0), "rate must be in"),
        (lambda: ops.quantize(Z, CB, topk=9), r"topk \(9\) must be <="),
        (lambda: ops.quantize(Z, CB, rate=0.5, topk=2, perturb_samples=-1), "perturb_samples"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unavailable_backend_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error message")
    with pytest.raises(ValueError, match="backend='cuda' is not available"):
        ops.nearest_codes(Z, CB, backend="cuda")


def test_available_backends_reports_every_backend():
    available = ops.available_backends("cpu")
    assert set(available) == {"triton", "cuda", "cpu", "reference"}
    assert available["reference"] and available["cpu"]
