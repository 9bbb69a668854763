"""Side-by-side comparison of several evaluation runs (``ibisagent compare DIR1 DIR2 ...``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CompareError", "compare_runs", "load_run", "paired_differences"]


class CompareError(ValueError):
    """A folder that is not a finished evaluation run."""


def load_run(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """summary.json and (when present) summary_extra.json of a run folder."""
    p = Path(path)
    f = p / "summary.json"
    if not f.is_file():
        raise CompareError(f"{p} has no summary.json: run `ibisagent eval DATA --out {p}` to completion first")
    try:
        summary = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CompareError(f"{f} is not valid JSON ({exc.msg})") from exc
    for key in ("cases", "mean_iou", "noc", "iou_at", "by_dataset", "config"):
        if key not in summary:
            raise CompareError(f"{f} lacks the key {key!r}: not a summary written by `ibisagent eval`")
    extra_f = p / "summary_extra.json"
    extra = json.loads(extra_f.read_text(encoding="utf-8")) if extra_f.is_file() else {}
    return summary, extra


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    labels = [p.name or str(p) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    return labels


def _case_rows(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(source, case_id) -> parsed row of a run's cases.csv (:func:`~ibisagent.evaluation.harness.read_cases`: the
    last row of a rerun case wins), for the cases that finished (status ok, an IoU)."""
    from .runfiles import CASES_CSV, read_cases

    f = path / CASES_CSV
    if not f.is_file():
        raise CompareError(f"{path} has no {CASES_CSV}: paired differences need the per-case results of "
                           "`ibisagent eval`")
    with f.open(encoding="utf-8") as fh:
        header = set(fh.readline().strip().split(","))
    if not {"case_id", "iou", "steps"} <= header:
        raise CompareError(f"{f} lacks case_id/iou/steps columns: not written by `ibisagent eval`")
    return {(r["source"], r["case_id"]): r for r in read_cases(path)
            if r.get("status") == "ok" and r.get("iou") is not None}


def paired_differences(dirs: Sequence[str | Path], *, tie: float = 0.005) -> str:
    """Per-case differences of every run against the first (the baseline), over the cases both finished: mean
    difference of IoU and of steps with its standard error and a normal-approximation 95 % interval, and how many
    cases got better / worse by more than ``tie`` IoU. A markdown table."""
    import math

    if len(dirs) < 2:
        raise CompareError("paired differences need a baseline run and at least one other run")
    paths = [Path(d) for d in dirs]
    labels = _unique_labels(paths)
    base = _case_rows(paths[0])

    def stats(d: list[float]) -> tuple[float, float]:
        m = sum(d) / len(d)
        if len(d) < 2:
            return m, float("nan")
        var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
        return m, math.sqrt(var / len(d))

    lines = [f"Paired differences against `{labels[0]}` (run minus baseline, per case; +- = standard error, "
             "95 % interval = mean +- 1.96 SE)", "",
             "| run | paired cases | IoU diff | 95 % interval | better / worse / within " + f"{tie:g}"
             + " | steps diff |", "|---|---|---|---|---|---|"]
    for label, path in zip(labels[1:], paths[1:]):
        other = _case_rows(path)
        ids = sorted(set(base) & set(other))
        if not ids:
            lines.append(f"| {label} | 0 | - | - | - | - |")
            continue
        d_iou = [float(other[i]["iou"]) - float(base[i]["iou"]) for i in ids]
        d_steps = [float(other[i]["steps"]) - float(base[i]["steps"]) for i in ids]
        m, se = stats(d_iou)
        ms, ses = stats(d_steps)
        better = sum(x > tie for x in d_iou)
        worse = sum(x < -tie for x in d_iou)
        interval = "-" if math.isnan(se) else f"[{m - 1.96 * se:+.3f}, {m + 1.96 * se:+.3f}]"
        lines.append(f"| {label} | {len(ids)} | {m:+.3f} +- {se:.3f} | {interval} | {better} / {worse} / "
                     f"{len(ids) - better - worse} | {ms:+.2f} +- {ses:.2f} |")
    return "\n".join(lines) + "\n"


def compare_runs(dirs: Sequence[str | Path], *, by_dataset: bool = False, fmt: str = "md") -> str:
    """A table with one column per run and one row per metric (markdown, or CSV with ``fmt="csv"``)."""
    if not dirs:
        raise CompareError("give at least one run folder")
    if fmt not in ("md", "csv"):
        raise CompareError(f"unknown format {fmt!r}; choose md or csv")
    paths = [Path(d) for d in dirs]
    runs = [load_run(p) for p in paths]
    labels = _unique_labels(paths)
    rows: list[tuple[str, list[Any]]] = [
        ("policy", [s["config"].get("policy") for s, _ in runs]),
        ("segmenter", [s["config"].get("segmenter") for s, _ in runs]),
        ("protocol", [s["config"].get("protocol") for s, _ in runs]),
        ("split", [s["config"].get("split") for s, _ in runs]),
        ("cases", [s["cases"] for s, _ in runs]),
        ("mean IoU", [s["mean_iou"] for s, _ in runs]),
        ("mean Dice", [s["mean_dice"] for s, _ in runs]),
    ]
    rows += [(f"NoC@{t}", [s["noc"].get(t) for s, _ in runs]) for t in ("80", "85", "90")]
    rows += [(f"IoU@{k}", [s["iou_at"].get(k) for s, _ in runs]) for k in ("1", "3", "5", "10")]
    rows += [("mean steps", [s["mean_steps"] for s, _ in runs]),
             ("s/case", [s["mean_seconds"] for s, _ in runs]),
             ("HD95 median", [e.get("overall", {}).get("median_hd95") for _, e in runs]),
             ("NSD", [e.get("overall", {}).get("mean_nsd") for _, e in runs])]
    if any("challenge" in e.get("overall", {}) for _, e in runs):
        for name in ("DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", "seconds_per_interaction"):
            rows.append((name, [e.get("overall", {}).get("challenge", {}).get(name) for _, e in runs]))
    if by_dataset:
        names = sorted({n for s, _ in runs for n in s["by_dataset"]})
        for n in names:
            rows.append((f"IoU {n}", [s["by_dataset"].get(n, {}).get("mean_iou") for s, _ in runs]))
            rows.append((f"cases {n}", [s["by_dataset"].get(n, {}).get("cases") for s, _ in runs]))
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["metric", *labels])
        for name, vals in rows:
            w.writerow([name, *("" if v is None else v for v in vals)])
        return buf.getvalue()
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "|".join("---" for _ in labels) + "|"]
    lines += ["| " + name + " | " + " | ".join(_fmt(v) for v in vals) + " |" for name, vals in rows]
    counts = {s["cases"] for s, _ in runs}
    if len(counts) > 1:
        lines.append("")
        lines.append("Note: the runs cover different numbers of cases; means are not directly comparable.")
    return "\n".join(lines) + "\n"
