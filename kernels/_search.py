"""The tensor-core search: augmented bf16 operands, their error bound, and the search tile every pass shares.

Shapes and dtypes
  z         [N, D]  fp32 / fp16 / bf16            codebook [K, D] same dtype
  z_aug     [N, DPAD]  bf16  (built here, once per call)
  c_aug     [KPAD, DPAD] bf16 (KPAD = K rounded up to BLOCK_K)
  err       [N] fp32  the search bound E_i of row i (NaN for a row with a NaN / inf entry)

One bf16 dot per (row, code) gives the search value w = ||z - c||^2 / 2 (up to the bound E_i), with both squared
norms folded into the product so the hot loop has nothing to add:
  bf16 inputs         z_aug = [ z,              1,    1,    1,    nz_hi, nz_mid, nz_lo, 0...]
                      c_aug = [-c,              nc_hi, nc_mid, nc_lo, 1,    1,      1,    0...]
  fp32 / fp16 inputs  every x is split into bf16 hi + lo (x = hi + lo + e, |e| <= 2**-18 |x|) and the product is
                      z.c ~= zh.ch + zl.ch + zh.cl: z_aug = [zh, zl, zh, ...], c_aug = [-ch, -ch, -cl, ...]
  nz = ||z||^2 / 2 and nc = ||c||^2 / 2 (fp32) are split into three bf16 parts (24 bits). Padded codes (past K) and
  codes with a NaN / inf entry get nc_hi = FAR = 2**127 (finite, exact in bf16): their search value is about FAR,
  above every real one and above every threshold (thresholds are clamped to FAR / 2), so no loop needs a mask.
  (Not NaN: max(m, NaN) = m would copy a running minimum into the next slot and count one code twice.)
  A non-finite z row becomes zeros here and is answered from the contract directly (err = NaN marks it).

The bound (derived in docs/INTERFACES.md, "Exact nearest codes"): with S_i = (||z_i|| + max_j ||c_j||)^2,
  E_i = S_i * [ (DPAD + 4) * 2**-22            tensor-core fp32 accumulation of DPAD terms (truncating adds:
                                                2u per add, u = 2**-24; sum of |terms| <= 1.02 S_i / 2 + n_z)
              + 2**-16 if split                 the dropped lo * lo products and the hi/lo residues
              + (D + 2) * 2**-23                the fp32 norms and their 3-part bf16 split (both sides)
              + (D + 3) * 2**-24 ]              the difference form's own rounding, so the candidates also
                                                cover every code the exact fp32 order could put first
and every candidate test uses 2 * (E_i + PACK_REL * (|v| + 2 E_i)) around the k-th best value v, PACK_REL
covering the tile number packed into the low mantissa bits of the k = 1 scan (kernels/_scan.py).
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Widest augmented operand held resident (as two power-of-two blocks) by one program; wider ones loop over chunks.
MAX_RESIDENT = 384
CHUNK_D = 64
# Search value of padded and non-finite codes; thresholds never exceed FAR / 2.
FAR = 2.0**127
# Extra columns of the augmented operands: three for ||c||^2/2 and three for ||z||^2/2.
NORM_COLS = 6


def next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Layout:
    """How the augmented width is laid out: resident (D_MAIN + D_TAIL, both powers of two, D_TAIL may be 0) or
    chunked (D_CHUNKS chunks of D_MAIN, D_TAIL = 0)."""
    split: bool
    d_aug: int  # used columns
    d_main: int
    d_tail: int
    d_chunks: int  # 0: resident

    @property
    def dpad(self) -> int:
        return self.d_main * max(self.d_chunks, 1) + self.d_tail


def plan_layout(D: int, dtype: torch.dtype) -> Layout:
    split = dtype != torch.bfloat16
    d_aug = (3 if split else 1) * D + NORM_COLS
    if d_aug <= MAX_RESIDENT:
        # The smallest pair of powers of two >= 16 covering d_aug (a tail of 0 when one block does).
        best = None
        for main in (16, 32, 64, 128, 256):
            for tail in (0, 16, 32, 64, 128):
                if main + tail >= d_aug and (tail == 0 or tail < main):
                    if best is None or main + tail < best[0] + best[1] or (main + tail == sum(best) and tail < best[1]):
                        best = (main, tail)
        return Layout(split, d_aug, best[0], best[1], 0)
    return Layout(split, d_aug, CHUNK_D, 0, cdiv(d_aug, CHUNK_D))


def bound_coefficient(layout: Layout, D: int) -> float:
    """E_i / S_i, see the module docstring."""
    coef = (layout.dpad + 4) * 2.0**-22 + (D + 2) * 2.0**-23 + (D + 3) * 2.0**-24
    return coef + (2.0**-16 if layout.split else 0.0)


def pack_bits(tiles: int) -> int:
    return max(1, (tiles - 1).bit_length())


def pack_rel(bits: int) -> float:
    # Replacing the low `bits` mantissa bits moves a value by < 2**bits ulp = 2**(bits - 23) relative; doubled to
    # cover the fp32 rounding of the threshold arithmetic itself.
    return 2.0 ** (bits - 22)


def _bf16_parts(x: torch.Tensor, parts: int) -> list:
    out = []
    rest = x
    for _ in range(parts):
        part = rest.to(torch.bfloat16)
        out.append(part)
        rest = rest - part.float()
    return out


def prepare_operands(z: torch.Tensor, codebook: torch.Tensor, layout: Layout, block_n: int, block_k: int):
    """(z_aug [NPAD, DPAD] bf16, c_aug [KPAD, DPAD] bf16, err [N] fp32); NPAD, KPAD: whole tiles, so the kernels
    load without masks. Plain torch: O((N + K) D) work per call."""
    N, D = z.shape
    K = codebook.shape[0]
    npad = max(cdiv(N, block_n), 1) * block_n
    kpad = cdiv(K, block_k) * block_k
    dpad = layout.dpad
    z32, c32 = z.float(), codebook.float()
    z_ok = torch.isfinite(z32).all(1)
    c_ok = torch.isfinite(c32).all(1)
    z32 = torch.where(z_ok[:, None], z32, 0.0)
    c32 = torch.where(c_ok[:, None], c32, 0.0)
    nz = 0.5 * (z32 * z32).sum(1)
    nc = 0.5 * (c32 * c32).sum(1)

    z_aug = torch.zeros(npad, dpad, dtype=torch.bfloat16, device=z.device)
    c_aug = torch.zeros(kpad, dpad, dtype=torch.bfloat16, device=z.device)
    if layout.split:
        zh, zl = _bf16_parts(z32, 2)
        ch, cl = _bf16_parts(c32, 2)
        z_aug[:N, 0:D], z_aug[:N, D:2 * D], z_aug[:N, 2 * D:3 * D] = zh, zl, zh
        c_aug[:K, 0:D], c_aug[:K, D:2 * D], c_aug[:K, 2 * D:3 * D] = -ch, -ch, -cl
        col = 3 * D
    else:
        z_aug[:N, 0:D] = z32.to(torch.bfloat16)  # exact: z is bf16 already
        c_aug[:K, 0:D] = -c32.to(torch.bfloat16)
        col = D
    z_aug[:N, col:col + 3] = 1.0
    c_aug[:K, col:col + 3] = torch.stack(_bf16_parts(nc, 3), 1)
    z_aug[:N, col + 3:col + 6] = torch.stack(_bf16_parts(nz, 3), 1)
    c_aug[:K, col + 3:col + 6] = 1.0
    # Padded and non-finite codes: a search value of about FAR, after every real code, under no threshold.
    c_aug[:K, col] = torch.where(c_ok, c_aug[:K, col], FAR)
    c_aug[K:, col] = FAR

    cmax = torch.where(c_ok, c32.norm(dim=1), 0.0).max()
    scale = (z32.norm(dim=1) + cmax) ** 2
    err = bound_coefficient(layout, D) * scale * (1.0 + 2.0**-10)  # the margin on the fp32 rounding of err itself
    err = torch.where(z_ok, err, float("nan"))
    return z_aug.contiguous(), c_aug.contiguous(), err


# ----------------------------------------------------------------------------------------------------------------
# Shared @triton.jit helpers: one search tile = one bf16 dot of the resident z tile against BLOCK_K codes.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def dot_bf16(a, b, acc, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        # Interpreter only: it keeps bf16 as raw uint16 and its dot would multiply bit patterns. bf16 products are
        # exact in fp32, so upcasting gives what the tensor cores compute (up to the accumulation order).
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def load_z_tile(z_ptr, rows, DPAD: tl.constexpr, COL0: tl.constexpr, WIDTH: tl.constexpr):
    # z_ptr: *bf16 [NPAD, DPAD]; rows int64 [BLOCK_N], all < NPAD (z_aug is padded to whole row tiles): no mask.
    offs = COL0 + tl.arange(0, WIDTH)
    return tl.load(z_ptr + rows[:, None] * DPAD + offs[None, :])


@triton.jit
def search_tile(z_main, z_tail, z_ptr, c_ptr, rows, k0,
                DPAD: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, D_CHUNKS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Search values of the BLOCK_N rows against codes [k0, k0 + BLOCK_K): fp32 [BLOCK_N, BLOCK_K]."""
    codes = k0 + tl.arange(0, BLOCK_K)
    c_cols = c_ptr + codes.to(tl.int64)[None, :] * DPAD
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if D_CHUNKS == 0:
        c_main = tl.load(c_cols + tl.arange(0, D_MAIN)[:, None])
        acc = dot_bf16(z_main, c_main, acc, UPCAST_DOT)
        if D_TAIL > 0:
            c_tail = tl.load(c_cols + D_MAIN + tl.arange(0, D_TAIL)[:, None])
            acc = dot_bf16(z_tail, c_tail, acc, UPCAST_DOT)
    else:
        for dc in range(D_CHUNKS):
            zc = tl.load(z_ptr + rows[:, None] * DPAD + dc * D_MAIN + tl.arange(0, D_MAIN)[None, :])
            cc = tl.load(c_cols + dc * D_MAIN + tl.arange(0, D_MAIN)[:, None])
            acc = dot_bf16(zc, cc, acc, UPCAST_DOT)
    return acc


@triton.jit
def load_resident(z_ptr, rows, DPAD: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
                  D_CHUNKS: tl.constexpr):
    """The resident z tiles (main, tail); placeholders of width 16 when the layout does not use them."""
    if D_CHUNKS == 0:
        z_main = load_z_tile(z_ptr, rows, DPAD, 0, D_MAIN)
    else:
        z_main = load_z_tile(z_ptr, rows, DPAD, 0, 16)
    if D_TAIL > 0:
        z_tail = load_z_tile(z_ptr, rows, DPAD, D_MAIN, D_TAIL)
    else:
        z_tail = load_z_tile(z_ptr, rows, DPAD, 0, 16)
    return z_main, z_tail
