"""Image-space augmentation of training cases: a random affine warp (zoom, rotation, shift) and an intensity change
(contrast, brightness, gamma) applied to an image and, with the same warp, to its masks.

Used by ``ibisagent train-policy --augment K``: each 2D train image gets ``K`` variants, each encoded once by the
segmenter's image encoder (and kept in the on-disk embedding cache), so the policy sees the object at other sizes,
angles and contrasts than the few hundred originals. The variant of an image is a pure function of the image's
location-independent key (``<dataset>/images/<file>``) and the variant number, so every mask of one image gets the
same warp (they share one embedding) and a rerun makes the same variants. No mirroring here: the trainer mirrors
separately, and only when the query names no side.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["AugmentParams", "augment_image", "augment_mask", "augment_params", "kept_fraction", "portable_key"]


@dataclass(frozen=True)
class AugmentParams:
    """One variant: ``zoom`` > 1 enlarges the content, ``angle`` in degrees (counter-clockwise), ``shift`` as a
    fraction of (width, height), then ``contrast`` (around the mean), ``brightness`` (grey levels) and ``gamma``."""

    zoom: float = 1.0
    angle: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)
    contrast: float = 1.0
    brightness: float = 0.0
    gamma: float = 1.0


def portable_key(key: str) -> str:
    """``key`` (an image path, optionally ``path#part``) without where the data lives: the last three parts of the
    path (``<dataset>/images/<file>``), with the ``#part`` kept."""
    path, sep, part = key.partition("#")
    return "/".join(Path(path).parts[-3:]) + sep + part


def augment_params(key: str, variant: int, *, zoom: tuple[float, float] = (0.8, 1.25), max_angle: float = 15.0,
                   max_shift: float = 0.08) -> AugmentParams:
    """The ``variant``-th (>= 1) random variant of the image with key ``key`` (a path or ``path#slice``)."""
    if variant < 1:
        raise ValueError("variant numbers start at 1 (0 is the original image)")
    seed = int(hashlib.sha1(f"{portable_key(key)}|aug{variant}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    z = float(math.exp(rng.uniform(math.log(zoom[0]), math.log(zoom[1]))))
    return AugmentParams(
        zoom=z, angle=float(rng.uniform(-max_angle, max_angle)),
        shift=(float(rng.uniform(-max_shift, max_shift)), float(rng.uniform(-max_shift, max_shift))),
        contrast=float(rng.uniform(0.8, 1.2)), brightness=float(rng.uniform(-20, 20)),
        gamma=float(math.exp(rng.uniform(math.log(0.8), math.log(1.25)))),
    )


def _inverse_affine(p: AugmentParams, width: int, height: int) -> tuple[float, ...]:
    """PIL's AFFINE coefficients: for each output pixel (x, y), the input pixel it samples."""
    cx, cy = width / 2.0, height / 2.0
    a = math.radians(p.angle)
    cos, sin = math.cos(a) / p.zoom, math.sin(a) / p.zoom
    tx, ty = p.shift[0] * width, p.shift[1] * height
    # output = R*zoom*(input - c) + c + t  =>  input = R^-1/zoom*(output - c - t) + c
    ox, oy = -cx - tx, -cy - ty
    return (cos, sin, cos * ox + sin * oy + cx, -sin, cos, -sin * ox + cos * oy + cy)


def augment_image(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """Warp and re-contrast an (H, W, 3) uint8 image; pixels from outside the original are black."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"augment_image needs an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    warped = Image.fromarray(img).transform((w, h), Image.AFFINE, _inverse_affine(p, w, h), Image.BILINEAR,
                                            fillcolor=(0, 0, 0))
    inside = np.asarray(Image.fromarray(np.full((h, w), 255, np.uint8)).transform(
        (w, h), Image.AFFINE, _inverse_affine(p, w, h), Image.NEAREST, fillcolor=0)) > 0
    x = np.asarray(warped, np.float32)
    if inside.any():
        mean = float(x[inside].mean())
        x = (x - mean) * p.contrast + mean + p.brightness
        x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** p.gamma
    x[~inside] = 0
    return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def augment_mask(mask: np.ndarray, p: AugmentParams) -> np.ndarray:
    """The same warp as :func:`augment_image` on an (H, W) mask (nearest neighbour), as bool."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"augment_mask needs an (H, W) mask, got {m.shape}")
    h, w = m.shape
    out = Image.fromarray(m.astype(np.uint8) * 255).transform((w, h), Image.AFFINE, _inverse_affine(p, w, h),
                                                              Image.NEAREST, fillcolor=0)
    return np.asarray(out) >= 128


def kept_fraction(mask: np.ndarray, warped: np.ndarray, p: AugmentParams) -> float:
    """How much of the object survived the warp: warped area / (original area x zoom^2); below ~0.8 the object was
    pushed partly off the image and the variant should not be used for that mask."""
    area = float(np.asarray(mask, bool).sum()) * p.zoom**2
    return float(np.asarray(warped, bool).sum()) / area if area > 0 else 0.0
