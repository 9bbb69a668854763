"""Load a case's image and ground-truth mask as arrays, turning every kind of bad input into a :class:`CaseError`
with a short machine-readable ``reason`` (recorded in the synthesis manifest instead of crashing the run).

Uses ``ibisagent.io`` when it provides ``load_case`` / ``load_image``; falls back to Pillow for plain raster files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .manifest import Case

__all__ = ["CaseError", "load_case_arrays", "load_mask_file", "load_rgb"]


class CaseError(ValueError):
    """A case that cannot be used. ``reason``: ``unreadable_image``, ``no_mask``, ``unreadable_mask``,
    ``empty_mask``, ``size_mismatch``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 (through ``ibisagent.io.images`` when available)."""
    p = Path(path)
    if not p.is_file():
        raise CaseError(f"image {p} does not exist", "unreadable_image")
    try:
        from .loader import load_image
    except ImportError:
        load_image = None
    try:
        if load_image is not None:
            arr = np.asarray(load_image(p).array)
        else:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise CaseError(f"cannot read image {p}: {exc}", "unreadable_image") from exc
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8 or min(arr.shape[:2]) < 2:
        raise CaseError(f"image {p} is not an HxWx3 8-bit image (shape {arr.shape}, {arr.dtype})",
                        "unreadable_image")
    return np.ascontiguousarray(arr[..., :3])


def load_mask_file(path: str | Path) -> np.ndarray:
    """A mask file (any nonzero value = object) as a boolean HxW array."""
    p = Path(path)
    if not p.is_file():
        raise CaseError(f"mask {p} does not exist", "unreadable_mask")
    try:
        with Image.open(p) as im:
            arr = np.asarray(im)
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise CaseError(f"cannot read mask {p}: {exc}", "unreadable_mask") from exc
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise CaseError(f"mask {p} is not a 2D image (shape {arr.shape})", "unreadable_mask")
    return arr > 0


def _reason(exc: Exception) -> str:
    """A reason code for an ``ibisagent.io`` error (they carry the kind in their type and message)."""
    text = str(exc).lower()
    if "mask" not in type(exc).__name__.lower() and "mask" not in text:
        return "unreadable_image"
    if "no object pixel" in text or " is empty" in text and "0 bytes" not in text:
        return "empty_mask"
    if "image's size" in text or "but the image is" in text:
        return "size_mismatch"
    if "has no mask" in text:
        return "no_mask"
    return "unreadable_mask"


def _from_io(case: Case) -> tuple[np.ndarray, np.ndarray] | None:
    """The (image, mask) pair from ``ibisagent.io.load_case`` if that function exists and gives something usable."""
    try:
        from .masks_io import load_case
    except ImportError:
        return None
    try:
        res: Any = load_case(case)
    except (OSError, ValueError) as exc:
        raise CaseError(str(exc), _reason(exc)) from exc
    if isinstance(res, tuple) and len(res) >= 2:
        image, mask = res[0], res[1]
    else:
        image, mask = getattr(res, "image", None), getattr(res, "mask", None)
    image = getattr(image, "array", image)
    if image is None or mask is None:
        return None
    return np.asarray(image), np.asarray(mask)


def load_case_arrays(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, ground truth HxW bool) of a case, or :class:`CaseError` with a reason."""
    if case.mask is None:
        raise CaseError(f"{case.id}: the case has no mask", "no_mask")
    pair = _from_io(case)
    if pair is None:
        image, gt = load_rgb(case.image), load_mask_file(case.mask)
    else:
        image, gt = pair
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False)
        gt = np.asarray(gt)
        gt = (gt[..., 0] if gt.ndim == 3 else gt) > 0
    if gt.shape != image.shape[:2]:
        raise CaseError(f"{case.id}: mask is {gt.shape[0]}x{gt.shape[1]} but the image is "
                        f"{image.shape[0]}x{image.shape[1]}", "size_mismatch")
    if not gt.any():
        raise CaseError(f"{case.id}: the mask is empty", "empty_mask")
    return image, gt
