"""The reference oracle click: the one rule the oracle policy, trajectory synthesis and policy training share.

Rule (reference release): compare the current mask with the ground truth; take the false-negative region FN and the
false-positive region FP, the Euclidean distance transform of each (distance to the region's border, the image edge
counting as border), and click at the pixel farthest from the border of the region with the larger maximum
(positive in FN, negative in FP; a tie goes to FN).

Pixels already clicked (``avoid``) are never clicked again. When they use up the chosen region (every pixel of it
that is left has distance 0, e.g. a one-pixel miss the segmenter ignored), the click goes to the other region, as a
human annotator would do: the remaining error is still worth correcting. Only when neither region has a pixel left
is there no click (None).

``rule="release"`` is the release's trajectory clicker instead (our reading of ``trajectory_gen/process_img.py``):
OpenCV's 5x5 chamfer L2 distance transform of each region, without padding (pixels outside the image do not count
as border, so a region touching the image edge is clicked at the edge), the first maximum in row-major order, a tie
to FN, and no memory of earlier clicks (it may click the same pixel again). It needs OpenCV
(``pip install ibisagent[release]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ibisagent.masks import error_regions

__all__ = ["CLICK_RULES", "OracleClick", "next_click"]

#: oracle click rules: ours (padded exact EDT, no repeated pixel) and the release's (see the module docstring)
CLICK_RULES = ("ours", "release")


@dataclass(frozen=True)
class OracleClick:
    """One oracle click in pixels (x = column, y = row)."""

    positive: bool
    x: int
    y: int
    region: np.ndarray  # the connected part of the error region (FN or FP) that holds the click
    depth: float  # distance of the click to that region's border (px)


def next_click(pred: np.ndarray | None, gt: np.ndarray,
               avoid: np.ndarray | Iterable[tuple[float, float]] | None = None, *,
               rule: str = "ours") -> OracleClick | None:
    """The reference oracle's next click for ``pred`` (None = no mask yet) against ``gt``, or None when no error pixel
    is left to click. ``avoid``: (x, y) pixels already clicked (an (N, 2) array or pairs; coordinates are truncated
    to whole pixels and clipped to the image); the ``"release"`` rule ignores it."""
    gt = np.asarray(gt).astype(bool)
    p = np.zeros_like(gt) if pred is None else np.asarray(pred).astype(bool)
    if rule == "release":
        return _release_click(p, gt)
    if rule != "ours":
        raise ValueError(f"rule must be one of {', '.join(CLICK_RULES)}, got {rule!r}")
    er = error_regions(p, gt)
    if er.fn_max == 0 and er.fp_max == 0:
        return None
    pts = _pixels(avoid, gt.shape)
    first = er.fn_max >= er.fp_max
    for positive in (first, not first):
        dt = er.fn_dt if positive else er.fp_dt
        if len(pts):
            dt = dt.copy()
            dt[pts[:, 1], pts[:, 0]] = 0.0
        if dt.max() <= 0:
            continue
        y, x = np.unravel_index(int(np.argmax(dt)), dt.shape)
        region = er.fn if positive else er.fp
        return OracleClick(positive, int(x), int(y), _component(region, int(x), int(y)), float(dt[y, x]))
    return None


def _release_click(pred: np.ndarray, gt: np.ndarray) -> OracleClick | None:
    try:
        import cv2
    except ImportError as exc:
        raise ImportError("the release's click rule uses OpenCV's distance transform: pip install "
                          "'ibisagent[release]' (opencv-python-headless)") from exc
    fn, fp = gt & ~pred, pred & ~gt
    if not fn.any() and not fp.any():
        return None
    fn_d = cv2.distanceTransform(fn.astype(np.uint8), cv2.DIST_L2, 5)
    fp_d = cv2.distanceTransform(fp.astype(np.uint8), cv2.DIST_L2, 5)
    positive = bool(fn_d.max() >= fp_d.max())
    d, region = (fn_d, fn) if positive else (fp_d, fp)
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return OracleClick(positive, int(x), int(y), _component(region, int(x), int(y)), float(d[y, x]))


def _pixels(avoid: np.ndarray | Iterable[tuple[float, float]] | None, shape: tuple[int, ...]) -> np.ndarray:
    if avoid is None:
        return np.zeros((0, 2), np.int64)
    pts = np.asarray(list(avoid) if not isinstance(avoid, np.ndarray) else avoid, dtype=np.float64).reshape(-1, 2)
    pts = pts.astype(np.int64)  # truncation, as the session's float pixel coordinates are whole pixels
    pts[:, 0] = np.clip(pts[:, 0], 0, shape[1] - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, shape[0] - 1)
    return pts


def _component(region: np.ndarray, x: int, y: int) -> np.ndarray:
    lab, _ = ndimage.label(region)
    return lab == lab[y, x] if lab[y, x] else region
