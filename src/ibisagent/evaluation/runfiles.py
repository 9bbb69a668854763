"""The files of an evaluation run folder and how to read them back: ``cases.csv`` (one row per case, columns
:data:`CASE_COLUMNS`), ``predictions.jsonl`` (final mask as RLE and prompts per case) and ``run_config.json`` (the
settings a rerun must match to resume). The harness writes them; the summary, the report and ``compare`` read them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["CASES_CSV", "CASE_COLUMNS", "PREDICTIONS", "RUN_CONFIG", "read_cases", "read_predictions"]

CASES_CSV = "cases.csv"
PREDICTIONS = "predictions.jsonl"
RUN_CONFIG = "run_config.json"

#: columns of cases.csv, in order
CASE_COLUMNS = (
    "case_id", "source", "dataset", "modality", "object", "group", "split", "height", "width", "area_px",
    "status", "error", "iou", "dice", "hd95", "nsd", "steps", "clicks", "interactions", "max_interactions",
    "stop_reason", "encoder_s", "segmenter_s", "policy_s", "total_s", "noc_80", "noc_85", "noc_90",
    "iou_curve", "dice_curve", "nsd_curve", "dsc_auc", "nsd_auc", "dsc_final", "nsd_final",
    "seconds_per_interaction", "predicted_iou", "depth", "peak_rss_mb",
)
_FLOAT_COLS = ("iou", "dice", "hd95", "nsd", "encoder_s", "segmenter_s", "policy_s", "total_s", "dsc_auc", "nsd_auc",
               "dsc_final", "nsd_final", "seconds_per_interaction", "predicted_iou", "peak_rss_mb")
_INT_COLS = ("depth", "height", "width", "area_px", "steps", "clicks", "interactions", "max_interactions", "noc_80", "noc_85",
             "noc_90")
_CURVE_COLS = ("iou_curve", "dice_curve", "nsd_curve")


def _parse_row(raw: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = dict(raw)
    for k in _FLOAT_COLS:
        v = raw.get(k, "")
        row[k] = float(v) if v not in ("", None) else None
    for k in _INT_COLS:
        v = raw.get(k, "")
        row[k] = int(float(v)) if v not in ("", None) else None
    for k in _CURVE_COLS:
        v = raw.get(k, "")
        row[k] = json.loads(v) if v else []
    return row


def read_cases(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``OUT/cases.csv`` with numbers and curves parsed; the last row of a case wins (reruns)."""
    path = Path(out) / CASES_CSV
    if not path.is_file():
        return []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            if not raw.get("case_id"):
                continue  # a line cut short by a crash
            try:
                row = _parse_row(raw)
            except (ValueError, json.JSONDecodeError):
                continue
            rows[(row["source"], row["case_id"])] = row
    return list(rows.values())


def read_predictions(out: str | Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The final mask (RLE) and prompts of each case from ``OUT/predictions.jsonl`` (last record wins)."""
    path = Path(out) / PREDICTIONS
    preds: dict[tuple[str, str], dict[str, Any]] = {}
    if not path.is_file():
        return preds
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        preds[(rec.get("source", ""), rec.get("case_id", ""))] = rec
    return preds
