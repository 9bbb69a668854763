#!/usr/bin/env bash
# Run every benchmark of docs/benchmarks.md with the commands given there (slow: about an hour on 2 CPU cores).
# Results go under OUT (default runs/bench_all); copy the figures you measured into docs/benchmarks.md by hand,
# with the date, the machine and its load.
#
#   benchmarks/run_all.sh [DATA] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=${2:-runs/bench_all}
PY=${PY:-.venv/bin/python}
CACHE=${CACHE:-runs/embeddings}
mkdir -p "$OUT"
echo "machine: $(uname -m), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)" | tee "$OUT/machine.txt"

echo "== runtime (encoder, decoder, oracle episode)"
$PY benchmarks/bench_runtime.py --data "$DATA" --split val --limit 12 | tee "$OUT/runtime.txt"
echo "== encoder runtimes (PyTorch / ONNX Runtime / OpenVINO)"
$PY benchmarks/bench_encoder.py --data "$DATA" --json "$OUT/encoder.json" --md "$OUT/encoder.md"
echo "== decoder runtimes"
$PY benchmarks/bench_decoder.py --data "$DATA" --rounds 4 --json "$OUT/decoder.json" --md "$OUT/decoder.md"
echo "== segmenter (oracle clicks on every 2D val mask)"
$PY benchmarks/bench_segmenter.py --data "$DATA" --max-per-dataset 0 --cache-dir "$CACHE" \
  --segmenters litemedsam litemedsam-click --out-md "$OUT/segmenter.md" --json "$OUT/segmenter.json"
echo "== evaluation harness: oracle / oracle-box / gt-box / center-click / challenge protocol"
CACHE=$CACHE BOX_STEPS=10 bash benchmarks/run_eval.sh litemedsam-click "$OUT/eval"
echo "== compact policy"
THREADS=2 bash benchmarks/bench_policy.sh "$DATA" "$OUT/policy"
echo "== tool server (loopback, 8 clients x 20 s)"
nice -n 10 $PY benchmarks/bench_server.py --clients 8 --duration 20 --segmenter fake \
  --json "$OUT/server_fake.json" --md "$OUT/server_fake.md"
echo "done: $OUT"
