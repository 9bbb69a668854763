"""Benchmark the LiteMedSAM image encoder: PyTorch vs ONNX Runtime (fp32, int8 dynamic quant) vs OpenVINO (fp32,
NNCF int8).

Parity on real cases: max |embedding difference| and the IoU between the masks decoded (box prompt = the ground
truth's tight box, original box-trained LiteMedSAM decoder) from the PyTorch and the ONNX embeddings; also each
mask's IoU with the ground truth. Speed: per-image encoder time, the backends interleaved round by round (so a
load change on a shared machine hits all of them alike), median over rounds and images.

    .venv/bin/python benchmarks/bench_encoder.py --data ../shared/data --cases 8 --rounds 5 --threads 2 \
        --json runs/bench_encoder.json --md runs/bench_encoder.md

``openvino-int8`` is included when an NNCF int8 model is cached (``ibisagent export-encoder --int8
--calibration-data DIR``; the newest one); ``--only torch,openvino,openvino-int8`` picks the backends. Parity cases
come from ``--split`` (default ``val``: the calibration images are train images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _load_cases(root: Path, n: int, split: str = "all") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Up to ``n`` 2D cases, round-robin over datasets (first cases of each, sorted), non-empty masks only."""
    from ibisagent.io.manifest import load_manifest

    by_ds: dict[str, list] = {}
    for c in load_manifest(root, split=split):  # type: ignore[arg-type]
        if c.mask is not None:
            by_ds.setdefault(c.source, []).append(c)
    out: list[tuple[str, np.ndarray, np.ndarray]] = []
    depth = 0
    while len(out) < n and any(len(v) > depth for v in by_ds.values()):
        for ds in sorted(by_ds):
            if len(out) >= n or len(by_ds[ds]) <= depth:
                continue
            c = by_ds[ds][depth]
            gt = np.asarray(Image.open(c.mask).convert("L")) > 0
            if gt.sum() < 16:
                continue
            out.append((c.id, np.array(Image.open(c.image).convert("RGB")), gt))
        depth += 1
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def _box_mask(parts, emb: torch.Tensor, gt: np.ndarray) -> np.ndarray:
    from ibisagent.masks import bbox
    from ibisagent.segmenters.litemedsam import boxes_to_model, decode_batch

    h, w = gt.shape
    box = torch.from_numpy(boxes_to_model(np.array(bbox(gt), np.float32), (h, w)))
    with torch.inference_mode():
        logits, _ = decode_batch(parts, emb, None, None, box, None, multimask=False)
        up = F.interpolate(logits[:, :1], size=(h, w), mode="bilinear", align_corners=False)
    return (up[0, 0] > 0).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data", help="dataset root (folders with index.jsonl)")
    ap.add_argument("--cases", type=int, default=8, help="number of real cases for parity and timing")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (each runs every backend on every timed case)")
    ap.add_argument("--timing-cases", type=int, default=None, help="time only the first N cases (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 quantized model")
    ap.add_argument("--no-openvino", action="store_true", help="skip OpenVINO")
    ap.add_argument("--only", default=None, help="comma-separated backends to run (torch always runs: the reference)")
    ap.add_argument("--split", choices=("train", "val", "all"), default="val", help="split of the parity cases")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--md", type=Path, help="write a markdown summary here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from ibisagent.segmenters.litemedsam import load_base_model, preprocess_image
    from ibisagent.segmenters.onnx_encoder import (
        OnnxEncoder,
        OpenVinoEncoder,
        find_int8_model,
        onnx_model_path,
        openvino_available,
        weights_sha256,
    )

    parts = load_base_model()
    enc = parts.image_encoder
    digest = weights_sha256(enc)
    cached = onnx_model_path(digest, 256).is_file()
    only = set(args.only.split(",")) if args.only else None
    builders = {
        "onnx": lambda: OnnxEncoder(enc, threads=args.threads),
        "openvino": lambda: OpenVinoEncoder(enc, threads=args.threads),
        "onnx-int8": lambda: OnnxEncoder(enc, threads=args.threads, quantize=True),
        "openvino-int8": lambda: OpenVinoEncoder(enc, threads=args.threads, int8=True),
    }
    skip = {"openvino": args.no_openvino or not openvino_available(), "onnx-int8": args.no_int8,
            "openvino-int8": not openvino_available() or find_int8_model(enc) is None}
    backends: dict[str, object] = {"torch": None}
    setup: dict[str, float] = {}
    for name, build in builders.items():
        if skip.get(name) or (only is not None and name not in only):
            continue
        t0 = time.perf_counter()
        backends[name] = build()
        setup[name] = time.perf_counter() - t0
    int8_model = getattr(backends.get("openvino-int8"), "path", None)

    def run(name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "torch":
            with torch.inference_mode():
                return enc(x)
        return backends[name](x)  # type: ignore[operator]

    cases = _load_cases(Path(args.data), args.cases, args.split)
    if not cases:
        print(f"no cases with masks under {args.data}", file=sys.stderr)
        return 2
    inputs = [preprocess_image(img) for _, img, _ in cases]

    # --- parity -------------------------------------------------------------------------------------------------
    parity = []
    for (cid, _, gt), x in zip(cases, inputs):
        ref = run("torch", x)
        m_ref = _box_mask(parts, ref, gt)
        row = {"case": cid, "shape": list(gt.shape), "iou_gt_torch": _iou(m_ref, gt)}
        for name in backends:
            if name == "torch":
                continue
            e = run(name, x)
            m = _box_mask(parts, e, gt)
            row[f"{name}_max_abs"] = float((e - ref).abs().max())
            row[f"{name}_rel_l2"] = float((e - ref).norm() / ref.norm())
            row[f"{name}_mask_iou_vs_torch"] = _iou(m, m_ref)
            row[f"iou_gt_{name}"] = _iou(m, gt)
        parity.append(row)

    # --- timing (interleaved) ---------------------------------------------------------------------------------
    timed = inputs[: args.timing_cases] if args.timing_cases else inputs
    for name in backends:  # warm-up
        run(name, inputs[0])
    times: dict[str, list[float]] = {name: [] for name in backends}
    cpu: dict[str, list[float]] = {name: [] for name in backends}  # CPU seconds of this process (all threads)
    for _ in range(args.rounds):
        for x in timed:
            for name in backends:
                t0, c0 = time.perf_counter(), time.process_time()
                run(name, x)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} visible cores, "
                   f"{args.threads} threads, shared with other jobs".strip(),
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "nncf": __import__("nncf").__version__ if "openvino-int8" in backends else None,
        "openvino": __import__("openvino").__version__ if "openvino" in backends else None,
        "onnx_export_cached_before": cached,
        "openvino_int8_model": str(int8_model) if int8_model else None,
        "split": args.split,
        "setup_s": setup,
        "cases": len(cases),
        "timed_cases": len(timed),
        "rounds": args.rounds,
        "median_s": med,
        "median_cpu_s": med_cpu,
        "p10_p90_s": {k: [float(np.percentile(v, 10)), float(np.percentile(v, 90))] for k, v in times.items()},
        "speedup_vs_torch": {k: med["torch"] / v for k, v in med.items()},
        "speedup_vs_openvino": {k: med["openvino"] / v for k, v in med.items()} if "openvino" in med else None,
        "parity": parity,
    }
    names = [n for n in backends if n != "torch"]
    lines = [
        f"Machine: {result['machine']}; load average at the end {tuple(round(v, 2) for v in result['load_avg'])}; "
        f"torch {result['torch']}, onnxruntime {result['onnxruntime']}, openvino {result['openvino']}.",
        f"Parity on {len(cases)} real cases ({args.split} split); timing on {len(timed)} of them x {args.rounds} interleaved rounds "
        f"({len(timed) * args.rounds} runs per encoder).",
        "",
        "| encoder | median s/image (wall) | p10-p90 s | speed-up vs torch (same run) | speed-up vs openvino fp32 "
        "| median CPU s/image |",
        "|---|---|---|---|---|---|",
    ]
    vs_ov = result["speedup_vs_openvino"] or {}
    for k in backends:
        p10, p90 = result["p10_p90_s"][k]
        ov_cell = f"{vs_ov[k]:.2f}x" if k in vs_ov else "-"
        lines.append(f"| {k} | {med[k]:.3f} | {p10:.3f}-{p90:.3f} | {result['speedup_vs_torch'][k]:.2f}x "
                     f"| {ov_cell} | {med_cpu[k]:.3f} |")
    lines += ["", "| case | size | IoU(gt, torch) | " + " | ".join(
        f"{n}: max abs emb diff | {n}: mask IoU vs torch | IoU(gt, {n})" for n in names) + " |",
        "|---|---|---|" + "---|---|---|" * len(names)]
    for r in parity:
        cells = [f"{r[f'{n}_max_abs']:.2e} | {r[f'{n}_mask_iou_vs_torch']:.4f} | {r[f'iou_gt_{n}']:.4f}" for n in names]
        lines.append(f"| {r['case']} | {r['shape'][1]}x{r['shape'][0]} | {r['iou_gt_torch']:.4f} | "
                     + " | ".join(cells) + " |")
    for n in names:
        ious = [r[f"{n}_mask_iou_vs_torch"] for r in parity]
        lines.append("")
        lines.append(f"{n}: min mask IoU vs torch {min(ious):.4f}, mean {np.mean(ious):.4f}; "
                     f"max abs embedding diff {max(r[f'{n}_max_abs'] for r in parity):.2e}; "
                     f"setup {setup[n]:.1f} s (export/quantize if not cached + session; fp32 ONNX file "
                     f"{'was already cached' if cached else 'exported in this run'}).")
    md = "\n".join(lines)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
