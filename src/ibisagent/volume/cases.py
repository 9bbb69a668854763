"""Volume cases: an ``is_3d`` manifest row as the slice stack and the ``[z, y, x]`` ground truth a volume episode uses.

A thin layer over :func:`ibisagent.io.cases.load_volume_case` (the one case loader): it selects the row's
``label_value`` of a multi-label map and turns the volume into a :class:`~ibisagent.volume.stack.SliceStack`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ibisagent.io.cases import CaseError, load_volume_case
from ibisagent.io.manifest import Case

from .stack import SliceStack

__all__ = ["case_label", "load_volume_stack"]


def case_label(case: Case) -> int | None:
    """The label value a 3D row names (``label_value``; None: any nonzero label)."""
    value = case.extra.get("label_value")
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CaseError(f"case {case.id}: label_value must be an integer, got {value!r}", "unreadable_mask",
                        case.id) from None


def load_volume_stack(case: Case, *, axis: int = 2, window: Any = None) -> tuple[SliceStack, np.ndarray]:
    """(slice stack, ground truth ``[z, y, x]`` bool) of a 3D manifest row, or :class:`CaseError`."""
    if not case.is_3d:
        raise CaseError(f"case {case.id} is not a 3D row", "not_2d", case.id)
    volume, mask = load_volume_case(case, label=case_label(case))
    stack = SliceStack.from_volume(volume, axis=axis, window=window)
    return stack, stack.from_stored(mask)
