"""verl entry point: ``compute_score(data_source, solution_str, ground_truth, extra_info)``.

Point verl's ``custom_reward_function.path`` at this file and ``name`` at ``compute_score``. Unlike the reference,
which POSTs every reward to an HTTP segmenter server, the segmenter runs in-process (created once per worker and
reused; image embeddings are cached per image).

Per-source scorers live in :data:`SCORERS` (a dict, not an if/elif chain); a ``data_source`` such as
``"ibisagent/ph2_dermoscopy"`` is looked up whole first, then by its part before the first ``/``. Unknown sources
raise ``NotImplementedError`` as verl's ``default_compute_score`` does. Register more with :func:`register_scorer`.
The release's own rows (``data_source`` ``"med-seg"``, its converter's layout) are scored with the ``reference``
reward profile and the release's fallbacks (see :func:`ibisagent.rewards.rows.release_row_arguments`).

Row layout (written by ``ibisagent export --format verl``): ``ground_truth`` is the ground-truth mask (a path to a
mask image, an RLE dict or its JSON string); ``extra_info`` holds the state: ``image_path``, ``points`` (pixels),
``labels``, ``box`` (pixels or null), ``step`` (1-based turn of the reply), optionally ``prev_mask_rle`` (the
state's mask), ``segmenter`` (backend name), ``reward_config`` (a dict of :class:`RewardConfig` fields); see
:mod:`ibisagent.rewards.rows`. The result holds ``score`` (the total), every registered component and the IoU
before/after.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ibisagent.protocol import GrammarMode
from ibisagent.rewards.core import score_step
from ibisagent.rewards.rows import (
    DEFAULT_SEGMENTER_ENV,
    RELEASE_DATA_SOURCE,
    load_ground_truth,
    release_row_arguments,
    step_arguments,
)

__all__ = ["DEFAULT_SEGMENTER_ENV", "SCORERS", "compute_score", "load_ground_truth", "register_scorer"]

Scorer = Callable[[str, Any, dict[str, Any]], dict[str, Any]]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Decorator: ``scorer(solution_str, ground_truth, extra_info) -> dict with "score"`` for a data source."""

    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn

    return deco


def _score_row(solution_str: str, ground_truth: Any, extra_info: dict[str, Any], mode: GrammarMode) -> dict[str, Any]:
    return _result(score_step(solution_str, **step_arguments(ground_truth, extra_info, mode)))


def _result(br: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"score": br.total}
    out.update({k: float(v) for k, v in br.components().items()})
    out.update(iou_before=float(br.iou_before), iou_after=float(br.iou_after))
    return out


@register_scorer("ibisagent")
def score_reference(solution_str: str, ground_truth: Any, extra_info: dict[str, Any]) -> dict[str, Any]:
    """Reference grammar (clicks and Terminate)."""
    return _score_row(solution_str, ground_truth, extra_info, "reference")


@register_scorer("ibisagent-box")
def score_extended(solution_str: str, ground_truth: Any, extra_info: dict[str, Any]) -> dict[str, Any]:
    """Extended grammar (clicks, boxes and Terminate) with our box placement reward."""
    return _score_row(solution_str, ground_truth, extra_info, "extended")


@register_scorer(RELEASE_DATA_SOURCE)
def score_release_row(solution_str: str, ground_truth: Any, extra_info: dict[str, Any]) -> dict[str, Any]:
    """The release's rows: the ``reference`` profile; ``ground_truth`` (the oracle's answer text) is not used, as in
    the release; the segmenter is ``extra_info["segmenter"]`` or ``$IBISAGENT_REWARD_SEGMENTER``."""
    seg = str(extra_info.get("segmenter") or os.environ.get(DEFAULT_SEGMENTER_ENV, "litemedsam-click"))
    return _result(score_step(solution_str, **release_row_arguments(extra_info, seg)))


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
