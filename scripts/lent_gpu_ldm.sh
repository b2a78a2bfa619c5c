#!/usr/bin/env bash
# The LDM's training on a lent GPU, prepared as ONE call of the device tool (a session gets about 15 minutes of
# device time in all, 10 per command, and a machine starts bare): render the training data there, train the
# denoiser under a time budget (train_ldm --stop-after), ship the EMA there, and leave under $OUT what a CPU session
# needs to evaluate and ship it. Nothing here needs the network; the device's own python3 (torch, numpy,
# safetensors, Pillow, tqdm) is enough.
#
#   run(command="bash scripts/lent_gpu_ldm.sh", timeout_s=590)                       # defaults below
#   run(command="MINUTES=5 INIT=none EXTRA='--min-snr 0' bash scripts/lent_gpu_ldm.sh", timeout_s=590)
#
# Comes back under $OUT (8 files at most): ldm/{config.json,denoiser.safetensors} (the shipped form: EMA, fp16),
# model.safetensors (the raw weights, fp32, for a later warm start), run_config.json, log.txt, metrics.jsonl,
# heldout.png (the last probe's samples; for a layout model ldm/layouts.npz instead, its placement prior), device.txt
# (GPU, versions, phase timings). Then, on the CPU:
#   python -m python.eval_gen --model ldm --weights CAND --data ~/data/iclevr --seeds 0 1 2 --steps 10 ...
# with CAND holding <files_at>/ldm and links to the other shipped weights folders (weights/ldm/MODEL_CARD.md).
#
# Settings (environment):
#   MINUTES  training budget in minutes (default 6: the render, the cache and the probes take ~2 more)
#   STEPS    the schedule's length (default 5500: an H100 did 16-18 steps/s at batch 1024; if the GPU is slower,
#            --stop-after ends the run early with a valid EMA, `stopped_early` in its config)
#   BATCH    default 1024;  LR  peak learning rate (default 2e-4 for a warm start, 5e-4 from scratch)
#   INIT     weights folder to warm-start from (default weights/ldm; "none": from scratch)
#   SCENES / DATA_SEED   the render (default 6003 scenes x 3 = 18,009 images, seed 0: the shipped data)
#   EXTRA    further train_ldm flags, e.g. "--min-snr 0";  DATA_ARGS  further make_data flags
#   DEVICE   default cuda (cpu for a dry run: see tests/test_lent_gpu.py)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lent_gpu_out}
MINUTES=${MINUTES:-6}
STEPS=${STEPS:-5500}
BATCH=${BATCH:-1024}
INIT=${INIT:-weights/ldm}
SCENES=${SCENES:-6003}
DATA_SEED=${DATA_SEED:-0}
EXTRA=${EXTRA:-}
DATA_ARGS=${DATA_ARGS:-}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/lent_gpu}
DEVICE=${DEVICE:-cuda}
if [ "$INIT" = none ]; then
    INIT_ARGS=(); LR=${LR:-5e-4}; POOLED=--pooled
else
    # the shipped weights have no pooled embedding; keep their architecture so that every loader takes the result
    INIT_ARGS=(--init "$INIT"); LR=${LR:-2e-4}; POOLED=--no-pooled
    # a layout denoiser (python/core/layout.py) carries on as one: the renders' places are recovered from the data
    if grep -q '"layout": true' "$INIT/config.json"; then INIT_ARGS+=(--layout); fi
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
info="$OUT/device.txt"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
  echo "MINUTES=$MINUTES STEPS=$STEPS BATCH=$BATCH LR=$LR INIT=$INIT SCENES=$SCENES DATA_SEED=$DATA_SEED EXTRA=$EXTRA"
} > "$info"
phase() { echo "$(date -u +%T) $*" | tee -a "$info"; }

phase "render start"
# shellcheck disable=SC2086
"$PY" -m python.make_data --out "$WORK/data" --seed "$DATA_SEED" --scenes "$SCENES" --workers "$(nproc)" $DATA_ARGS
phase "train start"
# shellcheck disable=SC2086
"$PY" -m python.train_ldm --data "$WORK/data" --run-dir "$WORK/run" --preset full $POOLED "${INIT_ARGS[@]}" \
    --batch "$BATCH" --lr "$LR" --warmup 200 --steps "$STEPS" --eval-every 2000 --save-every 1000 \
    --device "$DEVICE" --stop-after "$MINUTES" $EXTRA
phase "train end"
"$PY" -m python.ship ldm --run "$WORK/run" --out "$OUT/ldm"
ckpt="$WORK/run/$(cat "$WORK/run/latest")"
cp "$ckpt/model.safetensors" "$OUT/model.safetensors"
cp "$WORK/run/config.json" "$OUT/run_config.json"
cp "$WORK/run/log.txt" "$WORK/run/metrics.jsonl" "$OUT/"
last=$(ls "$WORK/run/samples" | tail -1 || true)
# at most 8 files come back: a layout model's ldm/layouts.npz takes the probe grid's place
if [ -n "$last" ] && [ ! -e "$OUT/ldm/layouts.npz" ]; then cp "$WORK/run/samples/$last" "$OUT/heldout.png"; fi
phase "done"
