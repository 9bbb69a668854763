"""Benchmark promptable segmenters with simulated (oracle) clicks on the validation images.

Protocol per (image, mask): the first click is a positive click at the object pixel farthest from its border; each
further click goes to the pixel farthest from the border of the larger error region (false negatives -> positive,
false positives -> negative); every call gets all clicks so far and the previous logits as mask input. IoU is
measured at the original resolution. Reported: mean IoU after 1/3/5/10 clicks, NoC@80/85/90 (clicks to reach the
IoU, capped at --max-clicks), the tight GT box alone, GT box + 2 oracle clicks, decoder latency per call and image
encoder time per image.

Example:
    python benchmarks/bench_segmenter.py --data ../shared/data --max-per-dataset 12 \
        --out-md docs/benchmarks.md --json runs/bench_segmenter.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_DATASETS = [
    "ph2_dermoscopy", "hc18_fetal_head_ultrasound", "busi_breast_ultrasound", "polyp_colonoscopy_small",
    "sammed2d_demo_ct", "totalsegmentator_examples_ct_mr", "drive_retinal_vessels", "isbi2012_em_membranes",
    "monuseg_he_nuclei_patches",
]
#: the issue's target set: one compact object per image (PH2, HC18, BUSI, polyps) and the CT slices
TARGET_SOURCES = ("ph2_dermoscopy", "hc18_fetal_head_ultrasound", "busi_breast_ultrasound", "polyp_colonoscopy_small")
THRESHOLDS = (0.80, 0.85, 0.90)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Example:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data", help="dataset folder (folder of index.jsonl folders)")
    p.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, help="dataset folder names")
    p.add_argument("--split", default="val", choices=["val", "train", "all"], help="manifest split (by image)")
    p.add_argument("--max-per-dataset", type=int, default=12, help="masks per dataset (0 = all)")
    p.add_argument("--segmenters", nargs="+", default=["litemedsam", "litemedsam-click"],
                   help="registered names; NAME@WEIGHTS runs litemedsam-click with another weights file")
    p.add_argument("--click-weights", default=None, help="weights for litemedsam-click (default: shipped)")
    p.add_argument("--max-clicks", type=int, default=20, help="longest click sequence (NoC cap)")
    p.add_argument("--cache-dir", default=None, help="on-disk embedding cache (default $IBISAGENT_CACHE_DIR)")
    p.add_argument("--timing-images", type=int, default=2, help="images on which to time the encoder uncached")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out-md", default=None, help="write a markdown report here")
    p.add_argument("--json", default=None, help="write per-case results here")
    return p.parse_args(argv)


def run_case(seg, gt: np.ndarray, max_clicks: int) -> dict:
    """Oracle-click curve, box, box + 2 clicks for one mask on the segmenter's current image."""
    from ibisagent.masks import bbox, iou
    from ibisagent.training.segmenter import first_click, next_click

    x, y = first_click(gt, None, jitter=False)
    pts, labels, logits, curve = [[x, y]], [1], None, []
    for k in range(max_clicks):
        res = seg.predict(points=np.array(pts), labels=np.array(labels), mask_input=logits)
        curve.append(iou(res.mask, gt))
        logits = res.logits
        if k < max_clicks - 1:
            x, y, lab = next_click(res.mask, gt, None)
            pts.append([x, y])
            labels.append(lab)
    box = np.array(bbox(gt), np.float32)
    if box[2] <= box[0] or box[3] <= box[1]:  # one-pixel-wide object: widen so the box is valid
        box[2:] = np.maximum(box[2:], box[:2] + 1)
    res = seg.predict(box=box)
    box_iou = iou(res.mask, gt)
    bpts, blab, logits = [], [], res.logits
    for _ in range(2):
        x, y, lab = next_click(res.mask, gt, None)
        bpts.append([x, y])
        blab.append(lab)
        res = seg.predict(points=np.array(bpts), labels=np.array(blab), box=box, mask_input=logits)
        logits = res.logits
    return {"curve": curve, "box": box_iou, "box+2": iou(res.mask, gt)}


def iou_at(curve: list[float], k: int) -> float:
    """IoU after k clicks; a curve stopped early (target reached) keeps its last value."""
    return curve[min(k, len(curve)) - 1]


def noc(curve: list[float], thr: float, cap: int) -> int:
    for i, v in enumerate(curve):
        if v >= thr:
            return i + 1
    return cap


def summarize(rows: list[dict], cap: int) -> dict:
    out: dict = {"n": len(rows)}
    for k in (1, 3, 5, 10, 20):
        out[f"@{k}"] = float(np.mean([iou_at(r["curve"], k) for r in rows]))
    curve = [float(np.mean([iou_at(r["curve"], k) for r in rows])) for k in range(1, cap + 1)]
    out["curve"] = curve
    drops = [curve[k] - curve[k - 1] for k in range(1, len(curve))]
    out["max_drop"] = float(-min(0.0, min(drops))) if drops else 0.0  # largest fall of the mean from k to k+1
    out["peak_at"] = int(np.argmax(curve)) + 1
    for t in THRESHOLDS:
        out[f"NoC@{int(t * 100)}"] = float(np.mean([noc(r["curve"], t, cap) for r in rows]))
    out["box"] = float(np.mean([r["box"] for r in rows]))
    out["box+2"] = float(np.mean([r["box+2"] for r in rows]))
    return out


def table(summary: dict[str, dict[str, dict]], groups: list[str]) -> str:
    cols = ["n", "box", "box+2", "@1", "@3", "@5", "@10", "@20", "NoC@80", "NoC@85", "NoC@90", "max_drop"]
    lines = ["| set | segmenter | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for g in groups:
        for name, per in summary.items():
            if g not in per:
                continue
            s = per[g]
            vals = [str(s["n"])] + [f"{s[c]:.3f}" if c.startswith(("@", "box", "max")) else f"{s[c]:.1f}"
                                    for c in cols[1:]]
            lines.append(f"| {g} | {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    from ibisagent.io import load_mask, load_rgb
    from ibisagent.io.manifest import load_manifest
    from ibisagent.segmenters import create_segmenter
    from ibisagent.training.segmenter import case_group

    cases = []
    for ds in args.datasets:
        cs = [c for c in load_manifest(args.data, split=args.split, datasets=[ds])
              if c.mask is not None and not c.is_3d]
        cases += cs[: args.max_per_dataset] if args.max_per_dataset else cs
    if not cases:
        print("no cases found", file=sys.stderr)
        return 2
    segs = {}
    for label in args.segmenters:
        name, _, weights = label.partition("@")  # "litemedsam-click@path.safetensors": other click weights
        cfg = {"cache_dir": args.cache_dir}
        if name == "litemedsam-click" and (weights or args.click_weights):
            cfg["weights"] = weights or args.click_weights
        segs[label] = create_segmenter(name, **cfg)

    # encoder time per image, uncached
    enc_times = []
    timer = create_segmenter(args.segmenters[0].partition("@")[0], memory_cache=False, cache_dir=None)
    timer.disk_cache = None
    for c in cases[: args.timing_images]:
        img = load_rgb(c.image)
        t = time.perf_counter()
        timer.set_image(img)
        enc_times.append(time.perf_counter() - t)

    from tqdm import tqdm

    results: list[dict] = []
    for c in tqdm(cases, desc="bench"):
        img, gt = load_rgb(c.image), load_mask(c.mask)
        if not gt.any():
            continue
        for name, seg in segs.items():
            seg.set_image(img)
            r = run_case(seg, gt, args.max_clicks)
            target = c.source in TARGET_SOURCES or (c.modality == "CT" and case_group(c) == "other")
            r.update(segmenter=name, id=c.id, dataset=c.source, group=case_group(c),
                     target="target" if target else "non-target")
            results.append(r)

    summary: dict[str, dict[str, dict]] = {}
    for name in segs:
        rs = [r for r in results if r["segmenter"] == name]
        per: dict[str, dict] = {}
        for key in ("group", "dataset", "target"):
            for g in sorted({r[key] for r in rs}):
                per[g] = summarize([r for r in rs if r[key] == g], args.max_clicks)
        summary[name] = per
    groups = ["target", "compact", "other", "thin"]
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    lat = {n: 1000 * s.timings.decoder_s / max(1, s.timings.decoder_calls) for n, s in segs.items()}
    cmd = "python benchmarks/bench_segmenter.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        "# Segmenter benchmark (oracle clicks, validation images)",
        "",
        f"Command: `{cmd}`",
        f"Machine: {platform.machine()}, 2 CPU cores shared with other jobs (load varied), fp32, torch "
        f"{torch.__version__}, {args.threads} threads. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "IoU at the original resolution. First click: object pixel farthest from the border; then the farthest pixel"
        " of the larger error region; all clicks + previous logits passed each call. NoC capped at "
        f"{args.max_clicks}. `box` = tight GT box alone; `box+2` = GT box then 2 oracle clicks.",
        "Groups: compact = dermoscopy, fetal head, breast US, polyps; other = CT organs, largest EM cell / nucleus;"
        " thin = vessels, membranes, all nuclei (clicks cannot outline these; reported separately); target = compact"
        " + the CT slices (the issue's target set). `max_drop` = largest fall of the mean IoU from one click count to"
        " the next (1..max clicks); 0 = the mean never falls.",
        "",
        "## By group",
        "",
        table(summary, groups),
        "",
        "## By dataset",
        "",
        table(summary, datasets),
        "",
        "## Mean IoU after k clicks (k = 1..max), target set",
        "",
        *[f"- {n}: " + ", ".join(f"{v:.3f}" for v in per["target"]["curve"]) for n, per in summary.items()
          if "target" in per],
        "",
        "## Latency",
        "",
        "| segmenter | decoder + prompt encoder per call (ms) |",
        "|---|---|",
        *[f"| {n} | {v:.0f} |" for n, v in lat.items()],
        "",
        f"Image encoder (TinyViT, torch, uncached): {np.mean(enc_times):.2f} s per image over {len(enc_times)} images"
        " (machine shared: timings vary)." if enc_times else "",
        "",
    ]
    text = "\n".join(md)
    print(text)
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "latency_ms": lat, "encoder_s": enc_times,
                                               "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
