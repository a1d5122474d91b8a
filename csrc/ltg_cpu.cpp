// LTG on the CPU: rows in parallel (at::parallel_for), each row one tight loop over its
// patches. The loop is branch-free (selects only) so the compiler can vectorise Philox and
// the series of ltg.h; on x86-64 with GCC an AVX2 clone is picked at load time when the
// CPU has it. Vector or scalar, every lane does the same IEEE operations, so the values do
// not depend on which clone runs (the build passes -ffp-contract=off: no FMA contraction).
#include <ATen/Parallel.h>

#include "ltg.h"

namespace pf {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PF_CPU_CLONES
#endif

// out_row: (num_patches,); counters first .. first + num_patches - 1.
template <typename T>
PF_CPU_CLONES void ltg_fill_row(T* __restrict out_row, int64_t num_patches, uint32_t k0,
                                uint32_t k1, uint64_t first, LtgRow<T> row) {
  for (int64_t i = 0; i < num_patches; ++i) {
    out_row[i] = ltg_patch<T>(k0, k1, first + static_cast<uint64_t>(i), row);
  }
}

}  // namespace

template <typename T>
void ltg_sample_cpu(T* out, int64_t batch, int64_t num_patches, LtgParams<T> p, uint64_t seed,
                    uint64_t offset) {
  if (batch == 0 || num_patches == 0) return;
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  // About 16k values per task: enough work to pay for a thread hand-off.
  const int64_t grain = std::max<int64_t>(1, 16384 / num_patches);
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint64_t first = offset + static_cast<uint64_t>(b * num_patches);
      const LtgRow<T> row = ltg_row<T>(k0, k1, first, p);
      ltg_fill_row<T>(out + b * num_patches, num_patches, k0, k1, first, row);
    }
  });
}

template void ltg_sample_cpu<float>(float*, int64_t, int64_t, LtgParams<float>, uint64_t, uint64_t);
template void ltg_sample_cpu<double>(double*, int64_t, int64_t, LtgParams<double>, uint64_t,
                                     uint64_t);

}  // namespace pf
