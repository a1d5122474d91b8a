#!/usr/bin/env bash
# Issue 28's final check: python -m pf.train with every option for runs at scale at once (2 gloo
# ranks, fsdp, grad_accum=2, cosine, activation checkpointing, TensorBoard, in-loop FID) on the
# digits; an uninterrupted run, and a run killed (SIGKILL) after step 4's checkpoint then resumed.
# Prints whether metrics (loss, lr, grad norm, validation, FID/KID), weights, EMA and optimizer
# state are bit-equal, and the TensorBoard loss steps of the resumed run.
#   bash scripts/check_all_train_options.sh [out dir]      (PYTHON=... picks the interpreter)
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${1:-/tmp/pf-all-options}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
rm -rf "$OUT/full" "$OUT/killed"
mkdir -p "$OUT"
OPTS="trainer.strategy=fsdp trainer.grad_accum=2 trainer.lr_schedule=cosine trainer.min_lr=1e-5 trainer.warmup_steps=2
 trainer.activation_checkpointing=true trainer.log=tensorboard trainer.fid_every=3 trainer.fid_samples=50
 trainer.fid_reference=500 trainer.max_steps=6 trainer.ckpt_every=2 trainer.keep_every=100 trainer.batch_size=8
 trainer.log_every=1 trainer.progress=false data.val_size=16 trainer.val_every=3 trainer.sample_every=3
 sampler.steps=4 sampler.num_images=10"
TR="$PY -m torch.distributed.run --nproc_per_node=2"
echo "== uninterrupted"
$TR -m pf.train $OPTS hydra.run.dir="$OUT/full" > "$OUT/full.log" 2>&1 || { echo "failed: $OUT/full.log"; exit 1; }
echo "== killed after step 4's checkpoint"
$TR -m pf.train $OPTS hydra.run.dir="$OUT/killed" > "$OUT/killed.log" 2>&1 &
TPID=$!
until grep -q '"step": 5' "$OUT/killed/metrics.jsonl" 2>/dev/null; do sleep 0.5; done
pkill -9 -P "$TPID"; kill -9 "$TPID"; wait "$TPID" 2>/dev/null
echo "== resumed"
$TR -m pf.train $OPTS resume="$OUT/killed" hydra.run.dir="$OUT/killed" > "$OUT/resumed.log" 2>&1 || {
    echo "failed: $OUT/resumed.log"; exit 1; }
"$PY" - "$OUT" <<'PY'
import json, sys
import torch
from pf.models.checkpoint import read_checkpoint_file
out = sys.argv[1]
rec = lambda run: [json.loads(x) for x in open(f"{out}/{run}/metrics.jsonl") if x.strip()]
keys = ("step", "loss", "lr", "grad_norm", "val_loss", "fid", "kid")
a, b = ([[r.get(k) for k in keys] for r in rec(run)] for run in ("full", "killed"))
print("metrics bit-equal:", a == b)
ca, cb = (read_checkpoint_file(f"{out}/{run}/checkpoints/last.pt") for run in ("full", "killed"))
for key in ("state_dict", "ema"):
    print(key, "bit-equal:", all(torch.equal(ca[key][n], cb[key][n]) for n in ca[key]))
print("optimizer bit-equal:", all(torch.equal(ca["optimizer"]["state"][i][s], cb["optimizer"]["state"][i][s])
                                  for i in ca["optimizer"]["state"] for s in ("exp_avg", "exp_avg_sq")))
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(f"{out}/killed/tensorboard")
acc.Reload()
print("TensorBoard loss steps:", [e.step for e in acc.Scalars("train/loss")], "images:", acc.Tags()["images"])
PY
