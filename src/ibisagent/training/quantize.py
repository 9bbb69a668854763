"""int8 post-training quantization of the image encoder (issue 27): the calibration sample and the NNCF build.

It lives here, above ``ibisagent.segmenters`` and ``ibisagent.io``, because it needs both: the dataset reader picks
the calibration images, the segmenter's exported encoder is what gets quantized. The runtime side (finding and running
the cached int8 model, ``encoder="openvino-int8"``) stays in :mod:`ibisagent.segmenters.onnx_encoder`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ibisagent.segmenters.base import SegmenterError, SegmenterUnavailable
from ibisagent.segmenters.onnx_encoder import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_OPSET,
    INT8_PIP_HINT,
    INT8_SETTINGS,
    announce_preparing,
    ensure_onnx_model,
    int8_model_path,
    log,
    nncf_available,
    openvino_available,
    weights_sha256,
)

__all__ = ["build_int8_model", "calibration_cases"]

_LOCK = threading.Lock()


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def calibration_cases(root: str | Path, n: int) -> list[Any]:
    """``n`` distinct 2D images (:class:`~ibisagent.io.manifest.Case`, one per image) of the train split under
    ``root``, the same on every machine: each dataset folder's images are ordered by (rank within their
    patient/volume group, hash of the group, hash of the image key), and the folders (sorted) are taken round robin,
    so a small ``n`` still spans every folder and every group gives one image before any gives a second."""
    from ibisagent.io.manifest import load_manifest

    if n < 1:
        raise SegmenterError(f"the number of calibration images must be >= 1, got {n}")
    per_folder: dict[str, dict[str, Any]] = {}
    for case in load_manifest(root, split="train"):
        per_folder.setdefault(case.source, {}).setdefault(case.image_key, case)
    queues = []
    for folder in sorted(per_folder):
        groups: dict[str, list[Any]] = {}
        for case in per_folder[folder].values():
            groups.setdefault(case.split_key, []).append(case)
        ranked = []
        for key, members in groups.items():
            for rank, case in enumerate(sorted(members, key=lambda c: _sha1(c.image_key))):
                ranked.append(((rank, _sha1(key), _sha1(case.image_key)), case))
        queues.append([case for _, case in sorted(ranked, key=lambda t: t[0])])
    out: list[Any] = []
    depth = 0
    while len(out) < n and any(len(q) > depth for q in queues):
        for q in queues:
            if len(out) < n and depth < len(q):
                out.append(q[depth])
        depth += 1
    return out


def _calibration_tag(image_keys: list[str], settings: dict[str, Any]) -> str:
    import json

    import nncf
    import openvino as ov

    blob = json.dumps({"images": image_keys, "settings": settings, "nncf": nncf.__version__,
                       "openvino": ov.__version__}, sort_keys=True)
    return _sha1(blob)[:12]


def build_int8_model(module: nn.Module, calibration_data: str | Path, preprocess: Any, *,
                     n_images: int = DEFAULT_CALIBRATION_IMAGES, input_size: int = 256,
                     cache_dir: str | Path | None = None, opset: int = DEFAULT_OPSET,
                     settings: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Quantize ``module``'s exported model to int8 with NNCF, calibrated on :func:`calibration_cases`
    (``n_images`` train images under ``calibration_data``, each ``preprocess(HxWx3 uint8) -> 1x3xSxS tensor``, the
    encoder's own input transform); cached (see the module docstring). Returns (IR path, info: ``cached``,
    ``images``, ``seconds``). Raises :class:`SegmenterUnavailable` without nncf/openvino, :class:`SegmenterError`
    when ``calibration_data`` holds no train images."""
    root = Path(calibration_data)
    if not root.is_dir():  # the user's argument first, then what the machine lacks
        raise SegmenterError(f"calibration data not found: {root} (a dataset folder or a folder of them)")
    if not (nncf_available() and openvino_available()):
        raise SegmenterUnavailable(f"the int8 encoder needs nncf and openvino: {INT8_PIP_HINT}")
    from ibisagent.io.manifest import ManifestError

    try:
        cases = calibration_cases(root, n_images)
    except ManifestError as exc:
        raise SegmenterError(f"no 2D train images with an index.jsonl under {root} to calibrate on ({exc})") from exc
    if not cases:
        raise SegmenterError(f"no 2D train images with an index.jsonl under {root} to calibrate on")
    settings = dict(INT8_SETTINGS if settings is None else settings)
    keys = [c.image_key for c in cases]
    path = int8_model_path(weights_sha256(module), input_size, _calibration_tag(keys, settings), opset, cache_dir)
    info: dict[str, Any] = {"cached": True, "images": len(cases), "seconds": 0.0}
    with _LOCK:
        if path.is_file() and path.with_suffix(".bin").is_file():
            return path, info
        onnx_path = ensure_onnx_model(module, input_size, cache_dir, opset)
        announce_preparing()
        log.info("quantizing the image encoder to int8 with NNCF on %d images (once): %s", len(cases), path)
        import json

        import nncf
        import openvino as ov

        from ibisagent.io.cases import load_rgb

        t0 = time.perf_counter()
        arrays = [np.ascontiguousarray(preprocess(load_rgb(c.image)).numpy(), dtype=np.float32) for c in cases]
        for a in arrays:
            if a.shape != (1, 3, input_size, input_size):
                raise SegmenterError(f"preprocess gave {a.shape}, the encoder takes (1, 3, {input_size}, {input_size})")
        model = ov.Core().read_model(str(onnx_path))
        kwargs: dict[str, Any] = {"subset_size": len(arrays),
                                  "fast_bias_correction": bool(settings.get("fast_bias_correction", True))}
        if settings.get("preset"):
            kwargs["preset"] = nncf.QuantizationPreset(settings["preset"])
        if settings.get("model_type"):
            kwargs["model_type"] = nncf.ModelType(settings["model_type"])
        quantized = nncf.quantize(model, nncf.Dataset(arrays), **kwargs)
        info.update(cached=False, seconds=time.perf_counter() - t0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent))
        try:
            ov.save_model(quantized, str(tmp_dir / "model.xml"), compress_to_fp16=False)
            (tmp_dir / "model.json").write_text(json.dumps(
                {"images": keys, "settings": settings, "nncf": nncf.__version__, "openvino": ov.__version__,
                 "calibration_seconds": round(info["seconds"], 1)}, indent=1))
            for suffix in (".bin", ".json", ".xml"):  # the .xml last: it is what marks the model as present
                os.chmod(tmp_dir / f"model{suffix}", 0o644)
                os.replace(tmp_dir / f"model{suffix}", path.with_suffix(suffix))
        finally:
            for leftover in tmp_dir.glob("*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            with contextlib.suppress(OSError):
                tmp_dir.rmdir()
    return path, info
