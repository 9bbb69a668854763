"""A small pure-numpy segmenter for tests, examples and CI: no weights, deterministic, fast.

Each positive click grows the connected region of pixels whose gray value is within ``tolerance`` of the clicked
pixel, limited to a disk of ``radius_frac`` x the short image side; negative clicks carve out the same kind of
region around them; a box keeps only what lies inside it (or, alone, fills the similar-intensity region around its
centre, clipped to the box). It behaves like a weak interactive segmenter, which is what tests need: clicks change
the mask in the expected direction.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ibisagent.segmenters.base import Segmenter, SegResult, register_segmenter

__all__ = ["FakeSegmenter"]


class FakeSegmenter(Segmenter):
    name = "fake"

    def __init__(self, tolerance: float = 40.0, radius_frac: float = 0.35) -> None:
        super().__init__()
        self.tolerance = float(tolerance)
        self.radius_frac = float(radius_frac)

    def _encode(self, image: np.ndarray) -> np.ndarray:
        return image.astype(np.float32).mean(axis=2)

    def _region(self, x: float, y: float) -> np.ndarray:
        gray: np.ndarray = self._features
        h, w = gray.shape
        cx, cy = int(round(x)), int(round(y))
        yy, xx = np.ogrid[:h, :w]
        r = self.radius_frac * min(h, w)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        similar = np.abs(gray - gray[cy, cx]) <= self.tolerance
        lab, _ = ndimage.label(similar & disk)
        return lab == lab[cy, cx]

    def _decode(self, points, labels, box, mask_input) -> SegResult:
        h, w = self.image_shape
        mask = np.zeros((h, w), bool)
        if box is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            inside = np.zeros((h, w), bool)
            inside[y1 : y2 + 1, x1 : x2 + 1] = True
            if not (labels == 1).any():
                mask |= self._region((x1 + x2) / 2, (y1 + y2) / 2) & inside
        for (x, y), lab in zip(points, labels):
            if lab == 1:
                mask |= self._region(x, y)
        for (x, y), lab in zip(points, labels):
            if lab == 0:
                mask &= ~self._region(x, y)
                mask[int(round(y)), int(round(x))] = False
        if box is not None:
            mask &= inside
        logits = np.where(mask, 4.0, -4.0).astype(np.float32)[None]
        return SegResult(mask=mask, logits=logits, score=float("nan"))


@register_segmenter("fake", "pure-numpy intensity region grower for tests (no weights)", tags=("test",))
def _make_fake(**cfg) -> FakeSegmenter:
    return FakeSegmenter(**cfg)
