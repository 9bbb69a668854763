"""Rendering: the policy overlay (what the policy sees) and a display rendering (what a person sees).

The policy overlay follows the reference: pixels where the mask is set are blended with forest green (34, 139, 34)
at alpha 0.4, nothing else is drawn. The display rendering adds click markers (green = positive, red = negative)
and the box; it is never fed to a policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DISPLAY_MAX_SIDE", "OVERLAY_COLOR", "OVERLAY_ALPHA", "policy_overlay", "display_overlay", "to_rgb"]

OVERLAY_COLOR = (34, 139, 34)
OVERLAY_ALPHA = 0.4
#: long side (pixels) above which saved display renderings are downscaled (the masks themselves never are)
DISPLAY_MAX_SIDE = 2048


def to_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"expected an HxW or HxWx3 image, got {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {img.dtype}")
    return img[..., :3]


def policy_overlay(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The observation image: the mask blended in forest green at alpha 0.4 (the image itself when no mask)."""
    img = to_rgb(image)
    if mask is None:
        return img.copy()
    m = np.asarray(mask).astype(bool)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask {m.shape} does not match image {img.shape[:2]}")
    out = img.copy()  # blend only the mask's pixels (a float copy of a whole 6000x6000 image would be 430 MB)
    color = np.asarray(OVERLAY_COLOR, np.float32)
    blended = (1 - OVERLAY_ALPHA) * img[m].astype(np.float32) + OVERLAY_ALPHA * color
    out[m] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def display_overlay(
    image: np.ndarray,
    mask: np.ndarray | None,
    points: Sequence[tuple[float, float]] = (),
    labels: Sequence[int] = (),
    box: Sequence[float] | None = None,
    gt: np.ndarray | None = None,
    max_side: int | None = None,
) -> np.ndarray:
    """A rendering for people: the overlay, the mask contour, optional ground-truth contour (yellow), clicks as
    green (positive) / red (negative) dots with a white rim, the box in cyan. With ``max_side``, an image whose
    long side is larger is rendered downscaled to that long side (prompts scaled along)."""
    img = to_rgb(image)
    scale = 1.0
    if max_side is not None and max(img.shape[:2]) > max_side:
        scale = max_side / max(img.shape[:2])
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
        mask = None if mask is None else _resize_mask(mask, size)
        gt = None if gt is None else _resize_mask(gt, size)
        points = [(float(x) * scale, float(y) * scale) for x, y in points]
        box = None if box is None else [float(v) * scale for v in box]
    out = policy_overlay(img, mask)
    h, w = out.shape[:2]
    if mask is not None:
        out = _draw_contour(out, np.asarray(mask).astype(bool), (20, 255, 20))
    if gt is not None:
        out = _draw_contour(out, np.asarray(gt).astype(bool), (255, 220, 0))
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    r = max(3, round(min(h, w) / 80))
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=(0, 220, 255), width=max(1, r // 2))
    for (x, y), lab in zip(points, labels):
        fill = (0, 230, 0) if int(lab) == 1 else (230, 0, 0)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255), width=max(1, r // 3))
    return np.asarray(pil)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    m = Image.fromarray(np.asarray(mask).astype(np.uint8) * 255)
    return np.asarray(m.resize(size, Image.Resampling.NEAREST)) > 127


def _draw_contour(img: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    if not mask.any():
        return img
    from scipy import ndimage

    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    out = img.copy()
    out[edge] = color
    return out
