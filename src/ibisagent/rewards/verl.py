"""verl entry point: ``compute_score(data_source, solution_str, ground_truth, extra_info)``.

Point verl's ``custom_reward_function.path`` at this file and ``name`` at ``compute_score``. Unlike the reference,
which POSTs every reward to an HTTP segmenter server, the segmenter runs in-process (created once per worker and
reused; image embeddings are cached per image).

Per-source scorers live in :data:`SCORERS` (a dict, not an if/elif chain); a ``data_source`` such as
``"ibisagent/ph2_dermoscopy"`` is looked up whole first, then by its part before the first ``/``. Unknown sources
raise ``NotImplementedError`` as verl's ``default_compute_score`` does. Register more with :func:`register_scorer`.

Row layout (written by ``ibisagent export --format verl``): ``ground_truth`` is the ground-truth mask (a path to a
mask image, an RLE dict or its JSON string); ``extra_info`` holds the state: ``image_path``, ``points`` (pixels),
``labels``, ``box`` (pixels or null), ``step`` (1-based turn of the reply), optionally ``prev_mask_rle`` (the
state's mask), ``segmenter`` (backend name), ``reward_config`` (a dict of :class:`RewardConfig` fields).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.masks import rle_decode
from ibisagent.protocol import GrammarMode
from ibisagent.rewards.core import RewardBreakdown, RewardConfig, RewardInputError, score_step

__all__ = ["DEFAULT_SEGMENTER_ENV", "SCORERS", "compute_score", "load_ground_truth", "register_scorer"]

#: environment variable naming the segmenter when a row does not say (default ``litemedsam-click``)
DEFAULT_SEGMENTER_ENV = "IBISAGENT_REWARD_SEGMENTER"

Scorer = Callable[[str, Any, dict[str, Any]], dict[str, Any]]
SCORERS: dict[str, Scorer] = {}

_IMAGES: OrderedDict[str, np.ndarray] = OrderedDict()
_MASKS: OrderedDict[str, np.ndarray] = OrderedDict()
_CACHE_SIZE = 64


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Decorator: ``scorer(solution_str, ground_truth, extra_info) -> dict with "score"`` for a data source."""

    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn

    return deco


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
    from ibisagent.io import load_mask

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
    from ibisagent.io import load_rgb

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


def _score_row(solution_str: str, ground_truth: Any, extra_info: dict[str, Any], mode: GrammarMode) -> dict[str, Any]:
    info = extra_info or {}
    image_path = info.get("image_path") or info.get("image")
    if not image_path:
        raise RewardInputError("extra_info needs 'image_path' (the image the state refers to)")
    gt = load_ground_truth(ground_truth)
    image = _load_image(str(image_path))
    prev = info.get("prev_mask_rle")
    if isinstance(prev, str) and prev.strip():
        prev = json.loads(prev)
    box = info.get("box")
    cfg = info.get("reward_config")
    if isinstance(cfg, str):
        cfg = json.loads(cfg) if cfg.strip() else None
    br: RewardBreakdown = score_step(
        solution_str,
        image=image,
        gt=gt,
        points=_array(info.get("points"), np.float32).reshape(-1, 2),
        labels=_array(info.get("labels"), np.int64).reshape(-1),
        box=None if box is None or len(box) == 0 else _array(box, np.float32).reshape(4),
        step=int(info.get("step", 1)),
        segmenter=str(info.get("segmenter") or os.environ.get(DEFAULT_SEGMENTER_ENV, "litemedsam-click")),
        config=RewardConfig.from_dict(cfg),
        mode=info.get("grammar", mode),
        mask_before=rle_decode(prev) if isinstance(prev, dict) else None,
    )
    d = br.as_dict()
    out: dict[str, Any] = {"score": br.total}
    out.update({k: float(d[k]) for k in ("format", "answer", "placement", "progress", "length",
                                         "iou_before", "iou_after")})
    return out


@register_scorer("ibisagent")
def score_reference(solution_str: str, ground_truth: Any, extra_info: dict[str, Any]) -> dict[str, Any]:
    """Reference grammar (clicks and Terminate)."""
    return _score_row(solution_str, ground_truth, extra_info, "reference")


@register_scorer("ibisagent-box")
def score_extended(solution_str: str, ground_truth: Any, extra_info: dict[str, Any]) -> dict[str, Any]:
    """Extended grammar (clicks, boxes and Terminate) with our box placement reward."""
    return _score_row(solution_str, ground_truth, extra_info, "extended")


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    **_: Any,
) -> dict[str, Any]:
    """verl reward: a dict with ``score`` (the total) and each component, for one generated reply."""
    scorer = SCORERS.get(data_source) or SCORERS.get(str(data_source).split("/", 1)[0])
    if scorer is None:
        raise NotImplementedError(f"no ibisagent scorer for data source {data_source!r}; known: "
                                  f"{', '.join(sorted(SCORERS))}")
    return scorer(solution_str, ground_truth, dict(extra_info or {}))
