"""Packed (distance, code index) keys: the one value the Triton re-rank sorts and merges.

# dist: fp32 [...], index: int32/int64 [...] in [0, 2**31)  ->  key: int64 [...]
key = (order-preserving int32 of the fp32 distance) << 32 | index
Comparing keys as signed int64 compares (distance, index) lexicographically, so a plain min / sort of keys picks
the smaller distance and, on equal distances, the lower index: the "ties go to the lowest index" rule of
docs/INTERFACES.md holds with no extra compare. Every key is unique (indices are), which the bitonic merge does not
need but which makes the result independent of how the codebook was tiled or split.

Callers turn NaN distances into +inf before packing (the contract orders NaN as +inf). The difference-form
distances the re-rank packs are never -0.0 (a sum of squares starting at +0.0), which the bit trick would order
just below +0.0.
"""

import os

import numpy as np
import triton
import triton.language as tl

# Larger than every real key (a real key's high word is at most +inf's 0x7F800000): fills invalid candidate slots
# and the not-yet-filled slots of a running top-k list.
KEY_PAD = tl.constexpr(0x7FFFFFFFFFFFFFFF)


def _interpreter_fast_xor_reduce() -> None:
    """Under TRITON_INTERPRET=1 only: evaluate xor reductions with numpy instead of one Python call per element.

    tl.topk / tl.bitonic_merge find compare-exchange partners with xor_sum over size-2 hypercube axes (cheap
    register shuffles on a GPU). The interpreter fast-paths sum/min/max/argmin reductions but runs any other
    combine function element by element, which made one top-128 of a 16 x 128 tile take seconds. np.bitwise_xor
    .reduce computes the same value (xor is associative and commutative), so the kernels under test are unchanged;
    only the test vehicle gets faster. If the interpreter's internals move, this silently does nothing.
    """
    try:
        import triton.language.standard as standard
        from triton.runtime.interpreter import ReduceOps
    except ImportError:
        return
    xor_combine = getattr(standard, "_xor_combine", None)
    if xor_combine is None or getattr(ReduceOps, "_tokpost_fast_xor", False) or not hasattr(ReduceOps, "apply_impl"):
        return
    generic_apply_impl = ReduceOps.apply_impl

    def apply_impl(self, inputs):
        if self.combine_fn is xor_combine and len(inputs) == 1 and self.axis is not None:
            data = inputs[0].handle.data
            return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims), inputs[0].dtype)
        return generic_apply_impl(self, inputs)

    ReduceOps.apply_impl = apply_impl
    ReduceOps._tokpost_fast_xor = True


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _interpreter_fast_xor_reduce()


@triton.jit
def dist_to_key(dist, index):
    # fp32 bits -> int32 whose signed order is the float order: non-negative floats already sort as their bits;
    # for negative floats flip the 31 magnitude bits so a larger magnitude becomes a smaller integer.
    bits = dist.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | index.to(tl.int64)


@triton.jit
def key_to_dist(key):
    # Inverse of dist_to_key's high word (the xor with the sign mask is its own inverse).
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def key_to_index(key):
    return key & 0xFFFFFFFF


@triton.jit
def smallest_ascending(keys, KP: tl.constexpr, WIDTH: tl.constexpr):
    """The KP smallest keys of each row of [BR, WIDTH] int64 keys (all >= 0), ascending: [BR, KP].

    Written with tl.sort / tl.topk(x, k, dim) only, which triton 3.6 and 3.8 share (3.6's topk has no
    `descending`: it always takes the largest, so it runs on the negated keys)."""
    if KP == 1:
        return tl.min(keys, axis=1)[:, None]
    elif KP == WIDTH:
        return tl.sort(keys, dim=1)
    else:
        return -tl.topk(-keys, KP, dim=1)


@triton.jit
def merge_topk_desc(running_desc, cand_asc, KP: tl.constexpr):
    """The KP smallest of two sorted lists [BN, KP]: running (descending) and candidates (ascending).

    min(a_i, b_i) of a descending and an ascending list holds exactly the KP smallest of their union and is
    bitonic (it falls, then rises), so one bitonic merge (log2 KP compare-exchange stages, no full sort) orders it.
    """
    smallest = tl.minimum(running_desc, cand_asc)
    if KP == 1:
        return smallest
    else:
        return tl.bitonic_merge(smallest, dim=1, descending=True)


@triton.jit
def select_rank(running_desc, rank, KP: tl.constexpr):
    """The rank-th smallest key of each row of a descending [BN, KP] list (rank [BN], 0 = smallest)."""
    col = tl.arange(0, KP)[None, :]
    hit = col == (KP - 1 - rank)[:, None]
    # Exactly one column matches per row, so the sum is that column's key.
    return tl.sum(tl.where(hit, running_desc, 0), axis=1)
