"""The one case loader: a manifest row's image and ground-truth mask, and the one error type for unusable cases.

Every consumer (inference CLI and demo, evaluation, trajectory synthesis, exports, segmenter and policy training,
rewards) loads through here, so training and inference see the same pixels: :func:`load_rgb` is
``load_image(path).array`` (8-bit PNG/JPEG pixels as they are, 16-bit / float images through the percentile window,
alpha composited onto black) and masks go through :func:`ibisagent.io.load_mask` (any nonzero value is the object).

:class:`CaseError` carries a machine-readable ``reason`` (recorded in synthesis manifests and evaluation rows):
``not_2d``, ``no_mask``, ``unreadable_image``, ``unreadable_mask``, ``size_mismatch``, ``empty_mask``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageLoadError, LoadedImage
from .loader import load_image
from .manifest import Case
from .masks_io import MaskError, load_mask
from .volumes import Volume, load_volume

__all__ = ["CASE_ERROR_REASONS", "CaseError", "load_case", "load_case_arrays", "load_rgb", "load_volume_case"]

CASE_ERROR_REASONS = ("not_2d", "no_mask", "unreadable_image", "unreadable_mask", "size_mismatch", "empty_mask")

_MASK_REASON = {"size_mismatch": "size_mismatch", "empty": "empty_mask"}


class CaseError(ValueError):
    """A manifest case that cannot be used; ``reason`` is one of :data:`CASE_ERROR_REASONS`."""

    def __init__(self, message: str, reason: str, case_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.case_id = case_id


def _fail(case: Case, exc: Exception) -> CaseError:
    if isinstance(exc, MaskError):
        reason = _MASK_REASON.get(exc.kind, "unreadable_mask")
    else:
        reason = "unreadable_image"
    return CaseError(f"case {case.id}: {exc}", reason, case.id)


def load_case(case: Case, *, window: Any = None) -> tuple[LoadedImage, np.ndarray]:
    """(image, ground-truth mask) of a 2D manifest case; the mask must match the image size and not be empty."""
    if case.is_3d:
        raise CaseError(f"case {case.id} is a 3D row; use load_volume_case(case) or load_image(case.image, "
                        "slice_index=...)", "not_2d", case.id)
    if case.mask is None:
        raise CaseError(f"case {case.id} has no mask", "no_mask", case.id)
    try:
        image = load_image(case.image, window=window)
        mask = load_mask(case.mask, shape=image.shape, allow_empty=False)
    except (ImageLoadError, MaskError) as exc:
        raise _fail(case, exc) from exc
    return image, mask


def load_case_arrays(case: Case, *, window: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, ground truth HxW bool) of a 2D manifest case, or :class:`CaseError`."""
    image, mask = load_case(case, window=window)
    return image.array, mask


def load_volume_case(case: Case, *, label: int | None = None) -> tuple[Volume, np.ndarray]:
    """(volume, 3D boolean mask) of a 3D manifest row (``load_manifest(..., include_3d=True)``).

    ``label`` selects one label value of a multi-label map (default: any nonzero label).
    """
    if case.mask is None:
        raise CaseError(f"case {case.id} has no mask", "no_mask", case.id)
    try:
        volume = load_volume(case.image)
        mask = load_mask(case.mask, shape=volume.shape, label=label, allow_empty=False)
    except (ImageLoadError, MaskError) as exc:
        raise _fail(case, exc) from exc
    return volume, mask


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as the HxWx3 uint8 array segmenters take (``load_image(path).array``; ImageLoadError)."""
    return load_image(path).array
