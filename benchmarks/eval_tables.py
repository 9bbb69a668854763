"""Markdown tables for docs from the run folders written by benchmarks/run_eval.sh.

usage: python benchmarks/eval_tables.py runs/eval_litemedsam [more roots...]
Prints, per root: all cases, regular structures, thin structures (by_group of summary_extra.json), the per-dataset
mean IoU, and the challenge-protocol table when a `challenge` run exists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = ("oracle", "oracle-box", "gt-box", "center-click", "challenge")
HEADER = ("policy", "cases", "IoU", "Dice", "NoC80", "NoC85", "NoC90", "IoU@1", "IoU@3", "IoU@5", "IoU@10",
          "steps", "s/case")


def _f(v: object) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _row(name: str, b: dict) -> list[str]:
    return [name, _f(b["cases"]), _f(b["mean_iou"]), _f(b["mean_dice"]), *(_f(b["noc"][k]) for k in ("80", "85", "90")),
            *(_f(b["iou_at"][k]) for k in ("1", "3", "5", "10")), _f(b["mean_steps"]), _f(b["mean_seconds"])]


def _table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def tables(root: Path) -> str:
    runs = {}
    for name in RUNS:
        p = root / name
        if (p / "summary.json").is_file():
            runs[name] = (json.loads((p / "summary.json").read_text()),
                          json.loads((p / "summary_extra.json").read_text()))
    if not runs:
        return f"(no finished runs under {root})\n"
    seg = next(iter(runs.values()))[0]["config"]["segmenter"]
    parts = [f"### Segmenter `{seg}` ({root})", ""]
    for label, pick in (("All cases", None), ("Regular structures", "regular"), ("Thin structures", "thin")):
        rows = []
        for name, (s, e) in runs.items():
            if name == "challenge":
                continue
            b = s if pick is None else e["by_group"].get(pick)
            if b:
                rows.append(_row(name, b))
        parts += [f"**{label}**", "", _table(HEADER, rows), ""]
    ks = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20)
    body = []
    for name, (_, e) in runs.items():
        curve = e.get("iou_curve") or []
        body.append([name, *(_f(curve[k - 1]) if k <= len(curve) else "" for k in ks)])
    parts += ["**Mean IoU after k interactions** (early stoppers keep their last IoU)", "",
              _table(["policy", *(f"k={k}" for k in ks)], body), ""]
    names = sorted({d for s, _ in runs.values() for d in s["by_dataset"]})
    body = [[d, *(_f(s["by_dataset"].get(d, {}).get("mean_iou")) for s, _ in runs.values())] for d in names]
    parts += ["**Mean IoU per dataset**", "", _table(["dataset", *runs], body), ""]
    if "challenge" in runs:
        s, e = runs["challenge"]
        hdr = ("dataset", "cases", "DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", "s/interaction")

        def crow(name: str, b: dict) -> list[str]:
            c = b["challenge"]
            return [name, _f(b["cases"]), *(_f(c[k]) for k in ("DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final",
                                                                "seconds_per_interaction"))]

        body = [crow(d, b) for d, b in e["by_dataset"].items()]
        body += [crow(f"**{g}**", b) for g, b in e["by_group"].items()]
        body.append(crow("**all**", e["overall"]))
        parts += ["**Challenge protocol (box + 5 clicks)**", "", _table(hdr, body), ""]
    cfg = next(iter(runs.values()))[0]["config"]
    parts += [f"Machine: `{json.dumps(cfg['machine'])}`; versions `{json.dumps(cfg['versions'])}`; "
              f"date {cfg['date']}.", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["runs/eval_litemedsam"]:
        print(tables(Path(arg)))
