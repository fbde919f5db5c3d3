"""Small awkward cases for `compute-sanitizer --tool memcheck` (benchmarks/gpu_check.sh): every CUDA/Triton kernel
path once on shapes that break tiling assumptions (N = 1, K not a multiple of a tile, D = 1, 3, 65, 257, k = K,
overflowing candidate buffers, NaN rows, collapsed lookup codes), each checked against the reference too.

    compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/gpu/sanitize_cases.py [--backends cuda,triton]

Exit 0: every case ran and matched; 1: a mismatch (printed); memcheck's own exit code for memory errors.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tokpost_fast import ops  # noqa: E402
from tokpost_fast.ops.philox import rate_threshold  # noqa: E402

KNN_CASES = [  # (N, K, D, k)
    (1, 1, 1, 1), (37, 3, 3, 3), (37, 130, 65, 7), (5, 1000, 257, 200), (64, 129, 8, 129), (33, 1000, 8, 1),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="cuda,triton")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    failures = []
    for backend in args.backends.split(","):
        if not ops.available_backends("cuda").get(backend, False):
            print(f"{backend}: not available, skipped")
            continue
        for (n, K, D, k) in KNN_CASES:
            for dtype in (torch.float32, torch.bfloat16):
                z = torch.randn(n, D, generator=gen).to(dtype)
                codebook = torch.randn(K, D, generator=gen).to(dtype)
                if n > 3:
                    z[2, 0] = float("nan")
                    codebook[K // 2] = codebook[0]  # an exact tie
                dist, idx = ops.nearest_codes(z.cuda(), codebook.cuda(), k=k, backend=backend)
                ref = ops.nearest_codes_reference(z, codebook, k)
                if not (torch.equal(idx.cpu(), ref[1]) and torch.equal(dist.cpu(), ref[0])):
                    failures.append(f"{backend} nearest_codes N={n} K={K} D={D} k={k} {dtype}")
                topk = min(k + 1, K)
                got = ops.perturb_codes(z.cuda(), codebook.cuda(), 1.0, topk, 7, backend=backend)
                want = ops.perturb_codes_reference(z, codebook, topk, rate_threshold(1.0), 7)
                if not (torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])):
                    failures.append(f"{backend} perturb_codes N={n} K={K} D={D} topk={topk} {dtype}")
        # Many codes inside one row's window / buffer: 600 identical codes.
        codebook = torch.cat([torch.ones(600, 4), torch.randn(100, 4, generator=gen)]).cuda()
        z = torch.ones(9, 4).cuda()
        for k in (1, 300):
            got = ops.nearest_codes(z, codebook, k=k, backend=backend)
            ref = ops.nearest_codes_reference(z.cpu(), codebook.cpu(), k)
            if not torch.equal(got[1].cpu(), ref[1]):
                failures.append(f"{backend} nearest_codes duplicated codes k={k}")
        print(f"{backend}: nearest_codes / perturb_codes cases done", flush=True)
    if ops.available_backends("cuda").get("cuda", False):
        for n, K, D, pattern in ((0, 5, 3, "uniform"), (1, 1, 1, "uniform"), (3000, 37, 65, "uniform"),
                                 (5000, 16, 8, "collapsed"), (70000, 4, 3, "collapsed")):
            idx = torch.randint(0, K, (n,), generator=gen) if pattern == "uniform" else torch.full((n,), K - 1)
            grad = torch.randn(n, D, generator=gen)
            codebook = torch.randn(K, D, generator=gen)
            out = ops.codebook_lookup(idx.cuda(), codebook.cuda(), backend="cuda")
            got = torch.ops.tokpost_fast.codebook_lookup_backward(grad.cuda(), idx.cuda(), K)
            want = torch.ops.tokpost_fast.codebook_lookup_backward(grad, idx, K)
            if not (torch.equal(out.cpu(), codebook[idx]) and torch.equal(got.cpu(), want)):
                failures.append(f"cuda codebook_lookup N={n} K={K} D={D} {pattern}")
        print("cuda: codebook_lookup cases done", flush=True)
    torch.cuda.synchronize()
    for line in failures:
        print("MISMATCH", line)
    print(f"{len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
