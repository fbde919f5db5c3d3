// CPU k-nearest-codes search: tiled over the codebook, OpenMP (at::parallel_for) over blocks of rows, never the
// N x K distance matrix. Exact under the contract of docs/INTERFACES.md: a fast expanded-form search collects
// every code within its error bound of the row's k-th best, and those candidates are re-ranked by the difference
// form (csrc/exact_rerank_cpu.h), which is the distance returned.
//
// Search (the FMA floor is 2*N*K*D flops; at k = 1, D = 8 one core runs at ~75-90 % of its FMA peak):
// - The codebook is packed once per call into panels of W = V * kLanes codes laid out [D][W] (fp32), with the
//   code norms ||c||^2 beside each panel; padding codes get norm +inf so they can never be kept.
// - The micro-kernel holds an R-rows x W-codes block of accumulators in registers and runs, per d, one FMA per
//   accumulator with a broadcast z value: acc = ||c||^2 + sum_d (-2 z_d) c_d, a chain of FMAs in d order. acc is
//   the expanded distance minus ||z||^2 (a row constant), so it orders codes the same way.
// - Error bound of acc against the exact ||c||^2 - 2 z.c: the chain is a recursive sum of D + 1 terms after a
//   D-term norm, so |err| <= gamma_D (2 + gamma_D) (||z|| + ||c||)^2 ~ 2 D u B with u = 2^-24 and
//   B = (||z|| + max_j ||c_j||)^2; the difference form errs by at most gamma_{D+2} B. The window must cover both
//   (the k-th search value and the true code each move by search + difference error), so
//       E_i = (4 D + 8) u B_i  (+ an absolute term for gradual underflow)
//   and the candidates of row i are all codes with acc <= s_k(i) + 2 E_i. Rows whose B_i exceeds 2^100 (no fp32
//   overflow is possible below it) skip the search and take the full difference-form pass, as do rows whose
//   candidates overflow their buffer.
// - k = 1 keeps a running minimum (V vector mins and one compare per panel) and, on the rare panel whose minimum
//   falls inside the window, appends that panel's codes inside it. k > 1 appends every code inside the window
//   (vector compress, branch-free: at k ~ 100 most panels hold a candidate) to a buffer of k + 4 panels; when it
//   is full it bisects for a new k-th bound and drops what left the window. Candidates are ~k ln(K/k) per row.
// - The re-rank reads the candidates' rows (fp32, row-major) and computes their difference form (exact_rerank_cpu.h);
//   a row in the full pass computes it for every code, panel by panel, keeping a running k-th best.
// - Row blocks are independent and every row sees the same arithmetic whatever its block, thread or batch split,
//   so results are bit-identical across thread counts and across calls on slices of z.
#include "knn_search_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "exact_rerank_cpu.h"
#include "row_topk_cpu.h"
#include "simd.h"

namespace tokpost {
namespace {

using row_topk::kInf;
using row_topk::RowMode;
using row_topk::RowState;
using simd::kLanes;
using simd::vfloat;

#if defined(__AVX512F__)
constexpr int kRows = 6;  // 6 x 4 zmm accumulators + 4 codebook vectors of the 32 registers
constexpr int kVecs = 4;
#elif defined(__AVX2__)
constexpr int kRows = 3;  // 3 x 3 ymm accumulators + 3 codebook vectors of the 16 registers
constexpr int kVecs = 3;
#else
constexpr int kRows = 4;
constexpr int kVecs = 4;
#endif
constexpr int kPanel = kVecs * kLanes;  // codes per panel
// Candidate buffer: k + 4 panels (at least row_topk::kNearestCandidates), compacted to about k + 1 panel when a
// panel might not fit. (Measured at k = 100, D = 8, before the exact re-rank: 2 panels 15.7 ms, 4 panels 13.9 ms,
// 8 panels 14.2 ms per 2048 x 16384 rows x codes.)
constexpr int kBufferPanels = 4;
// A row's buffer for k codes; at least kNearestCandidates: near-tie data (a cluster of codes inside every row's
// window) then rarely overflows.
inline int64_t candidate_cap(int64_t k) {
  return std::max<int64_t>(row_topk::kNearestCandidates, k + kBufferPanels * kPanel);
}
// Codebook bytes one tile of panels may take: kept in L1/L2 while every row group of a block sweeps it.
// (Measured flat from 8 KB to 256 KB at D = 8 and 64: the loop is compute-bound once a panel is in L1/L2.)
constexpr int64_t kTileBytes = 64 * 1024;
// Candidate-key workspace per thread and block.
constexpr int64_t kKeyBudgetBytes = 256 * 1024;
constexpr int64_t kMaxBlockRows = 240;
// B_i above this takes the full pass: every fp32 term of both forms stays far from overflow below it.
constexpr double kMaxBound = 0x1p100;

struct PackedCodebook {
  at::Tensor storage, rows_storage;  // keep the panels and the fp32 rows alive
  const float* panels;  // [num_panels][D][kPanel]
  const float* norms;   // [num_panels][kPanel]; +inf for padding codes
  const float* rows;    // [K][D] fp32: the re-rank gathers whole codes (one cache line at small D)
  int64_t num_codes, dim, num_panels;
  double max_norm;  // max ||c_j|| (float64) over codes with only finite entries
};

template <typename scalar_t>
PackedCodebook pack_codebook(const at::Tensor& codebook) {
  const int64_t K = codebook.size(0), D = codebook.size(1);
  const int64_t P = (K + kPanel - 1) / kPanel;
  // One allocation: panels then norms (CPU allocations are 64-byte aligned; both parts stay multiples of 64 B).
  at::Tensor storage = at::empty({P * kPanel * (D + 1)}, codebook.options().dtype(at::kFloat));
  float* panels = storage.data_ptr<float>();
  float* norms = panels + P * kPanel * D;
  const scalar_t* src = codebook.data_ptr<scalar_t>();
  std::vector<double> panel_max(P, 0.0);
  at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* panel = panels + p * kPanel * D;
      for (int j = 0; j < kPanel; ++j) {
        const int64_t code = p * kPanel + j;
        float norm = 0.f;
        double norm64 = 0.0;
        bool finite = true;
        for (int64_t d = 0; d < D; ++d) {
          const float c = code < K ? static_cast<float>(src[code * D + d]) : 0.f;
          panel[d * kPanel + j] = c;
          norm = std::fma(c, c, norm);
          norm64 += double(c) * double(c);
          finite = finite && std::isfinite(c);
        }
        norms[p * kPanel + j] = code < K ? norm : kInf;
        // A code with a NaN/inf entry is at +inf from every row (both forms), so it never bounds the error.
        if (finite) panel_max[p] = std::max(panel_max[p], std::sqrt(norm64));
      }
    }
  });
  const double max_norm = *std::max_element(panel_max.begin(), panel_max.end());
  at::Tensor rows_storage = codebook.scalar_type() == at::kFloat ? codebook : codebook.to(at::kFloat);
  return {storage, rows_storage, panels, norms, rows_storage.data_ptr<float>(), K, D, P, max_norm};
}

// R rows (zs: [R][D], already times -2) x panels [p0, p1); checks each row's window once per panel.
// kD > 0 fixes D at compile time (the d loop unrolls); kD = 0 reads it at run time.
template <int R, int kD>
void sweep(const float* __restrict zs, int64_t dim, const PackedCodebook& cb, int64_t p0, int64_t p1,
           RowState* states) {
  const int64_t D = kD > 0 ? kD : dim;
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict panel = cb.panels + p * kPanel * D;
    const float* __restrict norms = cb.norms + p * kPanel;
    vfloat acc[R][kVecs];
    {  // d = 0 starts from the norms: acc = ||c||^2 + (-2 z_0) c_0
      vfloat c[kVecs];
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) c[v] = simd::load(panel + v * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vfloat zb = simd::broadcast(zs[r * D]);
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) acc[r][v] = simd::fmadd(zb, c[v], simd::load(norms + v * kLanes));
      }
    }
#pragma GCC unroll 16
    for (int64_t d = 1; d < D; ++d) {
      vfloat c[kVecs];
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) c[v] = simd::load(panel + d * kPanel + v * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vfloat zb = simd::broadcast(zs[r * D + d]);
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) acc[r][v] = simd::fmadd(zb, c[v], acc[r][v]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      RowState& s = states[r];
      if (s.k > 1) {  // same for all rows of a group but the one group where a block's k == 1 rows end
        row_topk::append_panel<kVecs>(s, acc[r], int32_t(p * kPanel));
        continue;
      }
      const vfloat w = simd::broadcast(s.win);
      vfloat m = w;
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) m = simd::min_drop_nan(acc[r][v], m);
      // m holds no NaN when this passes (win is not NaN, or nothing would).
      if (__builtin_expect(simd::lt_mask(m, w) != 0, 0))
        row_topk::on_min_hit<kVecs>(s, simd::hmin(m), acc[r], int32_t(p * kPanel));
    }
  }
}

struct RowScratch {
  std::vector<uint64_t> keys, sort_scratch;
  std::vector<float> dist_held, squares;
  alignas(64) float dist[kPanel];
};

// The difference form for every code, keeping the k smallest (dist, idx) keys seen so far: codes arrive in index
// order, so once k are kept a later code needs a strictly smaller dist.
void full_pass(const float* zf_row, const PackedCodebook& cb, int64_t k, RowScratch& w) {
  auto& keys = w.keys;
  const size_t trim_at = size_t(2 * k + kPanel);
  float thr = kInf;  // every finite dist passes until k are kept
  for (int64_t p = 0; p < cb.num_panels; ++p) {
    exact::diff_dist_panel<kVecs>(zf_row, cb.panels + p * kPanel * cb.dim, cb.dim, w.dist);
    const vfloat t = simd::broadcast(thr);
    uint32_t hits[kVecs];
    bool any = false;
    for (int v = 0; v < kVecs; ++v) any |= (hits[v] = simd::lt_mask(simd::load(w.dist + v * kLanes), t)) != 0;
    if (!any) continue;
    for (int v = 0; v < kVecs; ++v)
      for (uint32_t m = hits[v]; m; m &= m - 1) {
        const int j = v * kLanes + __builtin_ctz(m);
        if (p * kPanel + j < cb.num_codes) keys.push_back(row_topk::make_key(w.dist[j], int32_t(p * kPanel + j)));
      }
    if (keys.size() >= trim_at) {
      std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
      keys.resize(size_t(k));
      thr = row_topk::key_dist(*std::max_element(keys.begin(), keys.end()));
    }
  }
}

// The row's k nearest by the difference form into dist/idx (ascending; sorted = false: [0] and [k - 1] only).
void finish_row(RowState& s, const float* zf_row, const PackedCodebook& cb, bool sorted, float* dist, int32_t* idx,
                RowScratch& w) {
  const int64_t D = cb.dim, k = s.k;
  auto& keys = w.keys;
  keys.clear();  // kNonFinite keeps none: select_k then gives codes 0..k-1 at +inf
  if (s.mode == RowMode::kFullPass) {
    full_pass(zf_row, cb, k, w);
  } else if (s.mode == RowMode::kSearch) {
    // Narrow the window to the k-th smallest acc (k = 1: the minimum; k > 1: it, or a value with exactly k held at
    // or below it, so no smaller than it): every code still held is a candidate. Fewer than k held: all are.
    if (k == 1 && s.count > 0) row_topk::narrow_to(s, s.thr);
    if (k > 1 && s.count > k) row_topk::compact(s, 0);
    w.dist_held.resize(size_t(s.count));
    exact::diff_dist_codes(zf_row, cb.rows, D, s.idx, s.count, w.dist_held.data(), w.squares);
    for (int h = 0; h < s.count; ++h)
      if (w.dist_held[h] < kInf) keys.push_back(row_topk::make_key(w.dist_held[h], s.idx[h]));
  }
  exact::select_k(keys, k, sorted, dist, idx, w.sort_scratch);
}

// Row setup: fp32 z, -2 z for the sweep, the error window, and the mode (csrc/row_topk_cpu.h).
template <typename scalar_t>
void init_row(RowState& s, int64_t row, int64_t k, const scalar_t* zsrc, const PackedCodebook& cb, float* zf,
              float* zs) {
  const int64_t D = cb.dim;
  double norm2 = 0.0;
  bool finite = true;
  for (int64_t d = 0; d < D; ++d) {
    const float x = static_cast<float>(zsrc[row * D + d]);
    zf[d] = x;
    zs[d] = -2.f * x;
    norm2 += double(x) * double(x);
    finite = finite && std::isfinite(x);
  }
  s.row = row;
  s.k = int32_t(k);
  s.cap = int32_t(candidate_cap(k));
  s.count = 0;
  s.thr = kInf;
  s.e2 = 0.f;
  const double bound = (std::sqrt(norm2) + cb.max_norm) * (std::sqrt(norm2) + cb.max_norm);
  if (!finite) {
    s.mode = RowMode::kNonFinite;
    s.win = -kInf;
  } else if (!(bound <= kMaxBound)) {
    s.mode = RowMode::kFullPass;
    s.win = -kInf;
  } else {
    const double width = 2.0 * (4.0 * D + 8.0) * (0x1p-24 * bound + 0x1p-140);  // 2 E_i
    float e2 = float(width);
    if (double(e2) < width) e2 = row_topk::next_up(e2);
    s.mode = RowMode::kSearch;
    s.e2 = e2;
    s.win = kInf;  // = next_up(thr + e2) while thr = +inf
  }
}

template <typename scalar_t>
void search(const at::Tensor& z, const PackedCodebook& cb, int64_t k_max, bool sorted, RowK row_k, RowEmit emit) {
  const int64_t N = z.size(0), D = cb.dim;
  const scalar_t* zsrc = z.data_ptr<scalar_t>();
  const int64_t stride = candidate_cap(k_max) + kLanes;  // + the overhang of the last compress store
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t block = std::min<int64_t>(kMaxBlockRows, std::max<int64_t>(1, kKeyBudgetBytes / (stride * 8)));
  // At least ~4 blocks per thread when N allows, for balance.
  block = std::min<int64_t>(block, (N + 4 * threads - 1) / (4 * threads));
  block = std::max<int64_t>(kRows, block / kRows * kRows);
  const int64_t num_blocks = (N + block - 1) / block;
  const int64_t tile_panels = std::max<int64_t>(1, kTileBytes / (D * kPanel * 4));

  // Blocks are handed out dynamically (an atomic counter) rather than split statically: on a shared machine a
  // descheduled thread would otherwise hold back the whole call. A row's result never depends on its thread.
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, std::min(threads, num_blocks), 1, [&](int64_t, int64_t) {
    std::vector<float> zs(block * D), zf(block * D);
    std::vector<RowState> states(block);
    std::vector<float> held_acc(block * stride);
    std::vector<int32_t> held_idx(block * stride);
    std::vector<int64_t> order;
    std::vector<float> out_dist(k_max);
    std::vector<int32_t> out_idx(k_max);
    RowScratch scratch;
    for (int64_t b = next_block++; b < num_blocks; b = next_block++) {
      const int64_t n0 = b * block, rows = std::min(block, N - n0);
      // k == 1 rows first, then the others (stable): row groups are then uniform in the sweep's k == 1 branch
      // (perturb_codes mixes both kinds).
      order.clear();
      for (int64_t r = 0; r < rows; ++r)
        if (row_k(n0 + r) == 1) order.push_back(n0 + r);
      for (int64_t r = 0; r < rows; ++r)
        if (row_k(n0 + r) != 1) order.push_back(n0 + r);
      for (int64_t r = 0; r < block; ++r) {
        RowState& s = states[r];
        s.acc = held_acc.data() + r * stride;
        s.idx = held_idx.data() + r * stride;
        if (r < rows) {
          init_row<scalar_t>(s, order[r], row_k(order[r]), zsrc, cb, zf.data() + r * D, zs.data() + r * D);
        } else {  // padding row of the last group: computes on zeros, never hits
          std::fill_n(zs.data() + r * D, D, 0.f);
          s.row = -1;
          s.k = 1;
          s.cap = 1;
          s.count = 0;
          s.thr = kInf;
          s.win = -kInf;
          s.mode = RowMode::kNonFinite;
        }
      }
      const int64_t groups = (rows + kRows - 1) / kRows;
      for (int64_t p0 = 0; p0 < cb.num_panels; p0 += tile_panels) {
        const int64_t p1 = std::min(cb.num_panels, p0 + tile_panels);
        for (int64_t g = 0; g < groups; ++g) {
          const float* zg = zs.data() + g * kRows * D;
          RowState* sg = states.data() + g * kRows;
          switch (D) {  // the LlamaGen (8) and small-latent sizes get an unrolled d loop
            case 4: sweep<kRows, 4>(zg, D, cb, p0, p1, sg); break;
            case 8: sweep<kRows, 8>(zg, D, cb, p0, p1, sg); break;
            case 16: sweep<kRows, 16>(zg, D, cb, p0, p1, sg); break;
            default: sweep<kRows, 0>(zg, D, cb, p0, p1, sg); break;
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        finish_row(states[r], zf.data() + r * D, cb, sorted, out_dist.data(), out_idx.data(), scratch);
        emit(states[r].row, out_dist.data(), out_idx.data(), states[r].k);
      }
    }
  });
}

}  // namespace

void knn_search_cpu(const at::Tensor& z, const at::Tensor& codebook, int64_t k_max, bool sorted, RowK row_k,
                    RowEmit emit) {
  if (z.size(0) == 0) return;
  TOKPOST_DISPATCH_FLOAT(z.scalar_type(), "knn_search_cpu", [&] {
    const PackedCodebook cb = pack_codebook<scalar_t>(codebook);
    search<scalar_t>(z, cb, k_max, sorted, row_k, emit);
  });
}

}  // namespace tokpost
