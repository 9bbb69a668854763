"""Aggregate cases.csv rows into ``summary.json`` (fixed schema other tools read) and ``summary_extra.json``.

summary.json has exactly these top-level keys (:data:`SUMMARY_KEYS`):

* ``cases``: number of cases evaluated without error;
* ``mean_iou``, ``mean_dice``: of the final masks;
* ``mean_steps``: policy turns per case (every reply counts, Terminate included);
* ``mean_seconds``: wall time per episode (encoder + segmenter decoder + policy + environment);
* ``noc``: ``{"80", "85", "90"}`` -> mean number of interactions (clicks and boxes) to reach that IoU, counting
  the interaction budget (``--max-steps``; 6 for the challenge protocol) when never reached within it; ``null``
  when it is not measurable: in some case the policy chose to stop (Terminate) below that IoU before its budget
  (summary_extra.json ``noc_not_measurable`` counts those cases; the oracle's ``--no-stop`` measures it);
* ``iou_at``: ``{"1", "3", "5", "10"}`` -> mean IoU after that many interactions (a policy that stopped earlier
  keeps its last IoU);
* ``by_dataset``: dataset folder -> the same fields (``cases`` ... ``iou_at``);
* ``config``: policy, segmenter, their args, protocol, max steps, split, versions, machine, date.

Everything else (errors, HD95/NSD, the time split, per-modality and thin-structure groups, the challenge metrics,
the mean IoU-vs-interactions curve) goes to summary_extra.json. HD95 and NSD are the per-case values of
:func:`ibisagent.evaluation.metrics.mask_metrics` (surfel-area-weighted, :mod:`ibisagent.masks`); ``mean_hd95`` and
``median_hd95`` are over the finite HD95 values only (an empty prediction has HD95 = inf), ``hd95_infinite`` counts
the others.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .metrics import IOU_AT_CLICKS, NOC_THRESHOLDS, finite_mean, iou_at, noc_measured

__all__ = ["SUMMARY_KEYS", "noc_mean", "noc_not_measurable", "summarize", "summarize_extra", "write_summaries"]

SUMMARY_KEYS = ("cases", "mean_iou", "mean_dice", "mean_steps", "mean_seconds", "noc", "iou_at", "by_dataset",
                "config")
#: cases.csv column -> name in the challenge's published tables
CHALLENGE_FIELDS = {"dsc_auc": "DSC_AUC", "nsd_auc": "NSD_AUC", "dsc_final": "DSC_Final", "nsd_final": "NSD_Final",
                    "seconds_per_interaction": "seconds_per_interaction"}


def _mean(values: Sequence[float | None]) -> float | None:
    m = finite_mean([v for v in values if v is not None])
    return None if m is None else round(m, 4)


def _curve(row: dict[str, Any]) -> list[float]:
    return list(row.get("iou_curve") or [])


def _budget(row: dict[str, Any], default: int) -> int:
    return int(row.get("max_interactions") or default)


def _noc(row: dict[str, Any], threshold: int, default_budget: int) -> int | None:
    return noc_measured(_curve(row), threshold / 100.0, _budget(row, default_budget), row.get("stop_reason"))


def noc_mean(rows: Sequence[dict[str, Any]], threshold: int, default_budget: int = 20) -> float | None:
    """Mean NoC at ``threshold`` (percent) over ``rows``; None when any row's NoC is not measurable."""
    values = [_noc(r, threshold, default_budget) for r in rows]
    return None if any(v is None for v in values) else _mean(values)


def noc_not_measurable(rows: Sequence[dict[str, Any]], default_budget: int = 20) -> dict[str, int]:
    """Threshold -> how many rows stopped (Terminate) below it before their budget."""
    return {str(t): sum(_noc(r, t, default_budget) is None for r in rows) for t in NOC_THRESHOLDS}


def block(rows: Sequence[dict[str, Any]], default_budget: int = 20) -> dict[str, Any]:
    """The metric fields of summary.json for a set of successful rows."""
    return {
        "cases": len(rows),
        "mean_iou": _mean([r["iou"] for r in rows]),
        "mean_dice": _mean([r["dice"] for r in rows]),
        "mean_steps": _mean([r["steps"] for r in rows]),
        "mean_seconds": _mean([r["total_s"] for r in rows]),
        "noc": {str(t): noc_mean(rows, t, default_budget) for t in NOC_THRESHOLDS},
        "iou_at": {str(k): _mean([iou_at(_curve(r), k, r["iou"] or 0.0) for r in rows]) for k in IOU_AT_CLICKS},
    }


def _grouped(rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], str],
             fn: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return {k: fn(v) for k, v in sorted(groups.items())}


def summarize(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """summary.json from cases.csv rows (error rows are left out)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    budget = int(config.get("max_interactions") or config.get("max_steps") or 20)
    top = block(ok, budget)
    top["by_dataset"] = _grouped(ok, lambda r: r["source"] or r["dataset"], lambda g: block(g, budget))
    top["config"] = config
    return {k: top[k] for k in SUMMARY_KEYS}


def _extra_block(rows: Sequence[dict[str, Any]], budget: int) -> dict[str, Any]:
    hd = [r["hd95"] for r in rows if r.get("hd95") is not None]
    finite_hd = [h for h in hd if h != float("inf")]
    ious = [r["iou"] for r in rows if r.get("iou") is not None]
    out: dict[str, Any] = {
        **block(rows, budget),
        "median_iou": round(statistics.median(ious), 4) if ious else None,
        "mean_nsd": _mean([r.get("nsd") for r in rows]),
        "mean_hd95": _mean(finite_hd),
        "median_hd95": round(statistics.median(finite_hd), 3) if finite_hd else None,
        "hd95_infinite": len(hd) - len(finite_hd),
        "mean_clicks": _mean([r["clicks"] for r in rows]),
        "mean_interactions": _mean([r["interactions"] for r in rows]),
        "mean_encoder_s": _mean([r["encoder_s"] for r in rows]),
        "mean_segmenter_s": _mean([r["segmenter_s"] for r in rows]),
        "mean_policy_s": _mean([r["policy_s"] for r in rows]),
        "stop_reasons": dict(sorted(_count(r["stop_reason"] for r in rows).items())),
        "noc_not_measurable": noc_not_measurable(rows, budget),
    }
    rss = [r.get("peak_rss_mb") for r in rows if r.get("peak_rss_mb") is not None]
    if rss:  # volume runs: the process's peak resident memory (the largest over the cases)
        out["max_peak_rss_mb"] = max(rss)
    if rows and all(r.get("dsc_auc") is not None for r in rows):
        out["challenge"] = {name: _mean([r[col] for r in rows]) for col, name in CHALLENGE_FIELDS.items()}
    return out


def _count(values: Any) -> dict[str, int]:
    c: dict[str, int] = defaultdict(int)
    for v in values:
        c[str(v)] += 1
    return dict(c)


def mean_curve(rows: Sequence[dict[str, Any]], length: int) -> list[float | None]:
    """Mean IoU after 1..length interactions over ``rows`` (early stoppers keep their last IoU)."""
    return [_mean([iou_at(_curve(r), k, r["iou"] or 0.0) for r in rows]) for k in range(1, length + 1)]


def summarize_extra(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """summary_extra.json: everything beyond the fixed summary schema."""
    ok = [r for r in rows if r.get("status") == "ok"]
    errors = [{"case_id": r["case_id"], "source": r["source"], "error": r.get("error", "")} for r in rows
              if r.get("status") != "ok"]
    budget = int(config.get("max_interactions") or config.get("max_steps") or 20)
    return {
        "protocol": config.get("protocol"),
        "overall": _extra_block(ok, budget),
        "by_dataset": _grouped(ok, lambda r: r["source"] or r["dataset"], lambda g: _extra_block(g, budget)),
        "by_modality": _grouped(ok, lambda r: r.get("modality") or "unknown", lambda g: block(g, budget)),
        "by_group": _grouped(ok, lambda r: r.get("group") or "regular", lambda g: _extra_block(g, budget)),
        "iou_curve": mean_curve(ok, budget),
        "confidence": confidence_ranking(ok),
        "errors": errors,
    }


def confidence_ranking(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How well the policy's own quality estimate (``predicted_iou``) ranks the cases: Spearman's rank correlation
    with the real IoU, the mean IoU of the cases it flags as low confidence and of the others. None when the policy
    gives no estimate."""
    from scipy.stats import spearmanr

    from ibisagent.agent import LOW_CONFIDENCE

    pairs = [(float(r["predicted_iou"]), float(r["iou"])) for r in rows
             if r.get("predicted_iou") not in (None, "") and r.get("iou") is not None]
    if len(pairs) < 3:
        return None
    pred, real = zip(*pairs)
    rho = spearmanr(pred, real).statistic if len(set(pred)) > 1 and len(set(real)) > 1 else float("nan")
    low = [b for a, b in pairs if a < LOW_CONFIDENCE]
    high = [b for a, b in pairs if a >= LOW_CONFIDENCE]
    return {"cases": len(pairs), "spearman": None if rho != rho else round(float(rho), 4),
            "low_confidence_threshold": LOW_CONFIDENCE, "low_confidence_cases": len(low),
            "mean_iou_low_confidence": _mean(low), "mean_iou_confident": _mean(high)}


def write_summaries(out: str | Path, rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary_extra.json`` into ``out``; returns the summary."""
    out = Path(out)
    summary = summarize(rows, config)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / "summary_extra.json").write_text(json.dumps(summarize_extra(rows, config), indent=1), encoding="utf-8")
    return summary
