#!/usr/bin/env bash
# Dev-data benchmark of the evaluation harness: oracle, gt-box, center-click, oracle-box and the challenge protocol
# on the val split of ../shared/data (2D, nothing excluded; thin structures are reported separately in each
# report.md). Runs the policies one after the other (the CPU is shared), resumable (rerun to continue), with one
# on-disk embedding cache shared by all runs, so each image is encoded once.
#
# usage: benchmarks/run_eval.sh [SEGMENTER] [OUT_ROOT]
#   SEGMENTER defaults to litemedsam-click when its weights exist, else litemedsam
#   OUT_ROOT  defaults to runs/eval_<segmenter>
#   env: ORACLE_STEPS / BOX_STEPS (click budgets of oracle / oracle-box, default 20), DATA, CACHE, PY
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
if [[ $# -ge 1 ]]; then
  SEG=$1
elif [[ -f src/ibisagent/weights/litemedsam_click.safetensors ]]; then
  SEG=litemedsam-click
else
  SEG=litemedsam
fi
OUT=${2:-runs/eval_${SEG}}
CACHE=${CACHE:-runs/embedding_cache}
COMMON=(--split val --segmenter "$SEG" --cache-dir "$CACHE" --threads 1 --quiet)
mkdir -p "$OUT"
run() {  # name, then eval arguments
  local name=$1; shift
  echo "== $name: $(date -u +%H:%M:%S)"
  nice -n 10 "$PY" -m ibisagent.cli eval "$DATA" "${COMMON[@]}" --out "$OUT/$name" "$@"
}
run gt-box --policy gt-box
run center-click --policy center-click
run challenge --protocol box+5clicks
run oracle --policy oracle --no-stop --max-steps "${ORACLE_STEPS:-20}"
run oracle-box --policy oracle-box --no-stop --max-steps "${BOX_STEPS:-20}"
echo "== done: $(date -u +%H:%M:%S)"
nice -n 10 "$PY" -m ibisagent.cli compare "$OUT"/{oracle,oracle-box,gt-box,center-click,challenge} --by-dataset \
  > "$OUT/compare.md" || true
"$PY" benchmarks/eval_tables.py "$OUT" > "$OUT/tables.md"
cat "$OUT/tables.md"
