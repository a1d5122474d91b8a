// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
// the counter-based generator behind torch's CUDA RNG and Random123. One call maps a
// 128-bit counter and a 64-bit key to 128 random bits; nothing is stored between calls,
// so host and device code produce the same words for the same (counter, key).
//
// Compiled as __host__ __device__ by nvcc and as plain inline C++ by g++. Pure integer
// arithmetic: the result does not depend on the compiler or its flags.
//
// Known answers (Random123 kat_vectors, philox4x32_10):
//   ctr 00000000 00000000 00000000 00000000, key 00000000 00000000
//     -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8
//   ctr ffffffff ffffffff ffffffff ffffffff, key ffffffff ffffffff
//     -> 408f276d 41c83b0e a20bc7c6 6d5451fd
//   ctr 243f6a88 85a308d3 13198a2e 03707344, key a4093822 299f31d0
//     -> d16cfe09 94fdcceb 5001e420 24126ea1
//
// The mapping of these words to uniforms and normals is in ltg.h (pf::uniform, pf::normal).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define PF_HD __host__ __device__ __forceinline__
#else
#define PF_HD inline __attribute__((always_inline))
#endif

// Full unrolling of the short fixed loops (rounds, series terms), so that the CPU loop over
// patches is one straight-line body the compiler can vectorise.
#if defined(__CUDACC__)
#define PF_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define PF_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define PF_UNROLL _Pragma("GCC unroll 32")
#else
#define PF_UNROLL
#endif

namespace pf {

struct u32x4 {
  uint32_t x, y, z, w;  // counter words 0..3 (or output words 0..3)
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key schedule: golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key schedule: sqrt(3) - 1

// hi:lo = a * b, the full 64-bit product of two 32-bit words.
PF_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// One round: (c0, c1, c2, c3) -> (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0)).
PF_HD u32x4 philox_round(u32x4 c, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(kPhiloxM0, c.x, hi0, lo0);
  mulhilo32(kPhiloxM1, c.z, hi1, lo1);
  return u32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
}

// Ten rounds; the key is bumped by (W0, W1) between rounds (nine bumps in all).
PF_HD u32x4 philox4x32_10(u32x4 ctr, uint32_t k0, uint32_t k1) {
  PF_UNROLL
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    ctr = philox_round(ctr, k0, k1);
  }
  return ctr;
}

}  // namespace pf
