"""``ibisagent export-encoder``: pre-build the ONNX cache of LiteMedSAM's image encoder and check it against PyTorch
(:func:`ibisagent.segmenters.onnx_encoder.export_and_check`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ibisagent.segmenters.base import SegmenterError, SegmenterUnavailable
from ibisagent.segmenters.onnx_encoder import CACHE_DIR_ENV, export_and_check

__all__ = ["add_parser"]


def _load_litemedsam_encoder() -> nn.Module:
    from ibisagent.segmenters.litemedsam import load_base_model

    return load_base_model().image_encoder


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        enc, setup_s, diff = export_and_check(_load_litemedsam_encoder(), runtime=args.runtime,
                                              input_size=args.input_size, cache_dir=args.cache_dir,
                                              threads=args.threads, int8=args.int8)
    except (SegmenterError, SegmenterUnavailable, OSError) as exc:
        print(f"export-encoder: {exc}", file=sys.stderr)
        return 2
    print(f"{enc.path}\n{enc.runtime}: setup {setup_s:.1f} s; max |onnx - torch| on a random input: {diff:.2e}")
    return 0


def add_parser(subparsers: Any) -> Any:
    """Add the ``export-encoder`` subcommand (sets ``func``)."""
    p = subparsers.add_parser(
        "export-encoder",
        help="export LiteMedSAM's image encoder to ONNX once (cached) and check it against PyTorch",
        description="Export the LiteMedSAM TinyViT image encoder to ONNX (cached on disk, keyed by the weights' "
                    "sha256, opset and torch version) so that the first segmentation does not pay for it; prints "
                    "the file and the max difference to PyTorch on a random input. Segmenters use it with "
                    "encoder='auto' (default) or 'onnx'.",
    )
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where to keep the .onnx file (default ${CACHE_DIR_ENV}/onnx or the per-user cache, "
                        "~/.cache/ibisagent/onnx on Linux)")
    p.add_argument("--runtime", choices=("onnx", "openvino"), default="onnx",
                   help="runtime used for the check (default onnx = ONNX Runtime)")
    p.add_argument("--int8", action="store_true", help="also build the int8 dynamically quantized model (onnx)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the check (default 2)")
    p.add_argument("--input-size", type=int, default=256, help=argparse.SUPPRESS)  # tests use a toy module
    p.set_defaults(func=_cmd_export)
    return p
