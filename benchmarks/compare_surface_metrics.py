"""Old vs new HD95 / NSD on the final masks of an evaluation run (``ibisagent eval ... --out RUN``).

The new definition is :mod:`ibisagent.masks` (surfel-area weighted, as the CVPR 2025 challenge script); the old one
(border pixels counted with equal weight, HD95 as the percentile of both directions pooled) is read from the git
revision ``--old-rev`` of this repository, so no copy of it lives in the package.

    python benchmarks/compare_surface_metrics.py RUN --data ../shared/data [--old-rev 4fd26e0] [--tolerance 2]

Prints per-dataset means and the overall mean of each metric under both definitions, and the challenge's
NSD_Final (NSD set to 0 when DSC <= 0.2) under both.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import numpy as np

from ibisagent.evaluation.challenge import NSD_MIN_DSC
from ibisagent.evaluation.harness import load_case_arrays, read_cases
from ibisagent.io.manifest import load_manifest
from ibisagent.masks import dice, hd95, nsd, rle_decode

REPO = Path(__file__).resolve().parents[1]


def _old_masks(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/ibisagent/masks.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("old_masks")
    exec(compile(source, f"{rev}:masks.py", "exec"), module.__dict__)  # noqa: S102 - our own file at another revision
    return module


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(statistics.fmean(finite), 4) if finite else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--old-rev", default="4fd26e0", help="git revision with the border-pixel definitions")
    p.add_argument("--tolerance", type=float, default=2.0)
    args = p.parse_args(argv)
    old = _old_masks(args.old_rev)
    cases = {c.id: c for c in load_manifest(args.data, split="all")}
    rows = {r["case_id"]: r for r in read_cases(args.run) if r.get("status") == "ok"}
    preds = [json.loads(line) for line in (args.run / "predictions.jsonl").read_text().splitlines() if line.strip()]
    by_ds: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in preds:
        if rec["case_id"] not in rows or rec["case_id"] not in cases:
            continue
        case = cases[rec["case_id"]]
        _, gt = load_case_arrays(case)
        pred = rle_decode(rec["mask_rle"])
        d = dice(pred, gt)
        values = {
            "nsd_old": old.nsd(pred, gt, tolerance=args.tolerance), "nsd_new": nsd(pred, gt, tolerance=args.tolerance),
            "hd95_old": old.hd95(pred, gt), "hd95_new": hd95(pred, gt),
        }
        values["nsd_final_old"] = values["nsd_old"] if d > NSD_MIN_DSC else 0.0
        values["nsd_final_new"] = values["nsd_new"] if d > NSD_MIN_DSC else 0.0
        values["abs_nsd_change"] = abs(values["nsd_new"] - values["nsd_old"])
        for key in (case.source, "ALL"):
            for k, v in values.items():
                by_ds[key][k].append(v)
    cols = ("nsd_old", "nsd_new", "abs_nsd_change", "nsd_final_old", "nsd_final_new", "hd95_old", "hd95_new")
    print("| dataset | cases | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for key in sorted(by_ds, key=lambda k: (k == "ALL", k)):
        vals = by_ds[key]
        print(f"| {key} | {len(vals['nsd_old'])} | " + " | ".join(str(_mean(vals[c])) for c in cols) + " |")
    allv = by_ds["ALL"]
    if allv:
        print(f"max |NSD change| {max(allv['abs_nsd_change']):.4f}; "
              f"median {statistics.median(allv['abs_nsd_change']):.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
