"""Benchmark LiteMedSAM's prompt encoder + mask decoder per click: PyTorch vs OpenVINO vs ONNX Runtime.

Each call is a full ``LiteMedSAMSegmenter.predict`` on a real image whose embedding is already cached (prompt checks,
prompt encoding, mask decoder, bilinear upsampling to the image size, thresholding), i.e. what one click costs in the
agent loop. The backends are interleaved call by call (torch, openvino, onnx, torch, ...) over a cycle of prompt
kinds (1 / 3 / 12 clicks, box, box + 3 clicks; with and without the previous logits as mask input), so a load change
on a shared machine hits all of them alike. Also prints the max |low-res logit difference| vs PyTorch per backend.

    .venv/bin/python benchmarks/bench_decoder.py --data ../shared/data --rounds 4 --threads 2 --md runs/bench_decoder.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _load_case(root: Path, dataset: str) -> tuple[str, np.ndarray, np.ndarray]:
    from PIL import Image

    from ibisagent.io.manifest import load_manifest

    cases = [c for c in load_manifest(root, datasets=[dataset]) if c.mask is not None]
    if not cases:
        raise SystemExit(f"no cases with masks for {dataset} under {root}")
    c = cases[0]
    return c.id, np.array(Image.open(c.image).convert("RGB")), np.asarray(Image.open(c.mask).convert("L")) > 0


def _prompts(gt: np.ndarray, seed: int = 0) -> list[tuple[str, dict]]:
    """Prompt kinds (without mask input): clicks drawn inside (positive) / outside (negative) the ground truth."""
    from ibisagent.masks import bbox

    rng = np.random.default_rng(seed)
    ys, xs = np.nonzero(gt)
    ny, nx = np.nonzero(~gt)

    def clicks(n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
        i = rng.choice(len(xs), n_pos, replace=False)
        j = rng.choice(len(nx), n_neg, replace=False)
        pts = np.concatenate([np.stack([xs[i], ys[i]], 1), np.stack([nx[j], ny[j]], 1)]).astype(np.float32)
        return pts, np.array([1] * n_pos + [0] * n_neg, np.int64)

    box = np.array(bbox(gt), np.float32)
    p1, l1 = clicks(1, 0)
    p3, l3 = clicks(2, 1)
    p12, l12 = clicks(8, 4)
    return [
        ("1 click", {"points": p1, "labels": l1}),
        ("3 clicks", {"points": p3, "labels": l3}),
        ("12 clicks", {"points": p12, "labels": l12}),
        ("box", {"box": box}),
        ("box + 3 clicks", {"points": p3, "labels": l3, "box": box}),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data", help="dataset root (folders with index.jsonl)")
    ap.add_argument("--dataset", default="ph2_dermoscopy", help="dataset folder whose first case is used")
    ap.add_argument("--weights", default="click", help="'click' (default), 'original' or a .safetensors path")
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="passes over the 10 prompt variants (calls per backend = 10 x rounds; default 4 -> 40)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenVINO / ONNX Runtime threads")
    ap.add_argument("--backends", default="torch,openvino,onnx", help="comma-separated decoder= values to compare")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)

    os.environ["IBISAGENT_ONNX_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    from ibisagent.segmenters import create_segmenter
    from ibisagent.segmenters.embedding_cache import MemoryEmbeddingCache

    load_start = os.getloadavg()
    case_id, img, gt = _load_case(Path(args.data), args.dataset)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    name = "litemedsam" if args.weights == "original" else "litemedsam-click"
    extra = {} if args.weights in ("original", "click") else {"weights": args.weights}
    cache = MemoryEmbeddingCache()  # one encoder run shared by all backends
    segs, setup = {}, {}
    first_box = np.array([0, 0, img.shape[1] - 1, img.shape[0] - 1], np.float32)
    for b in backends:
        seg = create_segmenter(name, decoder=b, memory_cache=cache, **extra)
        seg.set_image(img)
        t0 = time.perf_counter()
        seg.predict(box=first_box)  # builds the decoder runner (ONNX export if not cached + compile/session)
        setup[b] = time.perf_counter() - t0
        segs[b] = seg

    # prompt variants: each kind without and with the previous (torch) logits as mask input
    variants = []
    ref_seg = segs[backends[0]]
    for kind, kw in _prompts(gt):
        variants.append((kind, kw))
        variants.append((kind + " + mask", {**kw, "mask_input": ref_seg.predict(**kw).logits}))

    # parity (also the warm-up: the first call per multimask setting builds the runner)
    parity: dict[str, float] = {}
    refs = {kind: segs[backends[0]].predict(**kw) for kind, kw in variants}
    for b in backends:
        parity[b] = max(float(np.abs(segs[b].predict(**kw).logits - refs[kind].logits).max()) for kind, kw in variants)

    times: dict[str, list[float]] = {b: [] for b in backends}
    cpu: dict[str, list[float]] = {b: [] for b in backends}
    by_kind: dict[str, dict[str, list[float]]] = {b: {} for b in backends}
    for _ in range(args.rounds):
        for kind, kw in variants:
            for b in backends:
                t0, c0 = time.perf_counter(), time.process_time()
                segs[b].predict(**kw)
                dt = time.perf_counter() - t0
                times[b].append(dt)
                cpu[b].append(time.process_time() - c0)
                by_kind[b].setdefault(kind, []).append(dt)
    load_end = os.getloadavg()
    med = {b: statistics.median(v) for b, v in times.items()}
    base = backends[0]
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    import onnxruntime
    import openvino

    machine = (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} visible cores, {args.threads} threads"
    )
    lines = [
        f"Command: `{cmd}`",
        "",
        f"Machine: {machine}; load average at start {tuple(round(v, 2) for v in load_start)}, at end "
        f"{tuple(round(v, 2) for v in load_end)}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"openvino {openvino.__version__}.",
        f"Case {case_id} ({img.shape[1]}x{img.shape[0]}), weights {args.weights}; {len(variants)} prompt variants x "
        f"{args.rounds} rounds = {len(times[base])} `predict` calls per backend, interleaved; embedding cached.",
        "",
        f"| decoder | median ms/call (wall) | p10-p90 ms | speed-up vs {base} (same run) | median CPU ms/call "
        f"| max abs low-res logit diff vs {base} |",
        "|---|---|---|---|---|---|",
    ]
    for b in backends:
        p10, p90 = np.percentile(times[b], [10, 90]) * 1000
        lines.append(
            f"| {b} | {med[b] * 1000:.1f} | {p10:.1f}-{p90:.1f} | {med[base] / med[b]:.2f}x "
            f"| {statistics.median(cpu[b]) * 1000:.1f} | {parity[b]:.1e} |"
        )
    kinds = list(by_kind[base])
    lines += [
        "",
        "Median ms per prompt variant:",
        "",
        "| prompt | " + " | ".join(backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    for k in kinds:
        lines.append(
            f"| {k} | " + " | ".join(f"{statistics.median(by_kind[b][k]) * 1000:.1f}" for b in backends) + " |"
        )
    lines += [
        "",
        "First call (s; builds the runner, includes the ONNX export when not cached): "
        + ", ".join(f"{b} {setup[b]:.1f}" for b in backends),
    ]
    md = "\n".join(lines)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "command": cmd,
                    "machine": machine,
                    "load_start": load_start,
                    "load_end": load_end,
                    "median_s": med,
                    "times_s": times,
                    "cpu_s": cpu,
                    "parity_max_abs": parity,
                    "setup_s": setup,
                },
                indent=2,
            )
        )
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
