// Registers pf_kernels::ltg_sample with the PyTorch dispatcher and exposes raw Philox for tests.
//
//   pf_kernels::ltg_sample(SymInt batch, SymInt num_patches, float loc, float scale, float std,
//                  int seed, int offset, ScalarType dtype, Device device) -> Tensor (B, N)
//
// A factory op: it has no tensor input to dispatch on, so a BackendSelect kernel turns the
// `device` argument into the CPU or CUDA key and redispatches (as torch.empty does). The
// fake (meta) kernel lives in Python: pf_kernels/ltg.py registers it with
// torch.library.register_fake. dtype is float32 or float64 here; pf_kernels.ltg_sample
// casts for half precision. seed and offset arrive as int64 and are read as uint64.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/TensorOptions.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <array>

#if defined(PF_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "ltg.h"

namespace pf {
namespace {

void check_args(int64_t batch, int64_t num_patches, double stdev, at::ScalarType dtype) {
  TORCH_CHECK(batch >= 0 && num_patches >= 0, "pf_kernels::ltg_sample: sizes must be >= 0, got (", batch,
              ", ", num_patches, ")");
  TORCH_CHECK(stdev > 0, "pf_kernels::ltg_sample: std must be > 0, got ", stdev);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "pf_kernels::ltg_sample: dtype must be float32 or float64, got ", dtype);
}

at::Tensor ltg_sample_cpu_op(int64_t batch, int64_t num_patches, double loc, double scale,
                             double stdev, int64_t seed, int64_t offset, at::ScalarType dtype,
                             at::Device device) {
  check_args(batch, num_patches, stdev, dtype);
  at::Tensor out = at::empty({batch, num_patches}, at::TensorOptions().dtype(dtype).device(device));
  const auto s = static_cast<uint64_t>(seed);
  const auto o = static_cast<uint64_t>(offset);
  if (dtype == at::kFloat) {
    const LtgParams<float> p{static_cast<float>(loc), static_cast<float>(scale),
                             static_cast<float>(stdev)};
    ltg_sample_cpu<float>(out.data_ptr<float>(), batch, num_patches, p, s, o);
  } else {
    const LtgParams<double> p{loc, scale, stdev};
    ltg_sample_cpu<double>(out.data_ptr<double>(), batch, num_patches, p, s, o);
  }
  return out;
}

#if defined(PF_WITH_CUDA)
at::Tensor ltg_sample_cuda_op(int64_t batch, int64_t num_patches, double loc, double scale,
                              double stdev, int64_t seed, int64_t offset, at::ScalarType dtype,
                              at::Device device) {
  check_args(batch, num_patches, stdev, dtype);
  at::Tensor out = at::empty({batch, num_patches}, at::TensorOptions().dtype(dtype).device(device));
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  const auto s = static_cast<uint64_t>(seed);
  const auto o = static_cast<uint64_t>(offset);
  cudaError_t err;
  if (dtype == at::kFloat) {
    const LtgParams<float> p{static_cast<float>(loc), static_cast<float>(scale),
                             static_cast<float>(stdev)};
    err = ltg_sample_cuda(out.data_ptr<float>(), batch, num_patches, p, s, o, stream);
  } else {
    const LtgParams<double> p{loc, scale, stdev};
    err = ltg_sample_cuda(out.data_ptr<double>(), batch, num_patches, p, s, o, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "pf_kernels::ltg_sample: its CUDA kernel failed to launch: ",
              cudaGetErrorString(err));
  return out;
}
#endif

// No tensor argument: pick the backend from `device`, then redispatch below BackendSelect.
at::Tensor ltg_sample_backend_select(int64_t batch, int64_t num_patches, double loc, double scale,
                                     double stdev, int64_t seed, int64_t offset,
                                     at::ScalarType dtype, at::Device device) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pf_kernels::ltg_sample", "")
                       .typed<decltype(ltg_sample_backend_select)>();
  const c10::DispatchKeySet backend(c10::computeDispatchKey(dtype, at::kStrided, device));
  const c10::DispatchKeySet below(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);
  const c10::DispatchKeySet ks = c10::impl::computeDispatchKeySet(backend, below);
  return op.redispatch(ks, batch, num_patches, loc, scale, stdev, seed, offset, dtype, device);
}

}  // namespace
}  // namespace pf

TORCH_LIBRARY(pf_kernels, m) {
  m.set_python_module("pf_kernels.ltg");
  m.def(
      "ltg_sample(SymInt batch, SymInt num_patches, float loc, float scale, float std, int seed, "
      "int offset, ScalarType dtype, Device device) -> Tensor");
}

TORCH_LIBRARY_IMPL(pf_kernels, BackendSelect, m) { m.impl("ltg_sample", &pf::ltg_sample_backend_select); }

TORCH_LIBRARY_IMPL(pf_kernels, CPU, m) { m.impl("ltg_sample", &pf::ltg_sample_cpu_op); }

#if defined(PF_WITH_CUDA)
TORCH_LIBRARY_IMPL(pf_kernels, CUDA, m) { m.impl("ltg_sample", &pf::ltg_sample_cuda_op); }
#endif

// The Python module: a Philox known-answer hook for the tests, and what was compiled in.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "patch-forcing compiled ops: pf_kernels::ltg_sample (see torch.ops.pf_kernels)";
  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
        const pf::u32x4 w = pf::philox4x32_10(
            pf::u32x4{counter[0], counter[1], counter[2], counter[3]}, key[0], key[1]);
        return std::array<uint32_t, 4>{w.x, w.y, w.z, w.w};
      },
      "Raw Philox4x32-10: counter (4 words), key (2 words) -> 4 words.");
#if defined(PF_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
