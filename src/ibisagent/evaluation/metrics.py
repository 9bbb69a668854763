"""Per-case interaction metrics: IoU after k interactions, number of clicks to reach an IoU (NoC), curve areas.

An *interaction* is a prompt sent to the segmenter (a click or a box). A curve is the metric after each
interaction, in order. A policy that stops early keeps its last value for later interaction counts; its NoC for a
threshold it stopped below is not measurable (:func:`noc_measured`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "IOU_AT_CLICKS",
    "NOC_THRESHOLDS",
    "THIN_KEYWORDS",
    "curve_auc",
    "finite_mean",
    "group_of",
    "iou_at",
    "noc",
    "noc_measured",
    "pad_curve",
]

#: interaction counts reported as ``iou_at`` in summary.json
IOU_AT_CLICKS = (1, 3, 5, 10)
#: IoU thresholds (percent) reported as ``noc`` in summary.json
NOC_THRESHOLDS = (80, 85, 90)
#: object names with these words are thin structures (vessels, membranes, all-nuclei maps): reported separately
THIN_KEYWORDS = ("vessel", "membrane", "all cell nuclei", "all nuclei")


def iou_at(curve: Sequence[float], k: int, empty_value: float = 0.0) -> float:
    """The metric after ``k`` interactions (k >= 1). Past the end of the curve the last value is kept; an empty
    curve (no interaction at all) gives ``empty_value`` (the IoU of an empty mask with a non-empty object: 0)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not curve:
        return float(empty_value)
    return float(curve[min(k, len(curve)) - 1])


def noc(curve: Sequence[float], threshold: float, max_interactions: int) -> int:
    """Number of interactions needed to reach ``threshold`` (e.g. 0.85); ``max_interactions`` when never reached
    within the first ``max_interactions`` interactions."""
    for i, value in enumerate(curve[:max_interactions], 1):
        if value >= threshold:
            return i
    return int(max_interactions)


def noc_measured(curve: Sequence[float], threshold: float, max_interactions: int, stop_reason: str | None) -> int | None:
    """:func:`noc`, or None when it cannot be measured: the policy chose to stop (``stop_reason`` "terminate")
    before reaching ``threshold`` and before using its ``max_interactions``, so how many more interactions it would
    have needed is unknown (counting the budget would report a number nobody measured)."""
    n = noc(curve, threshold, max_interactions)
    reached = any(v >= threshold for v in curve[:max_interactions])
    if not reached and stop_reason == "terminate" and len(curve) < max_interactions:
        return None
    return n


def pad_curve(curve: Sequence[float], length: int, empty_value: float = 0.0) -> list[float]:
    """The curve cut or extended (by repeating its last value) to exactly ``length`` points."""
    return [iou_at(curve, k, empty_value) for k in range(1, length + 1)]


def curve_auc(values: Sequence[float]) -> float:
    """Area under a curve sampled at unit spacing (trapezoidal rule): 0 for fewer than two points."""
    v = [float(x) for x in values]
    if len(v) < 2:
        return 0.0
    return float(sum((a + b) / 2.0 for a, b in zip(v[:-1], v[1:])))


def finite_mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values (None when there are none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def group_of(object_name: str) -> str:
    """``"thin"`` for thin or scattered structures (:data:`ibisagent.queries.UNCLICKABLE_OBJECTS`, or a name with one
    of :data:`THIN_KEYWORDS`, except compact vessel cross-sections), else ``"regular"``."""
    from ibisagent.queries import is_unclickable

    name = object_name.lower()
    if is_unclickable(name):
        return "thin"
    return "thin" if any(k in name for k in THIN_KEYWORDS) and name not in _COMPACT_VESSELS else "regular"


#: vessel cross-sections (ultrasound): compact objects despite the word
_COMPACT_VESSELS = frozenset({"blood vessel", "common carotid artery"})
