// CPU k-nearest-codes search: tiled over the codebook, OpenMP (at::parallel_for) over blocks of rows, never the
// N x K distance matrix.
//
// Design (the FMA floor is 2*N*K*D flops; at k = 1, D = 8 one core runs at ~75-90 % of its FMA peak):
// - The codebook is packed once per call into panels of W = V * kLanes codes laid out [D][W] (fp32), with the
//   code norms ||c||^2 beside each panel; padding codes get norm +inf so they can never be kept.
// - The micro-kernel holds an R-rows x W-codes block of accumulators in registers and runs, per d, one FMA per
//   accumulator with a broadcast z value: acc = ||c||^2 + sum_d (-2 z_d) c_d, a chain of FMAs in d order.
// - ||z||^2 is not added per element: each row keeps a conservative filter f with  acc >= f  =>  dist >= thr,
//   where thr is the row's current k-th best distance (f = the next float above fl(thr - ||z||^2); see
//   update_filter). At k = 1 a row costs V vector mins and one compare per panel; only rows with a lane below f
//   take the rare slow path, which forms the exact dist = ||z||^2 + acc and keeps it when dist < thr.
// - A row visits the codes in ascending index order, so "strictly below the k-th best" is exactly the
//   lexicographic (dist, idx) order: ties go to the lowest index (csrc/row_topk_cpu.h has the invariants).
// - k = 1 keeps a running minimum and the panel it came from (the code itself is found once per row at the end).
//   k > 1 forms dist and appends every panel's codes with dist < thr (vector compress, branch-free: at k ~ 100
//   most panels hold a candidate, so a filter branch would mostly mispredict) to a buffer of k + 4 panels; when
//   it is full, it bisects for a new thr that leaves between k and k + 1 panel of them. Candidates are
//   ~k ln(K/k) per row of K codes.
// - Row blocks are independent and every row sees the same arithmetic whatever its block, thread or batch split,
//   so results are bit-identical across thread counts and across calls on slices of z.
// - NaN distances fail every ordered compare (and vminps drops them, see simd.h), so they are never kept; a row
//   left with fewer than k kept codes is completed with the lowest unused indices at +inf.
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
#include "row_topk_cpu.h"
#include "simd.h"

namespace tokpost {
namespace {

using row_topk::kInf;
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
// Candidate buffer: k + 4 panels, compacted to at most k + 1 panel when a panel might not fit. (Measured at
// k = 100, D = 8: 2 panels 15.7 ms, 4 panels 13.9 ms, 8 panels 14.2 ms per 2048 x 16384 rows x codes.)
constexpr int kBufferPanels = 4;
// Codebook bytes one tile of panels may take: kept in L1/L2 while every row group of a block sweeps it.
// (Measured flat from 8 KB to 256 KB at D = 8 and 64: the loop is compute-bound once a panel is in L1/L2.)
constexpr int64_t kTileBytes = 64 * 1024;
// Candidate-key workspace per thread and block.
constexpr int64_t kKeyBudgetBytes = 256 * 1024;
constexpr int64_t kMaxBlockRows = 240;

struct PackedCodebook {
  at::Tensor storage;  // keeps the panels alive
  const float* panels;  // [num_panels][D][kPanel]
  const float* norms;   // [num_panels][kPanel]; +inf for padding codes
  int64_t num_codes, dim, num_panels;
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
  at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* panel = panels + p * kPanel * D;
      for (int j = 0; j < kPanel; ++j) {
        const int64_t code = p * kPanel + j;
        float norm = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float c = code < K ? static_cast<float>(src[code * D + d]) : 0.f;
          panel[d * kPanel + j] = c;
          norm = std::fma(c, c, norm);
        }
        norms[p * kPanel + j] = code < K ? norm : kInf;
      }
    }
  });
  return {storage, panels, norms, K, D, P};
}

// R rows (zs: [R][D], already times -2) x panels [p0, p1); checks each row's filter once per panel.
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
      const vfloat f = simd::broadcast(s.filt);
      vfloat m = f;
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) m = simd::min_drop_nan(acc[r][v], m);
      // m holds no NaN when this passes (f is not NaN, or nothing would).
      if (__builtin_expect(simd::lt_mask(m, f) != 0, 0)) row_topk::on_min_hit(s, simd::hmin(m), int32_t(p));
    }
  }
}

// k == 1 rows record only the panel of their best distance (row_topk::on_min_hit); this finds the code: the
// first in the panel whose distance, recomputed with the sweep's exact arithmetic, equals the best.
void resolve_best_code(RowState& s, const float* zs_row, int64_t D, const PackedCodebook& cb) {
  const int64_t p = s.idx[0];
  const float* panel = cb.panels + p * kPanel * D;
  for (int j = 0; j < kPanel; ++j) {
    float acc = cb.norms[p * kPanel + j];
    for (int64_t d = 0; d < D; ++d) acc = std::fma(zs_row[d], panel[d * kPanel + j], acc);
    if (s.znorm + acc == s.thr) {
      s.idx[0] = int32_t(p * kPanel + j);
      return;
    }
  }
  TORCH_CHECK(false, "knn_search_cpu: internal error, best code of panel ", p, " not found");
}

template <typename scalar_t>
void search(const at::Tensor& z, const PackedCodebook& cb, int64_t k_max, bool sorted, RowK row_k, RowEmit emit) {
  const int64_t N = z.size(0), D = cb.dim;
  const scalar_t* zsrc = z.data_ptr<scalar_t>();
  const int64_t cap = k_max == 1 ? 1 : k_max + kBufferPanels * kPanel;
  const int64_t stride = cap + kLanes;  // + the overhang of the last compress store
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
    std::vector<float> zs(block * D);
    std::vector<RowState> states(block);
    std::vector<float> held_dist(block * stride);
    std::vector<int32_t> held_idx(block * stride);
    std::vector<uint64_t> keys, scratch;
    std::vector<int64_t> order;
    std::vector<float> out_dist(k_max);
    std::vector<int32_t> out_idx(k_max);
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
        s.dist = held_dist.data() + r * stride;
        s.idx = held_idx.data() + r * stride;
        s.count = 0;
        s.thr = kInf;
        if (r < rows) {
          s.row = order[r];
          float norm = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            const float x = static_cast<float>(zsrc[s.row * D + d]);
            zs[r * D + d] = -2.f * x;
            norm = std::fma(x, x, norm);
          }
          s.znorm = norm;
          s.k = int32_t(row_k(s.row));
          s.cap = s.k == 1 ? 1 : int32_t(s.k + kBufferPanels * kPanel);
          row_topk::update_filter(s);
        } else {  // padding row of the last group: computes on zeros, never hits
          std::fill_n(zs.data() + r * D, D, 0.f);
          s.znorm = 0.f;
          s.row = -1;
          s.k = 1;
          s.cap = 1;
          s.filt = -kInf;
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
        if (states[r].k == 1 && states[r].count == 1) resolve_best_code(states[r], zs.data() + r * D, D, cb);
        row_topk::finish(states[r], sorted, out_dist.data(), out_idx.data(), keys, scratch);
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
