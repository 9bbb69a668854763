"""``ibisagent synthesize DATA --out DIR``: roll out oracle trajectories with grounded reasoning."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

__all__ = ["add_parser", "main"]

_DESCRIPTION = """\
Roll out the oracle annotator through a real segmenter on every (image, mask, query) case of DATA (a manifest
folder with index.jsonl, or a folder of them) and write one JSON line per trajectory into DIR/shards/. Each step
keeps the state (clicks, labels, box, previous mask as RLE, IoU before), the reply (grounded reasoning + action in
the reference grammar) and the IoU after. Cases the segmenter cannot bring to the IoU threshold, and unreadable or
empty cases, are skipped with a reason (DIR/skipped.jsonl, counted in DIR/manifest.json). Re-running the same
command resumes an interrupted run without losing or duplicating a case.

variants: oracle (reference distance-transform clicks), box (jittered ground-truth box first, then clicks),
reflective (a deliberate wrong click, then the step that notices and corrects it), box-reflective (a loose or
shifted box corrected by a tighter box or a click), lookahead (tries candidate clicks through the segmenter and
keeps the largest IoU gain: shorter episodes), release (the public release's generator: its OpenCV clicker, repeats
allowed, up to --max-steps clicks then Terminate; needs pip install 'ibisagent[release]')."""


def add_parser(subparsers: Any) -> None:
    """Add the ``synthesize`` subcommand."""
    from ibisagent.synthesis.trajectories import VARIANTS

    p = subparsers.add_parser(
        "synthesize", help="synthesize SFT/RL trajectories with the oracle (resumable, parallel)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="manifest folder (index.jsonl) or a folder of manifest folders")
    p.add_argument("--out", required=True, help="output folder (shards/, skipped.jsonl, manifest.json)")
    p.add_argument("--variants", default="oracle",
                   help=f"comma-separated trajectory variants: {', '.join(VARIANTS)} (default: oracle)")
    p.add_argument("--segmenter", default="litemedsam-click", help="segmenter backend (default: litemedsam-click)")
    p.add_argument("--iou-threshold", type=float, default=0.8, help="stop once IoU reaches this (default 0.8)")
    p.add_argument("--max-steps", type=int, default=20, help="turns per episode, Terminate included (default 20)")
    p.add_argument("--box-jitter", type=float, default=0.1,
                   help="box variants: each side moves by up to this fraction of the box size (default 0.1)")
    p.add_argument("--lookahead-candidates", type=int, default=8,
                   help="lookahead: candidate clicks tried per step (default 8)")
    p.add_argument("--seed", type=int, default=0, help="run seed (trajectories depend on seed, case and variant)")
    p.add_argument("--split", choices=("train", "val", "all"), default="train", help="data split (default train)")
    p.add_argument("--datasets", default="", help="comma-separated dataset folder names to use (default: all)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N cases (sorted by id)")
    p.add_argument("--keep-unreached", action="store_true",
                   help="keep trajectories that never reach the threshold (marked reached=false)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes / Ray tasks (default 1)")
    p.add_argument("--ray", dest="ray_address", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster ('auto', 'ip:port') or 'local' for a local Ray instance "
                        "(needs the 'ray' extra)")
    p.add_argument("--shard-size", type=int, default=1000, help="trajectories per shard file (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ibisagent.io.manifest import ManifestError
    from ibisagent.segmenters.base import SegmenterError, SegmenterUnavailable
    from ibisagent.synthesis.runner import SynthesisConfig, SynthesisError, run_synthesis

    signal.signal(signal.SIGTERM, _terminate)  # a polite kill ends like Ctrl-C: shards stay consistent, workers stop
    try:
        config = SynthesisConfig(
            variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
            segmenter=args.segmenter, iou_threshold=args.iou_threshold, max_steps=args.max_steps,
            box_jitter=args.box_jitter, lookahead_candidates=args.lookahead_candidates, seed=args.seed,
            keep_unreached=args.keep_unreached, split=args.split,
            datasets=tuple(d.strip() for d in args.datasets.split(",") if d.strip()), limit=args.limit,
            workers=args.workers, ray_address=args.ray_address, shard_size=args.shard_size,
        )
        if args.segmenter not in _segmenters():
            raise SynthesisError(f"unknown segmenter {args.segmenter!r}; known: {', '.join(_segmenters())}")
        result = run_synthesis(args.data, args.out, config, progress=False if args.no_progress else None)
    except (SynthesisError, ManifestError, SegmenterError, SegmenterUnavailable) as exc:
        print(f"ibisagent synthesize: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ibisagent synthesize: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    c = result.counts
    print(json.dumps({"out": str(result.out), "processed_this_run": result.processed, "kept": c["kept"],
                      "skipped": c["skipped"], "skipped_by_reason": c["skipped_by_reason"],
                      "mean_interactions_by_variant": c["mean_interactions_by_variant"]}, indent=1))
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _segmenters() -> list[str]:
    from ibisagent.segmenters.base import list_segmenters

    return list(list_segmenters())
