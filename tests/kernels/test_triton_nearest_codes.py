"""knn_codes_triton against nearest_codes_reference: bit-identical everywhere (the exact-nearest contract).

On a CPU these run the same kernel source through the Triton interpreter (small ragged shapes, forced small tiles
so every codebook spans several tiles and the last one is padded). Tests marked `gpu` run natively at realistic
sizes. Near-tie data (the search bound's reason to exist) are in test_triton_exact.py.
"""

import pytest
import torch

from tokpost_fast.kernels._search import plan_layout
from tokpost_fast.kernels.nearest_codes import MAX_K, knn_codes_triton, search_plan
from tokpost_fast.ops.nearest_codes import nearest_codes_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
gpu = pytest.mark.skipif(not ON_GPU, reason="native Triton needs a CUDA GPU (CPU runs go through the interpreter)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K, D, k): N = 0 and 1, D = 1 and not a power of two, K not a multiple of any tile, k = K, k = 100.
CASES = [(0, 3, 8, 2), (1, 1, 1, 1), (37, 3, 1, 3), (37, 97, 17, 7), (130, 300, 3, 100), (37, 300, 8, 1)]
# 16 x 16 tiles (tl.dot's minimum) make every shape above span several tiles with a padded last one; 64-wide code
# tiles pack fewer tile numbers and run the wide-slot path.
CONFIGS = {"tiles16": {"BLOCK_N": 16, "BLOCK_K": 16}, "wide": {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 2}}


def assert_knn_tie_aware(z, codebook, dist, idx, k, atol_scale=1e-4):
    """The returned codes' true (fp64) distances equal the k smallest ones within fp32 accumulation error.

    The inputs are already in their dtype, so fp16/bf16 products are exact in fp32 and only the fp32 sums err:
    ~eps32 * (||z||^2 + ||c||^2) per term; 1e-4 of that scale is ~100x headroom and far below random gaps.
    """
    n = z.shape[0]
    assert dist.shape == (n, k) and idx.shape == (n, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    if n == 0:
        return
    z64, c64, idx, dist = z.double().cpu(), codebook.double().cpu(), idx.cpu(), dist.cpu()
    true = torch.cdist(z64, c64).pow(2)
    tol = atol_scale * (z64.pow(2).sum(1, keepdim=True) + c64.pow(2).sum(1).max()).clamp_min(1.0)
    assert int(idx.min()) >= 0 and int(idx.max()) < codebook.shape[0]
    assert (idx.sort(1).values.diff(dim=1) != 0).all(), "a code appears twice in one row"
    chosen = true.gather(1, idx)
    best = true.topk(k, dim=1, largest=False).values
    assert (chosen - best).abs().le(tol).all(), f"max excess {(chosen - best).abs().max().item()}"
    assert (dist.double() - chosen).abs().le(tol).all(), "returned dist differs from the true distance"
    assert (dist[:, 1:] >= dist[:, :-1] - tol.float()).all(), "not ascending"


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D,k", CASES)
def test_random_data_matches_reference_exactly(N, K, D, k, dtype, config):
    gen = torch.Generator().manual_seed(N * 7919 + K * 31 + D)
    z = torch.randn(N, D, generator=gen).to(dtype).to(DEVICE)
    codebook = torch.randn(K, D, generator=gen).to(dtype).to(DEVICE)
    dist, idx = knn_codes_triton(z, codebook, k, config=CONFIGS[config])
    assert_knn_tie_aware(z, codebook, dist, idx, k)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    # Both return the difference-form fp32 distance in (dist, index) order: nothing may differ.
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


@pytest.mark.parametrize("config", [None, *CONFIGS.values()], ids=["default", *CONFIGS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,k", [(97, 1), (97, 7), (300, 100)])
def test_integer_data_with_ties_is_exact(K, k, dtype, config):
    # Small integers: every distance is exact in fp32 (and in fp16/bf16 inputs), so the tie rule alone decides.
    # Values in [-2, 2] in 3-D give many equal distances, and K > 125 guarantees duplicate codebook rows.
    gen = torch.Generator().manual_seed(K + k)
    z = torch.randint(-2, 3, (37, 3), generator=gen).to(dtype).to(DEVICE)
    codebook = torch.randint(-2, 3, (K, 3), generator=gen).to(dtype).to(DEVICE)
    dist, idx = knn_codes_triton(z, codebook, k, config=config)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(dist, ref_dist)


def test_duplicate_rows_go_to_lowest_index():
    codebook = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], device=DEVICE)
    z = torch.zeros(3, 2, device=DEVICE)
    for config in CONFIGS.values():
        _, idx = knn_codes_triton(z, codebook, 5, config=config)
        assert idx.tolist() == [[2, 4, 5, 1, 3]] * 3
        _, idx1 = knn_codes_triton(z, codebook, 1, config=config)
        assert idx1.tolist() == [[2]] * 3


# numpy (the interpreter) warns about the NaN arithmetic these tests provoke on purpose.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("k", [1, 4])
def test_nan_orders_as_inf(k, config):
    gen = torch.Generator().manual_seed(3)
    z = torch.randint(-3, 4, (20, 5), generator=gen).float()
    codebook = torch.randint(-3, 4, (40, 5), generator=gen).float()
    z[3, 2] = float("nan")  # every distance of this token is NaN -> codes 0..k-1 at +inf
    codebook[0, 1] = float("nan")  # code 0 is never near anything
    z, codebook = z.to(DEVICE), codebook.to(DEVICE)
    dist, idx = knn_codes_triton(z, codebook, k, config=CONFIGS[config])
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    assert idx[3].tolist() == list(range(k)) and torch.isinf(dist[3]).all()
    assert not torch.isnan(dist).any() and (idx[torch.arange(20) != 3] != 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("k", [1, 4])
def test_infinite_latent_gives_inf_and_lowest_codes(k, config):
    # inf - inf = NaN for some codes, +inf for others: all order as +inf, so the tie rule returns codes 0..k-1.
    # (Checked directly: the reference's torch.nan_to_num also clamps a true +inf to the largest float.)
    gen = torch.Generator().manual_seed(5)
    z = torch.randint(-3, 4, (20, 5), generator=gen).float()
    codebook = torch.randint(-3, 4, (40, 5), generator=gen).float()
    z[7] = float("inf")
    dist, idx = knn_codes_triton(z.to(DEVICE), codebook.to(DEVICE), k, config=CONFIGS[config])
    assert idx[7].tolist() == list(range(k)) and torch.isposinf(dist[7]).all()


def test_largest_k():
    # k = 1000 -> KP = 1024 = MAX_K: the widest running list the launcher accepts.
    gen = torch.Generator().manual_seed(6)
    z = torch.randint(-2, 3, (3, 4), generator=gen).float().to(DEVICE)
    codebook = torch.randint(-2, 3, (1030, 4), generator=gen).float().to(DEVICE)
    dist, idx = knn_codes_triton(z, codebook, 1000)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, 1000)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


def test_strided_inputs_match_contiguous():
    gen = torch.Generator().manual_seed(4)
    z_big = torch.randn(40, 24, generator=gen).to(DEVICE)
    z = z_big[::2, 3:20]  # row stride 48, unit D stride: used in place
    codebook = torch.randn(17, 50, generator=gen).to(DEVICE).t()  # D stride != 1: copied
    want = knn_codes_triton(z.contiguous(), codebook.contiguous(), 5, config=CONFIGS["tiles16"])
    got = knn_codes_triton(z, codebook, 5, config=CONFIGS["tiles16"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_inputs_raise_value_error():
    z, codebook = torch.randn(4, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    for bad_k in (0, 6, MAX_K + 1, 2.0, True):
        with pytest.raises(ValueError, match="k"):
            knn_codes_triton(z, codebook, bad_k)
    with pytest.raises(ValueError, match="dtype"):
        knn_codes_triton(z.half(), codebook, 1)
    with pytest.raises(ValueError, match="dim"):
        knn_codes_triton(torch.randn(4, 2, device=DEVICE), codebook, 1)
    with pytest.raises(ValueError, match="z"):
        knn_codes_triton(z.double(), codebook.double(), 1)
    with pytest.raises(ValueError, match="2-D"):
        knn_codes_triton(z[None], codebook, 1)
    with pytest.raises(ValueError, match="config"):
        knn_codes_triton(z, codebook, 1, config={"BLOCK_M": 16})
    with pytest.raises(ValueError, match="power of two"):
        knn_codes_triton(z, codebook, 1, config={"BLOCK_N": 8})
    with pytest.raises(ValueError, match="config"):
        knn_codes_triton(z, codebook, 1, config="autotune")


def test_layouts_cover_the_augmented_width():
    # bf16: D + 6 columns; fp32 / fp16: 3 D + 6 (hi/lo split), as one or two power-of-two blocks, or 64-wide chunks.
    for D in (1, 3, 8, 17, 33, 64, 100, 256, 257):
        for dtype in DTYPES:
            lay = plan_layout(D, dtype)
            assert lay.d_aug == (1 if dtype == torch.bfloat16 else 3) * D + 6
            assert lay.dpad >= lay.d_aug and lay.dpad % 16 == 0
            assert lay.d_chunks == 0 or (lay.d_tail == 0 and lay.dpad - lay.d_aug < lay.d_main)
            if lay.d_chunks == 0:  # resident: waste under one block of 16 beyond a power-of-two pair
                assert lay.d_main & (lay.d_main - 1) == 0 and (lay.d_tail & (lay.d_tail - 1)) == 0
    assert plan_layout(8, torch.bfloat16).dpad == 16 and plan_layout(256, torch.bfloat16).dpad == 272


def test_plan_tracks_enough_values_for_k():
    for k in (1, 2, 7, 100, 128, 129, 1000, 1024):
        for D in (8, 256):
            for major in (0, 8, 9):
                plan = search_plan(65536, 16384, D, k, torch.bfloat16, False, (major, 0))
                assert plan.tracked * plan.block_k >= plan.kp and plan.tracked in (1, 2, 4)
                assert plan.cap >= plan.kp and plan.width >= plan.kp and plan.num_tiles * plan.block_k >= 16384
                # k = 1: slot mode at small D (D' <= 32), packed tile numbers (enough bits) above.
                assert plan.slot_mode == (k == 1 and plan.layout.dpad <= 32)
                assert (plan.pack_bits > 0) == (k == 1 and not plan.slot_mode)
                assert plan.pack_bits == 0 or 2**plan.pack_bits >= plan.num_tiles


# ---- native GPU runs (skipped on CPU-only machines) -----------------------------------------------------------


@gpu
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}], ids=["default", "tiles64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D,k", [(4097, 4096, 64, 1), (4097, 4096, 64, 100), (1000, 16384, 8, 7),
                                     (3, 16384, 64, 100), (5, 4097, 257, 1), (2048, 1000, 1, 128)])
def test_gpu_matches_reference_exactly(N, K, D, k, dtype, config):
    gen = torch.Generator().manual_seed(N + K + D + k)
    z = torch.randn(N, D, generator=gen).to(dtype).cuda()
    codebook = torch.randn(K, D, generator=gen).to(dtype).cuda()
    dist, idx = knn_codes_triton(z, codebook, k, config=config)
    assert_knn_tie_aware(z, codebook, dist, idx, k)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


@gpu
@pytest.mark.parametrize("k", [1, 100])
def test_gpu_integer_data_exact_few_rows(k):
    # N = 7 rows: one program scans the whole codebook.
    gen = torch.Generator().manual_seed(k)
    z = torch.randint(-2, 3, (7, 64), generator=gen).half().cuda()
    codebook = torch.randint(-2, 3, (16384, 64), generator=gen).half().cuda()
    dist, idx = knn_codes_triton(z, codebook, k)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


@pytest.mark.parametrize("k,perturb", [(1, False), (5, False), (4, True)])
def test_kernel_specs_mirror_the_launches(k, perturb, monkeypatch):
    # benchmarks/kernel_report.py compiles kernels/_specs.kernel_specs(plan): the same kernels and constexprs the
    # launcher runs, or the report would describe other code than the one that runs.
    import tokpost_fast.kernels.nearest_codes as launcher
    from tokpost_fast.kernels._specs import kernel_specs
    from tokpost_fast.kernels.perturb_codes import perturb_codes_triton

    launched = []

    class Spy:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                bound = dict(zip(self.fn.arg_names, args), **kwargs)  # positional arguments by name
                launched.append((self.fn.fn.__name__ if hasattr(self.fn, "fn") else self.fn.__name__, bound))
                return self.fn[grid](*args, **kwargs)
            return run

    for name in ("_scan_kernel", "_collect_kernel", "_rerank_kernel"):
        monkeypatch.setattr(launcher, name, Spy(getattr(launcher, name)))
    z, codebook = torch.randn(40, 12), torch.randn(90, 12)
    if perturb:
        perturb_codes_triton(z, codebook, k, 2**31, 3)
    else:
        knn_codes_triton(z, codebook, k)
    plan = search_plan(40, 90, 12, k, torch.float32, perturb, (0, 0))
    specs = kernel_specs(plan, k, 12)
    assert len(specs) == len(launched)
    for spec, (name, kwargs) in zip(specs, launched):
        assert spec.fn.__name__ == name or getattr(spec.fn, "fn", spec.fn).__name__ == name
        for key, value in spec.constexprs.items():
            if key not in ("UPCAST_DOT", "OFFSETS_32"):
                assert kwargs[key] == value, (spec.name, key, kwargs[key], value)
        assert kwargs.get("num_warps") == spec.num_warps
