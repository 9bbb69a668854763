"""Exported training rows -> the arguments of :func:`ibisagent.rewards.core.score_step`.

Both adapters read the same state columns (written by ``ibisagent export``): verl's ``extra_info`` dict and TRL's
dataset columns. ``ground_truth`` is a mask path, an RLE dict or its JSON string; the state holds ``image_path``,
``points`` (pixels), ``labels``, ``box`` (pixels or null), ``step`` (1-based turn of the reply), optionally
``prev_mask_rle`` (the state's mask), ``segmenter`` (backend name), ``grammar`` and ``reward_config``. Images and masks
read from files are kept in small LRU caches (a GRPO group scores the same state many times).

The release's RL rows (``data_source`` ``"med-seg"``, written by its ``trajectory_gen/convert_to_rl_data.py``) keep
the state in ``extra_info``: ``original_image_name`` and ``gt_mask_name`` (file names the release's reward opens as
given), ``clicklist`` (pixel ``[x, y]`` of the clicks so far, rounded to integers before segmenting), ``labels``
(1/0), ``image_size`` (``[W, H]``, for ``min(int(v * size), size - 1)``), optionally ``pre_iou`` (the IoU the progress
reward compares with, 0 when missing; the converter never writes it) and ``current_step`` (the length reward's turn;
missing: length 0). :func:`release_row_arguments` turns such a row into :func:`~ibisagent.rewards.core.score_step`
arguments; names that are not files as given are looked up with the converter's image extensions and under the
folders of ``IBISAGENT_RELEASE_ROOT`` (``os.pathsep``-separated).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.io import load_mask, load_rgb
from ibisagent.masks import rle_decode
from ibisagent.protocol import GrammarMode
from ibisagent.rewards.core import RewardConfig, RewardInputError

__all__ = ["DEFAULT_SEGMENTER_ENV", "RELEASE_DATA_SOURCE", "RELEASE_ROOT_ENV", "load_ground_truth",
           "release_row_arguments", "resolve_release_file", "step_arguments"]

#: environment variable naming the segmenter when a row does not say (default ``litemedsam-click``)
DEFAULT_SEGMENTER_ENV = "IBISAGENT_REWARD_SEGMENTER"

#: the ``data_source`` of the release's RL rows
RELEASE_DATA_SOURCE = "med-seg"
#: folders (``os.pathsep``-separated) where the release rows' image and mask names are looked up
RELEASE_ROOT_ENV = "IBISAGENT_RELEASE_ROOT"
#: extensions the release's converter tries for an image name without one
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")

_IMAGES: OrderedDict[str, np.ndarray] = OrderedDict()
_MASKS: OrderedDict[str, np.ndarray] = OrderedDict()
_CACHE_SIZE = 64


def _cached(cache: OrderedDict[str, np.ndarray], key: str, load: Callable[[], np.ndarray]) -> np.ndarray:
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = load()
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def load_ground_truth(ground_truth: Any) -> np.ndarray:
    """A boolean mask from a mask-image path, an RLE dict, its JSON string, or an array."""
    if isinstance(ground_truth, np.ndarray):
        return ground_truth.astype(bool)
    if isinstance(ground_truth, dict):
        return rle_decode(ground_truth)
    if isinstance(ground_truth, str | Path):
        text = str(ground_truth).strip()
        if text.startswith("{"):
            try:
                return rle_decode(json.loads(text))
            except json.JSONDecodeError as exc:
                raise RewardInputError(f"ground_truth looks like JSON but is not: {exc.msg}") from exc
        try:
            return _cached(_MASKS, text, lambda: load_mask(text))
        except ValueError as exc:  # MaskError: missing, unreadable or not a mask
            raise RewardInputError(str(exc)) from exc
    raise RewardInputError(f"ground_truth must be a mask path, an RLE dict or its JSON, got {type(ground_truth)}")


def _load_image(path: str) -> np.ndarray:
    try:
        return _cached(_IMAGES, path, lambda: load_rgb(path))
    except ValueError as exc:  # ImageLoadError: missing or unreadable
        raise RewardInputError(str(exc)) from exc


def _array(value: Any, dtype: Any) -> np.ndarray:
    """A numeric array from a list, a numpy array, or the object arrays of arrays that parquet round-trips give."""
    if value is None:
        return np.zeros((0,), dtype)
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value.astype(dtype)
    items = list(value)
    if not items:
        return np.zeros((0,), dtype)
    return np.asarray([np.asarray(v, dtype) for v in items], dtype)


def step_arguments(ground_truth: Any, state: dict[str, Any] | None, mode: GrammarMode,
                   config: RewardConfig | None = None) -> dict[str, Any]:
    """The keyword arguments of ``score_step`` (all but the reply) for one row.

    ``mode`` is used when the row's ``grammar`` is missing or empty; ``config`` (when given) replaces the row's
    ``reward_config``. Raises :class:`RewardInputError` for rows a reward cannot be computed from.
    """
    info = state or {}
    image_path = info.get("image_path") or info.get("image")
    if not image_path:
        raise RewardInputError("extra_info needs 'image_path' (the image the state refers to)")
    gt = load_ground_truth(ground_truth)
    image = _load_image(str(image_path))
    prev = info.get("prev_mask_rle")
    if isinstance(prev, str) and prev.strip():
        prev = json.loads(prev)
    box = info.get("box")
    if config is None:
        cfg = info.get("reward_config")
        if isinstance(cfg, str):
            cfg = json.loads(cfg) if cfg.strip() else None
        config = RewardConfig.from_dict(cfg)
    return {
        "image": image,
        "gt": gt,
        "points": _array(info.get("points"), np.float32).reshape(-1, 2),
        "labels": _array(info.get("labels"), np.int64).reshape(-1),
        "box": None if box is None or len(box) == 0 else _array(box, np.float32).reshape(4),
        "step": int(info.get("step", 1)),
        "segmenter": str(info.get("segmenter") or os.environ.get(DEFAULT_SEGMENTER_ENV, "litemedsam-click")),
        "config": config,
        "mode": info.get("grammar") or mode,
        "mask_before": rle_decode(prev) if isinstance(prev, dict) else None,
    }


def resolve_release_file(name: Any, what: str, roots: list[str | Path] | None = None) -> Path:
    """The file a release row's name refers to: as given, then with the converter's image extensions, each as given
    and under ``roots`` (default: the folders of ``IBISAGENT_RELEASE_ROOT``). Raises :class:`RewardInputError`."""
    if not isinstance(name, str | Path) or not str(name):
        raise RewardInputError(f"release row: extra_info has no {what}")
    if roots is None:
        roots = [r for r in os.environ.get(RELEASE_ROOT_ENV, "").split(os.pathsep) if r]
    bases = [Path(name)] + [Path(r) / name for r in roots if not Path(name).is_absolute()]
    for base in bases:
        for cand in (base, *(base.with_name(base.name + e) for e in _IMAGE_EXTS)):
            if cand.is_file():
                return cand
    where = f" (also looked under {', '.join(map(str, roots))})" if roots else f" (set {RELEASE_ROOT_ENV})"
    raise RewardInputError(f"release row: {what} {str(name)!r} is not a file{where}")


def _number(value: Any, default: float | None) -> float | None:
    if value is None:
        return default
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return default if v != v else v  # NaN (a missing value after a parquet round trip) counts as missing


def release_row_arguments(extra_info: dict[str, Any], segmenter: str) -> dict[str, Any]:
    """:func:`~ibisagent.rewards.core.score_step` keyword arguments (all but the reply) for a release RL row, scored
    with ``RewardConfig(profile="reference")`` and its fallbacks: ``pre_iou`` missing -> 0 (``progress_from``),
    ``current_step`` missing -> no length reward (``step=None``)."""
    info = dict(extra_info or {})
    image = _load_image(str(resolve_release_file(info.get("original_image_name"), "original_image_name")))
    gt = load_ground_truth(str(resolve_release_file(info.get("gt_mask_name"), "gt_mask_name")))
    size = info.get("image_size")
    if size is not None and len(size) == 2 and (int(size[1]), int(size[0])) != gt.shape:
        raise RewardInputError(f"release row: image_size {list(map(int, size))} (W, H) does not match the "
                               f"{gt.shape[1]}x{gt.shape[0]} ground truth")
    clicks = np.round(_array(info.get("clicklist"), np.float64).reshape(-1, 2))  # the release rounds (half to even)
    labels = _array(info.get("labels"), np.int64).reshape(-1)
    if len(labels) != len(clicks):
        raise RewardInputError(f"release row: {len(clicks)} clicks but {len(labels)} labels")
    step = _number(info.get("current_step"), None)
    return {
        "image": image,
        "gt": gt,
        "points": clicks.astype(np.float32),
        "labels": labels,
        "box": None,
        "step": None if step is None else int(step),
        "segmenter": segmenter,
        "config": RewardConfig(profile="reference"),
        "mode": "reference",
        "progress_from": _number(info.get("pre_iou"), 0.0),
    }
