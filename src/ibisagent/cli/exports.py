"""``ibisagent export SYNTH_DIR --format llamafactory|verl|hf|release-verl|release-trajectories --out DIR``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "main"]

#: the export formats (ibisagent.exports.EXPORTERS, spelled here so that --help does not import numpy)
EXPORT_FORMATS = ("llamafactory", "verl", "hf", "release-verl", "release-trajectories")

_DESCRIPTION = """\
Export synthesized trajectories (a folder written by `ibisagent synthesize`) for training:

  llamafactory  multimodal ShareGPT JSON + a dataset_info.json entry (SFT with LLaMA-Factory)
  verl          a parquet file in the reference's per-step RL layout, for ibisagent.rewards.verl.compute_score
  hf            a Hugging Face `datasets` dataset (prompt/completion + images) for TRL, saved with save_to_disk
  release-verl  the public release's RL parquet (data_source med-seg, one row per click), for its verl recipe
  release-trajectories
                the public release's trajectory JSON, one file per trajectory (trajectories/<id>.json)

Release formats: --profile reference writes the release's coordinates (x / W) and exactly its converter's
extra_info; the default writes ours ((x + 0.5) / W) and adds current_step / pre_iou. Box steps cannot be written.

Each step becomes one single-turn sample (the reference's history-off layout). Images are written once (case
images, overlays and masks each once) and referenced by path."""


def add_parser(subparsers: Any) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser("export", help="export trajectories for LLaMA-Factory, verl or TRL",
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("synth_dir", help="folder written by `ibisagent synthesize`")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="export format")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--variants", default="", help="comma-separated variants to export (default: all)")
    p.add_argument("--prompts", default=None,
                   help="prompt template name or JSON path (default: per trajectory grammar, reference/extended)")
    p.add_argument("--name", default=None,
                   help="dataset name (llamafactory: default ibisagent_sft; verl: parquet stem, default train)")
    p.add_argument("--include-error-steps", action="store_true",
                   help="also use the deliberate mistakes of reflective trajectories as targets (SFT exports)")
    p.add_argument("--profile", choices=("default", "reference"), default="default",
                   help="release formats: coordinate convention and extra fields (reference = the release's)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ibisagent.exports import export
    from ibisagent.exports.common import ExportError
    from ibisagent.prompts import PromptTemplateError

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or None
    try:
        info = export(args.format, args.synth_dir, args.out, variants=variants, prompts=args.prompts,
                      name=args.name, include_error_steps=args.include_error_steps, profile=args.profile)
    except (ExportError, PromptTemplateError) as exc:
        print(f"ibisagent export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1))
    return 0
