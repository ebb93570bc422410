#!/usr/bin/env bash
# GPU runs behind docs/RESULTS.md:  bash scripts/gpu_smoke.sh bench|train|eval|ddp   (logs and copies to $OUT)
# Needs, and checks first:
#   - a CUDA build of torch plus the packages of requirements-gpu.txt (pip install -r requirements-gpu.txt
#     keeps the machine's torch). Offline machine: put the wheels in a folder and set WHEELS=<folder>.
#   - the data the run reads: DATA_PATH / TOKENIZER_PATH (defaults of the RECIPE). docs/RESULTS.md used a proxy
#     corpus written in the challenge's shard format (data/README.md, "Proxy corpus").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, numpy, sentencepiece, zstandard" 2>/dev/null || {
  echo "error: missing Python packages: pip install -r requirements-gpu.txt (it keeps the CUDA torch)" >&2; exit 1; }
read -r DATA TOK < <(python3 -c "import train_gpt as t; a = t.Hyperparameters(); print(a.data_path, a.tokenizer_path)")
if [ ! -d "${DATA:-}" ] || [ ! -f "${TOK:-}" ]; then
  VARIANT=$(basename "${DATA:-fineweb10B_sp1024}"); VARIANT=${VARIANT#fineweb10B_}
  cat >&2 <<EOF
error: this run reads DATA_PATH=${DATA:-?} and TOKENIZER_PATH=${TOK:-?}, which do not exist. Get data with
  python3 data/cached_challenge_fineweb.py --variant $VARIANT --train-shards 2   (the challenge's data; network)
  python3 data/build_shards.py TEXT_FILES --out DIR --tokenizer MODEL           (your own text, e.g. a proxy corpus)
and set DATA_PATH / TOKENIZER_PATH (and VOCAB_SIZE or RECIPE to match) to it; see data/README.md.
EOF
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1
MODE=${1:-bench}
if [ "$MODE" = bench ]; then
  RUN_ID=bench ITERATIONS=${ITERS:-20} MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=3 TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 \
  VAL_TOKENS=${VAL_TOKENS:-1048576} ARTIFACT_PATH=/tmp/bench.ptz timeout 560 python3 train_gpt.py > "$OUT/bench.log" 2>&1
  grep -vE '^config' "$OUT/bench.log" | tail -60
fi
# Short training run (batch 262,144, momentum warm-up 300, WALL seconds); TTT is left for the eval-only call.
if [ "$MODE" = train ]; then
  RUN_ID=${RUN_ID:-proxy_train} TRAIN_BATCH_TOKENS=262144 WARMDOWN_ITERS=500 MUON_MOMENTUM_WARMUP_STEPS=300 \
  MAX_WALLCLOCK_SECONDS=${WALL:-240} VAL_LOSS_EVERY=200 TTT_ENABLED=0 timeout 580 python3 train_gpt.py > "$OUT/train.log" 2>&1
  cp logs/*.txt "$OUT/" 2>/dev/null; grep -vE '^config|^warmup_step' "$OUT/train.log" | tail -40
fi
# Evaluate the saved artifact: round-trip and the recipe's legal TTT (EVAL_STRIDE=64 adds the sliding window).
if [ "$MODE" = eval ]; then
  RUN_ID=${RUN_ID:-proxy_eval} EVAL_ONLY_PATH=final_model.int6.ptz TTT_ENABLED=1 timeout 580 python3 train_gpt.py > "$OUT/eval.log" 2>&1
  cp logs/*.txt "$OUT/" 2>/dev/null; grep -vE '^config' "$OUT/eval.log" | tail -30
fi
# Short multi-GPU step-time run through torchrun/NCCL: NPROC GPUs, full 786,432-token batch.
if [ "$MODE" = ddp ]; then
  RUN_ID=ddp${NPROC} ITERATIONS=${ITERS:-12} MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=2 TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 \
  VAL_TOKENS=262144 TTT_ENABLED=0 LATE_QAT_THRESHOLD=0 SIZE_FIT=0 \
  SIZE_LIMIT=$(python3 -c 'import train_gpt as t; print(len(t.code_info()[1]) + 1)') timeout ${LIMIT:-170} \
  torchrun --standalone --nproc_per_node=$NPROC train_gpt.py > "$OUT/ddp.log" 2>&1
  cp logs/*.txt "$OUT/" 2>/dev/null; grep -vE '^config|^warmup_step' "$OUT/ddp.log" | grep -vE "^\[rank" | tail -30
fi
