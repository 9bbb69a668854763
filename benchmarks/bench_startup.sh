#!/usr/bin/env bash
# Start-up figures of issue 27: `ibisagent --help`, an argument error, first-run and warm single-image `segment`
# on the bundled demo image. Each is a whole process, timed with /usr/bin/time (wall seconds, peak RSS), RUNS times;
# prints min / median / max. First-run uses a fresh IBISAGENT_CACHE_DIR each run (nothing exported yet).
# Usage: benchmarks/bench_startup.sh [RUNS]   (from the checkout root; IBIS defaults to .venv/bin/ibisagent)
set -euo pipefail
RUNS=${1:-5}
IBIS=${IBIS:-.venv/bin/ibisagent}
IMG=src/ibisagent/demo_data/images/ph2_IMD006.png
Q="the pigmented skin lesion"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

measure() {  # name, then the command; prints wall min/median/max and the largest peak RSS
  local name=$1; shift
  : >"$TMP/$name.tsv"
  for _ in $(seq "$RUNS"); do
    /usr/bin/time -f "%e %M" -o "$TMP/t" "$@" >/dev/null 2>&1 || true
    tail -n 1 "$TMP/t" >>"$TMP/$name.tsv"  # on a non-zero exit, time -o writes a status line first
  done
  sort -n "$TMP/$name.tsv" | awk -v n="$name" '{w[NR]=$1; if ($2>m) m=$2} END {
    printf "%-18s wall s min %.2f median %.2f max %.2f  peak RSS %.0f MB (%d runs)\n", n, w[1], w[int((NR+1)/2)], w[NR], m/1024, NR}'
}

first_run() { IBISAGENT_CACHE_DIR=$(mktemp -d -p "$TMP") "$IBIS" segment "$IMG" --query "$Q" --out "$TMP/out"; }
export -f first_run; export IBIS IMG Q TMP

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
measure help "$IBIS" --help
measure arg_error "$IBIS" segment --no-such-flag
measure segment_first bash -c first_run
export IBISAGENT_CACHE_DIR="$TMP/warm"
"$IBIS" segment "$IMG" --query "$Q" --out "$TMP/out" >/dev/null 2>&1   # build the cache once
measure segment_warm "$IBIS" segment "$IMG" --query "$Q" --out "$TMP/out"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
