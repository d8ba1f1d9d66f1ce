#!/usr/bin/env bash
# The multi-GPU recipe: a d24 chat model with ears on one 8-GPU node (upstream's speedrun horizon:
# d24, 8 tokens per parameter, fp8, ~1.7 h of pretraining on 8xH100), then SFT, RL, the audio stage,
# every evaluation and the report card.
#
#   bash runs/speedrun.sh             # runs it (NPROC=8 by default; WANDB_RUN=name to log to wandb)
#   bash runs/speedrun.sh --dry-run   # prints every command and checks that its arguments parse
#
# Shards come from $NANOCHAT_DATA_URL when set (a mirror of the FineWeb-Edu shards), else from
# upstream's dataset repository. Every training stage resumes from its last checkpoint when re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
NPROC=${NPROC:-8}
WANDB_RUN=${WANDB_RUN:-}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
export OMP_NUM_THREADS=1

step() {  # print a command, then run it (--dry-run: check its arguments instead, with nanochat.dryrun)
  echo "+ $*"
  if [ "$DRY_RUN" = 1 ]; then python -m nanochat.dryrun "$@"; else "$@"; fi
}
resumable() {  # a training command that continues its run if the output folder has a checkpoint
  local dir=$1; shift
  if ls "$NANOCHAT_BASE_DIR/$dir"/meta_*.json >/dev/null 2>&1; then step "$@" --resume; else step "$@"; fi
}
TRUN="torchrun --standalone --nproc_per_node=$NPROC -m"

if [ "$DRY_RUN" = 0 ]; then
  bash runs/setup.sh
  . "${NANOCHAT_VENV:-.venv}/bin/activate"
fi

# 1. Data and tokenizer: 240 FineWeb-Edu shards (~60B characters) cover d24 at ratio 8 with room;
#    the tokenizer trains on the first 2B characters while the rest download.
step python -m nanochat.dataset download -n 240
step python -m scripts.tok_train --vocab-size 32768 --max-chars 2e9
step python -m scripts.tok_eval

# 2. Base model: d24 (1536 wide), 2048-token context, 8 tokens per scaling parameter, fp8 matmuls;
#    the batch size and LRs follow from the horizon (base_train's defaults).
resumable base_checkpoints/d24 $TRUN scripts.base_train -- --depth 24 --target-param-data-ratio 8 --fp8 \
  --device-batch-size 16 --model-tag d24 --save-every 1000 --run "$WANDB_RUN"
step $TRUN scripts.base_eval -- --model-tag d24

# 3. Chat: SFT on the offline conversation mix, the chat evals, RL on generated math, the evals again.
resumable sft_checkpoints/d24 $TRUN scripts.chat_sft -- --model-tag d24 --run "$WANDB_RUN"
step $TRUN scripts.chat_eval -- --source sft --model-tag d24
resumable rl_checkpoints/d24 $TRUN scripts.chat_rl -- --model-tag d24 --run "$WANDB_RUN"
step $TRUN scripts.chat_eval -- --source rl --model-tag d24

# 4. Ears on the chat model: more speech than the CPU recipe, the projector alone, then projector + GPT
#    with the chat conversations mixed in, then the held-out voices.
step python -m nanochat.speech_data build --n-train 60000 --n-val 500 --n-test 1000 --workers 32
resumable audio_checkpoints/s1 $TRUN scripts.audio_train -- --tag s1 --stage 1 --source rl --model-tag d24 \
  --whisper base --epochs 1 --run "$WANDB_RUN"
resumable audio_checkpoints/s2 $TRUN scripts.audio_train -- --tag s2 --stage 2 --init-from s1 --text-mix 0.3 \
  --epochs 3 --run "$WANDB_RUN"
step python -m scripts.audio_eval --tag s2
step $TRUN scripts.chat_eval -- --source audio --model-tag s2

# 5. The report card: base_dir/report/report.md with its plots.
step python -m nanochat.report
[ "$DRY_RUN" = 1 ] || echo "done. Talk to it: python -m scripts.chat_web   (the audio checkpoint s2; OpenAI-compatible API at /v1)"
