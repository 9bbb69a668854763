"""``OUT/report.md``: tables per dataset / modality / structure group and plots (PNG, matplotlib Agg).

Plots: ``iou_vs_interactions.png`` (mean IoU after k interactions, overall and per dataset),
``per_dataset.png`` (mean IoU and Dice per dataset), ``gallery.png`` (best and worst cases with overlays:
green = prediction, yellow contour = ground truth, dots = clicks, cyan = box).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .runfiles import read_cases, read_predictions
from .summary import mean_curve

__all__ = ["GALLERY_SIZE", "markdown_table", "write_report"]

#: best and worst cases shown in the gallery (each)
GALLERY_SIZE = 4


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; floats with 3 decimals, None as '-'."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


_METRIC_HEADER = ("cases", "IoU", "Dice", "NoC80", "NoC85", "NoC90", "IoU@1", "IoU@3", "IoU@5", "IoU@10", "steps",
                  "s/case")


def _metric_cells(b: dict[str, Any]) -> list[Any]:
    return [b["cases"], b["mean_iou"], b["mean_dice"], b["noc"]["80"], b["noc"]["85"], b["noc"]["90"],
            b["iou_at"]["1"], b["iou_at"]["3"], b["iou_at"]["5"], b["iou_at"]["10"], b["mean_steps"],
            b["mean_seconds"]]


def _plots(out: Path, rows: list[dict[str, Any]], budget: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    by_ds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_ds[r["source"]].append(r)
    xs = list(range(1, budget + 1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, group in sorted(by_ds.items()):
        ax.plot(xs, mean_curve(group, budget), lw=1, alpha=0.6, label=f"{name} ({len(group)})")
    ax.plot(xs, mean_curve(rows, budget), lw=3, color="black", label=f"all ({len(rows)})")
    ax.set_xlabel("interactions (clicks + boxes)")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "iou_vs_interactions.png", dpi=110)
    plt.close(fig)
    made.append("iou_vs_interactions.png")

    names = sorted(by_ds)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [np.mean([r["iou"] for r in by_ds[n]]) for n in names], 0.4, label="IoU")
    ax.bar(x + 0.2, [np.mean([r["dice"] for r in by_ds[n]]) for n in names], 0.4, label="Dice")
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "per_dataset.png", dpi=110)
    plt.close(fig)
    made.append("per_dataset.png")
    return made


def _gallery(out: Path, rows: list[dict[str, Any]], data: str | None) -> str | None:
    if not rows or not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ibisagent.io import CaseError, load_case_arrays
    from ibisagent.io.manifest import ManifestError, load_manifest
    from ibisagent.masks import rle_decode
    from ibisagent.overlay import display_overlay

    try:
        cases = {(c.source, c.id): c for c in load_manifest(data, split="all")}
    except (ManifestError, OSError):
        return None
    preds = read_predictions(out)
    ranked = sorted(rows, key=lambda r: r["iou"])
    k = min(GALLERY_SIZE, (len(ranked) + 1) // 2)
    picks = [("best", r) for r in ranked[::-1][:k]] + [("worst", r) for r in ranked[:k]]
    panels = []
    for tag, r in picks:
        key = (r["source"], r["case_id"])
        if key not in cases or key not in preds:
            continue
        try:
            image, gt = load_case_arrays(cases[key])
            p = preds[key]
            mask = rle_decode(p["mask_rle"])
        except (CaseError, ValueError, OSError):  # CaseError: the case cannot be loaded any more
            continue
        vis = display_overlay(image, mask, p.get("points") or [], p.get("labels") or [], p.get("box"), gt=gt)
        panels.append((f"{tag}: {r['case_id'][:32]}\nIoU {r['iou']:.3f}, {r['interactions']} interactions", vis))
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, vis) in zip(axes.ravel(), panels):
        ax.imshow(vis)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gallery.png", dpi=100)
    plt.close(fig)
    return "gallery.png"


def write_report(out: str | Path) -> Path:
    """Write ``OUT/report.md`` (and its PNGs) from cases.csv, summary.json and summary_extra.json."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    extra = json.loads((out / "summary_extra.json").read_text(encoding="utf-8"))
    cfg = summary["config"]
    rows = [r for r in read_cases(out) if r["status"] == "ok"]
    budget = int(cfg.get("max_interactions") or cfg.get("max_steps") or 20)
    lines = [f"# Evaluation: policy `{cfg['policy']}`, segmenter `{cfg['segmenter']}`", ""]
    lines += [f"* data: `{cfg.get('data')}` (split `{cfg.get('split')}`), protocol `{cfg.get('protocol')}`, "
              f"max steps {cfg.get('max_steps')}, interaction budget {budget}",
              f"* policy args `{json.dumps(cfg.get('policy_args'))}`, segmenter args "
              f"`{json.dumps(cfg.get('segmenter_args'))}`",
              f"* versions `{json.dumps(cfg.get('versions'))}`",
              f"* machine `{json.dumps(cfg.get('machine'))}`, date {cfg.get('date')}"]
    if cfg.get("command"):
        lines.append(f"* command: `{cfg['command']}`")
    lines += ["", "IoU/Dice of the final mask; NoC = mean interactions (clicks + boxes) to reach the IoU, counting "
              f"{budget} when never reached; IoU@k = mean IoU after k interactions (early stoppers keep their last "
              "IoU); steps = policy turns including Terminate; s/case = wall time per episode.", ""]
    lines += ["## Overall", "", markdown_table(_METRIC_HEADER, [_metric_cells(summary)]), ""]
    o = extra["overall"]
    lines += [markdown_table(("median IoU", "NSD", "HD95 mean", "HD95 median", "HD95 inf", "clicks", "encoder s",
                              "decoder s", "policy s"),
                             [[o["median_iou"], o["mean_nsd"], o["mean_hd95"], o["median_hd95"], o["hd95_infinite"],
                               o["mean_clicks"], o["mean_encoder_s"], o["mean_segmenter_s"], o["mean_policy_s"]]]),
              "", f"Stop reasons: {', '.join(f'{k} {v}' for k, v in o['stop_reasons'].items()) or '-'}", ""]
    if "challenge" in o:
        lines += ["## Challenge protocol (box + 5 clicks)", "",
                  "DSC_AUC / NSD_AUC: trapezoidal area under DSC / NSD over the 5 click predictions (0..4), as the "
                  "CVPR 2025 interactive 3D challenge script computes it; NSD (surfel-area weighted, as the "
                  f"challenge) at tolerance {cfg.get('nsd_tolerance')} px, 0 when DSC <= 0.2; "
                  "time per interaction = case time / 6.", ""]
        hdr = ("dataset", "cases", "DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", "s/interaction")

        def ch_row(name: str, b: dict[str, Any]) -> list[Any]:
            c = b["challenge"]
            return [name, b["cases"], c["DSC_AUC"], c["NSD_AUC"], c["DSC_Final"], c["NSD_Final"],
                    c["seconds_per_interaction"]]

        body = [ch_row(n, b) for n, b in extra["by_dataset"].items() if "challenge" in b]
        body.append(ch_row("**all**", o))
        lines += [markdown_table(hdr, body), ""]
    lines += ["## By dataset", "", markdown_table(("dataset", *_METRIC_HEADER),
                                                  [[n, *_metric_cells(b)] for n, b in summary["by_dataset"].items()]),
              ""]
    lines += ["## By modality", "", markdown_table(("modality", *_METRIC_HEADER),
                                                   [[n, *_metric_cells(b)] for n, b in extra["by_modality"].items()]),
              ""]
    lines += ["## Thin structures vs the rest", "",
              "thin = vessels, membranes and all-nuclei maps (by object name); hard for click/box segmenters.", "",
              markdown_table(("group", *_METRIC_HEADER),
                             [[n, *_metric_cells(b)] for n, b in extra["by_group"].items()]), ""]
    if rows:
        plots = _plots(out, rows, budget)
        gallery = _gallery(out, rows, cfg.get("data"))
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
        if gallery:
            lines += ["", "Best and worst cases (green: prediction, yellow: ground-truth contour, dots: clicks, "
                          "cyan: box)", "", f"![gallery]({gallery})"]
        lines.append("")
    if extra["errors"]:
        lines += [f"## Skipped cases ({len(extra['errors'])})", ""]
        lines += [f"* `{e['source']}/{e['case_id']}`: {e['error']}" for e in extra["errors"]]
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
