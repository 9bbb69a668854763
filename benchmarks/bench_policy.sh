#!/usr/bin/env bash
# Benchmark the compact CPU policy with the evaluation harness (`ibisagent eval`) on the val split of the dev data.
#
#   benchmarks/bench_policy.sh [DATA] [OUT]
#
# Rows: compact SFT only, compact SFT+GRPO (shipped), compact box-first, compact with the belief click rule, the oracle
# with the same segmenter (stopping at IoU 0.8 as in the paper; also with the policy's 5-turn budget, and never
# stopping before 5 clicks: the upper bound), the click-free baselines center-click and gt-box; then the query test on multi-object CT slices (compact
# vs the same policy with an empty query), and an end-to-end timing run without the on-disk embedding cache.
# Environment: SFT_WEIGHTS (default runs/policy/sft.safetensors), SEG (default litemedsam-click), CACHE (default
# runs/embeddings), THREADS (default 1), TIMING_CASES (default 12), SEGW (click-segmenter weights file; default the
# shipped one), POLICY_WEIGHTS (policy weights file for every compact row but sft; default the shipped one), ONLY
# (space-separated subset of the run names below).
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/bench_policy}
SFT_WEIGHTS=${SFT_WEIGHTS:-runs/policy/sft.safetensors}
SEG=${SEG:-litemedsam-click}
CACHE=${CACHE:-runs/embeddings}
THREADS=${THREADS:-1}
TIMING_CASES=${TIMING_CASES:-12}
COMPACT_SETS=ph2_dermoscopy,hc18_fetal_head_ultrasound,busi_breast_ultrasound,polyp_colonoscopy_small
CT_SETS=sammed2d_demo_ct,totalsegmentator_examples_ct_mr
PY=${PY:-.venv/bin/python}
SEGARG=${SEGW:+--segmenter-arg weights=$SEGW}
PW=${POLICY_WEIGHTS:+--policy-arg weights=$POLICY_WEIGHTS}
EVAL="$PY -m ibisagent.cli eval $DATA --split val --segmenter $SEG $SEGARG --cache-dir $CACHE --threads $THREADS --quiet"
mkdir -p "$OUT"

run() {  # name, extra args...
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "== $name: $*"
  $EVAL --out "$OUT/$name" "$@" || echo "   ($name exited with $?)"
}

# --- main table: the four compact-object sets -----------------------------------------------------------------
run sft          --datasets $COMPACT_SETS --policy compact --policy-arg weights="$SFT_WEIGHTS"
run grpo         --datasets $COMPACT_SETS --policy compact $PW
run grpo_box     --datasets $COMPACT_SETS --policy compact-box $PW
run grpo_belief  --datasets $COMPACT_SETS --policy compact $PW --policy-arg click_rule=belief
run oracle       --datasets $COMPACT_SETS --policy oracle
run oracle_5     --datasets $COMPACT_SETS --policy oracle --max-steps 5
# the oracle never stops on its own (the paper's oracle stops at IoU 0.8): 5 clicks, the upper bound at 5 turns
run oracle_keep_5 --datasets $COMPACT_SETS --policy oracle --no-stop --max-steps 5
run center_click --datasets $COMPACT_SETS --policy center-click
run gt_box       --datasets $COMPACT_SETS --policy gt-box

# --- the query is used: multi-object CT slices ----------------------------------------------------------------
run ct_query       --datasets $CT_SETS --policy compact $PW
run ct_query_blind --datasets $CT_SETS --policy compact $PW --policy-arg query_blind=true
run ct_oracle      --datasets $CT_SETS --policy oracle

# --- end to end time per case: no disk cache (one encoder pass per image, shared by segmenter and policy) ------
echo "== timing (no disk cache, $TIMING_CASES cases)"
if [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" timing "* ]]; then
$PY -m ibisagent.cli eval "$DATA" --split val --segmenter "$SEG" $SEGARG --threads "$THREADS" --quiet \
  --datasets $COMPACT_SETS --policy compact $PW --limit "$TIMING_CASES" --out "$OUT/timing" || true
fi

$PY -m ibisagent.cli compare "$OUT"/{sft,grpo,grpo_belief,grpo_box,oracle,oracle_5,oracle_keep_5,center_click,gt_box} --by-dataset --paired \
  | tee "$OUT/table_compact.md" || true
$PY -m ibisagent.cli compare "$OUT"/{ct_query,ct_query_blind,ct_oracle} --by-dataset | tee "$OUT/table_ct.md" || true
$PY -m ibisagent.cli compare "$OUT"/timing | tee "$OUT/table_timing.md" || true
