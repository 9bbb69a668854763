"""Loading an evaluation case as arrays: the case's HxWx3 uint8 image and boolean ground truth, or a
:class:`CaseError` that the harness records as an error row (and the report skips)."""

from __future__ import annotations

import numpy as np

from ibisagent.io import load_case
from ibisagent.io.manifest import Case
from ibisagent.masks import as_bool

__all__ = ["CaseError", "load_case_arrays"]


class CaseError(ValueError):
    """A case that cannot be evaluated (unreadable image or mask, size mismatch, empty mask)."""


def load_case_arrays(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The case's HxWx3 uint8 image and boolean mask. Raises :class:`CaseError` for unusable cases."""
    if case.mask is None:
        raise CaseError(f"case {case.id} has no mask: evaluation needs a ground truth")
    try:
        loaded, mask = load_case(case)
    except (ValueError, OSError) as exc:
        raise CaseError(str(exc)) from exc
    image = np.asarray(getattr(loaded, "array", loaded))
    try:
        mask = as_bool(mask)
    except ValueError as exc:
        raise CaseError(f"mask {case.mask}: {exc}") from exc
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise CaseError(f"image {case.image} loaded as {image.shape} {image.dtype}, expected HxWx3 uint8")
    if mask.shape != image.shape[:2]:
        raise CaseError(f"mask is {mask.shape[0]}x{mask.shape[1]} but the image is {image.shape[0]}x{image.shape[1]}")
    if not mask.any():
        raise CaseError(f"mask {case.mask} is empty")
    return image, mask
