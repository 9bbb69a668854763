"""``ibisagent import-release PATH... --out DIR``: the public release's data files in our layout."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "main"]

_DESCRIPTION = """\
Convert the public IBISAgent release's data files into our layout, so they mix with ours:

  *.json     trajectory records of its trajectory_gen/run_tr_gen.py (one record or a list), or its converter's
             dataset {"data": [...]} (clicks_list with COCO-RLE masks)
  *.parquet  RL rows of its trajectory_gen/convert_to_rl_data.py (data_source med-seg)

Writes OUT/<name>/ (index.jsonl, images/, masks/: a dataset folder for eval/synthesize) and OUT/synth/ (a synthesis
folder for `ibisagent export`). The release stores no reasoning: replies get our grounded reasoning text; a
Terminate step is added when the last mask reaches --iou-threshold. Image and mask names in the files are looked up
as given, beside the file and under each --root."""


def add_parser(subparsers: Any) -> None:
    """Add the ``import-release`` subcommand."""
    p = subparsers.add_parser("import-release",
                              help="convert the release's trajectory JSON / RL parquet into a dataset + synthesis folder",
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="release .json or .parquet files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--root", action="append", default=[],
                   help="folder where the files' image and mask names are looked up (repeatable)")
    p.add_argument("--query", default=None, help="query for cases without a caption (trajectory JSON has none)")
    p.add_argument("--name", default="release", help="dataset folder name under OUT (default: release)")
    p.add_argument("--iou-threshold", type=float, default=0.8,
                   help="add a Terminate step when the last mask reaches this IoU (the release's default: 0.8)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ibisagent.exports.release import ReleaseFormatError, import_release

    try:
        info = import_release(args.paths, args.out, roots=args.root, query=args.query, name=args.name,
                              iou_threshold=args.iou_threshold)
    except ReleaseFormatError as exc:
        print(f"ibisagent import-release: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1))
    return 0
