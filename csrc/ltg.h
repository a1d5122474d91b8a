// LTG timestep sampler (SPEC.md section 4), shared by the CPU and CUDA kernels.
//
//   per row b:    tbar = sigmoid(loc + scale * n0),  sd = min(tbar / 2, std)
//   per patch i:  t_i = tbar - |n_i| * sd;  where t_i < 0:  t_i = u_i * tbar
//
// ---------------------------------------------------------------------------------------
// Random streams (the contract behind "same (seed, offset) -> same values everywhere")
// ---------------------------------------------------------------------------------------
// key     = (lo32(seed), hi32(seed))                        seed taken as uint64
// element e = b * N + i of the (B, N) output; its counter  c = offset + e   (mod 2^64)
// Philox counter words = (lo32(c), hi32(c), stream, 0), with
//   stream 0 (patch): words (w0, w1, w2, w3) of element e give
//                     n_i = normal(w0, w1),  u_i = uniform(w2);  w3 is unused
//   stream 1 (row):   at the counter of the row's first element, c = offset + b * N:
//                     n0 = normal(w0, w1);   w2, w3 unused
// A call consumes the counters [offset, offset + B*N) of both streams, so a caller that
// advances offset by B*N after each call never reuses a random word.
//
// uniform(w):  float:  (w >> 8) * 2^-24   (24 bits, in [0, 1))
//              double:  w * 2^-32         (32 bits, in [0, 1))
// normal(wa, wb) = sqrt(-2 * log(1 - uniform(wa))) * cos(2 * pi * uniform(wb))
//   (Box-Muller, cosine branch; 1 - uniform is in (0, 1] and exact, so log never sees 0)
//
// Bit-identical host and device results: libm's log/cos/exp differ from CUDA's in the
// last bit, so log, cos and exp below are our own (range reduction + Taylor series, about
// 1 ulp of the working precision), and every float operation goes through add/sub/mul/div
// /sqrt_rn, which are IEEE round-to-nearest on both sides (CUDA's __f*_rn intrinsics are
// never contracted into FMAs, whatever --fmad says; the host build uses
// -ffp-contract=off). Float outputs are computed in float, double outputs in double.
#pragma once

#include <stdint.h>
#include <string.h>

#include "philox.h"

namespace pf {

// ----------------------------------------------------------------------- exact arithmetic
#if defined(__CUDA_ARCH__)
PF_HD float add(float a, float b) { return __fadd_rn(a, b); }
PF_HD float sub(float a, float b) { return __fsub_rn(a, b); }
PF_HD float mul(float a, float b) { return __fmul_rn(a, b); }
PF_HD float div(float a, float b) { return __fdiv_rn(a, b); }
PF_HD float sqrt_rn(float a) { return __fsqrt_rn(a); }
PF_HD double add(double a, double b) { return __dadd_rn(a, b); }
PF_HD double sub(double a, double b) { return __dsub_rn(a, b); }
PF_HD double mul(double a, double b) { return __dmul_rn(a, b); }
PF_HD double div(double a, double b) { return __ddiv_rn(a, b); }
PF_HD double sqrt_rn(double a) { return __dsqrt_rn(a); }
PF_HD float abs_(float a) { return fabsf(a); }
PF_HD double abs_(double a) { return fabs(a); }
PF_HD uint32_t bits(float a) { return __float_as_uint(a); }
PF_HD uint64_t bits(double a) { return static_cast<uint64_t>(__double_as_longlong(a)); }
PF_HD float float_from_bits(uint32_t u) { return __uint_as_float(u); }
PF_HD double double_from_bits(uint64_t u) { return __longlong_as_double(static_cast<long long>(u)); }
#else
template <typename T> PF_HD T add(T a, T b) { return a + b; }
template <typename T> PF_HD T sub(T a, T b) { return a - b; }
template <typename T> PF_HD T mul(T a, T b) { return a * b; }
template <typename T> PF_HD T div(T a, T b) { return a / b; }
PF_HD float sqrt_rn(float a) { return __builtin_sqrtf(a); }
PF_HD double sqrt_rn(double a) { return __builtin_sqrt(a); }
PF_HD float abs_(float a) { return __builtin_fabsf(a); }
PF_HD double abs_(double a) { return __builtin_fabs(a); }
PF_HD uint32_t bits(float a) { uint32_t u; memcpy(&u, &a, 4); return u; }
PF_HD uint64_t bits(double a) { uint64_t u; memcpy(&u, &a, 8); return u; }
PF_HD float float_from_bits(uint32_t u) { float a; memcpy(&a, &u, 4); return a; }
PF_HD double double_from_bits(uint64_t u) { double a; memcpy(&a, &u, 8); return a; }
#endif

// Per-precision constants: Taylor orders chosen so the truncation error is below half an
// ulp on the reduced ranges; ln2 split as hi + lo with hi short enough that k * hi is exact.
template <typename T> struct Fp;
template <> struct Fp<float> {
  using I = int32_t;
  using U = uint32_t;
  static constexpr int kMantBits = 23, kBias = 127;
  static constexpr U kSqrtHalfBits = 0x3f3504f3u;  // sqrt(1/2)
  static constexpr int kLogTerms = 6;              // log: 2s * sum_{k<6} z^k / (2k+1)
  static constexpr int kTrigTerms = 6;             // cos, sin/th: z^0 .. z^5
  static constexpr int kExpTerms = 8;              // exp: r^0 .. r^7
  static constexpr float kExpMax = 80.0f;          // |exp argument| clamp (sigmoid only)
  static PF_HD float uniform(uint32_t w) {
    return mul(static_cast<float>(static_cast<int32_t>(w >> 8)), 5.9604644775390625e-08f);  // 2^-24
  }
  static PF_HD float from_bits(U u) { return float_from_bits(u); }
};
template <> struct Fp<double> {
  using I = int64_t;
  using U = uint64_t;
  static constexpr int kMantBits = 52, kBias = 1023;
  static constexpr U kSqrtHalfBits = 0x3fe6a09e667f3bcdull;
  static constexpr int kLogTerms = 11;
  static constexpr int kTrigTerms = 10;
  static constexpr int kExpTerms = 14;
  static constexpr double kExpMax = 700.0;
  static PF_HD double uniform(uint32_t w) {
    // double(w) exactly, via a signed conversion (x86 has no vector unsigned one)
    const double wd = add(static_cast<double>(static_cast<int32_t>(w ^ 0x80000000u)), 2147483648.0);
    return mul(wd, 2.3283064365386962890625e-10);  // 2^-32
  }
  static PF_HD double from_bits(U u) { return double_from_bits(u); }
};

// Split constants of ln 2 (Cody-Waite), hi + lo with hi short enough that k * hi is exact:
// float log: hi has 15 significant bits (|k| <= 24 since x >= 2^-24); float exp: 9 bits
// (|k| <= 116); double: the fdlibm (log) and cephes (exp) splits.
template <typename T> PF_HD T ln2_hi_log();
template <typename T> PF_HD T ln2_lo_log();
template <> PF_HD float ln2_hi_log<float>() { return 0.693145751953125f; }
template <> PF_HD float ln2_lo_log<float>() { return 1.428606765330187e-06f; }
template <> PF_HD double ln2_hi_log<double>() { return 6.93147180369123816490e-01; }
template <> PF_HD double ln2_lo_log<double>() { return 1.90821492927058770002e-10; }
template <typename T> PF_HD T ln2_hi_exp();
template <typename T> PF_HD T ln2_lo_exp();
template <> PF_HD float ln2_hi_exp<float>() { return 0.693359375f; }
template <> PF_HD float ln2_lo_exp<float>() { return -2.12194440e-4f; }
template <> PF_HD double ln2_hi_exp<double>() { return 6.93145751953125e-1; }
template <> PF_HD double ln2_lo_exp<double>() { return 1.42860682030941723212e-6; }

// Table of 1 / n! in double, n <= 22 (n! is exact in double up to 22!); a compile-time
// constant, so the series coefficients below are each rounded once from it.
struct InvFactorials {
  double v[23];
};
PF_HD constexpr InvFactorials inv_factorials() {
  InvFactorials t{};
  double f = 1.0;
  t.v[0] = 1.0;
  for (int n = 1; n <= 22; ++n) {
    f *= n;
    t.v[n] = 1.0 / f;
  }
  return t;
}

// ------------------------------------------------------------------------ uniform, normal
template <typename T> PF_HD T uniform(uint32_t w) { return Fp<T>::uniform(w); }

// log(x) for x in (0, 1], normal numbers only (x >= 2^-24 here).
//   x = 2^e * m with m in [sqrt(1/2), sqrt(2)):  e and m read from the bits
//   log m = 2 atanh(s) = 2s (1 + z/3 + z^2/5 + ...),  s = (m - 1) / (m + 1),  z = s^2
//   log x = e * ln2_hi + (e * ln2_lo + log m)
template <typename T> PF_HD T log_unit(T x) {
  using I = typename Fp<T>::I;
  using U = typename Fp<T>::U;
  const I ix = static_cast<I>(bits(x)) - static_cast<I>(Fp<T>::kSqrtHalfBits);
  // e = floor(ix / 2^mant) (ix >= -2^(mant+6) here), by a logical shift of a biased value:
  // x86 has no vector 64-bit arithmetic shift or int64 -> double conversion.
  const int32_t e = static_cast<int32_t>((static_cast<U>(ix) + (U(64) << Fp<T>::kMantBits)) >> Fp<T>::kMantBits) - 64;
  const U mant_mask = (U(1) << Fp<T>::kMantBits) - 1;
  const T m = Fp<T>::from_bits((static_cast<U>(ix) & mant_mask) + Fp<T>::kSqrtHalfBits);
  const T s = div(sub(m, T(1)), add(m, T(1)));
  const T z = mul(s, s);
  T p = T(1.0 / (2 * Fp<T>::kLogTerms - 1));  // 1 / (2k+1), rounded once from double
  PF_UNROLL
  for (int k = Fp<T>::kLogTerms - 2; k >= 0; --k) p = add(mul(p, z), T(1.0 / (2 * k + 1)));
  const T log_m = mul(mul(T(2), s), p);
  const T ef = static_cast<T>(e);
  return add(mul(ef, ln2_hi_log<T>()), add(mul(ef, ln2_lo_log<T>()), log_m));
}

// cos(2 pi v) for v in [0, 1).
//   y = 4v (exact); q = nearest integer to y (0..4); r = y - q in [-1/2, 1/2] (exact)
//   th = r * pi/2 in [-pi/4, pi/4];  cos(2 pi v) = cos(q pi/2 + th)
//     = cos th, -sin th, -cos th, sin th  for  q mod 4 = 0, 1, 2, 3
//   cos th = sum (-1)^k z^k / (2k)!,  sin th = th * sum (-1)^k z^k / (2k+1)!,  z = th^2
template <typename T> PF_HD T cos_2pi(T v) {
  const T y = mul(v, T(4));
  const int q = static_cast<int>(add(y, T(0.5)));  // y + 1/2 >= 0: truncation is floor
  const T r = sub(y, static_cast<T>(q));
  const T th = mul(r, T(1.57079632679489661923));
  const T z = mul(th, th);
  // Horner in z with the coefficients (-1)^k / (2k)! and (-1)^k / (2k+1)!, each rounded
  // once from the double table.
  constexpr InvFactorials f = inv_factorials();
  constexpr int n = Fp<T>::kTrigTerms;
  T pc = T((n - 1) % 2 ? -f.v[2 * n - 2] : f.v[2 * n - 2]);
  T ps = T((n - 1) % 2 ? -f.v[2 * n - 1] : f.v[2 * n - 1]);
  PF_UNROLL
  for (int k = n - 2; k >= 0; --k) {
    pc = add(mul(pc, z), T(k % 2 ? -f.v[2 * k] : f.v[2 * k]));
    ps = add(mul(ps, z), T(k % 2 ? -f.v[2 * k + 1] : f.v[2 * k + 1]));
  }
  const T c = pc;
  const T s = mul(th, ps);
  const T mag = (q & 1) ? s : c;                    // quadrants 1, 3: sin
  return mul(mag, ((q + 1) & 2) ? T(-1) : T(1));   // quadrants 1, 2: negative
}

// normal(wa, wb) = sqrt(-2 log(1 - uniform(wa))) * cos(2 pi uniform(wb)).
template <typename T> PF_HD T normal(uint32_t wa, uint32_t wb) {
  const T radius = sqrt_rn(mul(T(-2), log_unit(sub(T(1), uniform<T>(wa)))));
  return mul(radius, cos_2pi(uniform<T>(wb)));
}

// exp(a) for a clamped to [-kExpMax, kExpMax]:
//   k = a / ln2 rounded to the nearest integer (halves away from 0), by truncating
//       a / ln2 +- 1/2;   r = (a - k ln2_hi) - k ln2_lo  (|r| <= ln2 / 2 + rounding)
//   exp(a) = 2^k * sum r^j / j!
template <typename T> PF_HD T exp_clamped(T a) {
  a = a > Fp<T>::kExpMax ? Fp<T>::kExpMax : (a < -Fp<T>::kExpMax ? -Fp<T>::kExpMax : a);
  const T scaled = mul(a, T(1.44269504088896340736));  // a / ln 2
  const T kf = static_cast<T>(static_cast<int>(add(scaled, a >= T(0) ? T(0.5) : T(-0.5))));
  const T r = sub(sub(a, mul(kf, ln2_hi_exp<T>())), mul(kf, ln2_lo_exp<T>()));
  constexpr InvFactorials f = inv_factorials();
  constexpr int n = Fp<T>::kExpTerms;
  T p = T(f.v[n - 1]);
  PF_UNROLL
  for (int j = n - 2; j >= 0; --j) p = add(mul(p, r), T(f.v[j]));
  using U = typename Fp<T>::U;
  const U two_k = static_cast<U>(static_cast<int>(kf) + Fp<T>::kBias) << Fp<T>::kMantBits;
  return mul(p, Fp<T>::from_bits(two_k));
}

// --------------------------------------------------------------------------------- LTG
template <typename T> struct LtgParams {
  T loc, scale, std;
};

template <typename T> struct LtgRow {
  T tbar, sd;  // the row's maximum time and its half-Gaussian width
};

PF_HD u32x4 ltg_counter(uint64_t c, uint32_t stream) {
  return u32x4{static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), stream, 0u};
}

constexpr uint32_t kPatchStream = 0;
constexpr uint32_t kRowStream = 1;

// Row parameters; row_counter = offset + b * N.
template <typename T>
PF_HD LtgRow<T> ltg_row(uint32_t k0, uint32_t k1, uint64_t row_counter, LtgParams<T> p) {
  const u32x4 w = philox4x32_10(ltg_counter(row_counter, kRowStream), k0, k1);
  const T n0 = normal<T>(w.x, w.y);
  // tbar = sigmoid(loc + scale * n0) = 1 / (1 + exp(-(loc + scale * n0)))
  const T x = add(p.loc, mul(p.scale, n0));
  const T tbar = div(T(1), add(T(1), exp_clamped(-x)));
  const T half = mul(tbar, T(0.5));
  return LtgRow<T>{tbar, half < p.std ? half : p.std};
}

// One patch time from its stream-0 words (w0, w1, w2).
template <typename T>
PF_HD T ltg_patch_from_words(uint32_t w0, uint32_t w1, uint32_t w2, LtgRow<T> row) {
  const T n = normal<T>(w0, w1);
  const T u = uniform<T>(w2);
  const T t = sub(row.tbar, mul(abs_(n), row.sd));
  const T resampled = mul(u, row.tbar);
  return t < T(0) ? resampled : t;  // negatives resampled uniformly below tbar
}

// One patch time; counter = offset + b * N + i.
template <typename T>
PF_HD T ltg_patch(uint32_t k0, uint32_t k1, uint64_t counter, LtgRow<T> row) {
  const u32x4 w = philox4x32_10(ltg_counter(counter, kPatchStream), k0, k1);
  return ltg_patch_from_words<T>(w.x, w.y, w.z, row);
}

// ---------------------------------------------------------------------------- launchers
// out: (batch, num_patches) contiguous. seed and offset as uint64 (two's complement of the
// int64 the op receives).
template <typename T>
void ltg_sample_cpu(T* out, int64_t batch, int64_t num_patches, LtgParams<T> p, uint64_t seed,
                    uint64_t offset);

}  // namespace pf

#if defined(PF_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace pf {
// Launches on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t ltg_sample_cuda(float* out, int64_t batch, int64_t num_patches, LtgParams<float> p,
                            uint64_t seed, uint64_t offset, cudaStream_t stream);
cudaError_t ltg_sample_cuda(double* out, int64_t batch, int64_t num_patches, LtgParams<double> p,
                            uint64_t seed, uint64_t offset, cudaStream_t stream);
}  // namespace pf
#endif
