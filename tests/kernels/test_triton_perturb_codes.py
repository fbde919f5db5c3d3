"""perturb_codes_triton: the ranks are bit-identical to tokpost_fast.ops.philox, the codes to the reference.

The rank test uses a 1-D codebook c_j = j and z = -1, so the j-th nearest code is exactly code j and
idx_perturbed *is* the drawn rank: any difference in key/counter layout, 64-bit compare or rounding shows up.
Seeds, thresholds and offsets straddle the i32 / u32 / i64 argument typing and the counter's hi word.
"""

import pytest
import torch

from tokpost_fast.kernels import _rank
from tokpost_fast.kernels.perturb_codes import perturb_codes_triton
from tokpost_fast.ops import philox
from tokpost_fast.ops.perturb_codes import perturb_codes_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
gpu = pytest.mark.skipif(not ON_GPU, reason="native Triton needs a CUDA GPU (CPU runs go through the interpreter)")

TILES16 = {"BLOCK_N": 16, "BLOCK_K": 16}
WIDE = {"BLOCK_N": 16, "BLOCK_K": 64}
# The rank test is about the draws, not the tiling: one 128 x 128 tile keeps the interpreter quick.
ONE_TILE = {"BLOCK_N": 128, "BLOCK_K": 128}
SEEDS = [0, 1, 2**31 + 5, 2**40 + 3, 2**63 - 1]  # i32, the specialised 1, u32, i64, the largest
THRESHOLDS = [0, 1, 2**31 + 7, 2**32 - 1, 2**32]  # never, almost never, u32 middle, almost always, always
OFFSETS = [0, 2**32 - 40]  # the second crosses into the counter's hi word within the batch


def test_stream_constant_matches_the_contract():
    assert _rank.PERTURB_STREAM.value == philox.PERTURB_STREAM


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("topk", [7, 100])
def test_ranks_bit_identical(seed, topk):
    N, K = 80, 128
    codebook = torch.arange(K, dtype=torch.float32, device=DEVICE)[:, None]
    z = torch.full((N, 1), -1.0, device=DEVICE)
    for threshold in THRESHOLDS:
        for offset in OFFSETS:
            idx, idx_perturbed = perturb_codes_triton(z, codebook, topk, threshold, seed, offset, config=ONE_TILE)
            positions = torch.arange(N, dtype=torch.int64) + offset
            want = philox.ranks_for_threshold(seed, positions, threshold, topk)
            assert torch.equal(idx.cpu(), torch.zeros(N, dtype=torch.int64))
            assert torch.equal(idx_perturbed.cpu(), want), (threshold, offset)
            if threshold == 0:
                assert (want == 0).all()
            if threshold == 2**32:
                assert (want > 0).any()  # 80 draws from 7+ ranks: a zero-only outcome would be a broken draw


@pytest.mark.parametrize("config", [None, TILES16, WIDE], ids=["default", "tiles16", "wide"])
# fp16 shares bf16's path (half inputs, fp32 accumulation) and is covered by the nearest-codes tests.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K,topk", [(97, 1), (97, 7), (300, 100)])
def test_integer_data_matches_reference(K, topk, dtype, config):
    # Exact distances with many ties: the reference's stable sort and the packed keys must agree everywhere.
    gen = torch.Generator().manual_seed(K * topk)
    z = torch.randint(-2, 3, (37, 3), generator=gen).to(dtype).to(DEVICE)
    codebook = torch.randint(-2, 3, (K, 3), generator=gen).to(dtype).to(DEVICE)
    for seed, threshold, offset in [(11, 2**31, 0), (2**40 + 3, 2**32, 2**32 - 20)]:
        got = perturb_codes_triton(z, codebook, topk, threshold, seed, offset, config=config)
        want = perturb_codes_reference(z, codebook, topk, threshold, seed, offset)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_batch_split_invariance():
    # Positions come from position_offset, so a slice with the matching offset reproduces the whole call.
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(50, 4, generator=gen).to(DEVICE)
    codebook = torch.randn(64, 4, generator=gen).to(DEVICE)
    whole = perturb_codes_triton(z, codebook, 16, 2**31, 123, 1000, config=TILES16)
    part = perturb_codes_triton(z[20:], codebook, 16, 2**31, 123, 1020, config=WIDE)
    assert torch.equal(whole[0][20:], part[0]) and torch.equal(whole[1][20:], part[1])


def test_empty_and_bad_inputs():
    z, codebook = torch.randn(0, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    idx, idx_perturbed = perturb_codes_triton(z, codebook, 2, 2**31, 0)
    assert idx.shape == idx_perturbed.shape == (0,) and idx.dtype == torch.int64
    z = torch.randn(4, 3, device=DEVICE)
    for kwargs, name in [
        (dict(topk=6, threshold=0, seed=0), "topk"),
        (dict(topk=0, threshold=0, seed=0), "topk"),
        (dict(topk=2, threshold=2**32 + 1, seed=0), "threshold"),
        (dict(topk=2, threshold=-1, seed=0), "threshold"),
        (dict(topk=2, threshold=0, seed=-1), "seed"),
        (dict(topk=2, threshold=0, seed=2**63), "seed"),
        (dict(topk=2, threshold=0, seed=0, position_offset=-1), "position_offset"),
    ]:
        with pytest.raises(ValueError, match=name):
            perturb_codes_triton(z, codebook, **kwargs)


@gpu
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}], ids=["default", "tiles64"])
@pytest.mark.parametrize("N,K,D,topk", [(8192, 4096, 64, 100), (5, 16384, 8, 100), (4096, 4096, 64, 2)])
def test_gpu_integer_data_matches_reference(N, K, D, topk, config):
    gen = torch.Generator().manual_seed(N + K)
    z = torch.randint(-2, 3, (N, D), generator=gen).to(torch.bfloat16).cuda()
    codebook = torch.randint(-2, 3, (K, D), generator=gen).to(torch.bfloat16).cuda()
    got = perturb_codes_triton(z, codebook, topk, 2**31 + 7, 2**40 + 3, 2**32 - 100, config=config)
    want = perturb_codes_reference(z, codebook, topk, 2**31 + 7, 2**40 + 3, 2**32 - 100)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
