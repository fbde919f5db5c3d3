// Shared argument checks and small helpers for the tokpost_fast._C ops.
// Style follows flash-attention's csrc/flash_attn/flash_api.cpp: every entry point checks device, dtype, shape and
// contiguity up front with TORCH_CHECK, naming the argument, so a bad call is a RuntimeError and never a crash.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#define CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define CHECK_SHAPE(x, ...)                                                                           \
  TORCH_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must be ", (n), "-D, got ", (x).dim(), "-D")
#define CHECK_FLOAT_DTYPE(x)                                                                     \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||             \
                  (x).scalar_type() == at::kBFloat16,                                          \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())

// fp32, fp16 and bf16 only (AT_DISPATCH_FLOATING_TYPES_AND2 would also instantiate double, which is rejected).
#define TOKPOST_DISPATCH_FLOAT(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace tokpost {

// codebook_lookup_backward (CPU and CUDA): a code's rows are summed in chunks of this many rows, in row order, then
// the chunk sums in chunk order, all in fp32. Fixed, so the result is the same bits on every run, thread count and
// device; small enough that a collapsed codebook (every row on one code) spreads over N / 256 parallel chunks.
constexpr int64_t kLookupChunkRows = 256;

// Checks shared by knn_codes and perturb_codes on every device: z [N, D] and codebook [K, D], same float dtype,
// contiguous, same device.
inline void check_z_codebook(const at::Tensor& z, const at::Tensor& codebook, c10::DeviceType dev) {
  CHECK_DEVICE(z, dev);
  CHECK_DEVICE(codebook, dev);
  CHECK_DIM(z, 2);
  CHECK_DIM(codebook, 2);
  CHECK_FLOAT_DTYPE(z);
  CHECK_FLOAT_DTYPE(codebook);
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), "z (", z.scalar_type(), ") and codebook (",
              codebook.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(codebook.size(0) > 0, "codebook is empty (K = 0)");
  TORCH_CHECK(codebook.size(1) > 0, "codebook has D = 0");
  TORCH_CHECK(z.size(1) == codebook.size(1), "z's dim (", z.size(1), ") must equal codebook's dim D (",
              codebook.size(1), ")");
  TORCH_CHECK(codebook.size(0) <= INT32_MAX, "codebook has more than 2**31 - 1 codes");
  CHECK_CONTIGUOUS(z);
  CHECK_CONTIGUOUS(codebook);
}

inline void check_k(const char* name, int64_t k, int64_t num_codes) {
  TORCH_CHECK(k >= 1, name, " must be >= 1, got ", k);
  TORCH_CHECK(k <= num_codes, name, " (", k, ") must be <= the number of codes K (", num_codes, ")");
}

inline void check_perturb_args(int64_t topk, int64_t threshold, int64_t seed, int64_t position_offset,
                               int64_t num_codes) {
  check_k("topk", topk, num_codes);
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 32), "threshold must be in [0, 2**32], got ", threshold);
  TORCH_CHECK(seed >= 0, "seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(position_offset >= 0, "position_offset must be >= 0, got ", position_offset);
}

inline void check_lookup(const at::Tensor& idx, const at::Tensor& codebook, c10::DeviceType dev) {
  CHECK_DEVICE(idx, dev);
  CHECK_DEVICE(codebook, dev);
  CHECK_DIM(idx, 1);
  CHECK_DIM(codebook, 2);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  CHECK_FLOAT_DTYPE(codebook);
  TORCH_CHECK(codebook.size(0) > 0, "codebook is empty (K = 0)");
  CHECK_CONTIGUOUS(idx);
  CHECK_CONTIGUOUS(codebook);
}

inline void check_lookup_backward(const at::Tensor& grad_out, const at::Tensor& idx, int64_t num_codes,
                                  c10::DeviceType dev) {
  CHECK_DEVICE(grad_out, dev);
  CHECK_DEVICE(idx, dev);
  CHECK_DIM(grad_out, 2);
  CHECK_DIM(idx, 1);
  CHECK_FLOAT_DTYPE(grad_out);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  CHECK_SHAPE(idx, grad_out.size(0));  // one index per row of grad_out
  TORCH_CHECK(num_codes >= 1, "num_codes must be >= 1, got ", num_codes);
  TORCH_CHECK(num_codes <= INT32_MAX, "num_codes must be < 2**31, got ", num_codes);
  CHECK_CONTIGUOUS(grad_out);
  CHECK_CONTIGUOUS(idx);
}

}  // namespace tokpost
