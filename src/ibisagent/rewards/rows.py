"""Exported training rows -> the arguments of :func:`ibisagent.rewards.core.score_step`.

Both adapters read the same state columns (written by ``ibisagent export``): verl's ``extra_info`` dict and TRL's
dataset columns. ``ground_truth`` is a mask path, an RLE dict or its JSON string; the state holds ``image_path``,
``points`` (pixels), ``labels``, ``box`` (pixels or null), ``step`` (1-based turn of the reply), optionally
``prev_mask_rle`` (the state's mask), ``segmenter`` (backend name), ``grammar`` and ``reward_config``. Images and masks
read from files are kept in small LRU caches (a GRPO group scores the same state many times).
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

__all__ = ["DEFAULT_SEGMENTER_ENV", "load_ground_truth", "step_arguments"]

#: environment variable naming the segmenter when a row does not say (default ``litemedsam-click``)
DEFAULT_SEGMENTER_ENV = "IBISAGENT_REWARD_SEGMENTER"

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
