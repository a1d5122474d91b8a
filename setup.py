"""Build script: the package (metadata in pyproject.toml) plus the compiled LTG extension.

``pip install --no-build-isolation -e .`` builds ``pf_kernels._C`` from ``csrc/`` with
torch.utils.cpp_extension and ninja:
- the CPU op always;
- the CUDA op when PyTorch is a CUDA build and a CUDA toolkit (nvcc) is found, even with no
  GPU present (CI compiles and links it); ``PF_BUILD_CUDA=0`` skips it, ``PF_BUILD_CUDA=1``
  requires it. Targets sm_80 and sm_90, with sm_90 PTX for newer GPUs, unless ``TORCH_CUDA_ARCH_LIST`` says otherwise.
- ``MAX_JOBS`` defaults to 2 parallel compiler jobs.
A wheel also carries the sources as ``pf_kernels/csrc`` so that ``pf_kernels.ltg`` can
JIT-build them if the prebuilt module does not load (e.g. a different PyTorch).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
SOURCES = [f"{CSRC}/bindings.cpp", f"{CSRC}/ltg_cpu.cpp"]
CUDA_SOURCES = [f"{CSRC}/ltg_cuda.cu"]
# Keep in sync with pf_kernels/ltg.py (CXX_FLAGS, NVCC_FLAGS, CUDA_ARCH_LIST). -g0 undoes
# the -g that Python's sysconfig adds: debug info for the torch headers doubles the build.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-g0"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _cuda_home() -> str | None:
    """The CUDA toolkit root. PyTorch guesses it from `which nvcc`, which is wrong when nvcc
    is a wrapper script (here /usr/local/bin/nvcc -> /usr/local/cuda-13.0), so prefer an
    explicit CUDA_HOME / CUDA_PATH, then /usr/local/cuda, and check for the headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for cand in candidates:
        if cand and (Path(cand) / "bin" / "nvcc").exists() and (Path(cand) / "include" / "cuda_runtime_api.h").exists():
            return cand
    return None


def _want_cuda(torch) -> bool:
    flag = os.environ.get("PF_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"PF_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    have = torch.version.cuda is not None and _cuda_home() is not None
    if flag == "1" and not have:
        raise SystemExit(
            "PF_BUILD_CUDA=1 but the CUDA op cannot be built: "
            + ("this PyTorch is not a CUDA build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found; set CUDA_HOME")
        )
    return have


def _extensions():
    import torch

    home = _cuda_home()
    if home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ.setdefault("CUDA_HOME", home)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", "2")
    if _want_cuda(torch):
        # nvcc 13 has dropped the oldest architectures torch would otherwise list.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_LIST)
        print(f"pf_kernels._C: building CPU + CUDA ops (CUDA_HOME={os.environ['CUDA_HOME']}, "
              f"archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
        return [
            CUDAExtension(
                "pf_kernels._C",
                SOURCES + CUDA_SOURCES,
                define_macros=[("PF_WITH_CUDA", "1")],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            )
        ]
    print("pf_kernels._C: building the CPU op only")
    return [CppExtension("pf_kernels._C", SOURCES, extra_compile_args={"cxx": CXX_FLAGS})]


class BuildPyWithSources(build_py):
    """Ship csrc/ as pf_kernels/csrc in wheels (for the JIT fallback of pf_kernels.ltg)."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads ../csrc from the checkout
            return
        dest = Path(self.build_lib) / "pf_kernels" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in (ROOT / CSRC).iterdir():
            if src.suffix in (".h", ".cpp", ".cu"):
                shutil.copy2(src, dest / src.name)


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithSources}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
