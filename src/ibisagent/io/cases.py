"""The one case loader: a manifest row's image and ground-truth mask, and the one error type for unusable cases.

Every consumer (inference CLI and demo, evaluation, trajectory synthesis, exports, segmenter and policy training,
rewards) loads through here, so training and inference see the same pixels: :func:`load_rgb` is
``load_image(path).array`` (8-bit PNG/JPEG pixels as they are, 16-bit / float images through the percentile window,
alpha composited onto black) and masks go through :func:`ibisagent.io.load_mask` (any nonzero value is the object).

:class:`CaseError` carries a machine-readable ``reason`` (recorded in synthesis manifests and evaluation rows):
``not_2d``, ``not_3d``, ``no_mask``, ``unreadable_image``, ``unreadable_mask``, ``size_mismatch``,
``geometry_mismatch``, ``empty_mask``.

3D rows (``is_3d``) load through :func:`load_volume_case`: the image :class:`~ibisagent.io.Volume` and the boolean
mask of the row's ``label_value`` in the same voxel order (:func:`ibisagent.io.volume_masks.load_volume_mask`,
which refuses a mask on another voxel grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageLoadError, LoadedImage
from .loader import load_image
from .manifest import Case
from .masks_io import MaskError, load_mask
from .volume_masks import load_volume_mask
from .volumes import Volume, load_volume

__all__ = ["CASE_ERROR_REASONS", "CaseError", "load_case", "load_case_arrays", "load_rgb", "load_volume_case"]

CASE_ERROR_REASONS = ("not_2d", "not_3d", "no_mask", "unreadable_image", "unreadable_mask", "size_mismatch",
                      "geometry_mismatch", "empty_mask")

_MASK_REASON = {"size_mismatch": "size_mismatch", "empty": "empty_mask", "geometry_mismatch": "geometry_mismatch",
                "not_3d": "not_3d"}


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
    """(image volume, 3D boolean mask in its voxel order) of a 3D manifest row (``load_manifest(...,
    include_3d=True)``); the spacing is ``volume.spacing`` (mm per voxel axis).

    ``label`` selects one label value of a multi-label map; default: the row's ``label_value``, else any nonzero
    label. CaseError reasons: ``not_3d`` (a 4D image or mask), ``size_mismatch`` / ``geometry_mismatch`` (image and
    mask on different grids, or the file disagrees with the row's ``shape`` / ``spacing``), ``empty_mask`` (the
    label does not occur), ``unreadable_image`` / ``unreadable_mask``, ``no_mask``.
    """
    if case.mask is None:
        raise CaseError(f"case {case.id} has no mask", "no_mask", case.id)
    if label is None:
        label = _row_label_value(case)
    try:
        volume = load_volume(case.image)
    except ImageLoadError as exc:
        raise _fail(case, exc) from exc
    n_volumes = int(volume.meta.get("n_volumes", 1) or 1)
    if n_volumes > 1:
        raise CaseError(f"case {case.id}: the image {case.image.name} is 4D ({n_volumes} volumes of "
                        f"{'x'.join(map(str, volume.shape))}); a 3D case needs one volume (save the one you mean on "
                        "its own)", "not_3d", case.id)
    _check_row_geometry(case, volume)
    try:
        mask = load_volume_mask(case.mask, volume, label=label, allow_empty=False)
    except MaskError as exc:
        raise _fail(case, exc) from exc
    return volume, mask


def _row_label_value(case: Case) -> int | None:
    """The row's ``label_value`` (None when absent); a value that is not a positive integer (1.5, "2", true) is a
    manifest error, not something to truncate into another label."""
    value = case.extra.get("label_value")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value <= 0:
        raise CaseError(f"case {case.id}: label_value must be a positive integer, got {value!r}", "unreadable_mask",
                        case.id)
    return int(value)


def _check_row_geometry(case: Case, volume: Volume) -> None:
    """The row's ``shape`` and ``spacing`` (``spacing_mm``), when given, must describe the image file."""
    shape = case.extra.get("shape")
    if shape is not None and tuple(int(s) for s in shape) != volume.shape:
        raise CaseError(f"case {case.id}: the row says shape {list(shape)} but {case.image.name} is "
                        f"{list(volume.shape)}", "size_mismatch", case.id)
    spacing = case.extra.get("spacing", case.extra.get("spacing_mm"))
    if spacing is not None and not np.allclose([float(s) for s in spacing], volume.spacing, rtol=1e-3, atol=1e-3):
        shown = ", ".join(f"{s:g}" for s in volume.spacing)
        raise CaseError(f"case {case.id}: the row says spacing {list(spacing)} mm but {case.image.name} has "
                        f"[{shown}] mm", "geometry_mismatch", case.id)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as the HxWx3 uint8 array segmenters take (``load_image(path).array``; ImageLoadError)."""
    return load_image(path).array
