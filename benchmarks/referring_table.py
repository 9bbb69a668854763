"""Markdown tables for the universal-referring benchmark (benchmarks/bench_referring.sh).

usage: python benchmarks/referring_table.py OUT [DATA]

Reads OUT/<row>/cases.csv of the rows agent, text_only, blind, oracle5, gtbox, previous (those present) and prints:
the overall table, the table per modality and per dataset folder (mean IoU; thin / scattered structures, the
evaluation's ``thin`` group, apart), the query-use check on multi-object images (val images with masks of two or
more objects: agent vs blind), and the confidence ranking (Spearman of predicted vs real IoU) of the agent row.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

from ibisagent.evaluation.summary import confidence_ranking

ROWS = ("agent", "sft", "text_only", "blind", "oracle5", "gtbox", "previous")
LABEL = {"agent": "agent", "sft": "SFT only", "text_only": "text-only", "blind": "query blind", "oracle5": "oracle @5",
         "gtbox": "GT box", "previous": "previous weights"}


def _read(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return {(r["source"], r["case_id"]): r for r in csv.DictReader(f) if r["status"] == "ok"}


def _m(vals: list[float]) -> str:
    return f"{mean(vals):.3f}" if vals else "-"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def main(out: Path, data: Path | None) -> str:
    runs = {name: _read(out / name / "cases.csv") for name in ROWS if (out / name / "cases.csv").is_file()}
    if not runs:
        raise SystemExit(f"no OUT/<row>/cases.csv under {out}: run benchmarks/bench_referring.sh first")
    keys = sorted(set.intersection(*(set(r) for r in runs.values())))
    base = runs.get("agent") or next(iter(runs.values()))
    names = list(runs)
    header = ["", "cases", *(LABEL[n] for n in names)]

    def grouped(key_fn) -> list[list[str]]:
        groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for k in keys:
            groups[key_fn(base[k])].append(k)
        return [[g, str(len(ks)), *(_m([float(runs[n][k]["iou"]) for k in ks]) for n in names)]
                for g, ks in sorted(groups.items())]

    regular = [k for k in keys if base[k]["group"] != "thin"]
    thin = [k for k in keys if base[k]["group"] == "thin"]
    parts = ["### All cases (mean IoU)",
             _table(header, [[lab, str(len(ks)), *(_m([float(runs[n][k]["iou"]) for k in ks]) for n in names)]
                             for lab, ks in (("regular structures", regular), ("thin / scattered", thin))]),
             "### Per modality (regular structures)"]
    keys_all = keys
    keys = regular
    parts += [_table(["modality", "cases", *header[2:]], grouped(lambda r: r["modality"] or "?")),
              "### Per dataset folder (regular structures)",
              _table(["folder", "cases", *header[2:]], grouped(lambda r: r["source"]))]
    steps = {n: _m([float(runs[n][k]["steps"]) for k in regular]) for n in names}
    secs = {n: _m([float(runs[n][k]["total_s"]) for k in regular]) for n in names}
    parts += ["### Steps and seconds per case (regular)",
              _table(["", *(LABEL[n] for n in names)], [["mean steps", *steps.values()], ["s/case", *secs.values()]])]
    if data is not None and "blind" in runs and "agent" in runs:
        from ibisagent.io.manifest import load_manifest

        by_image: dict[str, set[str]] = defaultdict(set)
        image_of: dict[tuple[str, str], str] = {}
        for c in load_manifest(data, split="val"):
            by_image[c.image_key].add(c.object)
            image_of[c.source, c.id] = c.image_key
        multi = [k for k in regular if len(by_image.get(image_of.get(k, ""), ())) >= 2]
        if multi:
            a = [float(runs["agent"][k]["iou"]) for k in multi]
            b = [float(runs["blind"][k]["iou"]) for k in multi]
            parts += ["### Query use on multi-object images (val images with masks of >= 2 objects)",
                      _table(["cases", "agent", "query blind", "loss without the query"],
                             [[str(len(multi)), _m(a), _m(b), f"{mean(a) - mean(b):+.3f}"]])]
    conf = confidence_ranking([base[k] for k in keys_all]) if "agent" in runs else None
    if conf is not None:  # the harness's own ranking figures (summary_extra.json "confidence"), on the common cases
        parts += ["### Confidence (agent's predicted IoU vs real IoU, all cases)",
                  _table(["cases", "Spearman", f"flagged low (<{conf['low_confidence_threshold']})", "IoU flagged",
                          "IoU not flagged"],
                         [[str(conf["cases"]), f"{conf['spearman']:.3f}", str(conf["low_confidence_cases"]),
                           f"{conf['mean_iou_low_confidence']:.3f}", f"{conf['mean_iou_confident']:.3f}"]])]
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
