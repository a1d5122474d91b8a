// LTG on the CPU: rows in parallel (at::parallel_for); within a row, blocks of kBlock
// patches: first the Philox words of the block, then the math of ltg.h over the block.
//
// Philox is most of the cost. Compilers vectorise its 32x32->64-bit products poorly, so on
// x86-64 CPUs with AVX2 (checked at run time) 4 x 8 counters go through the rounds at once
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

// philox_block, 8 * kVecs counters per pass: kVecs independent 8-lane states interleaved so
// the multiplier latency of one hides behind the others. Blocks whose low counter word
// would wrap, and the tail, go through the portable philox_block.
constexpr int kVecs = 4;

__attribute__((target("avx2"))) void philox_block_avx2(uint64_t first, int64_t n, uint32_t k0,
                                                       uint32_t k1, uint32_t* w0, uint32_t* w1,
                                                       uint32_t* w2) {
  constexpr int kStep = 8 * kVecs;
  const uint32_t lo_first = static_cast<uint32_t>(first);
  if (static_cast<uint64_t>(lo_first) + static_cast<uint64_t>(n) > (uint64_t(1) << 32)) {
    philox_block(first, n, k0, k1, w0, w1, w2);  // the carry into the high word is in here
    return;
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i hi_word = _mm256_set1_epi32(static_cast<int>(first >> 32));
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    __m256i c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      // counter words (lo32(c), hi32(c), stream, 0) for c = first + j + 8v + lane
      c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo_first + static_cast<uint32_t>(j + 8 * v))), iota);
      c1[v] = hi_word;
      c2[v] = _mm256_set1_epi32(static_cast<int>(kPatchStream));
      c3[v] = _mm256_setzero_si256();
    }
    uint32_t key0 = k0, key1 = k1;
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        key0 += kPhiloxW0;
        key1 += kPhiloxW1;
      }
      const __m256i kv0 = _mm256_set1_epi32(static_cast<int>(key0));
      const __m256i kv1 = _mm256_set1_epi32(static_cast<int>(key1));
      for (int v = 0; v < kVecs; ++v) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(c0[v], m0, hi0, lo0);
        mulhilo8(c2[v], m1, hi1, lo1);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), kv0);
        c1[v] = lo1;
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), kv1);
        c3[v] = lo0;
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + j + 8 * v), c0[v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + j + 8 * v), c1[v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + j + 8 * v), c2[v]);
    }
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
