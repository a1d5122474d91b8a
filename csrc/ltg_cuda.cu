// LTG on the GPU: one thread per patch (grid-stride), no PyTorch headers; the binding passes
// raw pointers and PyTorch's current stream. Each thread recomputes its row's tbar (one
// more Philox call and an exp): cheaper than a second pass or a block-wide broadcast at
// these sizes, and it keeps every value a pure function of (seed, counter), like the CPU.
#include <cuda_runtime.h>

#ifndef PF_WITH_CUDA
#define PF_WITH_CUDA 1  // declares the launchers in ltg.h
#endif
#include "ltg.h"

namespace pf {
namespace {

// out: (batch, num_patches) contiguous; total = batch * num_patches.
template <typename T>
__global__ void ltg_kernel(T* __restrict__ out, int64_t num_patches, int64_t total,
                           LtgParams<T> p, uint32_t k0, uint32_t k1, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t b = e / num_patches;
    const LtgRow<T> row = ltg_row<T>(k0, k1, offset + static_cast<uint64_t>(b * num_patches), p);
    out[e] = ltg_patch<T>(k0, k1, offset + static_cast<uint64_t>(e), row);
  }
}

template <typename T>
cudaError_t launch(T* out, int64_t batch, int64_t num_patches, LtgParams<T> p, uint64_t seed,
                   uint64_t offset, cudaStream_t stream) {
  const int64_t total = batch * num_patches;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  // An error left by an earlier launch (someone else's) must not be reported as this one's:
  // take it off the queue first, so the check below sees only this kernel's launch.
  (void)cudaGetLastError();
  ltg_kernel<T><<<grid, kThreads, 0, stream>>>(out, num_patches, total, p,
                                               static_cast<uint32_t>(seed),
                                               static_cast<uint32_t>(seed >> 32), offset);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ltg_sample_cuda(float* out, int64_t batch, int64_t num_patches, LtgParams<float> p,
                            uint64_t seed, uint64_t offset, cudaStream_t stream) {
  return launch<float>(out, batch, num_patches, p, seed, offset, stream);
}

cudaError_t ltg_sample_cuda(double* out, int64_t batch, int64_t num_patches, LtgParams<double> p,
                            uint64_t seed, uint64_t offset, cudaStream_t stream) {
  return launch<double>(out, batch, num_patches, p, seed, offset, stream);
}

}  // namespace pf
