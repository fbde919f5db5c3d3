"""codebook_lookup: codebook[idx], differentiable, with a deterministic backward.

# idx: [...] int, codebook: [K, D] -> [..., D] (codebook's dtype)
The backward scatter-adds the output gradient into a [K, D] codebook gradient. The fused kernels (csrc/) do it
without float atomics: rows grouped by code, each code's rows summed in chunks of 256 in row order, then the chunk
sums in chunk order, all fp32. So two runs give bit-identical gradients (the CPU and CUDA kernels share the
order; benchmarks/gpu_check.sh checks that they agree bit for bit), and a collapsed codebook (every token on one
code) is summed in parallel chunks. The reference uses index_add_,
deterministic on the CPU only.
"""

from __future__ import annotations

import torch

from tokpost_fast.ops import _backends
from tokpost_fast.ops._validate import FLOAT_DTYPES


def codebook_lookup_reference(idx: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return codebook.index_select(0, idx)


def codebook_lookup_backward_reference(grad: torch.Tensor, idx: torch.Tensor, num_codes: int) -> torch.Tensor:
    out = torch.zeros(num_codes, grad.shape[1], dtype=torch.float32, device=grad.device)
    out.index_add_(0, idx, grad.float())
    return out.to(grad.dtype)


def _concrete_backend(backend: str, device: torch.device) -> str:
    # Resolved inside the custom ops so torch.compile never traces the discovery code.
    backend = _backends.resolve_backend(backend, device, "codebook_lookup")
    if backend == "triton":  # the lookup has no Triton kernel: csrc's CUDA kernel serves it
        backend = "cuda" if _backends.backend_available("cuda", device) else "reference"
    return backend


def _lookup_kernel(idx, codebook, backend):
    backend = _concrete_backend(backend, codebook.device)
    if backend in ("cpu", "cuda"):
        return torch.ops.tokpost_fast.codebook_lookup(idx.contiguous(), codebook.contiguous())
    return codebook_lookup_reference(idx, codebook)


def _lookup_backward_kernel(grad, idx, num_codes, backend):
    backend = _concrete_backend(backend, grad.device)
    if backend in ("cpu", "cuda"):
        return torch.ops.tokpost_fast.codebook_lookup_backward(grad.contiguous(), idx.contiguous(), num_codes)
    return codebook_lookup_backward_reference(grad, idx, num_codes)


@torch.library.custom_op("tokpost_fast::lookup_codes", mutates_args=())
def _lookup_op(idx: torch.Tensor, codebook: torch.Tensor, backend: str, validate: bool) -> torch.Tensor:
    if validate and idx.numel() > 0:
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= codebook.shape[0]:
            raise ValueError(f"idx holds values in [{low}, {high}], outside the codebook's range [0, {codebook.shape[0] - 1}]")
    return _lookup_kernel(idx, codebook, backend)


@_lookup_op.register_fake
def _(idx, codebook, backend, validate):
    return codebook.new_empty(idx.shape[0], codebook.shape[1])


@torch.library.custom_op("tokpost_fast::lookup_codes_backward", mutates_args=())
def _lookup_backward_op(grad: torch.Tensor, idx: torch.Tensor, num_codes: int, backend: str) -> torch.Tensor:
    return _lookup_backward_kernel(grad, idx, num_codes, backend)


@_lookup_backward_op.register_fake
def _(grad, idx, num_codes, backend):
    return grad.new_empty(num_codes, grad.shape[1])


def _setup_context(ctx, inputs, output):
    idx, codebook, backend, _ = inputs
    ctx.save_for_backward(idx)
    ctx.num_codes = codebook.shape[0]
    ctx.backend = backend


def _backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return None, _lookup_backward_op(grad, idx, ctx.num_codes, ctx.backend), None, None


_lookup_op.register_autograd(_backward, setup_context=_setup_context)


def codebook_lookup(idx: torch.Tensor, codebook: torch.Tensor, backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """codebook[idx] with a deterministic gradient to the codebook.

    # idx: [...] int64/int32, codebook: [K, D] -> [..., D]
    codebook: float32, float16 or bfloat16 (ValueError otherwise, on every backend).
    validate=True checks the index range (one device sync); callers whose indices come from nearest_codes may
    pass False. With validate=False an index outside [0, K) is a caller bug: backends then fail in their own
    ways (IndexError, RuntimeError, a CUDA device-side assert).
    """
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be an int64 or int32 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2:
        raise ValueError(f"codebook must be a 2-D [K, D] tensor, got shape {tuple(getattr(codebook, 'shape', ()))}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0)")
    if codebook.dtype not in FLOAT_DTYPES:
        # float64 too: the fused kernels take the three dtypes the other ops do, and a backend-dependent
        # RuntimeError (cpu, cuda) where the reference would have run is worse than one clear error everywhere.
        raise ValueError(f"codebook must be float32, float16 or bfloat16, got {codebook.dtype}")
    if idx.device != codebook.device:
        raise ValueError(f"idx is on {idx.device} but codebook is on {codebook.device}")
    _backends.check_backend_name(backend)
    out = _lookup_op(idx.reshape(-1).to(torch.int64), codebook, backend, validate)
    return out.reshape(*idx.shape, codebook.shape[1])
