"""knn_codes_triton against nearest_codes_reference: tie-aware on random data, exact on integer data.

On a CPU these run the same kernel source through the Triton interpreter (small ragged shapes, forced small tiles
so every tile is partial, and the split-K path forced). Tests marked `gpu` run natively at realistic sizes.
"""

import pytest
import torch

from tokpost_fast.kernels.nearest_codes import MAX_K, config_fits, knn_codes_triton, plan_split
from tokpost_fast.ops.nearest_codes import nearest_codes_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
gpu = pytest.mark.skipif(not ON_GPU, reason="native Triton needs a CUDA GPU (CPU runs go through the interpreter)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K, D, k): N = 0 and 1, D = 1 and not a power of two, K not a multiple of any tile, k = K, k = 100.
CASES = [(0, 3, 8, 2), (1, 1, 1, 1), (37, 3, 1, 3), (37, 97, 17, 7), (130, 300, 3, 100), (37, 300, 8, 1)]
# 16 x 16 tiles (tl.dot's minimum) make every shape above span several partial tiles; SPLIT_K forces the
# small-N path (partial lists + merge kernel) that a GPU only takes when row tiles cannot fill it.
CONFIGS = {"tiles16": {"BLOCK_N": 16, "BLOCK_K": 16}, "split3": {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3}}


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
def test_random_data_tie_aware(N, K, D, k, dtype, config):
    gen = torch.Generator().manual_seed(N * 7919 + K * 31 + D)
    z = torch.randn(N, D, generator=gen).to(dtype).to(DEVICE)
    codebook = torch.randn(K, D, generator=gen).to(dtype).to(DEVICE)
    dist, idx = knn_codes_triton(z, codebook, k, config=CONFIGS[config])
    assert_knn_tie_aware(z, codebook, dist, idx, k)
    ref_dist, _ = nearest_codes_reference(z, codebook, k)
    # Both are the same fp32 expansion; they differ only by summation order.
    torch.testing.assert_close(dist, ref_dist, atol=1e-4 * (1 + D), rtol=1e-5)


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


def test_split_plan_covers_the_codebook_without_empty_splits():
    for K in (1, 97, 300, 4096, 16385):
        for forced in (1, 2, 3, 7, 1000):
            splits, per = plan_split(3, K, 16, 32, torch.device("cpu"), forced)
            assert 1 <= splits <= forced and (splits == 1 or per % 32 == 0)
            assert (splits - 1) * per < K <= splits * per  # every split non-empty, all codes covered
    assert plan_split(3, 4096, 16, 32, torch.device("cpu"), None) == (1, 4096)  # no SMs to fill on the CPU


def test_prune_predicate():
    assert config_fits(32, 128, 4, 2, 128, 64, 2, 227 * 1024)
    assert not config_fits(32, 64, 4, 2, 128, 64, 2, 227 * 1024)  # tile narrower than the candidate list
    assert not config_fits(64, 128, 4, 2, 128, 64, 2, 227 * 1024)  # int64 key tile too big for registers
    assert not config_fits(128, 256, 4, 3, 1, 128, 4, 163 * 1024)  # shared memory


# ---- native GPU runs (skipped on CPU-only machines) -----------------------------------------------------------


@gpu
@pytest.mark.parametrize("config", [None, "autotune"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D,k", [(4097, 4096, 64, 1), (4097, 4096, 64, 100), (1000, 16384, 8, 7),
                                     (3, 16384, 64, 100), (5, 4097, 257, 1), (2048, 1000, 1, 128)])
def test_gpu_tie_aware(N, K, D, k, dtype, config):
    gen = torch.Generator().manual_seed(N + K + D + k)
    z = torch.randn(N, D, generator=gen).to(dtype).cuda()
    codebook = torch.randn(K, D, generator=gen).to(dtype).cuda()
    dist, idx = knn_codes_triton(z, codebook, k, config=config)
    assert_knn_tie_aware(z, codebook, dist, idx, k)


@gpu
@pytest.mark.parametrize("k", [1, 100])
def test_gpu_integer_data_exact_with_auto_split(k):
    # N = 7 rows: the launcher splits the codebook across programs on any real GPU.
    gen = torch.Generator().manual_seed(k)
    z = torch.randint(-2, 3, (7, 64), generator=gen).half().cuda()
    codebook = torch.randint(-2, 3, (16384, 64), generator=gen).half().cuda()
    dist, idx = knn_codes_triton(z, codebook, k)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
