"""``ibisagent export-encoder``: pre-build the ONNX cache of LiteMedSAM's image encoder and check it against PyTorch
(:func:`ibisagent.segmenters.onnx_encoder.export_and_check`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ibisagent.segmenters.base import SegmenterError, SegmenterUnavailable
from ibisagent.segmenters.onnx_encoder import CACHE_DIR_ENV, DEFAULT_CALIBRATION_IMAGES, export_and_check

__all__ = ["add_parser"]


def _load_litemedsam_encoder() -> nn.Module:
    from ibisagent.segmenters.litemedsam import load_base_model

    return load_base_model().image_encoder


def _preprocess() -> Any:
    """The encoder's input transform (HxWx3 uint8 -> 1x3x256x256), applied to the calibration images."""
    from ibisagent.segmenters.litemedsam import preprocess_image

    return preprocess_image


def _cmd_export(args: argparse.Namespace) -> int:
    runtime = args.runtime or ("openvino" if args.calibration_data is not None else "onnx")
    if args.calibration_data is not None and not (args.int8 and runtime == "openvino"):
        print("export-encoder: --calibration-data is for the OpenVINO int8 model: add --int8 (and --runtime "
              "openvino)", file=sys.stderr)
        return 2
    if args.int8 and runtime == "openvino" and args.calibration_data is None:
        print("export-encoder: the OpenVINO int8 model needs --calibration-data DIR (a dataset root with "
              "index.jsonl; its train split is used)", file=sys.stderr)
        return 2
    if args.calibration_images < 1:
        print(f"export-encoder: --calibration-images must be >= 1, got {args.calibration_images}", file=sys.stderr)
        return 2
    try:
        encoder = _load_litemedsam_encoder()
        if args.int8 and runtime == "openvino":  # calibrate (cached) first; export_and_check then runs that model
            from ibisagent.training.quantize import build_int8_model

            build_int8_model(encoder, args.calibration_data, _preprocess(), n_images=args.calibration_images,
                             input_size=args.input_size, cache_dir=args.cache_dir)
        enc, setup_s, diff = export_and_check(encoder, runtime=runtime, input_size=args.input_size,
                                              cache_dir=args.cache_dir, threads=args.threads, int8=args.int8)
    except (SegmenterError, SegmenterUnavailable, OSError) as exc:
        print(f"export-encoder: {exc}", file=sys.stderr)
        return 2
    print(f"{enc.path}\n{enc.runtime}{' int8' if enc.quantized else ''}: setup {setup_s:.1f} s; "
          f"max |onnx - torch| on a random input: {diff:.2e}")
    return 0


def add_parser(subparsers: Any) -> Any:
    """Add the ``export-encoder`` subcommand (sets ``func``)."""
    p = subparsers.add_parser(
        "export-encoder",
        help="export LiteMedSAM's image encoder to ONNX once (cached) and check it against PyTorch",
        description="Export the LiteMedSAM TinyViT image encoder to ONNX (cached on disk, keyed by the weights' "
                    "sha256, opset and torch version) so that the first segmentation does not pay for it; prints "
                    "the file and the max difference to PyTorch on a random input. Segmenters use it with "
                    "encoder='auto' (default) or 'onnx'. With --int8 --calibration-data DIR it also builds the int8 "
                    "model (NNCF) that encoder='openvino-int8' runs.",
    )
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where to keep the .onnx file (default ${CACHE_DIR_ENV}/onnx or the per-user cache, "
                        "~/.cache/ibisagent/onnx on Linux)")
    p.add_argument("--runtime", choices=("onnx", "openvino"), default=None,
                   help="runtime used for the check (default onnx = ONNX Runtime; openvino with --calibration-data)")
    p.add_argument("--int8", action="store_true",
                   help="also build the int8 model: with --runtime openvino the NNCF post-training quantized model "
                        "that encoder='openvino-int8' runs (needs --calibration-data and the int8 extra); with onnx "
                        "ONNX Runtime's dynamic quantization (experiments)")
    p.add_argument("--calibration-data", type=Path, default=None, metavar="DIR",
                   help="dataset root (folders with index.jsonl, e.g. ../shared/data) whose train split calibrates "
                        "the OpenVINO int8 model")
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                   help=f"number of calibration images (default {DEFAULT_CALIBRATION_IMAGES}; a stable sample, "
                        "round robin over the dataset folders)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the check (default 2)")
    p.add_argument("--input-size", type=int, default=256, help=argparse.SUPPRESS)  # tests use a toy module
    p.set_defaults(func=_cmd_export)
    return p
