"""Which kernel runs an op: backend discovery and the "auto" choice.

Backends (METHOD.md B2): "triton" (GPU; on the CPU only under TRITON_INTERPRET=1, which is how CI tests it), "cuda"
and "cpu" (the csrc extension tokpost_fast._C), "reference" (plain PyTorch, the ground truth), "auto".
A missing backend is a clear error when asked for by name, and a logged fallback (once) under "auto".
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("tokpost_fast.ops")

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


@functools.lru_cache(maxsize=None)
def _extension():
    try:
        from tokpost_fast import _C  # noqa: F401  (registers torch.ops.tokpost_fast.* kernels)
    except ImportError as err:  # not built: setup.py was skipped or the compiler failed
        log.debug("tokpost_fast._C not importable: %s", err)
        return None
    return _C


def extension_built_with_cuda() -> bool:
    if _extension() is None:
        return False
    return bool(torch.ops.tokpost_fast.built_with_cuda())


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    try:
        import triton  # noqa: F401

        from tokpost_fast.kernels import nearest_codes, perturb_codes
    except Exception as err:  # triton missing, or a kernel module failed to import
        log.debug("triton kernels not importable: %s", err)
        return None
    return nearest_codes, perturb_codes


def backend_available(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and _extension() is not None
    if backend == "cuda":
        return device.type == "cuda" and extension_built_with_cuda()
    if backend == "triton":
        if device.type == "cuda":
            return _triton_kernels() is not None
        return device.type == "cpu" and triton_interpreted() and _triton_kernels() is not None
    return False


def available_backends(device: str | torch.device | None = None) -> dict[str, bool]:
    """Which backends can run on `device` (default: cuda when present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: backend_available(name, device) for name in BACKENDS if name != "auto"}


_warned: set[tuple[str, str]] = set()


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """The concrete backend for `op` on `device`; "auto" picks the fastest available one."""
    check_backend_name(backend)
    if backend != "auto":
        if not backend_available(backend, device):
            raise ValueError(
                f"backend={backend!r} is not available for {op} on device {device.type!r}; "
                f"available: {[b for b, ok in available_backends(device).items() if ok]}"
            )
        return backend
    if device.type == "cuda":
        order = ("triton", "cuda") if op != "codebook_lookup" else ("cuda",)
    else:
        # The interpreter is a test vehicle, never a fast path: auto does not pick triton on the CPU.
        order = ("cpu",)
    for candidate in order:
        if backend_available(candidate, device):
            return candidate
    key = (op, device.type)
    if key not in _warned:
        _warned.add(key)
        log.warning(
            "tokpost_fast: no fused kernel for %s on %s (extension not built?); using the slow PyTorch reference",
            op,
            device.type,
        )
    return "reference"
