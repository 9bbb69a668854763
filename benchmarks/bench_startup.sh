#!/usr/bin/env bash
# Start-up figures of issue 27: `ibisagent --help`, an argument error, first-run and warm single-image `segment`
# on the bundled demo image. Each is a whole process, timed with /usr/bin/time (wall seconds, peak RSS, CPU seconds
# user + system), RUNS times; prints min / median / max of the wall time and the median CPU time (less sensitive to
# other jobs on the machine than the wall time). First-run uses a fresh IBISAGENT_CACHE_DIR each run (nothing exported yet).
# Usage: benchmarks/bench_startup.sh [RUNS]   (from the checkout root; IBIS defaults to .venv/bin/ibisagent;
# FIRST_RUNS, default RUNS: how many first runs, the slow part; 0 skips them)
# Before/after on a busy machine: IBIS_BEFORE=/path/to/old/ibisagent benchmarks/bench_startup.sh [RUNS] runs the old
# and the new command alternately (old, new, old, new, ...; same cache folders), prints a row for each and the ratio
# of the medians (new / old), so that both see the same load.
set -euo pipefail
RUNS=${1:-5}
FIRST_RUNS=${FIRST_RUNS:-$RUNS}
IBIS=${IBIS:-.venv/bin/ibisagent}
IBIS_BEFORE=${IBIS_BEFORE:-}
IMG=src/ibisagent/demo_data/images/ph2_IMD006.png
Q="the pigmented skin lesion"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

one() {  # file, then the command: one timed run appended to file
  local file=$1; shift
  /usr/bin/time -f "%e %M %U %S" -o "$TMP/t" "$@" >/dev/null 2>&1 || true
  tail -n 1 "$TMP/t" >>"$file"  # on a non-zero exit, time -o writes a status line first
}

summary() {  # name, file: wall min/median/max and the largest peak RSS
  local cpu
  cpu=$(awk '{print $3 + $4}' "$2" | sort -n | awk '{c[NR]=$1} END {print c[int((NR+1)/2)]}')
  sort -n "$2" | awk -v n="$1" -v cpu="$cpu" '{w[NR]=$1; if ($2>m) m=$2} END {
    printf "%-27s wall s min %.2f median %.2f max %.2f  CPU s median %.2f  peak RSS %.0f MB (%d runs)\n", n, w[1],
           w[int((NR+1)/2)], w[NR], cpu, m/1024, NR}'
}

median() { sort -n "$1" | awk '{w[NR]=$1} END {print w[int((NR+1)/2)]}'; }
cpu_median() { awk '{print $3 + $4}' "$1" | sort -n | awk '{c[NR]=$1} END {print c[int((NR+1)/2)]}'; }

measure() {  # name, then the command with the placeholder @IBIS@ for the ibisagent executable
  local name=$1; shift
  local new=() old=() a
  for a in "$@"; do new+=("${a//@IBIS@/$IBIS}"); old+=("${a//@IBIS@/$IBIS_BEFORE}"); done
  : >"$TMP/$name.new"; : >"$TMP/$name.old"
  for _ in $(seq "$RUNS"); do
    if [ -n "$IBIS_BEFORE" ]; then one "$TMP/$name.old" "${old[@]}"; fi
    one "$TMP/$name.new" "${new[@]}"
  done
  if [ -n "$IBIS_BEFORE" ]; then
    summary "$name [before]" "$TMP/$name.old"
    summary "$name [after]" "$TMP/$name.new"
    awk -v a="$(median "$TMP/$name.new")" -v b="$(median "$TMP/$name.old")" -v n="$name" \
      -v ca="$(cpu_median "$TMP/$name.new")" -v cb="$(cpu_median "$TMP/$name.old")" \
      'BEGIN {printf "%-27s median after / before: wall %.2f, CPU %.2f\n", n, a / b, ca / cb}'
  else
    summary "$name" "$TMP/$name.new"
  fi
}

first_run() { IBISAGENT_CACHE_DIR=$(mktemp -d -p "$TMP") "$1" segment "$IMG" --query "$Q" --out "$TMP/out"; }
export -f first_run; export IMG Q TMP

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
measure help @IBIS@ --help
measure arg_error @IBIS@ segment --no-such-flag
[ "$FIRST_RUNS" -gt 0 ] && RUNS=$FIRST_RUNS measure segment_first bash -c 'first_run "$0"' @IBIS@
export IBISAGENT_CACHE_DIR="$TMP/warm"
for cmd in "$IBIS" ${IBIS_BEFORE:+"$IBIS_BEFORE"}; do   # build the cache once (each version's own files, if any)
  "$cmd" segment "$IMG" --query "$Q" --out "$TMP/out" >/dev/null 2>&1
done
measure segment_warm @IBIS@ segment "$IMG" --query "$Q" --out "$TMP/out"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
