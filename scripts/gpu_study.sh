#!/usr/bin/env bash
# A study advanced as far as one GPU call allows (at most 9 minutes), its new records returned.
#   bash scripts/gpu_study.sh OUT_DIR [--wheels DIR] [STUDY OVERRIDES...]   on the device (timeout_s 600)
#   bash scripts/gpu_study.sh --dry-run [STUDY OVERRIDES...]                 the plan: stages, jobs, budget
#   bash scripts/gpu_study.sh --unpack TAR...                                merge returned tars here
#   bash scripts/gpu_study.sh --stage-data                                   copy the data set where it travels
# The device tool copies the working tree but no data set and no wheels: before the call run
# `scripts/device_wheels.sh` and `scripts/gpu_study.sh --stage-data` here, and give the call
# carry [".whl", "runs/device-data"] (30 MiB of Fashion-MNIST beside the 24 MiB tree).
#
# One call: the wheels the machine lacks installed (as scripts/gpu_check.sh does), the data
# put where the study reads it, the LTG extension built once (not by every worker), then the
# study's unfinished stages on several worker processes sharing the GPU until the deadline
# (start + PF_STUDY_BUDGET_S - PF_STUDY_RESERVE_S); stages running then are cut and leave no
# record (pf/experiments/device_call.py says what a cut costs). Then the files of the records
# folder that are new or changed go into OUT/study-N.tar (15 MiB each, at most 6), with
# OUT/study.log and OUT/summary.json (stages done now, left, the device and the jobs). Merge
# them here with --unpack, which refuses a file that differs from one already here.
#
# Settings (environment):
#   PF_STUDY_MODULE    the study (default pf.experiments.reproduce; any module naming DEFAULTS,
#                      FREE, TOY and build_stages)
#   PF_STUDY_BUDGET_S  seconds for the whole call, start-up included (default 540)
#   PF_STUDY_RESERVE_S seconds kept after the deadline (default 30): the first half for the cut
#                      stages to stop (then a timeout stops the run), the second for the pack
#   PF_STUDY_FAKE=1    no GPU: the same call on the CPU (device=cpu toy=true jobs=2), for tests
# The study runs with device=cuda (PF_STUDY_FAKE: device=cpu toy=true) before the overrides
# given, so the overrides win; the records land in the study's records_dir (results/study).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
module="${PF_STUDY_MODULE:-pf.experiments.reproduce}"
budget="${PF_STUDY_BUDGET_S:-540}"
reserve="${PF_STUDY_RESERVE_S:-30}"
fake="${PF_STUDY_FAKE:-0}"
data_home=/usr/share/datasets/fashion-mnist # where the study's data config reads it
data_carried=runs/device-data/fashion-mnist  # where --stage-data puts it for the carry
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE

if ((fake)); then
  base=(device=cpu toy=true jobs=2 threads=1)
else
  base=(device=cuda)
fi

case "${1:-}" in
  --dry-run)
    shift
    exec "$py" -m pf.experiments.device_call plan "$module" --budget "$budget" "${base[@]}" "$@"
    ;;
  --unpack)
    shift
    [ $# -gt 0 ] || { echo "usage: gpu_study.sh --unpack TAR... (records_dir from PF_STUDY_RECORDS, default results/study)" >&2; exit 2; }
    exec "$py" -m pf.experiments.device_call unpack "${PF_STUDY_RECORDS:-results/study}" "$@"
    ;;
  --stage-data)
    shift
    mkdir -p "$data_carried" && cp "$data_home"/*.gz "$data_carried"/ || exit 2
    # The feature classifier trains on the CPU (13 min on this machine's 2 cores): carried when
    # it is here, it is read instead (its file name is the key of the data and classifier config).
    runs=$("$py" -m pf.experiments.device_call plan "$module" --field out_dir "${base[@]}" "$@") || exit 2
    if compgen -G "$runs/classifier_*.pt" >/dev/null; then
      cp "$runs"/classifier_*.pt "$(dirname "$data_carried")"/
    else
      echo "no feature classifier in $runs: the call trains it on the device's CPU first (minutes)"
    fi
    du -sh "$(dirname "$data_carried")"
    exit 0
    ;;
  "" | -*)
    echo "usage: gpu_study.sh OUT_DIR [--wheels DIR] [OVERRIDES...] | --dry-run | --unpack TAR... | --stage-data" >&2
    exit 2
    ;;
esac

out=$1
shift
wheels=""
if [ "${1:-}" = --wheels ]; then
  wheels=$2
  shift 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
start=$(date +%s)
deadline=$((start + budget - reserve))
log="$out/study.log"
: >"$log"
say() { echo "$*" | tee -a "$log"; }
say "gpu_study.sh: $module, budget ${budget} s (deadline at +$((budget - reserve)) s), fake=$fake"

if [ -n "$wheels" ]; then # the same install as scripts/gpu_check.sh's env phase
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pf-site "$wheels"/*.whl 2>&1 | tee -a "$log"
  export PYTHONPATH="$PYTHONPATH:/tmp/pf-site"
fi

overrides=("${base[@]}")
if [ ! -e "$data_home/train-images-idx3-ubyte.gz" ] && [ -d "$data_carried" ]; then
  # The data's path is part of the data config, hence of the classifier's and the points' keys:
  # the same path as here when the machine lets us write it, else one fixed path every call uses.
  if mkdir -p "$data_home" 2>/dev/null && cp "$data_carried"/*.gz "$data_home"/ 2>/dev/null; then
    say "data: copied to $data_home (the path this study's records name)"
  else
    mkdir -p /tmp/pf-data/fashion-mnist && cp "$data_carried"/*.gz /tmp/pf-data/fashion-mnist/
    overrides+=("data_overrides=[data.path=/tmp/pf-data/fashion-mnist]")
    say "data: $data_home not writable; read from /tmp/pf-data/fashion-mnist (a data.path override)"
  fi
fi
overrides+=("$@")

if ((!fake)); then # one build of the LTG extension, before the workers would each wait on it
  t0=$(date +%s)
  "$py" -c "import pf_kernels.ltg as l; l.load_extension(); print('LTG extension ready')" >>"$log" 2>&1 ||
    say "LTG extension build FAILED (study.log): the training stages will fail the same way"
  say "extension: $(($(date +%s) - t0)) s"
fi

plan_json=$(mktemp)
"$py" -m pf.experiments.device_call plan "$module" --budget "$budget" --json "$plan_json" "${overrides[@]}" >>"$log" 2>&1 ||
  { say "the study's plan failed (study.log):"; tail -5 "$log"; exit 2; }
field() { "$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$plan_json" "$1"; }
records=$(field records_dir)
runs=$(field out_dir)
rm -f "$plan_json"
for f in "$(dirname "$data_carried")"/classifier_*.pt; do # carried by --stage-data
  [ -e "$f" ] || continue
  mkdir -p "$runs"
  [ -e "$runs/$(basename "$f")" ] || cp "$f" "$runs"/
  say "classifier: $(basename "$f") carried into $runs"
done
snapshot=$(mktemp)
"$py" -m pf.experiments.device_call snapshot "$records" "$snapshot"

# The run stops by itself at the deadline; timeout is the backstop for a stage stuck in one
# long C call (it signals the whole process group, the workers too).
left=$((deadline + reserve / 2 - $(date +%s))) # half the reserve for the cut stages to stop, half for the pack
timeout --signal=INT --kill-after=5 "$((left > 1 ? left : 1))" \
  "$py" -m pf.experiments.device_call run "$module" --deadline "$deadline" --summary "$out/summary.json" \
  "${overrides[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
"$py" -m pf.experiments.device_call pack "$records" "$snapshot" "$out" --summary "$out/summary.json" 2>&1 | tee -a "$log"
rm -f "$snapshot"
"$py" - "$out/summary.json" "$(($(date +%s) - start))" <<'PY' | tee -a "$log"
import json, sys
import os
s = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else {}
if "study" not in s:
    print("the run was stopped by the backstop timeout before its summary (study.log); the records it finished "
          "are in the tars all the same")
print(f"=== {s.get('study')} on {s.get('device_name')}: jobs={s.get('jobs')} threads={s.get('threads')}, "
      f"{sys.argv[2]} s used ===")
print(f"stages done before: {s.get('done_before')}, done now: {len(s.get('done_now', []))}, "
      f"left: {len(s.get('left', []))} of {s.get('stages')}")
for name in s.get("left", []):
    print(f"  left: {name}")
if s.get("error"):
    print(f"FAILED: {s['error']}")
r = s.get("returned", {})
print(f"returned: {r.get('changed_files')} files in {[t['file'] for t in r.get('tars', [])]}"
      + (f"; {len(r['left_out'])} NOT returned" if r.get("left_out") else ""))
PY
exit "$rc"
