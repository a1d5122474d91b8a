#!/usr/bin/env bash
# The first call of a GPU lease: the headline numbers in one call of at most 9.5 minutes.
#   bash scripts/gpu_check.sh OUT_DIR [WHEEL_DIR]     run (device tool: timeout_s 600)
#   bash scripts/gpu_check.sh --dry-run               print the phase plan and its budgets
# WHEEL_DIR: the wheels the machine lacks, made here by scripts/device_wheels.sh (.whl).
#
# Phases run in the order PF_GPU_PHASES gives (default: the value-first order of PLAN below).
# Each has a budget; a phase may use its own budget plus whatever the phases before it left
# unused, never more than the whole budget minus the reserve for the table. A phase whose
# time is up is cut (SIGINT, then KILL 5 s later) with a note and the run goes on; the
# Python phases also stop by themselves before a row that would not fit, with a note.
# Every measured row is appended to OUT/rows.jsonl the moment it exists, and OUT/table.md is
# re-rendered after each phase (scripts/bench_table.py), so a call cut short keeps all it got.
#
# Settings (environment):
#   PF_GPU_PHASES    phases and their order (default: the PLAN order)
#   PF_GPU_BUDGET_S  seconds for the whole call (default 540)
#   PF_GPU_FAKE=1    no GPU: the same phases on the CPU at toy sizes (the control-flow test)
#   PF_GPU_BUDGET_SCALE every budget (and the total) times this integer (default 1): for
#                    rehearsals on a slow, shared CPU, where the GPU budgets would cut them
#   PF_GPU_BUILD_CMD the build command (default: setup.py build_ext --inplace with CUDA)
#   PF_GPU_TEST_FILES the GPU test files, in order (default: the real-shape file first, then
#                    every file with gpu tests; under PF_GPU_FAKE only the real-shape file)
#   PF_GPU_TEST_TIMEOUT_S per-test timeout when pytest-timeout is there (default 60), else
#                    per file (default 120)
# Files in OUT_DIR: check.log (everything printed), build.log, rows.jsonl, phases.tsv,
# limits.json, table.md, triton_warm.log. The last lines printed are the table, the value checks' count and the
# phase summary.
# shellcheck disable=SC2317  # the phase functions are called through run_phase
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

# phase    budget_s estimate_s  basis of the estimate (H100, 16 cores; "here" = this 2-core CPU)
PLAN=(
  "env      10   6  measured here: 6 s on this loaded 2-core CPU (python imports torch/triton, nvcc); + 4 pure wheels"
  "build    40  25  measured here: the whole CUDA build (sm_80, sm_90 + PTX) took 33 s on this loaded 2-core CPU, MAX_JOBS=2"
  "limits   10   6  process start (~4 s) + do_bench of a 512 MiB copy and an 8192^3 bf16 matmul (~1 s)"
  "ops     110  95  19 (op, width) cases x (3-5 Triton compiles, 0.6 s each measured here*, + 4 do_bench ~1 s) + LTG + start"
  "train   110 100  XL/2: value check ~10 s, eager ~6 s, fused ~8 s, per-block compile fwd+bwd ~45 s; B/2 ~30 s"
  "sampling 110 90  XL/2 20 NFE at b32 ~1.5 s a run x 3 per variant, per-block compile ~20 s; B/2 a quarter"
  "compile  80  80  op compiles 4 x ~10 s, then dedup+compile XL/2 (~60 s) and compile-model: cut where they do not fit"
  "tests    60  60  real-shape tests first (fp16 kernels new to the JIT: ~40 s), then the other gpu test files until time is up"
)
# * kernel_report.py compiled the 47 PF-XL/2 bf16 launch forms for sm_90 in 48 s wall, 27 s CPU,
#   on this loaded 2-core CPU (2026-12-05): about 0.6 s a kernel, ptxas included.
declare -A BUDGET EST BASIS
ORDER=()
scale="${PF_GPU_BUDGET_SCALE:-1}" # CPU rehearsals on a loaded machine: every budget times this
[[ "$scale" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: PF_GPU_BUDGET_SCALE must be a positive integer, got '$scale'" >&2; exit 2; }
for line in "${PLAN[@]}"; do
  read -r name budget est basis <<<"$line"
  BUDGET[$name]=$((budget * scale)) EST[$name]=$est BASIS[$name]=$basis
  ORDER+=("$name")
done
total=$((${PF_GPU_BUDGET_S:-540} * scale))
reserve=$((10 * scale)) # the table, rendered at the end
read -r -a phases <<<"${PF_GPU_PHASES:-${ORDER[*]}}"
for phase in "${phases[@]}"; do
  [[ -n "${BUDGET[$phase]:-}" ]] || { echo "gpu_check.sh: unknown phase '$phase' in PF_GPU_PHASES (known: ${ORDER[*]})" >&2; exit 2; }
done

plan() {
  local sum_b=0 sum_e=0 phase
  printf '%-9s %7s %7s  %s\n' phase budget_s est_s "basis of the estimate"
  for phase in "${phases[@]}"; do
    printf '%-9s %7d %7d  %s\n' "$phase" "${BUDGET[$phase]}" "${EST[$phase]}" "${BASIS[$phase]}"
    sum_b=$((sum_b + BUDGET[$phase])) sum_e=$((sum_e + EST[$phase]))
  done
  printf '%-9s %7d %7d  of PF_GPU_BUDGET_S=%d x PF_GPU_BUDGET_SCALE=%d (%d s kept for the table)\n' total "$sum_b" \
    "$sum_e" "${PF_GPU_BUDGET_S:-540}" "$scale" "$reserve"
  if ((sum_b + reserve > total)); then
    echo "note: the phases' budgets exceed PF_GPU_BUDGET_S; the later phases get what is left, or are skipped"
  fi
}

if [[ "${1:-}" == "--dry-run" ]]; then
  plan
  exit 0
fi

out="${1:?usage: gpu_check.sh OUT_DIR [WHEEL_DIR] | --dry-run}"
wheels="${2:-}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
start=$(date +%s)
log="$out/check.log" rows="$out/rows.jsonl" tsv="$out/phases.tsv"
: >"$log"
: >"$rows"
printf 'phase\tbudget_s\test_s\tlimit_s\ttook_s\tstate\n' >"$tsv"
py="${PYTHON:-python3}"
fake="${PF_GPU_FAKE:-0}"
unset TRITON_INTERPRET
# One arch list for the whole call: setup.py, a JIT build and the tests agree (sm_80 and
# sm_90 code, sm_90 PTX: tests/test_ltg_op.py checks the built op carries them).
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary=()
failed=0
cum=0       # the budgets of the phases run so far: each phase's deadline is start + cum
have_cuda=0 # set by the env phase

say() { echo "$*" | tee -a "$log"; }

# note PHASE TEXT: a row in rows.jsonl (rendered with the table) and a line in the log.
note() {
  say "  note ($1): $2"
  "$py" -c 'import json, sys
print(json.dumps({"group": sys.argv[1] + " notes", "name": sys.argv[1] + "[note]", "stats": {"median": 0.0},
                  "extra_info": {"impl": "note", "phase": sys.argv[1], "note": sys.argv[2]}}))' "$1" "$2" >>"$rows"
}

render() { "$py" scripts/bench_table.py "$rows" "$tsv" >"$out/table.md" 2>>"$log" || true; }

# run_phase NAME CMD...: CMD under this phase's limit; the Python phases read PF_PHASE_SECONDS.
run_phase() {
  local name=$1
  shift
  cum=$((cum + BUDGET[$name]))
  local now elapsed deadline limit t0 rc took state
  now=$(date +%s)
  elapsed=$((now - start))
  deadline=$((cum < total - reserve ? cum : total - reserve))
  limit=$((deadline - elapsed))
  if ((limit < 3)); then
    state="SKIPPED: ${limit} s left of its deadline"
    summary+=("$(printf '%-9s %-40s %4s s  (budget %d, est %d)' "$name" "$state" - "${BUDGET[$name]}" "${EST[$name]}")")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "${BUDGET[$name]}" "${EST[$name]}" "$limit" 0 "$state" >>"$tsv"
    note "$name" "skipped: ${limit} s left of its deadline (budget ${BUDGET[$name]} s)"
    failed=1
    render
    return 0
  fi
  say "=== $name (limit ${limit} s: budget ${BUDGET[$name]} s + $((limit - BUDGET[$name])) s carried; est ${EST[$name]} s; ${elapsed} s used) ==="
  t0=$(date +%s)
  # The phases are functions of this script: exported, run by a child bash under timeout.
  # shellcheck disable=SC2163  # exports the function named by $1
  export -f "$1"
  PF_PHASE_SECONDS=$((limit > 8 ? limit - 3 : limit)) timeout --signal=INT --kill-after=5 "$limit" \
    bash -c '"$@"' bash "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  took=$(($(date +%s) - t0))
  case $rc in
    0) state="ok" ;;
    124 | 137) state="CUT at its ${limit} s limit" ;;
    *) state="FAILED (exit $rc)" ;;
  esac
  ((rc == 0)) || failed=1
  ((rc == 124 || rc == 137)) && note "$name" "cut at its ${limit} s limit (rows measured before the cut are kept)"
  summary+=("$(printf '%-9s %-40s %4d s  (budget %d, est %d)' "$name" "$state" "$took" "${BUDGET[$name]}" "${EST[$name]}")")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "${BUDGET[$name]}" "${EST[$name]}" "$limit" "$took" "$state" >>"$tsv"
  render
}

#################################################################################
#                                    phases                                     #
#################################################################################

phase_env() {
  if [ -n "$wheels" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pf-site "$wheels"/*.whl || return 1
  fi
  "$py" - <<'PY'
import importlib.util, os, sysconfig
import torch, triton
print(f"torch {torch.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
with open(os.path.join(os.environ["out"], "cuda"), "w") as f:  # read by the script: which phases can run
    f.write("1" if torch.cuda.is_available() else "0")
if torch.cuda.is_available():  # the Triton cache warm-up's target (build phase)
    with open(os.path.join(os.environ["out"], "arch"), "w") as f:
        f.write("%d%d" % torch.cuda.get_device_capability())
st = importlib.util.find_spec("setuptools")
print("setuptools:", __import__("setuptools").__version__ if st else "MISSING (the build needs it)")
inc = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("Python.h:", inc if os.path.exists(inc) else f"MISSING at {inc} (the build needs it)")
print("pytest-timeout:", "yes" if importlib.util.find_spec("pytest_timeout") else "no (per-file timeouts)")
PY
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null || echo "no nvidia-smi"
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "no nvcc on PATH"; fi
}

phase_build() {
  local cmd="${PF_GPU_BUILD_CMD:-}" blog="$out/build.log" rc
  if [ -z "$cmd" ]; then
    if ((!have_cuda)); then
      echo "build skipped: no CUDA device (the extension already here is used)"
      return 0
    fi
    cmd="PF_BUILD_CUDA=1 \"$py\" setup.py build_ext --inplace"
  fi
  if ((have_cuda)) && [ -s "$out/arch" ]; then
    # While nvcc runs, warm Triton's cache with the ops phase's bf16 kernels: kernel_report.py
    # compiles them for this card with the launches' own specialisation (same cache keys), so
    # the ops phase finds them compiled. Best effort, in the background, its own log.
    for d in 1152 768; do
      "$py" scripts/kernel_report.py --arch "$(<"$out/arch")" --only "D=$d bf16" >>"$out/triton_warm.log" 2>&1 &
    done
    echo "warming Triton's cache for sm_$(<"$out/arch") in the background (triton_warm.log)"
  fi
  echo "building: $cmd (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS; log: build.log)"
  bash -c "$cmd" >"$blog" 2>&1
  rc=$?
  if ((rc == 0)) && [ -z "${PF_GPU_BUILD_CMD:-}" ]; then
    "$py" -c "import pf_kernels._C as C; assert C.with_cuda, 'built without the CUDA op'; print('pf_kernels._C built with the CUDA op')" >>"$blog" 2>&1
    rc=$?
  fi
  if ((rc != 0)); then
    echo "BUILD FAILED (exit $rc); its errors (all of build.log comes back in OUT):"
    grep -n -i -E "error|fatal|undefined|not found|No such file" "$blog" | head -20
    echo "--- last lines of build.log ---"
    tail -5 "$blog"
    { grep -m1 -i -E "error|fatal" "$blog" || tail -1 "$blog"; } >"$out/build.failed"
    [ -s "$out/build.failed" ] || echo "exit $rc, nothing in build.log" >"$out/build.failed"
    return 1
  fi
  echo "build ok ($(wc -l <"$blog") lines in build.log)"
}

phase_py() { # the lease.py phases
  local toy=()
  ((fake)) && toy=(--toy)
  "$py" benchmarks/lease.py "$1" --out "$rows" --seconds "$PF_PHASE_SECONDS" "${toy[@]}"
}

phase_tests() {
  local files per_test=() file_limit tmo="${PF_GPU_TEST_TIMEOUT_S:-}" f t0 rc left status=0
  if [ -n "${PF_GPU_TEST_FILES:-}" ]; then
    read -r -a files <<<"$PF_GPU_TEST_FILES"
  elif ((fake)); then
    files=(tests/test_gpu_real_shapes.py)
  else
    mapfile -t files < <({ echo tests/test_gpu_real_shapes.py; grep -l -E "mark\.gpu|device_dtype_cases" tests/test_*.py; } | awk '!seen[$0]++')
  fi
  if "$py" -c "import pytest_timeout" 2>/dev/null; then
    per_test=(--timeout="${tmo:-60}")
    file_limit=100000
  else
    file_limit="${tmo:-120}"
  fi
  local end=$(($(date +%s) + PF_PHASE_SECONDS))
  mkdir -p /tmp/pf-junit
  for f in "${files[@]}"; do
    left=$((end - $(date +%s)))
    if ((left < 5)); then
      echo "tests: out of time before $f (and the files after it)"
      "$py" benchmarks/lease_rows.py junit /dev/null --out "$rows" --file "$f (not run: phase time up)" --rc 124 >/dev/null
      break
    fi
    if [[ "$f" == *test_ltg_op.py ]] && [ "${PF_GPU_LTG:-}" = torch ]; then
      echo "tests: $f not run: the extension build failed (build.log)"
      continue
    fi
    t0=$(date +%s)
    timeout --signal=INT --kill-after=5 $((left < file_limit ? left : file_limit)) \
      "$py" -m pytest "$f" -m gpu -q -rfE -p no:cacheprovider --junitxml="/tmp/pf-junit/$(basename "$f").xml" "${per_test[@]}"
    rc=$?
    ((rc == 0 || rc == 5)) || status=1 # 5: nothing selected (no gpu test in the file)
    "$py" benchmarks/lease_rows.py junit "/tmp/pf-junit/$(basename "$f").xml" --out "$rows" --file "$f" --rc "$rc" \
      --took $(($(date +%s) - t0)) >/dev/null
  done
  return "$status"
}

say "gpu_check.sh: PF_GPU_BUDGET_S=$total, phases: ${phases[*]}, fake=$fake"
plan | tee -a "$log"
export py out rows wheels fake have_cuda
for phase in "${phases[@]}"; do
  if [[ "$phase" != env ]] && [ ! -e "$out/cuda" ]; then # no env phase asked for: find out here
    "$py" -c "import torch; print(int(torch.cuda.is_available()), end='')" >"$out/cuda" 2>/dev/null || echo 0 >"$out/cuda"
  fi
  [ -e "$out/cuda" ] && have_cuda=$(<"$out/cuda")
  case "$phase" in
    env)
      run_phase env phase_env
      if [ -n "$wheels" ]; then export PYTHONPATH="$PYTHONPATH:/tmp/pf-site"; fi
      ;;
    build)
      run_phase build phase_build
      if [ -e "$out/build.failed" ]; then
        # Recorded once: the later phases take LTG's torch path and skip the LTG op tests
        # instead of each retrying a JIT build (30-60 s a process).
        export PF_GPU_LTG=torch
        note build "build FAILED: $(<"$out/build.failed"); LTG's torch path used from here on"
      fi
      ;;
    tests)
      if ((!have_cuda && !fake)); then
        note tests "skipped: no CUDA device"
        continue
      fi
      run_phase tests phase_tests
      ;;
    *)
      if ((!have_cuda && !fake)); then
        note "$phase" "skipped: no CUDA device (PF_GPU_FAKE=1 rehearses it on the CPU)"
        continue
      fi
      run_phase "$phase" phase_py "$phase"
      ;;
  esac
done

# The table first, the summary last: the device tool returns the output's last 12,000
# characters (all of table.md comes back in OUT anyway).
render
echo
cat "$out/table.md"
echo
checks=$(grep -c '"impl": "check"' "$rows")
bad=$(grep -c '"check": "FAIL"' "$rows")
if ((bad > 0)); then
  failed=1
  say "VALUE CHECKS: $bad of $checks FAILED (the value rows of table.md)"
else
  say "value checks: $checks, all ok"
fi
say "=== phases (PF_GPU_BUDGET_S ${total} s, used $(($(date +%s) - start)) s, fake=$fake) ==="
printf '%s\n' "${summary[@]}" | tee -a "$log"
exit $failed
