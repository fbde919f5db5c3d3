"""Seeded fuzzing of the public ops (nearest_codes, perturb_codes, codebook_lookup, quantize) on every backend.

Each case comes from one seed, so a failing id such as test_fuzz_fused_backends[17] replays exactly. A case is
either valid, and then every backend returns the reference backend's result (bit for bit where the data make the
distances exact; tie-aware otherwise, since fp32 kernels may order codes whose distances agree to rounding either
way), or invalid, and then every backend raises a ValueError naming the bad argument: no other exception type, no
silently wrong result. The reference itself is checked against a brute-force fp64 search, so it is no free pass.

What is thrown: leading batch dims of 0-3 dims (and N = 0), D = 1 and D > 128, K = 1 and K not a power of two,
k from 1 to min(K, 128); fp32 / fp16 / bf16 and mixed dtypes; transposed, strided (the gaps hold NaN, so a kernel
reading them shows), expanded (stride 0) and overlapping (unfold) layouts; NaN / inf entries; integer-valued data
with duplicated codes (exact ties); CPU and meta tensors; bad dtypes, ranks, shapes, devices, metric and backend
strings, rates, top-ks, seeds, offsets, out-of-range indices.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

# Same as tests/conftest.py: the interpreter must be on before any @triton.jit runs (it is already when pytest
# loads that conftest; repeated here so the module does not depend on how it was collected).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokpost_fast import ops  # noqa: E402
from tokpost_fast.ops._validate import common_dtype, l2_normalize  # noqa: E402

from .helpers import require_backend  # noqa: E402

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
OPS = ("nearest_codes", "perturb_codes", "quantize", "codebook_lookup")
LAYOUTS = ("contiguous", "contiguous", "transposed", "strided", "expanded", "unfold")
INF = float("inf")
NAN = float("nan")

FUZZ_SEEDS = list(range(400))
# The interpreter runs every Triton program in Python: fewer, smaller cases.
TRITON_SEEDS = list(range(1000, 1050))


@dataclass
class Case:
    seed: int
    op: str
    kwargs: dict
    error: Optional[str] = None  # regex of the expected ValueError; None: a valid call
    exact: bool = False  # every distance is exact in fp32: results must equal the reference bit for bit
    leaves: tuple = ()  # tensors whose gradients are compared (empty: forward only)
    grad_weight: Optional[torch.Tensor] = None
    tags: set = field(default_factory=set)  # what the case exercises (read by the coverage test)


# ------------------------------------------------------------------------------------------------------------------
# Case generation
# ------------------------------------------------------------------------------------------------------------------


def _interleave(t: torch.Tensor, fill) -> torch.Tensor:
    """t's values at every other element of a twice-as-large tensor (along every dim) whose gaps hold `fill`."""
    big = t
    for dim in range(t.dim()):
        big = torch.stack([big, torch.full_like(big, fill)], dim=dim + 1).flatten(dim, dim + 1)
    return big[tuple(slice(None, None, 2) for _ in range(t.dim()))]


def relayout(t: torch.Tensor, kind: str, rng: random.Random, fill) -> torch.Tensor:
    """A tensor with t's shape but another memory layout. "expanded" and "unfold" change the values (rows repeat or
    overlap in memory); the others keep them. All are differentiable, so gradients reach t."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided" and t.dim() >= 1:
        return _interleave(t, fill)
    if kind == "expanded" and t.dim() >= 1:
        dims = [d for d in range(t.dim()) if t.shape[d] > 1]
        if dims:
            d = rng.choice(dims)
            return t.narrow(d, 0, 1).expand(t.shape)
    if kind == "unfold" and t.dim() >= 2 and t.shape[-2] > 0:
        # Row r is elements [r, r + D) of one flat buffer: rows overlap in memory (row stride 1 < D).
        rows, d = t.shape[-2], t.shape[-1]
        flat = t.reshape(*t.shape[:-2], rows * d)[..., : rows + d - 1]
        return flat.unfold(-1, d, 1)
    return t


def _lead_shape(rng: random.Random, sizes, max_rows: int) -> list:
    lead = [rng.choice(sizes) for _ in range(rng.randint(0, 3))]
    while math.prod(lead) > max_rows:
        lead[lead.index(max(lead))] = 1
    return lead


def _pick_k(rng: random.Random, num_codes: int) -> int:
    hi = min(num_codes, 128)
    return rng.choice([1, hi, rng.randint(1, hi), min(hi, rng.choice([2, 3, 7, 8, 9, 31, 33, 100]))])


def _values(g: torch.Generator, shape, flavor: str, scale: float) -> torch.Tensor:
    if flavor == "int":  # small integers: every product and sum is exact in fp32, so ties are exact ties
        return torch.randint(-3, 4, shape, generator=g).float()
    return torch.randn(shape, generator=g) * scale


def _inject_nonfinite(t: torch.Tensor, rng: random.Random, tags: set, name: str) -> torch.Tensor:
    if t.numel() == 0:
        return t
    t = t.clone()
    rows = t.view(-1, t.shape[-1])
    for _ in range(rng.randint(1, 3)):
        r = rng.randrange(rows.shape[0])
        value = rng.choice([NAN, NAN, INF, -INF])
        if rng.random() < 0.3:
            rows[r] = value
        else:
            rows[r, rng.randrange(rows.shape[1])] = value
    tags.add(f"nonfinite_{name}")
    return t


def _float_tensor(rng, g, shape, dtype, flavor, scale, nonfinite, tags, name):
    t = _values(g, shape, flavor, scale)
    if flavor == "dup" and len(shape) == 2 and shape[0] > 1:
        # Rows drawn with replacement from the first half: exact duplicates, whose equal distances must not make
        # a kernel return one code twice or skip a row.
        src = torch.randint(0, max(1, shape[0] // 2), (shape[0],), generator=g)
        t = t[src]
    t = t.to(dtype)
    if nonfinite:
        t = _inject_nonfinite(t, rng, tags, name)
    return t


def gen_case(seed: int, small: bool) -> Case:
    """The case of one seed; calling it again rebuilds identical fresh tensors (each backend gets its own)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    if small:
        # Few, so spent on what reaches a Triton kernel: non-empty CPU inputs, and rarely the lookup (which has
        # no Triton kernel) or N = 0.
        lead_sizes, max_rows = (1, 2, 3, 5, 9, 17, 33), 64
        k_choices, d_choices = (1, 2, 3, 5, 16, 17, 40, 64, 100, 300), (1, 2, 3, 5, 8, 17, 33, 130)
        op = rng.choice(OPS[:3] * 3 + OPS[3:])
        meta_rate = 0.03
    else:
        lead_sizes, max_rows = (0, 1, 2, 3, 5, 7, 16, 33), 400
        k_choices, d_choices = (1, 2, 3, 5, 7, 31, 64, 100, 257, 1000, 1030), (1, 2, 3, 4, 5, 8, 16, 17, 33, 64, 130)
        op = OPS[seed % len(OPS)] if rng.random() < 0.5 else rng.choice(OPS)
        meta_rate = 0.08
    tags: set = {op}
    lead = _lead_shape(rng, lead_sizes, max_rows)
    if small and rng.random() < 0.08:
        lead.insert(rng.randint(0, len(lead)), 0)
    if op == "quantize" and rng.random() < 0.5 and not lead:
        lead = [rng.choice(lead_sizes)]
    num_codes, dim = rng.choice(k_choices), rng.choice(d_choices)
    flavor = rng.choice(["randn", "randn", "int", "int", "scaled", "dup", "on_codes"])
    scale = {"scaled": 10.0 ** rng.uniform(-3, 3), "on_codes": 10.0 ** rng.uniform(1, 3)}.get(flavor, 1.0)
    z_dtype = rng.choice(FLOATS)
    c_dtype = z_dtype if rng.random() < 0.7 else rng.choice(FLOATS)
    metric = rng.choice(["l2", "cosine"])
    device = "meta" if rng.random() < meta_rate else "cpu"
    z_layout, c_layout = rng.choice(LAYOUTS), rng.choice(LAYOUTS)
    tags |= {f"flavor_{flavor}", f"z_{z_dtype}", f"c_{c_dtype}", f"metric_{metric}", f"device_{device}",
             f"zlayout_{z_layout}", f"clayout_{c_layout}", f"lead_ndim_{len(lead)}"}
    tags |= {"mixed_dtype"} if z_dtype != c_dtype else set()
    tags |= {"N0"} if math.prod(lead) == 0 else set()
    tags |= {"D1"} if dim == 1 else set()
    tags |= {"K1"} if num_codes == 1 else set()
    tags |= {"K_not_pow2"} if num_codes & (num_codes - 1) else set()
    tags |= {"D_gt_128"} if dim > 128 else set()

    nonfinite_z, nonfinite_c = rng.random() < 0.15, rng.random() < 0.15
    codebook = _float_tensor(rng, g, (num_codes, dim), c_dtype, flavor, scale, nonfinite_c, tags, "codebook")
    want_grad = op in ("quantize", "codebook_lookup") and device == "cpu" and rng.random() < 0.4
    leaves: tuple = ()
    if op == "codebook_lookup":
        idx_dtype = rng.choice([torch.int64, torch.int32])
        idx = torch.randint(0, num_codes, lead, generator=g, dtype=idx_dtype)
        tags.add(f"idx_{idx_dtype}")
        if want_grad:
            codebook.requires_grad_()
            leaves = (codebook,)
        main = relayout(idx, z_layout, rng, fill=-1)  # gaps hold an out-of-range index
        kwargs = dict(idx=main, codebook=relayout(codebook, c_layout, rng, fill=NAN))
        exact = True  # a lookup is a copy
    else:
        if flavor == "on_codes":
            # Latents on a code or within rounding of it: distances ~0 that fp32 rounding pushes below zero,
            # where the packed-key kernels must still order negative floats right.
            src = torch.randint(0, num_codes, lead, generator=g)
            jitter = 1.0 + 1e-6 * torch.randn((*lead, dim), generator=g) * rng.choice([0, 1])
            z = (codebook.detach().float()[src] * jitter).to(z_dtype)
            if nonfinite_z:
                z = _inject_nonfinite(z, rng, tags, "z")
        else:
            z = _float_tensor(rng, g, (*lead, dim), z_dtype, flavor, scale, nonfinite_z, tags, "z")
        if want_grad:
            z.requires_grad_()
            codebook.requires_grad_()
            leaves = (z, codebook)
        kwargs = dict(z=relayout(z, z_layout, rng, fill=NAN), codebook=relayout(codebook, c_layout, rng, fill=NAN),
                      metric=metric)
        exact = flavor == "int" and metric == "l2"
        if op == "nearest_codes":
            kwargs["k"] = _pick_k(rng, num_codes)
            tags.add("k_eq_K" if kwargs["k"] == num_codes else "k_lt_K")
        elif op == "perturb_codes":
            kwargs.update(rate=rng.choice([0.0, 1.0, 0.5, 1e-9, rng.random()]), topk=_pick_k(rng, num_codes),
                          seed=rng.randrange(2**63), position_offset=rng.choice([0, rng.randrange(1000),
                                                                                 rng.randrange(2**62)]))
        else:
            kwargs.update(rate=rng.choice([0.0, 1.0, 0.5, rng.random()]), topk=_pick_k(rng, num_codes),
                          beta_commit=rng.choice([0.0, 0.25, 1.0, rng.uniform(0, 3)]),
                          # Always explicit: a drawn seed would differ between the backends' calls.
                          seed=rng.randrange(2**63))
            if lead and rng.random() < 0.5:
                kwargs["perturb_samples"] = rng.randint(0, lead[0] + 1)
    if device == "meta":
        kwargs = {k: v.detach().to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    case = Case(seed, op, kwargs, exact=exact, leaves=leaves, tags=tags)
    # Validation is shared Python in front of every backend: the interpreter's time goes to valid cases.
    if rng.random() < (0.2 if small else 0.4):
        _mutate(case, rng)
    if case.leaves and case.error is None:
        out_shape = (*lead, dim)
        case.grad_weight = torch.randn(out_shape, generator=g)
        case.tags.add("grad")
    return case


# ------------------------------------------------------------------------------------------------------------------
# Invalid inputs: each mutation breaks exactly one argument and says what the ValueError must name.
# ------------------------------------------------------------------------------------------------------------------


def _mutate(case: Case, rng: random.Random) -> None:
    kw = case.kwargs
    main = "idx" if case.op == "codebook_lookup" else "z"
    cb = kw["codebook"]
    on_cpu = cb.device.type == "cpu"
    choices: list[tuple[str, Callable[[], Optional[str]]]] = []

    def set_(key, value, match):
        def apply():
            kw[key] = value() if callable(value) else value
            return match
        return apply

    def other_device():
        # Meta tensors cannot be copied out: a CPU tensor of the same shape is the mismatch then.
        return cb.detach().to("meta") if on_cpu else torch.zeros(cb.shape, dtype=cb.dtype)

    choices += [
        ("codebook_rank", set_("codebook", lambda: rng.choice([cb[0], cb[None], cb.reshape(-1)[:1].reshape(())]),
                               "codebook must be (a )?2-D")),
        ("codebook_empty", set_("codebook", lambda: cb[:0], "codebook is empty")),
        ("device_mismatch", set_("codebook", other_device, f"{main} is on")),
        ("backend_name", set_("backend", lambda: rng.choice(["gpu", "CPU", "", None, "triton_interpret", 0]),
                              "backend must be one of")),
        (f"{main}_not_tensor", set_(main, lambda: kw[main].detach().tolist() if on_cpu else [0], f"{main} must be")),
    ]
    if on_cpu:
        # A CUDA tensor cannot be made without a GPU; asking for the cuda kernels on CPU tensors is the honest
        # device mismatch (meta tensors only propagate shapes and never reach a backend).
        choices.append(("backend_cuda_on_cpu", set_("backend", "cuda", "backend='cuda' is not available")))
    if case.op == "codebook_lookup":
        idx = kw["idx"]
        num_codes = cb.shape[0]

        def out_of_range():
            bad = idx.detach().reshape(-1).clone() if idx.numel() else torch.zeros(1, dtype=idx.dtype)
            bad[rng.randrange(bad.numel())] = rng.choice([-1, num_codes, num_codes + 7, -(2**31)])
            kw["idx"] = bad
            return r"idx holds values in \["

        if on_cpu:
            choices.append(("idx_out_of_range", out_of_range))
        choices += [
            ("idx_dtype", set_("idx", lambda: idx.to(rng.choice([torch.float32, torch.int16, torch.uint8, torch.bool])),
                               "idx must be an int64 or int32")),
            ("codebook_dtype", set_("codebook", lambda: cb.detach().to(rng.choice([torch.float64, torch.int32])),
                                    "codebook must be float32, float16 or bfloat16")),
        ]
    else:
        z = kw["z"]
        dim = cb.shape[1]
        choices += [
            ("z_dtype", set_("z", lambda: z.detach().to(rng.choice([torch.float64, torch.int32, torch.int64,
                                                                    torch.bool, torch.complex64])),
                             "z must be float32, float16 or bfloat16")),
            ("codebook_dtype", set_("codebook", lambda: cb.detach().to(rng.choice([torch.float64, torch.int64])),
                                    "codebook must be float32, float16 or bfloat16")),
            ("z_scalar", set_("z", lambda: z.reshape(-1)[:1].reshape(()) if z.numel() else torch.tensor(1.0),
                              "z must have at least one dimension")),
            ("dim_mismatch", set_("codebook", lambda: torch.cat([cb, cb[:, :1]], dim=1), "z's last dim")),
            ("dim_zero", lambda: (kw.update(z=z[..., :0], codebook=cb[:, :0]), "D = 0")[1]),
            ("metric", set_("metric", lambda: rng.choice(["L2", "cos", "", "dot", None, 2]),
                            "metric must be one of")),
        ]
        if dim > 1:
            choices.append(("dim_mismatch_smaller", set_("codebook", lambda: cb[:, : dim - 1], "z's last dim")))
        k_key = {"nearest_codes": "k"}.get(case.op, "topk")
        choices += [
            ("k_bad_type", set_(k_key, lambda: rng.choice([2.0, True, None, "1"]), f"{k_key} must be an int")),
            ("k_below_1", set_(k_key, lambda: rng.choice([0, -1, -(2**40)]), f"{k_key} must be >= 1")),
            ("k_above_K", set_(k_key, lambda: cb.shape[0] + rng.choice([1, 5, 2**20]),
                               rf"{k_key} \(\d+\) must be <= the number of codes")),
        ]
        if case.op in ("perturb_codes", "quantize"):
            choices += [
                ("rate_range", set_("rate", lambda: rng.choice([-0.1, 1.0001, NAN, INF, -INF, 2]),
                                    r"rate must be in \[0, 1\]")),
                ("rate_type", set_("rate", lambda: rng.choice(["0.5", None, True, torch.tensor(0.5)]),
                                   "rate must be a float")),
                ("seed_range", set_("seed", lambda: rng.choice([-1, 2**63, 2**70]), "seed must be in")),
                ("seed_type", set_("seed", lambda: rng.choice([0.5, True, "7", torch.tensor(3)]),
                                   "seed must be an int")),
            ]
        if case.op == "perturb_codes":
            n_tokens = math.prod(z.shape[:-1])
            choices += [
                ("offset_range", set_("position_offset",
                                      lambda: rng.choice([-1, 2**63, 2**70, 2**63 - 1, 2**63 - max(n_tokens, 1)]),
                                      "position_offset must be")),
                ("offset_type", set_("position_offset", lambda: rng.choice([1.0, True, None]),
                                     "position_offset must be")),
            ]
        if case.op == "quantize":
            choices += [
                ("beta_commit", set_("beta_commit", lambda: rng.choice(["x", None, NAN, INF, -1.0, True,
                                                                         torch.tensor(0.25)]),
                                     "beta_commit must be a finite float")),
                ("perturb_samples", set_("perturb_samples", lambda: rng.choice([-1, 1.5, True, "2"]),
                                         "perturb_samples must be None or")),
            ]
            if z.dim() == 1:
                choices.append(("perturb_samples_1d", set_("perturb_samples", 1, "perturb_samples needs z")))
    name, apply = rng.choice(choices)
    case.error = apply()
    case.exact = False
    case.leaves = ()
    case.tags.add("invalid")
    case.tags.add(f"invalid_{name}")


# ------------------------------------------------------------------------------------------------------------------
# Oracles and comparisons
# ------------------------------------------------------------------------------------------------------------------


def searched_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """z [M, D] and codebook [K, D] as the kernels see them: the public op's dtype promotion and normalisation
    (shared Python code in front of every backend), so fp16/bf16 rounding of the inputs is not counted as error."""
    z, cb = case.kwargs["z"].detach(), case.kwargs["codebook"].detach()
    if case.op == "quantize":
        if case.kwargs["metric"] == "cosine":
            z, cb = F.normalize(z, dim=-1), F.normalize(cb, dim=-1)
        cb = cb.to(z.dtype)
    else:
        z, cb = common_dtype(z, cb)
        if case.kwargs["metric"] == "cosine":
            z, cb = l2_normalize(z), l2_normalize(cb)
    return z.reshape(-1, z.shape[-1]), cb


def true_distances(z: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """[M, K] fp64 squared distances; NaN -> +inf as the contract orders them."""
    z64, c64 = z.double(), cb.double()
    dist = (z64 * z64).sum(1, keepdim=True) - 2.0 * (z64 @ c64.T) + (c64 * c64).sum(1)[None, :]
    return torch.where(dist.isnan(), INF, dist)


def tolerance(z: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """[M, 1] fp64: the kernels accumulate ||z||^2 - 2 z.c + ||c||^2 in fp32, an error of ~D eps32 (||z||^2 +
    ||c||^2); 1e-4 of that scale leaves headroom for D <= 130 and is far below the gap between distinct random
    codes. No floor: data scaled by 1e-3 get a proportionally small tolerance."""
    z64, c64 = z.double(), cb.double()
    c_norm = (c64 * c64).sum(1)
    c_max = c_norm[c_norm.isfinite()].max() if c_norm.isfinite().any() else torch.zeros((), dtype=torch.float64)
    z_norm = (z64 * z64).sum(1, keepdim=True)
    return 1e-4 * (torch.where(z_norm.isfinite(), z_norm, 0.0) + c_max) + 1e-30


def stable_order(true: torch.Tensor) -> torch.Tensor:
    return torch.sort(true, dim=1, stable=True).indices


def assert_codes_equivalent(z, cb, got: torch.Tensor, want: torch.Tensor, exact: bool, what: str) -> None:
    """got/want int64 [M, j]: the same codes, or codes whose true distances agree to rounding (near-ties).
    Where want's code is at +inf (a NaN / inf distance) the order is by index alone, so it must match exactly."""
    assert got.shape == want.shape and got.dtype == torch.int64, (what, got.shape, want.shape, got.dtype)
    if got.numel() == 0:
        return
    if exact:
        assert torch.equal(got, want), f"{what}: indices differ from the reference on exact data"
        return
    num_codes = cb.shape[0]
    assert int(got.min()) >= 0 and int(got.max()) < num_codes, f"{what}: index out of range"
    true = true_distances(z, cb)
    t_got, t_want = true.gather(1, got), true.gather(1, want)
    at_inf = t_want.isinf()
    assert torch.equal(got[at_inf], want[at_inf]), f"{what}: codes at +inf distance are not in index order"
    excess = torch.where(at_inf, 0.0, (t_got - t_want).abs())
    tol = tolerance(z, cb).expand_as(excess)
    bad = excess > tol
    assert not bad.any(), f"{what}: codes differ beyond near-ties, max excess {excess.max().item():.3g}"


def check_nearest(case, got, want, exact=None):
    dist, idx = got
    rdist, ridx = want
    assert dist.shape == rdist.shape and idx.shape == ridx.shape, (dist.shape, rdist.shape)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    if dist.device.type == "meta":
        return
    exact = case.exact if exact is None else exact
    z, cb = searched_inputs(case)
    k = ridx.shape[-1]
    dist, idx, rdist, ridx = (t.reshape(-1, k) for t in (dist, idx, rdist, ridx))
    if exact:
        assert torch.equal(idx, ridx) and torch.equal(dist, rdist.float()), "differs from the reference on exact data"
        return
    assert_codes_equivalent(z, cb, idx, ridx, False, "nearest_codes idx")
    if idx.numel():
        assert (idx.sort(1).values.diff(dim=1) != 0).all(), "a code appears twice in one row"
        true = true_distances(z, cb).gather(1, idx)
        at_inf = true.isinf()
        assert (dist[at_inf] == INF).all(), "a NaN / inf distance must be returned as +inf"
        err = torch.where(at_inf, 0.0, (dist.double() - true).abs())
        assert (err <= tolerance(z, cb)).all(), f"returned dist is not the code's distance (max err {err.max():.3g})"


def check_codes_pair(case, got, want, rate, topk, exact=None):
    """(idx, idx_perturbed) of perturb_codes / quantize against the reference's."""
    exact = case.exact if exact is None else exact
    for g_t, w_t in zip(got, want):
        assert g_t.shape == w_t.shape and g_t.dtype == torch.int64, (g_t.shape, w_t.shape, g_t.dtype)
    if got[0].device.type == "meta":
        return
    z, cb = searched_inputs(case)
    for name, g_t, w_t in zip(("idx", "idx_perturbed"), got, want):
        assert_codes_equivalent(z, cb, g_t.reshape(-1, 1), w_t.reshape(-1, 1), exact, f"{case.op} {name}")
    if rate == 0.0 or topk == 1:
        assert torch.equal(got[0], got[1]), "nothing is resampled, yet idx_perturbed differs from idx"


def _close(got, want, dtype, what):
    """Values computed by the same PyTorch ops from (maybe near-tie-different) codes."""
    rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    scale = want.detach().double().abs().nan_to_num(posinf=0.0, neginf=0.0).max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True, msg=what)


def check_quantize(case, got, want):
    for name in ("z_q", "indices", "perturbed_indices", "codebook_loss", "commit_loss"):
        g_t, w_t = getattr(got, name), getattr(want, name)
        assert g_t.shape == w_t.shape and g_t.dtype == w_t.dtype and g_t.device == w_t.device, name
    if got.z_q.device.type == "meta":
        return
    kw = case.kwargs
    check_codes_pair(case, (got.indices, got.perturbed_indices), (want.indices, want.perturbed_indices),
                     kw["rate"], kw["topk"])
    same = got.perturbed_indices == want.perturbed_indices
    # Same codes -> the same PyTorch ops on the same values: bit-identical z_q rows.
    torch.testing.assert_close(got.z_q[same], want.z_q[same], rtol=0, atol=0, equal_nan=True)
    all_same = bool(same.all()) and torch.equal(got.indices, want.indices)
    for name in ("codebook_loss", "commit_loss"):
        g_t, w_t = getattr(got, name), getattr(want, name)
        if all_same:
            torch.testing.assert_close(g_t, w_t, rtol=0, atol=0, equal_nan=True, msg=name)
        else:
            _close(g_t, w_t, w_t.dtype, name)


def check_lookup(case, got, want):
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    if got.device.type != "meta":
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # a copy: bit-identical


def check_against_reference(case: Case, got, want) -> None:
    if case.op == "nearest_codes":
        check_nearest(case, got, want)
    elif case.op == "perturb_codes":
        check_codes_pair(case, got, want, case.kwargs["rate"], case.kwargs["topk"])
    elif case.op == "quantize":
        check_quantize(case, got, want)
    else:
        check_lookup(case, got, want)


def check_reference_against_brute_force(case: Case, got) -> None:
    """The reference backend is the ground truth of the others; it answers to an fp64 full sort."""
    kw = case.kwargs
    if case.op == "codebook_lookup":
        if kw["idx"].device.type != "meta":
            want = kw["codebook"].detach()[kw["idx"].long()]
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        return
    if kw["z"].device.type == "meta":
        return
    z, cb = searched_inputs(case)
    lead = kw["z"].shape[:-1]
    true = true_distances(z, cb)
    order = stable_order(true)
    if case.op == "nearest_codes":
        k = kw["k"]
        want = (true.gather(1, order[:, :k]).float().reshape(*lead, k), order[:, :k].reshape(*lead, k))
        check_nearest(case, got, want)
        return
    if case.op == "perturb_codes":
        rate, topk, seed, offset = kw["rate"], kw["topk"], kw["seed"], kw["position_offset"]
        n_pert = z.shape[0]
    else:
        rate, topk, seed, offset = kw["rate"], kw["topk"], kw["seed"], 0
        samples = kw.get("perturb_samples")
        n_pert = z.shape[0] if samples is None else min(samples, kw["z"].shape[0]) * math.prod(lead[1:])
        if not (rate > 0 and topk > 1):
            n_pert = 0
    ranks = ops.perturb_ranks(seed, torch.arange(z.shape[0], device=z.device) + offset, rate, topk)
    ranks[n_pert:] = 0
    want = (order[:, 0].reshape(lead), order.gather(1, ranks[:, None]).reshape(lead))
    if case.op == "perturb_codes":
        check_codes_pair(case, got, want, rate, topk)
        return
    check_codes_pair(case, (got.indices, got.perturbed_indices), want, rate, topk)
    # z_q is the perturbed code (straight-through adds z and subtracts it again: one rounding of z's dtype each);
    # the losses are the MSEs to the clean code.
    code = cb[got.perturbed_indices.reshape(-1)].double()
    z64 = z.double()
    finite = z64.isfinite().all(1) & code.isfinite().all(1)
    z_q = got.z_q.detach().reshape(-1, z.shape[1]).double()
    eps = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[z.dtype]
    err = (z_q - code).abs()[finite]
    assert (err <= eps * (z64.abs() + code.abs())[finite] + 1e-30).all(), "z_q is not the chosen code"
    assert not z_q[~z64.isfinite().all(1)].isfinite().all(1).any(), "a non-finite latent must give a non-finite z_q"
    # The op's formula in the op's dtype (fp16 squares of large latents overflow there, and must here too).
    clean = cb[got.indices.reshape(-1)]
    mse = ((clean - z) ** 2).mean()
    _close(got.codebook_loss, mse, z.dtype, "codebook_loss")
    _close(got.commit_loss, kw["beta_commit"] * mse, z.dtype, "commit_loss")


# ------------------------------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------------------------------


def call(case: Case, backend: str):
    kwargs = dict(case.kwargs)
    kwargs.setdefault("backend", backend)
    return getattr(ops, case.op)(**kwargs)


def gradients(case: Case, out) -> list:
    value = out.z_q if case.op == "quantize" else out
    loss = (value.float() * case.grad_weight).sum()
    if case.op == "quantize":
        loss = loss + out.codebook_loss.float() + out.commit_loss.float()
    return list(torch.autograd.grad(loss, case.leaves))


def run_seed(seed: int, small: bool, backends: tuple, device: torch.device) -> None:
    def fresh() -> Case:
        case = gen_case(seed, small)
        if device.type != "cpu" and case.kwargs.get("backend") != "cuda":
            case.kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
                           for k, v in case.kwargs.items()}
            if case.grad_weight is not None:
                case.grad_weight = case.grad_weight.to(device)
        return case

    case = fresh()
    if case.error is not None:
        # A backend in the kwargs is the mutation itself: one call says it all.
        for backend in ["reference", *backends] if "backend" not in case.kwargs else ["reference"]:
            with pytest.raises(ValueError, match=case.error):
                call(fresh(), backend)
        return
    want = call(case, "reference")
    check_reference_against_brute_force(case, want)
    want_grads = gradients(case, want) if case.leaves else None
    for backend in backends:
        mine = fresh()
        got = call(mine, backend)
        check_against_reference(mine, got, want)
        if want_grads is not None:
            same_codes = (torch.equal(got.indices, want.indices) and torch.equal(got.perturbed_indices,
                                                                                  want.perturbed_indices)
                          if case.op == "quantize" else True)
            if same_codes:  # near-tie codes legitimately move the gradient
                for g_t, w_t in zip(gradients(mine, got), want_grads):
                    # The fused backward sums each code's rows in fp32 in another order than index_add_.
                    _close(g_t, w_t, w_t.dtype, f"{backend} gradient")


# Written for a CUDA machine's CI and never run where it was written (no GPU): the same cases on CUDA tensors,
# through the csrc CUDA kernels and native Triton. One test, not 400 skipped ones on every CPU run.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fuzz_cuda_backends():
    for seed in FUZZ_SEEDS:
        try:
            run_seed(seed, small=False, backends=("cuda", "triton", "auto"), device=torch.device("cuda"))
        except (Exception, pytest.fail.Exception) as err:
            raise AssertionError(f"fuzz seed {seed} failed on CUDA") from err


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_fuzz_fused_backends(seed):
    assert ops.available_backends("cpu")["cpu"], "the csrc extension must be built: missing is a failure, not a skip"
    run_seed(seed, small=False, backends=("cpu", "auto"), device=torch.device("cpu"))


# numpy's warnings from inside the interpreter's NaN arithmetic: expected here, noise in the report.
INTERPRETER_NAN_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@INTERPRETER_NAN_WARNINGS
@pytest.mark.parametrize("seed", TRITON_SEEDS)
def test_fuzz_triton(seed):
    device = require_backend("triton")
    run_seed(seed, small=True, backends=("triton",), device=device)


def test_fuzz_cases_cover_the_input_space():
    """The seed lists are fixed; this keeps an edit of the generator from quietly dropping a dimension."""
    tags: set = set()
    for seed in FUZZ_SEEDS:
        tags |= gen_case(seed, small=False).tags
    required = {
        *OPS, "N0", "D1", "K1", "K_not_pow2", "D_gt_128", "k_eq_K", "k_lt_K", "mixed_dtype", "grad", "invalid",
        "nonfinite_z", "nonfinite_codebook", "device_cpu", "device_meta", "idx_torch.int32", "idx_torch.int64",
        *(f"lead_ndim_{n}" for n in range(4)),
        *(f"{side}_{dtype}" for side in ("z", "c") for dtype in FLOATS),
        *(f"{side}layout_{kind}" for side in ("z", "c") for kind in set(LAYOUTS)),
        *(f"flavor_{kind}" for kind in ("randn", "int", "scaled", "dup", "on_codes")),
        *(f"invalid_{kind}" for kind in (
            "codebook_rank", "codebook_empty", "device_mismatch", "backend_name", "backend_cuda_on_cpu",
            "z_not_tensor", "idx_not_tensor", "idx_out_of_range", "idx_dtype", "codebook_dtype", "z_dtype",
            "z_scalar", "dim_mismatch", "dim_mismatch_smaller", "dim_zero", "metric", "k_bad_type", "k_below_1",
            "k_above_K", "rate_range", "rate_type", "seed_range", "seed_type", "offset_range", "offset_type",
            "beta_commit", "perturb_samples")),
    }
    assert not required - tags, f"no fuzz case exercises {sorted(required - tags)}"
    triton_ops = set()
    for seed in TRITON_SEEDS:
        case = gen_case(seed, small=True)
        if case.error is None and case.kwargs.get("z", case.kwargs.get("idx")).device.type == "cpu":
            triton_ops.add(case.op)
    assert triton_ops == set(OPS)


# ------------------------------------------------------------------------------------------------------------------
# The checks above can fail: wrong answers planted in a correct one are caught.
# ------------------------------------------------------------------------------------------------------------------


def _random_case(op: str, **extra) -> Case:
    g = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(20, 8, generator=g), torch.randn(50, 8, generator=g)
    return Case(0, op, dict(z=z, codebook=codebook, metric="l2", **extra))


def test_checks_reject_planted_errors():
    case = _random_case("nearest_codes", k=4)
    want = call(case, "reference")
    check_nearest(case, want, want)  # the right answer passes
    order = stable_order(true_distances(*searched_inputs(case)))
    wrong_code = want[1].clone()
    wrong_code[5, 0] = order[5, 4]  # the 5th-nearest in first place
    swapped = want[1].clone()
    swapped[7, [1, 2]] = swapped[7, [2, 1]]  # a random pair is no near-tie: order matters
    wrong_dist = want[0].clone()
    wrong_dist[3, 1] += 1e-2
    for got in ((want[0], wrong_code), (want[0], swapped), (wrong_dist, want[1])):
        with pytest.raises(AssertionError):
            check_nearest(case, got, want)
    with pytest.raises(AssertionError):  # the reference answers to the brute force too
        check_reference_against_brute_force(case, (want[0], wrong_code))

    case = _random_case("perturb_codes", rate=1.0, topk=8, seed=11, position_offset=0)
    want = call(case, "reference")
    check_reference_against_brute_force(case, want)
    moved = want[1].clone()
    moved[2] = want[0][2] if want[1][2] != want[0][2] else order[2, 1]
    with pytest.raises(AssertionError):
        check_codes_pair(case, (want[0], moved), want, 1.0, 8)

    # At +inf (a NaN latent) the order is by index alone: any other code is wrong even though "equally far".
    case = _random_case("nearest_codes", k=3)
    case.kwargs["z"][4, 0] = NAN
    want = call(case, "reference")
    assert want[1][4].tolist() == [0, 1, 2]
    shuffled = want[1].clone()
    shuffled[4] = torch.tensor([2, 1, 0])
    with pytest.raises(AssertionError):
        check_nearest(case, (want[0], shuffled), want)

    case = _random_case("quantize", rate=0.0, topk=1, beta_commit=0.25, seed=0)
    want = call(case, "reference")
    check_reference_against_brute_force(case, want)
    bent = want._replace(z_q=want.z_q.clone())
    bent.z_q[1, 0] += 1e-3
    with pytest.raises(AssertionError):
        check_quantize(case, bent, want)
    with pytest.raises(AssertionError):
        check_reference_against_brute_force(case, want._replace(commit_loss=want.commit_loss * 2))


# ------------------------------------------------------------------------------------------------------------------
# NaN / inf (docs/INTERFACES.md "Ops"): a NaN distance orders as +inf and is returned as +inf.
# ------------------------------------------------------------------------------------------------------------------

NONFINITE_BACKENDS = ["reference", "cpu", "auto", "triton"]
BAD_ROWS, BAD_CODES = [1, 4, 7, 9], [2, 5, 8]


def _nonfinite_inputs(dtype):
    # Small integers: every finite distance is exact, so every backend must agree bit for bit.
    g = torch.Generator().manual_seed(5)
    z = torch.randint(-3, 4, (12, 4), generator=g).float()
    codebook = torch.randint(-3, 4, (10, 4), generator=g).float()
    z[1, 2], z[4, 0], z[7], z[9] = NAN, INF, -INF, NAN
    codebook[2, 1], codebook[5, 3], codebook[8, 0] = NAN, INF, -INF
    return z.to(dtype), codebook.to(dtype)


@INTERPRETER_NAN_WARNINGS
@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_nonfinite_rows_follow_the_contract(backend, metric, dtype):
    device = require_backend("cpu" if backend == "auto" else backend)
    z, codebook = _nonfinite_inputs(dtype)
    z, codebook = z.to(device), codebook.to(device)
    good_rows = [r for r in range(12) if r not in BAD_ROWS]
    finite_codes = [c for c in range(10) if c not in BAD_CODES]
    exact = metric == "l2"

    for k in (1, 3, 10):
        case = Case(0, "nearest_codes", dict(z=z, codebook=codebook, metric=metric, k=k), exact=exact)
        dist, idx = got = call(case, backend)
        # A latent with a NaN / inf entry: every distance is NaN or inf, so codes 0..k-1 at +inf.
        assert (idx[BAD_ROWS] == torch.arange(k, device=device)).all()
        assert (dist[BAD_ROWS] == INF).all()
        # A code with a NaN / inf entry is never ahead of a finite one; when reached, in index order at +inf.
        n_finite = min(k, len(finite_codes))
        assert set(idx[good_rows, :n_finite].flatten().tolist()) <= set(finite_codes)
        assert dist[good_rows, :n_finite].isfinite().all()
        if k == 10:
            assert (idx[good_rows, n_finite:] == torch.tensor(BAD_CODES, device=device)).all()
            assert (dist[good_rows, n_finite:] == INF).all()
        check_nearest(case, got, call(case, "reference"))

    for topk in (4, 10):
        kw = dict(z=z, codebook=codebook, metric=metric, rate=1.0, topk=topk, seed=1234, position_offset=3)
        case = Case(0, "perturb_codes", kw, exact=exact)
        idx, pert = got = call(case, backend)
        ranks = ops.perturb_ranks(1234, torch.arange(12) + 3, 1.0, topk).to(device)
        # Codes 0..K-1 in index order are the bad rows' ranking, so the rank-th code is the rank itself.
        assert (idx[BAD_ROWS] == 0).all() and torch.equal(pert[BAD_ROWS], ranks[BAD_ROWS])
        check_codes_pair(case, got, call(case, "reference"), 1.0, topk)

    kw = dict(z=z, codebook=codebook, metric=metric, rate=1.0, topk=10, beta_commit=0.25, seed=77)
    case = Case(0, "quantize", kw, exact=exact)
    out = call(case, backend)
    ranks = ops.perturb_ranks(77, torch.arange(12), 1.0, 10).to(device)
    assert (out.indices[BAD_ROWS] == 0).all() and torch.equal(out.perturbed_indices[BAD_ROWS], ranks[BAD_ROWS])
    # NaN propagates: the bad tokens' z_q and both (mean) losses are not finite.
    assert not out.z_q[BAD_ROWS].isfinite().all(1).any()
    assert not out.codebook_loss.isfinite() and not out.commit_loss.isfinite()
    check_quantize(case, out, call(case, "reference"))

    # The lookup copies non-finite codes as they are.
    rows = torch.tensor([2, 5, 8, 0], device=device)
    case = Case(0, "codebook_lookup", dict(idx=rows, codebook=codebook))
    got = call(case, backend)
    torch.testing.assert_close(got, codebook[rows], rtol=0, atol=0, equal_nan=True)
