// Declarations of every kernel entry point; registration.cpp binds them to the schemas per dispatch key.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace tokpost {

// knn_codes(Tensor z, Tensor codebook, int k) -> (Tensor dist, Tensor idx)
std::tuple<at::Tensor, at::Tensor> knn_codes_cpu(const at::Tensor& z, const at::Tensor& codebook, int64_t k);
// perturb_codes(Tensor z, Tensor codebook, int topk, int threshold, int seed, int position_offset)
//   -> (Tensor idx, Tensor idx_perturbed)
std::tuple<at::Tensor, at::Tensor> perturb_codes_cpu(const at::Tensor& z, const at::Tensor& codebook, int64_t topk,
                                                     int64_t threshold, int64_t seed, int64_t position_offset);
// codebook_lookup(Tensor idx, Tensor codebook) -> Tensor
at::Tensor codebook_lookup_cpu(const at::Tensor& idx, const at::Tensor& codebook);
// codebook_lookup_backward(Tensor grad_out, Tensor idx, int num_codes) -> Tensor
at::Tensor codebook_lookup_backward_cpu(const at::Tensor& grad_out, const at::Tensor& idx, int64_t num_codes);

#ifdef TOKPOST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> knn_codes_cuda(const at::Tensor& z, const at::Tensor& codebook, int64_t k);
std::tuple<at::Tensor, at::Tensor> perturb_codes_cuda(const at::Tensor& z, const at::Tensor& codebook, int64_t topk,
                                                      int64_t threshold, int64_t seed, int64_t position_offset);
at::Tensor codebook_lookup_cuda(const at::Tensor& idx, const at::Tensor& codebook);
at::Tensor codebook_lookup_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx, int64_t num_codes);
#endif

}  // namespace tokpost
