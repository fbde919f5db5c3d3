"""Argument checks shared by the public ops. Every failure is a ValueError that names the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
METRICS = ("l2", "cosine")


def check_z_codebook(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not isinstance(codebook, torch.Tensor):
        raise ValueError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if z.dtype not in FLOAT_DTYPES:
        raise ValueError(f"z must be float32, float16 or bfloat16, got {z.dtype}")
    if codebook.dtype not in FLOAT_DTYPES:
        raise ValueError(f"codebook must be float32, float16 or bfloat16, got {codebook.dtype}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0)")
    if z.dim() < 1:
        raise ValueError("z must have at least one dimension [..., D]")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z's last dim ({z.shape[-1]}) must equal codebook's dim D ({codebook.shape[1]})")
    if codebook.shape[1] == 0:
        raise ValueError("codebook has D = 0")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}")


def check_k(name: str, k, num_codes: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    if k > num_codes:
        raise ValueError(f"{name} ({k}) must be <= the number of codes K ({num_codes})")
    return k


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise ValueError(f"rate must be a float in [0, 1], got {type(rate).__name__}")
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:  # also rejects NaN
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    return rate


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int in [0, 2**63), got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def check_position_offset(position_offset, num_tokens: int) -> int:
    # Every backend forms the positions position_offset + n in int64. Unchecked, an offset >= 2**63 failed in the
    # op schema (RuntimeError), a smaller one that overflowed was rejected by the Triton launcher only (signed
    # overflow in the C++ kernel, a silent wrap in the reference). The bound is the Triton launcher's, so every
    # backend accepts the same offsets.
    if isinstance(position_offset, bool) or not isinstance(position_offset, int):
        raise ValueError(f"position_offset must be a non-negative int, got {position_offset!r}")
    limit = 2**63 - 1 - max(num_tokens, 1)
    if not 0 <= position_offset <= limit:
        raise ValueError(
            f"position_offset must be an int in [0, 2**63 - 1 - max(N, 1)] = [0, {limit}] for N = {num_tokens} "
            f"tokens, got {position_offset!r}"
        )
    return position_offset


def check_beta_commit(beta_commit) -> float:
    if isinstance(beta_commit, bool) or not isinstance(beta_commit, (int, float)):
        raise ValueError(f"beta_commit must be a finite float >= 0, got {type(beta_commit).__name__}")
    beta_commit = float(beta_commit)
    if not 0.0 <= beta_commit < float("inf"):  # also rejects NaN
        raise ValueError(f"beta_commit must be a finite float >= 0, got {beta_commit}")
    return beta_commit


def common_dtype(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed dtypes (a bf16 latent against an fp32 codebook under autocast) run in fp32 rather than
    rounding the codebook down."""
    if z.dtype != codebook.dtype:
        return z.float(), codebook.float()
    return z, codebook


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # Normalised in fp32 and rounded back once, so bf16/fp16 inputs lose no more than one rounding.
    return torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)
