#!/usr/bin/env bash
# CPU smoke run on a fresh machine: builds the offline dataset, then trains, exports and evaluates a tiny model
# through the same code paths as the real run (about a minute on 2 cores). Prints val_bpb lines.
# RECIPE=r549 bash scripts/cpu_smoke.sh runs the 2026-03-23 stack instead of the default frontier recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 data/make_smoke_dataset.py
if [ "${RECIPE:-frontier}" = r549 ]; then  # tiny versions of each recipe's layer-indexed features
  RECIPE_KNOBS="BIGRAM_VOCAB_SIZE=256 BIGRAM_DIM=32 VE_DIM=32 VE_LAYERS=2,3 XSA_LAST_N=2"
else
  RECIPE_KNOBS="LOOP_START=1 LOOP_END=2 PARALLEL_START=3 ENABLE_LOOPING_AT=0.3"
fi
env DATA_PATH=data/smoke/datasets/fineweb10B_sp1024 TOKENIZER_PATH=data/smoke/tokenizers/smoke_1024_bpe.model \
  VOCAB_SIZE=1024 RUN_ID=${RUN_ID:-cpu_smoke} ARTIFACT_PATH=${ARTIFACT_PATH:-logs/cpu_smoke.int6.ptz} \
  NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=128 EVAL_SEQ_LEN=128 TRAIN_BATCH_TOKENS=4096 ITERATIONS=80 \
  WARMDOWN_ITERS=30 WARMUP_STEPS=2 VAL_LOSS_EVERY=40 TRAIN_LOG_EVERY=20 MAX_WALLCLOCK_SECONDS=0 VAL_TOKENS=16384 \
  TTT_CHUNK_TOKENS=4096 TTT_BATCH_SEQS=8 TTT_LORA_RANK=8 TTT_DOC_BATCH=1 TTT_PREFIX_DOCS=2 TTT_PHASES=1 EMA_DECAY=0.95 $RECIPE_KNOBS \
  python3 train_gpt.py "$@" | grep -vE '^config '
