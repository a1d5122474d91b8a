// LTG on the CPU: rows in parallel (at::parallel_for); within a row, blocks of kBlock
// patches: first the Philox words of the block, then the math of ltg.h over the block.
//
// Philox is most of the cost. Compilers vectorise its 32x32->64-bit products poorly, so on
// x86-64 CPUs with AVX2 (checked at run time) eight counters go through the rounds at once
// with _mm256_mul_epu32; elsewhere the portable philox4x32_10 of philox.h runs per counter.
// The math loop is branch-free and auto-vectorised (in the AVX2 function too). Vector or
// scalar, each value is the same sequence of IEEE operations (the build passes
// -ffp-contract=off, so no FMA contraction), so results do not depend on the path taken:
// tests/test_ltg_op.py checks them bit for bit against a pure-Python model.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>

#include "ltg.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define PF_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace pf {
namespace {

constexpr int64_t kBlock = 64;  // patches per block: the words fit in L1 (3 x 256 B)

// Stream-0 words of the counters first .. first + n - 1 (n <= kBlock), portable.
void philox_block(uint64_t first, int64_t n, uint32_t k0, uint32_t k1, uint32_t* w0, uint32_t* w1,
                  uint32_t* w2) {
  for (int64_t j = 0; j < n; ++j) {
    const u32x4 w = philox4x32_10(ltg_counter(first + static_cast<uint64_t>(j), kPatchStream), k0, k1);
    w0[j] = w.x;
    w1[j] = w.y;
    w2[j] = w.z;
  }
}

// The math over one block: out[j] from the words of patch j.
template <typename T>
inline void math_block(T* __restrict out, int64_t n, const uint32_t* __restrict w0,
                      const uint32_t* __restrict w1, const uint32_t* __restrict w2, LtgRow<T> row) {
  for (int64_t j = 0; j < n; ++j) out[j] = ltg_patch_from_words<T>(w0[j], w1[j], w2[j], row);
}

// out_row: (num_patches,); its counters are first .. first + num_patches - 1.
template <typename T>
void fill_row_portable(T* out_row, int64_t num_patches, uint32_t k0, uint32_t k1, uint64_t first,
                       LtgRow<T> row) {
  alignas(64) uint32_t w0[kBlock], w1[kBlock], w2[kBlock];
  for (int64_t i = 0; i < num_patches; i += kBlock) {
    const int64_t n = std::min(kBlock, num_patches - i);
    philox_block(first + static_cast<uint64_t>(i), n, k0, k1, w0, w1, w2);
    math_block<T>(out_row + i, n, w0, w1, w2, row);
  }
}

#if defined(PF_HAVE_AVX2_PATH)
// hi:lo = a * m for eight 32-bit lanes: _mm256_mul_epu32 multiplies the even lanes into
// 64-bit products; the odd lanes are shifted down and multiplied the same way.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox_block for eight counters at a time (n a multiple of 8 up to the tail).
__attribute__((target("avx2"))) void philox_block_avx2(uint64_t first, int64_t n, uint32_t k0,
                                                       uint32_t k1, uint32_t* w0, uint32_t* w1,
                                                       uint32_t* w2) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int l = 0; l < 8; ++l) {  // 64-bit counters: the carry may cross lanes
      const uint64_t c = first + static_cast<uint64_t>(j + l);
      lo[l] = static_cast<uint32_t>(c);
      hi[l] = static_cast<uint32_t>(c >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(kPatchStream));
    __m256i c3 = _mm256_setzero_si256();
    uint32_t key0 = k0, key1 = k1;
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        key0 += kPhiloxW0;
        key1 += kPhiloxW1;
      }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, hi0, lo0);
      mulhilo8(c2, m1, hi1, lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(key0)));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(key1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + j), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + j), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + j), c2);
  }
  philox_block(first + static_cast<uint64_t>(j), n - j, k0, k1, w0 + j, w1 + j, w2 + j);
}

template <typename T>
__attribute__((target("avx2"))) void fill_row_avx2(T* out_row, int64_t num_patches, uint32_t k0,
                                                   uint32_t k1, uint64_t first, LtgRow<T> row) {
  alignas(64) uint32_t w0[kBlock], w1[kBlock], w2[kBlock];
  for (int64_t i = 0; i < num_patches; i += kBlock) {
    const int64_t n = std::min(kBlock, num_patches - i);
    philox_block_avx2(first + static_cast<uint64_t>(i), n, k0, k1, w0, w1, w2);
    // Same loop as math_block, compiled here for AVX2.
    T* __restrict out = out_row + i;
    for (int64_t j = 0; j < n; ++j) out[j] = ltg_patch_from_words<T>(w0[j], w1[j], w2[j], row);
  }
}

// PF_LTG_NO_AVX2=1 forces the portable path (the tests compare both).
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && std::getenv("PF_LTG_NO_AVX2") == nullptr;
  return has;
}
#endif

}  // namespace

template <typename T>
void ltg_sample_cpu(T* out, int64_t batch, int64_t num_patches, LtgParams<T> p, uint64_t seed,
                    uint64_t offset) {
  if (batch == 0 || num_patches == 0) return;
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(PF_HAVE_AVX2_PATH)
  const bool avx2 = cpu_has_avx2();
#else
  const bool avx2 = false;
#endif
  // About 16k values per task: enough work to pay for a thread hand-off.
  const int64_t grain = std::max<int64_t>(1, 16384 / num_patches);
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint64_t first = offset + static_cast<uint64_t>(b * num_patches);
      const LtgRow<T> row = ltg_row<T>(k0, k1, first, p);
      T* out_row = out + b * num_patches;
#if defined(PF_HAVE_AVX2_PATH)
      if (avx2) {
        fill_row_avx2<T>(out_row, num_patches, k0, k1, first, row);
        continue;
      }
#endif
      (void)avx2;
      fill_row_portable<T>(out_row, num_patches, k0, k1, first, row);
    }
  });
}

template void ltg_sample_cpu<float>(float*, int64_t, int64_t, LtgParams<float>, uint64_t, uint64_t);
template void ltg_sample_cpu<double>(double*, int64_t, int64_t, LtgParams<double>, uint64_t,
                                     uint64_t);

}  // namespace pf
