"""Runtime of the agent loop on CPU: image-encoder time per image, decoder time per click, whole oracle episodes.

    python benchmarks/bench_runtime.py --data ../shared/data --split val --limit 20 --segmenter litemedsam-click

Prints a Markdown table (median / p90 / mean) to paste into docs/benchmarks.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="dataset folder (default: the bundled demo cases)")
    ap.add_argument("--split", default="val", choices=["train", "val", "all"])
    ap.add_argument("--limit", type=int, default=20, help="number of cases (default 20)")
    ap.add_argument("--segmenter", default=None, help="segmenter name (default: the CLI default)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()

    import torch

    from ibisagent.agent import Agent
    from ibisagent.cli import default_segmenter
    from ibisagent.demo import demo_data_dir
    from ibisagent.io import load_case, load_manifest
    from ibisagent.segmenters import create_segmenter

    torch.set_num_threads(args.threads)
    data = args.data or str(demo_data_dir())
    cases = load_manifest(data, split=args.split if args.data else "all")
    # one mask per image so every episode pays its own encoder pass
    seen, picked = set(), []
    for c in cases:
        if c.image_key not in seen:
            seen.add(c.image_key)
            picked.append(c)
    picked = picked[: args.limit]
    name = args.segmenter or default_segmenter()
    seg = create_segmenter(name)
    agent = Agent("oracle", seg)
    enc, dec_per_click, episode_s, steps = [], [], [], []
    for case in picked:
        loaded, gt = load_case(case)
        t0 = seg.timings.encoder_s
        d0, n0 = seg.timings.decoder_s, seg.timings.decoder_calls
        t = time.perf_counter()
        ep = agent.segment(loaded.array, case.query, gt)
        episode_s.append(time.perf_counter() - t)
        enc.append(seg.timings.encoder_s - t0)
        calls = seg.timings.decoder_calls - n0
        if calls:
            dec_per_click.append((seg.timings.decoder_s - d0) / calls)
        steps.append(len(ep.steps))
    print(f"segmenter={name}, cases={len(picked)} (distinct images), torch threads={args.threads}, "
          f"CPU count={os.cpu_count()}, {platform.processor() or platform.machine()}")
    print("| figure | median | p90 | mean |\n|---|---|---|---|")
    for label, vals, unit in [("image encoder per image", enc, "s"), ("decoder per click", dec_per_click, "ms"),
                              ("oracle episode (encoder + all steps)", episode_s, "s"), ("steps per episode", steps, "")]:
        k = 1000.0 if unit == "ms" else 1.0
        print(f"| {label} ({unit or 'count'}) | {statistics.median(vals) * k:.3g} | {_q(vals, 0.9) * k:.3g} | "
              f"{statistics.mean(vals) * k:.3g} |")


if __name__ == "__main__":
    main()
