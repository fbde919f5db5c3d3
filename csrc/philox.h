// Philox4x32-10 (Random123), host and device, and the perturbation rank of METHOD.md A2.
// The contract is tokpost_fast/ops/philox.py (change every backend together):
//   key = (seed lo32, seed hi32), counter = (p lo32, p hi32, PERTURB_STREAM, 0), p = the token's position
//   resample = r0 < threshold (64-bit compare, threshold in [0, 2**32]); rank = resample ? (r1 * topk) >> 32 : 0
// Only integer arithmetic decides, so the CPU, CUDA, Triton and PyTorch backends agree bit for bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TOKPOST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TOKPOST_HOST_DEVICE inline
#endif

namespace tokpost {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
// c2 of the counter; equals tokpost_fast.ops.philox.PERTURB_STREAM.
constexpr uint32_t kPerturbStream = 0u;

struct Philox4 {
  uint32_t r[4];
};

TOKPOST_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                          uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kPhiloxM0) * c0;
    const uint64_t p1 = uint64_t(kPhiloxM1) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The rank (0 = the nearest code) the token at `position` takes; in [0, topk).
TOKPOST_HOST_DEVICE int64_t perturb_rank(uint64_t seed, uint64_t position, int64_t threshold, int64_t topk) {
  const Philox4 r = philox4x32_10(uint32_t(position), uint32_t(position >> 32), kPerturbStream, 0u, uint32_t(seed),
                                  uint32_t(seed >> 32));
  if (int64_t(r.r[0]) >= threshold) return 0;
  return int64_t((uint64_t(r.r[1]) * uint64_t(topk)) >> 32);
}

}  // namespace tokpost
