"""Benchmark trajectory synthesis and rewards on the dev data.

Measures, on a subset of the dev train split:

* trajectories per minute (all variants asked for, kept or skipped), with N worker processes;
* mean interactions per episode of the distance-transform oracle vs the lookahead oracle (all cases, and the cases
  where both reach the threshold), and how many reach it;
* rewards per second: ``score_transition`` (no segmenter), ``score_step`` and ``compute_score`` (with the
  segmenter in-process).

Writes a JSON result and a markdown table. Run it niced in the background on the shared machine::

    nice -n 10 .venv/bin/python benchmarks/bench_synthesis.py --cases 24 --workers 2 \
        --md docs/benchmarks.md > runs/bench_synthesis.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ibisagent.io import load_case_arrays
from ibisagent.io.manifest import Case
from ibisagent.masks import rle_decode
from ibisagent.rewards import compute_score, score_step, score_transition
from ibisagent.segmenters.base import default_segmenter
from ibisagent.synthesis.runner import SynthesisConfig, iter_skipped, iter_trajectories, run_synthesis, select_cases

REPO = Path(__file__).resolve().parents[1]


def pick_cases(data: str, n: int) -> list[Case]:
    """Round-robin over the dataset folders of the train split (sorted by id), so every modality is represented."""
    by_source: dict[str, list[Case]] = defaultdict(list)
    for c in select_cases(data, SynthesisConfig(split="train")):
        by_source[c.source].append(c)
    out: list[Case] = []
    i = 0
    while len(out) < n and any(i < len(v) for v in by_source.values()):
        for src in sorted(by_source):
            if i < len(by_source[src]) and len(out) < n:
                out.append(by_source[src][i])
        i += 1
    return out


def bench_synthesis(cases: list[Case], out: Path, segmenter: str, variants: tuple[str, ...], workers: int,
                    max_steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = SynthesisConfig(variants=variants, segmenter=segmenter, keep_unreached=True, workers=workers,
                          max_steps=max_steps, split="all")
    t = time.perf_counter()
    res = run_synthesis(cases, out, cfg, progress=False)
    secs = time.perf_counter() - t
    recs = list(iter_trajectories(out))
    by_case: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in recs:
        by_case[r["case_id"]][r["variant"]] = r
    stats: dict[str, dict] = {}
    for v in variants:
        rs = [r for r in recs if r["variant"] == v]
        stats[v] = {
            "trajectories": len(rs),
            "reached": sum(r["reached"] for r in rs),
            "mean_interactions_all": round(statistics.mean(r["n_interactions"] for r in rs), 3) if rs else None,
            "mean_final_iou": round(statistics.mean(r["final_iou"] for r in rs), 4) if rs else None,
        }
    both = [c for c, d in by_case.items() if all(v in d and d[v]["reached"] for v in ("oracle", "lookahead"))]
    paired = {v: round(statistics.mean(by_case[c][v]["n_interactions"] for c in both), 3) if both else None
              for v in ("oracle", "lookahead") if v in variants}
    skipped = list(iter_skipped(out))
    return {
        "cases": len(cases), "variants": list(variants), "workers": workers, "segmenter": segmenter,
        "max_steps": max_steps, "seconds": round(secs, 1), "jobs": res.processed,
        "trajectories_per_min": round(60.0 * res.processed / secs, 2),
        "per_variant": stats, "both_reached_cases": len(both), "mean_interactions_both_reached": paired,
        "skipped": [{"id": s["id"], "reason": s["reason"]} for s in skipped],
    }


def bench_rewards(synth_dir: Path, segmenter: str, n: int) -> dict:
    """Rewards per second on the states of the synthesized trajectories (replies = the recorded oracle replies)."""
    rows = []
    for r in iter_trajectories(synth_dir):
        for s in r["steps"]:
            rows.append((r, s))
    if not rows:
        return {}
    rng = np.random.default_rng(0)
    picks = [rows[i] for i in rng.integers(len(rows), size=n)]
    cache: dict[str, tuple] = {}

    def arrays(r: dict) -> tuple:
        if r["case_id"] not in cache:
            case = Case(id=r["case_id"], image=Path(r["image"]), mask=Path(r["mask"]), query=r["query"])
            cache[r["case_id"]] = load_case_arrays(case)
        return cache[r["case_id"]]

    prepared = []
    for r, s in picks:
        img, gt = arrays(r)
        st = s["state"]
        before = rle_decode(st["prev_mask_rle"]) if st["prev_mask_rle"] else None
        prepared.append((r, s, img, gt, before))
    after_masks = {}
    for i, (r, s, _img, _gt, before) in enumerate(prepared):
        nxt = [x for x in r["steps"] if x["step"] == s["step"] + 1]
        after_masks[i] = rle_decode(nxt[0]["state"]["prev_mask_rle"]) if nxt else before
    out = {}
    t = time.perf_counter()
    for i, (r, s, _img, gt, before) in enumerate(prepared):
        score_transition(s["reply"], gt=gt, mask_before=before, mask_after=after_masks[i], step=s["step"],
                         mode=r["grammar"])
    out["score_transition_per_s"] = round(n / (time.perf_counter() - t), 1)
    m = min(n, 200)
    t = time.perf_counter()
    for r, s, img, gt, before in prepared[:m]:
        st = s["state"]
        score_step(s["reply"], image=img, gt=gt, points=st["clicks"], labels=st["labels"], box=st["box"],
                   step=s["step"], segmenter=segmenter, mode=r["grammar"], mask_before=before)
    out["score_step_per_s"] = round(m / (time.perf_counter() - t), 1)
    t = time.perf_counter()
    for r, s, _img, _gt, _before in prepared[:m]:
        st = s["state"]
        info = {"image_path": r["image"], "points": st["clicks"], "labels": st["labels"], "box": st["box"],
                "step": s["step"], "segmenter": segmenter,
                "prev_mask_rle": json.dumps(st["prev_mask_rle"]) if st["prev_mask_rle"] else ""}
        src = "ibisagent-box" if r["grammar"] == "extended" else "ibisagent"
        compute_score(f"{src}/{r.get('source', '')}", s["reply"], r["mask"], info)
    out["compute_score_per_s"] = round(m / (time.perf_counter() - t), 1)
    out["n_transition"], out["n_step"] = n, m
    return out


def to_markdown(res: dict) -> str:
    s = res["synthesis"]
    lines = [
        "# Synthesis and reward benchmark",
        "",
        f"Command: `nice -n 10 .venv/bin/python benchmarks/bench_synthesis.py --cases {s['cases']} "
        f"--workers {s['workers']} --max-steps {s['max_steps']}` ({res['date']}).",
        f"Machine: {res['cpu']}, 2 CPU cores **shared with up to 8 other jobs** (load average at start "
        f"{res['load_start']}, at end {res['load_end']}), torch 1 thread per worker, fp32. Segmenter: "
        f"`{s['segmenter']}`. Data: {s['cases']} cases of the dev train split, round-robin over the dataset "
        "folders (2D only).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| trajectories per minute ({', '.join(s['variants'])}; {s['workers']} workers) | "
        f"{s['trajectories_per_min']} ({s['jobs']} trajectories in {s['seconds']} s) |",
    ]
    r = res.get("rewards", {})
    if r:
        lines += [
            f"| rewards/s, `score_transition` (masks given) | {r['score_transition_per_s']} |",
            f"| rewards/s, `score_step` (segmenter decoder in-process, embedding cached) | {r['score_step_per_s']} |",
            f"| rewards/s, verl `compute_score` (image/mask cache, decoder in-process) | "
            f"{r['compute_score_per_s']} |",
        ]
    lines += ["", "| variant | trajectories | reached IoU >= 0.8 | mean interactions (all) | mean final IoU |",
              "|---|---|---|---|---|"]
    for v, st in s["per_variant"].items():
        lines.append(f"| {v} | {st['trajectories']} | {st['reached']} | {st['mean_interactions_all']} | "
                     f"{st['mean_final_iou']} |")
    pb = s["mean_interactions_both_reached"]
    if pb:
        lines += ["", f"Cases where both the distance-transform oracle and the lookahead oracle reach IoU 0.8: "
                      f"{s['both_reached_cases']}; mean interactions there: DT oracle {pb.get('oracle')}, "
                      f"lookahead {pb.get('lookahead')}."]
    lines += ["", "Unreached trajectories are kept here (`keep_unreached`) so the means cover every case; their "
                  f"episodes run to `max_steps` = {s['max_steps']} turns."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--variants", default="oracle,lookahead,box")
    ap.add_argument("--segmenter", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--rewards", type=int, default=2000, help="transitions scored for score_transition")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_synthesis"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    seg = args.segmenter or default_segmenter()
    cases = pick_cases(args.data, args.cases)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or "x86_64",
           "load_start": round(os.getloadavg()[0], 1)}
    res["synthesis"] = bench_synthesis(cases, Path(args.out), seg, tuple(args.variants.split(",")), args.workers,
                                       args.max_steps)
    res["rewards"] = bench_rewards(Path(args.out), seg, args.rewards)
    res["load_end"] = round(os.getloadavg()[0], 1)
    text = json.dumps(res, indent=1)
    print(text)
    Path(args.json or Path(args.out) / "result.json").write_text(text)
    if args.md:
        Path(args.md).write_text(to_markdown(res))


if __name__ == "__main__":
    main()
