"""Batch ``segment`` (one process) against a per-call loop of the CLI (issue 27).

Writes a JSONL manifest of N dev images (round robin over 2D folders with PNG/JPEG images <= 1024 px, first cases
by id order), runs ``ibisagent segment MANIFEST`` once and ``ibisagent segment IMAGE`` for the first K of them, and
prints images/s of each; the per-call figure is extrapolated per image from the K calls (stated in the output).

    python benchmarks/bench_batch.py --data ../shared/data --n 50 --loop 10 --out runs/bench_batch
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

FOLDERS = ("ph2_dermoscopy", "busi_breast_ultrasound", "cvc_colondb_endoscopy", "jsrt_chest_xray",
           "chaos_t2spir_abdomen_mri", "drishti_gs_fundus", "hc18_fetal_head_ultrasound", "glas_colon_glands",
           "acdc_cardiac_mri", "sammed2d_demo_ct")


def pick(data: Path, n: int) -> list[dict[str, str]]:
    per: list[list[dict[str, str]]] = []
    for name in FOLDERS:
        index = data / name / "index.jsonl"
        if not index.is_file():
            continue
        rows = []
        for line in index.read_text().splitlines():
            r = json.loads(line)
            img = data / name / r["image"]
            if r.get("is_3d") or img.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            with Image.open(img) as im:
                if max(im.size) > 1024:
                    continue
            rows.append({"image": str(img), "query": r["query"]})
        per.append(rows)
    out: list[dict[str, str]] = []
    i = 0
    while len(out) < n and any(i < len(r) for r in per):
        out += [r[i] for r in per if i < len(r)]
        i += 1
    return out[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--loop", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_batch"))
    ap.add_argument("--ibisagent", default=str(Path(sys.executable).with_name("ibisagent")))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = pick(a.data, a.n)
    manifest = a.out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ)
    t = time.perf_counter()
    subprocess.run([a.ibisagent, "segment", str(manifest), "--out", str(a.out / "batch"), "--overwrite"],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    batch_s = time.perf_counter() - t
    t = time.perf_counter()
    for i, r in enumerate(rows[: a.loop]):
        subprocess.run([a.ibisagent, "segment", r["image"], "--query", r["query"], "--out", str(a.out / f"loop{i}")],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop_s = time.perf_counter() - t
    print(f"batch: {len(rows)} images in {batch_s:.1f} s wall = {len(rows) / batch_s:.2f} images/s (one process)")
    print(f"loop: {a.loop} CLI calls in {loop_s:.1f} s wall = {a.loop / loop_s:.2f} images/s "
          f"(extrapolated per image to {len(rows)}: {loop_s / a.loop * len(rows):.0f} s)")
    print(f"speed-up per image: {(loop_s / a.loop) / (batch_s / len(rows)):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
