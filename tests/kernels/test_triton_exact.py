"""The exact-nearest contract on the data it exists for (docs/INTERFACES.md "Exact nearest codes").

Near-tie clusters (the fp32 expanded form gets a sizeable share of them wrong: the control), the two ways pass 1
settles a k = 1 row (slot mode at small D, packed tile numbers at large D), and the fallbacks: more codes inside the
window than the candidate buffer holds, and fewer finite codes than k. Every result must equal the reference bit
for bit, and the reference must match a float64 brute force.
"""

import pytest
import torch

from tests.ops.helpers import near_tie_clusters, true_nearest_violations
from tokpost_fast.kernels.nearest_codes import knn_codes_triton, search_plan
from tokpost_fast.kernels.perturb_codes import perturb_codes_triton
from tokpost_fast.ops.nearest_codes import nearest_codes_reference, squared_distances_reference
from tokpost_fast.ops.perturb_codes import perturb_codes_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TILES16 = {"BLOCK_N": 16, "BLOCK_K": 16}


def near_ties(n, num_codes, dim, seed, spread=1e-3):
    # Fewer, fuller clusters than the ops tests (16, not 64).
    return near_tie_clusters(n, num_codes, dim, seed, clusters=16, spread=spread)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("config", [None, TILES16], ids=["default", "tiles16"])
def test_near_tie_clusters_fp32(k, config):
    z, codebook = near_ties(96, 512, 8, seed=k)
    assert true_nearest_violations(z, codebook, squared_distances_reference(z, codebook).argmin(1)) >= 5  # control
    dist, idx = knn_codes_triton(z.to(DEVICE), codebook.to(DEVICE), k, config=config)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(dist.cpu(), ref_dist)
    assert true_nearest_violations(z, codebook, ref_idx[:, 0]) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_near_tie_clusters_half_precision(dtype):
    # Rounded to 16 bits the clusters become exact duplicates and near-duplicates: ties decided by index.
    z, codebook = near_ties(64, 256, 8, seed=3, spread=3e-3)
    z, codebook = z.to(dtype), codebook.to(dtype)
    for k in (1, 3):
        got = knn_codes_triton(z.to(DEVICE), codebook.to(DEVICE), k)
        want = nearest_codes_reference(z, codebook, k)
        assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


def test_packed_mode_at_large_d():
    # D = 130 in bf16: D' = 144 > 32, so pass 1 packs tile numbers and tracks two minima per slot.
    z, codebook = near_ties(40, 200, 130, seed=5, spread=2e-3)
    z, codebook = z.bfloat16(), codebook.bfloat16()
    assert search_plan(40, 200, 130, 1, torch.bfloat16, False, (0, 0)).pack_bits > 0
    assert search_plan(40, 200, 8, 1, torch.bfloat16, False, (0, 0)).pack_bits == 0  # slot mode
    got = knn_codes_triton(z.to(DEVICE), codebook.to(DEVICE), 1, config=TILES16)
    want = nearest_codes_reference(z, codebook, 1)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@pytest.mark.parametrize("k", [1, 5])
def test_window_overflow_takes_the_full_scan(k):
    # 150 copies of one code: every token near it has 150 codes inside the window, more than the candidate buffer
    # holds (64 for k = 1, 64 for k = 5), so the re-rank scans all codes exactly for those rows.
    gen = torch.Generator().manual_seed(k)
    others = torch.randn(60, 6, generator=gen)
    codebook = torch.cat([others[:30], others[30:31].expand(150, 6), others[31:]])
    z = torch.cat([codebook[40:41] + 1e-4 * torch.randn(20, 6, generator=gen), torch.randn(20, 6, generator=gen)])
    dist, idx = knn_codes_triton(z.to(DEVICE), codebook.to(DEVICE), k, config=TILES16)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(dist.cpu(), ref_dist)
    assert (idx[:20, 0].cpu() == 30).all()  # the lowest index of the copies


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fewer_finite_codes_than_k():
    # 3 finite codes, k = 6: three at finite distances, then the NaN / inf codes at +inf in index order.
    gen = torch.Generator().manual_seed(8)
    codebook = torch.randn(40, 4, generator=gen)
    codebook[[i for i in range(40) if i not in (5, 17, 33)], 1] = float("nan")
    codebook[9, 0] = float("inf")
    z = torch.randn(25, 4, generator=gen)
    dist, idx = knn_codes_triton(z.to(DEVICE), codebook.to(DEVICE), 6, config=TILES16)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, 6)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(dist.cpu(), ref_dist)
    assert sorted(idx[0, :3].tolist()) == [5, 17, 33] and idx[0, 3:].tolist() == [0, 1, 2]


def test_perturbation_on_near_ties_matches_the_reference():
    z, codebook = near_ties(80, 256, 8, seed=9)
    for topk, threshold in [(8, 2**31), (40, 2**32)]:
        got = perturb_codes_triton(z.to(DEVICE), codebook.to(DEVICE), topk, threshold, 77, 5, config=TILES16)
        want = perturb_codes_reference(z, codebook, topk, threshold, 77, 5)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("k", [1, 3])
def test_chunked_layout_at_wide_fp32(k):
    # fp32 D = 130: 3 D + 6 = 396 augmented columns, past the resident limit: the search loops over 64-wide chunks.
    from tokpost_fast.kernels._search import plan_layout

    assert plan_layout(130, torch.float32).d_chunks == 7
    z, codebook = near_ties(20, 70, 130, seed=k, spread=1e-2)
    got = knn_codes_triton(z.to(DEVICE), codebook.to(DEVICE), k, config=TILES16)
    want = nearest_codes_reference(z, codebook, k)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])
