#!/usr/bin/env bash
# Prove the GPU path in one go on a CUDA machine with no network:
#   bash scripts/gpu_check.sh OUT_DIR [WHEEL_DIR]
# 1. installs the wheels in WHEEL_DIR (if given) into a private site dir,
# 2. builds the C++/CUDA extension in place (sm_90 for H100/H200; override TORCH_CUDA_ARCH_LIST),
# 3. runs the whole test suite on the GPU (kernels compiled for real, CUDA LTG vs CPU bit
#    equality, CUDA-graph sampling, bf16),
# 4. runs every benchmark with JSON output,
# 5. prints a compact table (ratios to eager and torch.compile, fraction of the measured
#    copy bandwidth / matmul peak, the card's name) last.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu_check.sh OUT_DIR [WHEEL_DIR]}"
wheels="${2:-}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
py="${PYTHON:-python3}"

if [ -n "$wheels" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pf-site "$wheels"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/pf-site"
fi
"$py" - <<'PY'
import torch, triton
print(f"torch {torch.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PF_BUILD_CUDA=1
start=$(date +%s)
"$py" setup.py -q build_ext --inplace 2>&1 | tail -5 | tee "$out/build.log"
echo "extension build: $(( $(date +%s) - start )) s"

"$py" -m pytest tests -q -rs --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

"$py" -m pytest benchmarks --benchmark-only --benchmark-json="$out/bench.json" -q 2>&1 | tee "$out/bench.log" | tail -5
bench_rc=${PIPESTATUS[0]}

"$py" scripts/bench_table.py "$out/bench.json" | tee "$out/table.md"
echo "tests rc=$tests_rc  benchmarks rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
