#!/usr/bin/env bash
# verl GRPO for ibisagent with our compute_score in-process (no HTTP segmenter server, unlike the reference).
#
#   MODEL=checkpoints/ibisagent-sft-7b TRAIN=exports/verl/train.parquet VAL=exports/verl/val.parquet \
#   NGPUS=8 bash configs/verl/run_grpo.sh [extra hydra overrides, e.g. trainer.total_epochs=2]
#
# CONFIG names the config file in this folder (default ibisagent_grpo, ours; CONFIG=release_grpo: the release's
# values).
#
# Run it inside the verl environment, with ibisagent installed there (pip install --no-deps -e .; see
# docs/full_scale.md). The reward worker builds the segmenter named by IBISAGENT_REWARD_SEGMENTER once per process
# (default litemedsam-click) and reuses cached image embeddings.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL=${MODEL:-checkpoints/ibisagent-sft-7b}
TRAIN=${TRAIN:-exports/verl/train.parquet}
VAL=${VAL:-exports/verl/val.parquet}
NGPUS=${NGPUS:-8}
CONFIG=${CONFIG:-ibisagent_grpo}
# verl <= 0.5 reads the top-level `custom_reward_function`; newer releases moved it to `reward.custom_reward_function`.
REWARD_KEY=${REWARD_KEY:-custom_reward_function}
export IBISAGENT_REWARD_SEGMENTER=${IBISAGENT_REWARD_SEGMENTER:-litemedsam-click}

REWARD_FILE=$(python3 -c 'import ibisagent.rewards.verl as m; print(m.__file__)')
for f in "$TRAIN" "$VAL"; do
  [[ -f "$f" ]] || { echo "error: $f not found; run: ibisagent export SYNTH_DIR --format verl --out exports/verl" >&2; exit 2; }
done
[[ -f "$HERE/$CONFIG.yaml" ]] || { echo "error: no config $HERE/$CONFIG.yaml (CONFIG=ibisagent_grpo or release_grpo)" >&2; exit 2; }
[[ -f "$MODEL/config.json" ]] || { echo "error: $MODEL is not a checkpoint directory (no config.json)" >&2; exit 2; }

# Preflight: score a few rows with the oracle's reply and a malformed one in this environment; fails fast.
python3 "$HERE/check_reward.py" "$TRAIN" --rows 4

exec python3 -m verl.trainer.main_ppo \
  --config-path "$HERE" --config-name "$CONFIG" \
  actor_rollout_ref.model.path="$MODEL" \
  data.train_files="$TRAIN" data.val_files="$VAL" \
  trainer.n_gpus_per_node="$NGPUS" \
  "++${REWARD_KEY}.path=${REWARD_FILE}" "++${REWARD_KEY}.name=compute_score" \
  "$@"
