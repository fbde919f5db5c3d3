// codebook_lookup and its deterministic backward on the CPU.
// Backward: a stable counting sort groups the rows by code (row order kept within a code); each code's rows are
// summed in fixed chunks, then the chunk sums in chunk order, all in fp32 (common.h: kLookupChunkRows). The result
// does not depend on the thread count, uses no atomics, and equals the CUDA kernel's bit for bit.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "common.h"
#include "ops.h"

namespace tokpost {

at::Tensor codebook_lookup_cpu(const at::Tensor& idx, const at::Tensor& codebook) {
  check_lookup(idx, codebook, at::kCPU);
  const int64_t N = idx.size(0), K = codebook.size(0), D = codebook.size(1);
  at::Tensor out = at::empty({N, D}, codebook.options());
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  const int64_t row_bytes = D * codebook.element_size();
  const char* src = static_cast<const char*>(codebook.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  // An out-of-range index is reported after the parallel region (TORCH_CHECK must not throw inside it).
  std::atomic<bool> any_bad{false};
  std::atomic<int64_t> bad_code{0};
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t code = idx_ptr[n];
      if (code < 0 || code >= K) {
        bad_code.store(code);
        any_bad.store(true);
        std::memset(dst + n * row_bytes, 0, row_bytes);
        continue;
      }
      std::memcpy(dst + n * row_bytes, src + code * row_bytes, row_bytes);
    }
  });
  TORCH_CHECK(!any_bad.load(), "idx holds ", bad_code.load(),
              ", outside the codebook's range [0, ", K - 1, "]");
  return out;
}

at::Tensor codebook_lookup_backward_cpu(const at::Tensor& grad_out, const at::Tensor& idx, int64_t num_codes) {
  check_lookup_backward(grad_out, idx, num_codes, at::kCPU);
  const int64_t N = idx.size(0), K = num_codes, D = grad_out.size(1);
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  // Stable counting sort of the rows by code.
  std::vector<int64_t> offsets(K + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t code = idx_ptr[n];
    TORCH_CHECK(code >= 0 && code < K, "idx holds ", code, ", outside the codebook's range [0, ", K - 1, "]");
    ++offsets[code + 1];
  }
  for (int64_t c = 0; c < K; ++c) offsets[c + 1] += offsets[c];
  std::vector<int64_t> order(N);
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t n = 0; n < N; ++n) order[cursor[idx_ptr[n]]++] = n;
  }
  // Each code's rows are cut into chunks of kLookupChunkRows from the segment's start; chunk_start[c] is code c's
  // first chunk. Chunks are summed in parallel (a collapsed codebook, every row on one code, still spreads over
  // all threads), then each code adds its chunk sums in chunk order: the csrc/codebook_lookup_cuda.cu order too.
  std::vector<int64_t> chunk_start(K + 1, 0);
  for (int64_t c = 0; c < K; ++c)
    chunk_start[c + 1] = chunk_start[c] + (offsets[c + 1] - offsets[c] + kLookupChunkRows - 1) / kLookupChunkRows;
  const int64_t num_chunks = chunk_start[K];
  std::vector<float> partial(size_t(num_chunks * D));
  at::Tensor grad_codebook = at::empty({K, D}, grad_out.options());
  TOKPOST_DISPATCH_FLOAT(grad_out.scalar_type(), "codebook_lookup_backward_cpu", [&] {
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    scalar_t* out = grad_codebook.data_ptr<scalar_t>();
    at::parallel_for(0, num_chunks, 16, [&](int64_t m0, int64_t m1) {
      int64_t c = std::upper_bound(chunk_start.begin(), chunk_start.end(), m0) - chunk_start.begin() - 1;
      for (int64_t m = m0; m < m1; ++m) {
        while (chunk_start[c + 1] <= m) ++c;
        const int64_t j0 = offsets[c] + (m - chunk_start[c]) * kLookupChunkRows;
        const int64_t j1 = std::min(offsets[c + 1], j0 + kLookupChunkRows);
        float* acc = partial.data() + m * D;
        std::fill_n(acc, D, 0.f);
        for (int64_t j = j0; j < j1; ++j) {  // row order within the chunk
          const scalar_t* row = g + order[j] * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(row[d]);
        }
      }
    });
    at::parallel_for(0, K, 256, [&](int64_t c0, int64_t c1) {
      std::vector<float> acc(D);
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t m = chunk_start[c]; m < chunk_start[c + 1]; ++m)  // chunk order
          for (int64_t d = 0; d < D; ++d) acc[d] += partial[m * D + d];
        for (int64_t d = 0; d < D; ++d) out[c * D + d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return grad_codebook;
}

}  // namespace tokpost
