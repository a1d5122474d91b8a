#!/usr/bin/env bash
# Prove the GPU path on a lent CUDA machine (no network), inside a fixed time budget:
#   bash scripts/gpu_check.sh OUT_DIR [WHEEL_DIR]
# WHEEL_DIR: the wheels the machine lacks, made here by scripts/device_wheels.sh (.whl).
#
# Phases, in priority order. Each runs under its own cap and what is left of the budget, so
# a run cut short still returns everything that finished; benchmarks stream one JSON line
# each as they finish (PF_BENCH_JSONL), so even a phase cut mid-way keeps its numbers.
#   env       torch / Triton / CUDA versions, the card, its clocks
#   build     the C++/CUDA extension in place (sm_90; TORCH_CUDA_ARCH_LIST overrides)
#   tests     pytest -m gpu: the Triton kernels compiled for real (fp32/fp16/bf16, odd
#             shapes, chunk views, opcheck, torch.compile), CUDA LTG bit equality with the
#             CPU, CUDA-graph and compiled sampling; on 8 processes when pytest-xdist is there
#   limits    copy bandwidth and bf16 matmul peak (every ratio below is read against them)
#   ltg       the compiled LTG op vs its PyTorch composite
#   ops       each pf_kernels op vs eager PyTorch and torch.compile (and, at PF-XL/2, the
#             kernels with whole-row blocks instead of column tiles)
#   sampling  images/s: eager, per-block compile, torch.compile of the torch-ops model,
#             fused, CUDA graphs
#   train     one training step: eager, fused, torch.compile of the whole torch-ops model,
#             per-block compile, fused + per-block compile
# Every fused benchmark has its torch.compile baseline in the same group, in the quick scope
# too; the table's "x compile" column is the fused path's speed-up over it.
#   suite     the rest of the test suite with CUDA visible (not in the default list)
# Settings (environment):
#   PF_GPU_PHASES    phases to run (default "env build tests limits ltg ops sampling train")
#   PF_GPU_BUDGET_S  seconds for the whole script (default 480; call the device tool with a
#                    timeout_s about 60 s above it)
#   PF_BENCH_SCOPE   quick (default here: the cases a lease holds) or full
# Files in OUT_DIR (the device tool returns at most 8): check.log (everything printed),
# tests.xml, bench.jsonl, table.md. The last lines printed are the phase summary and the table.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu_check.sh OUT_DIR [WHEEL_DIR]}"
wheels="${2:-}"
mkdir -p "$out"
start=$(date +%s)
budget="${PF_GPU_BUDGET_S:-480}"
phases=" ${PF_GPU_PHASES:-env build tests limits ltg ops sampling train} "
log="$out/check.log"
: >"$log"
export PF_BENCH_SCOPE="${PF_BENCH_SCOPE:-quick}" PF_BENCH_JSONL="$out/bench.jsonl"
: >"$PF_BENCH_JSONL"  # this run's numbers only
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
py="${PYTHON:-python3}"
reserve=15  # seconds kept back for the table
summary=()
failed=0

for phase in $phases; do
  case "$phase" in
    env | build | tests | limits | ltg | ops | sampling | train | suite) ;;
    *) echo "gpu_check.sh: unknown phase '$phase' in PF_GPU_PHASES" >&2; exit 2 ;;
  esac
done

# run_phase NAME CAP_S CMD...: run CMD if NAME was asked for, under min(CAP_S, time left).
run_phase() {
  local name=$1 cap=$2
  shift 2
  [[ "$phases" == *" $name "* ]] || return 0
  local left=$((budget - ($(date +%s) - start) - reserve))
  if ((left < 10)); then
    summary+=("$(printf '%-9s SKIPPED: under 10 s of the %s s budget left' "$name" "$budget")")
    failed=1
    return 0
  fi
  local limit=$((cap < left ? cap : left))
  local t0
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s, $((left + reserve)) s of the budget left) ===" | tee -a "$log"
  # SIGINT first: pytest stops cleanly and reports; KILL 20 s later if it does not.
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]} took=$(($(date +%s) - t0)) state
  case $rc in
    0) state="ok" ;;
    124 | 137) state="CUT at its ${limit} s limit" ;;
    *) state="FAILED (exit $rc)" ;;
  esac
  ((rc == 0)) || failed=1
  summary+=("$(printf '%-9s %-28s %4d s' "$name" "$state" "$took")")
}

if [ -n "$wheels" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pf-site "$wheels"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/pf-site"
fi

run_phase env 60 bash -c '
  "$0" -c "
import torch, triton
print(f\"torch {torch.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}\")
print(\"device:\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"NO CUDA DEVICE\")
"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null || true
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "no nvcc on PATH"
' "$py"

run_phase build 240 bash -c '
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PF_BUILD_CUDA=1
  "$0" setup.py -q build_ext --inplace 2>&1 | grep -v -i warning | tail -5
  "$0" -c "import pf_kernels._C as C; assert C.with_cuda, \"built without the CUDA op\"; print(\"pf_kernels._C built with the CUDA op\")"
' "$py"

xdist=()
if "$py" -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi
run_phase tests 240 "$py" -m pytest tests -m gpu -q -rfE -p no:cacheprovider --junitxml="$out/tests.xml" "${xdist[@]}"

bench=("$py" -m pytest --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,rounds)
run_phase limits 60 "${bench[@]}" benchmarks/bench_hw_limits.py
run_phase ltg 60 "${bench[@]}" benchmarks/bench_ltg.py
run_phase ops 240 "${bench[@]}" benchmarks/bench_ops.py
run_phase sampling 300 "${bench[@]}" benchmarks/bench_sampling.py
run_phase train 300 "${bench[@]}" benchmarks/bench_train_step.py
run_phase suite 300 "$py" -m pytest tests -m "not gpu" -q -rfE -p no:cacheprovider "${xdist[@]}"

echo
echo "=== phases (budget ${budget} s, used $(($(date +%s) - start)) s, PF_BENCH_SCOPE=$PF_BENCH_SCOPE) ===" | tee -a "$log"
printf '%s\n' "${summary[@]}" | tee -a "$log"
if [ -s "$PF_BENCH_JSONL" ]; then
  echo
  "$py" scripts/bench_table.py "$PF_BENCH_JSONL" | tee "$out/table.md"
fi
exit $failed
