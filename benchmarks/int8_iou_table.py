"""Paired IoU change per modality between two ``ibisagent eval`` runs that differ only in the image encoder
(e.g. ``--segmenter-arg encoder=openvino`` vs ``encoder=openvino-int8``): mean IoU after 1 and 5 interactions
(oracle runs) or the final IoU (agent runs), per modality group, over the cases present and ok in both runs.

    python benchmarks/int8_iou_table.py runs/int8_eval/oracle_fp32 runs/int8_eval/oracle_int8 --at 1,5 \
        --md runs/int8_eval/oracle.md

The rule of issue 27: int8 may become the default only if |change| <= 0.01 on every modality group.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _value(row: dict, k: int | None) -> float:
    from ibisagent.evaluation.metrics import iou_at

    if k is None:
        return float(row["iou"] or 0.0)
    return iou_at(list(row.get("iou_curve") or []), k, row["iou"] or 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="eval output folder of the reference encoder (fp32)")
    ap.add_argument("other", type=Path, help="eval output folder of the int8 encoder")
    ap.add_argument("--at", default="1,5", help="interaction counts (comma-separated), or 'final'")
    ap.add_argument("--tolerance", type=float, default=0.01, help="allowed |mean IoU change| per group")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)
    from ibisagent.evaluation.runfiles import read_cases

    ks: list[int | None] = [None] if args.at == "final" else [int(k) for k in args.at.split(",")]
    base = {(r["source"], r["case_id"]): r for r in read_cases(args.base) if r.get("status") == "ok"}
    other = {(r["source"], r["case_id"]): r for r in read_cases(args.other) if r.get("status") == "ok"}
    keys = sorted(set(base) & set(other))
    if not keys:
        print("no case is ok in both runs", file=sys.stderr)
        return 2
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        groups.setdefault(base[key].get("modality") or "unknown", []).append(key)
    names = [f"@{k}" if k is not None else "final" for k in ks]
    head = "| modality | cases | " + " | ".join(f"fp32 {n} | int8 {n} | change {n} (+- s.e.)" for n in names) + " |"
    lines = [head, "|---|---|" + "---|---|---|" * len(ks)]
    worst = 0.0

    def row(label: str, members: list[tuple[str, str]]) -> str:
        nonlocal worst
        cells = []
        for k in ks:
            a = np.array([_value(base[m], k) for m in members])
            b = np.array([_value(other[m], k) for m in members])
            d = b - a
            se = f"+- {float(d.std(ddof=1) / np.sqrt(len(d))):.3f}" if len(d) > 1 else "one case"
            if label != "**all**":
                worst = max(worst, abs(float(d.mean())))
            cells.append(f"{a.mean():.3f} | {b.mean():.3f} | {d.mean():+.3f} ({se})")
        return f"| {label} | {len(members)} | " + " | ".join(cells) + " |"

    for name in sorted(groups):
        lines.append(row(name, groups[name]))
    lines.append(row("**all**", keys))
    verdict = "within" if worst <= args.tolerance else "NOT within"
    lines += ["", f"Largest |mean change| over the modality groups: {worst:.3f} ({verdict} {args.tolerance}); "
              f"{len(keys)} paired cases ({len(base)} ok in {args.base.name}, {len(other)} in {args.other.name})."]
    md = "\n".join(lines)
    print(md)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
