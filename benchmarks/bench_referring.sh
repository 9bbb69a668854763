#!/usr/bin/env bash
# Universal referring (issue 26): the agent and its baselines on the val split (by group) of every dev folder.
#
#   benchmarks/bench_referring.sh [DATA] [OUT]
#
# Rows (each one `ibisagent eval` run, --per-dataset K cases per folder spread over patients):
#   agent       the default agent (compact policy + litemedsam-click), no ground truth
#   text_only   single shot from the query: a box around the policy's object belief, then Terminate
#   blind       the same policy given an empty query (does it read the query?)
#   oracle5     the simulated annotator, exactly 5 clicks (never stops earlier)
#   gtbox       one box drawn from the ground truth
#   previous    the previous shipped weights (POLICY_PREV), for reference
#   sft         the SFT stage alone (SFT_WEIGHTS, when given): what GRPO adds
# Tables: python benchmarks/referring_table.py OUT
# Environment: K (default 6), CACHE (runs/embeddings), THREADS (1), POLICY_WEIGHTS (default the shipped file),
# SEG_WEIGHTS (click-segmenter weights file; default the shipped one), POLICY_PREV (default runs/compact_ea75922.safetensors; row skipped when missing), SFT_WEIGHTS (sft row), ONLY
# (subset of row names).
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/referring}
K=${K:-6}
CACHE=${CACHE:-runs/embeddings}
THREADS=${THREADS:-1}
PY=${PY:-.venv/bin/python}
PW=${POLICY_WEIGHTS:+--policy-arg weights=$POLICY_WEIGHTS}
SW=${SEG_WEIGHTS:+--segmenter-arg weights=$SEG_WEIGHTS}
PREV=${POLICY_PREV:-runs/compact_ea75922.safetensors}
EVAL="$PY -m ibisagent.cli eval $DATA --split val --per-dataset $K --segmenter litemedsam-click $SW --cache-dir $CACHE --threads $THREADS --quiet"
mkdir -p "$OUT"
run() {  # name, extra args...
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "== $name: $*"
  $EVAL --out "$OUT/$name" "$@" || echo "   ($name exited with $?)"
}
run agent     --policy compact $PW
run text_only --policy text-only $PW
run blind     --policy compact $PW --policy-arg query_blind=true
run oracle5   --policy oracle --no-stop --max-steps 5
run gtbox     --policy gt-box
if [ -f "$PREV" ]; then run previous --policy compact --policy-arg weights="$PREV"; fi
if [ -n "${SFT_WEIGHTS:-}" ]; then run sft --policy compact --policy-arg weights="$SFT_WEIGHTS"; fi
