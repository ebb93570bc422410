#!/usr/bin/env bash
# One-H100 timing run on the proxy corpus (see docs/RESULTS.md). Needs .bench/ and .whl/ carried.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
[ -d data/datasets/fineweb10B_sp1024 ] || bash .bench/unpack.sh ./data > "$OUT/unpack.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1
MODE=${1:-bench}
if [ "$MODE" = bench ]; then
  RUN_ID=bench ITERATIONS=${ITERS:-20} MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=3 TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 \
  VAL_TOKENS=${VAL_TOKENS:-1048576} ARTIFACT_PATH=/tmp/bench.ptz timeout 560 python3 train_gpt.py > "$OUT/bench.log" 2>&1
  grep -vE '^config' "$OUT/bench.log" | tail -60
fi
# Proxy-corpus training run with the bench README's short-run settings (TTT left for the eval-only call).
if [ "$MODE" = train ]; then
  RUN_ID=${RUN_ID:-proxy_train} TRAIN_BATCH_TOKENS=262144 WARMDOWN_ITERS=500 MUON_MOMENTUM_WARMUP_STEPS=300 \
  MAX_WALLCLOCK_SECONDS=${WALL:-240} VAL_LOSS_EVERY=200 TTT_ENABLED=0 timeout 580 python3 train_gpt.py > "$OUT/train.log" 2>&1
  cp logs/*.txt "$OUT/" 2>/dev/null; grep -vE '^config|^warmup_step' "$OUT/train.log" | tail -40
fi
# Evaluate the saved artifact: round-trip, sliding window and legal TTT.
if [ "$MODE" = eval ]; then
  RUN_ID=${RUN_ID:-proxy_eval} EVAL_ONLY_PATH=final_model.int6.ptz TTT_ENABLED=1 timeout 580 python3 train_gpt.py > "$OUT/eval.log" 2>&1
  cp logs/*.txt "$OUT/" 2>/dev/null; grep -vE '^config' "$OUT/eval.log" | tail -30
fi
# Short multi-GPU step-time run through torchrun/NCCL: NPROC GPUs, full 786,432-token batch.
if [ "$MODE" = ddp ]; then
  RUN_ID=ddp${NPROC} ITERATIONS=${ITERS:-12} MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=2 TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 \
  VAL_TOKENS=262144 TTT_ENABLED=0 LATE_QAT_THRESHOLD=0 SIZE_LIMIT=1 timeout ${LIMIT:-170} \
  torchrun --standalone --nproc_per_node=$NPROC train_gpt.py > "$OUT/ddp.log" 2>&1
  cp logs/*.txt "$OUT/" 2>/dev/null; grep -vE '^config|^warmup_step' "$OUT/ddp.log" | grep -vE "^\[rank" | tail -30
fi
