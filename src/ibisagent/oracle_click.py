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

Two more simulated annotators live here, so the 2D and the volume episodes share them:

* :func:`challenge_click`: the CVPR 2025 interactive-segmentation challenge's click (centre of the largest connected
  error component; 8-connectivity in 2D, 26 in 3D; ties by a fixed-seed draw), for 2D images and volumes.
* :func:`worst_slice_click`: for a volume, the reference rule above on its worst slice (the slice with the most
  error voxels; ties to the lower index).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ibisagent.masks import error_regions

__all__ = ["CLICK_RULES", "OracleClick", "SliceClick", "challenge_click", "next_click", "worst_slice",
           "worst_slice_click"]

#: oracle click rules: ours (padded exact EDT, no repeated pixel) and the release's (see the module docstring)
CLICK_RULES = ("ours", "release")

_TIE_SEED = 42


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


def challenge_click(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, ...] | None:
    """The CVPR 2025 challenge's next click for ``pred`` (None = no prediction yet) against ``gt``: the voxel of the
    largest connected error component (error = prediction != ground truth; full connectivity: 8 in 2D, 26 in 3D)
    farthest from the component's border (the array edge counts as border), ties broken by a fixed-seed (42)
    uniform draw among the maxima in row-major order; positive where the ground truth is set.

    2D: ``(x, y, positive)`` (x = column). 3D (arrays indexed ``[z, y, x]``): ``(x, y, z, positive)``. None when
    the prediction is perfect."""
    gt = np.asarray(gt).astype(bool)
    pred = np.zeros_like(gt) if pred is None else np.asarray(pred).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    if gt.ndim not in (2, 3):
        raise ValueError(f"challenge_click takes 2D or 3D masks, got shape {gt.shape}")
    error = pred != gt
    if not error.any():
        return None
    labels, n = ndimage.label(error, structure=np.ones((3,) * gt.ndim, bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    component = labels == int(np.argmax(sizes))
    crop = ndimage.find_objects(component.astype(np.int8))[0]  # the distance transform only needs the component's box
    inner = (slice(1, -1),) * gt.ndim
    dist = ndimage.distance_transform_edt(np.pad(component[crop], 1))[inner]
    best = np.argwhere(dist == dist.max())  # row-major order
    idx = best[np.random.RandomState(_TIE_SEED).choice(len(best))] + np.array([c.start for c in crop])
    positive = bool(gt[tuple(idx)])
    if gt.ndim == 2:
        return int(idx[1]), int(idx[0]), positive
    return int(idx[2]), int(idx[1]), int(idx[0]), positive


@dataclass(frozen=True)
class SliceClick:
    """A click on slice ``z`` of a volume: the reference :class:`OracleClick` on that slice."""

    z: int
    click: OracleClick

    @property
    def positive(self) -> bool:
        return self.click.positive


def worst_slice(pred: np.ndarray | None, gt: np.ndarray) -> int | None:
    """The slice (first axis of a ``[z, y, x]`` volume) with the most error voxels, or None when there is none."""
    gt = np.asarray(gt).astype(bool)
    pred = np.zeros_like(gt) if pred is None else np.asarray(pred).astype(bool)
    if pred.shape != gt.shape or gt.ndim != 3:
        raise ValueError(f"worst_slice takes two 3D masks of one shape, got {pred.shape} and {gt.shape}")
    errors = np.count_nonzero(pred != gt, axis=(1, 2))
    return int(np.argmax(errors)) if errors.any() else None


def worst_slice_click(pred: np.ndarray | None, gt: np.ndarray,
                      avoid: dict[int, list[tuple[float, float]]] | None = None) -> SliceClick | None:
    """The reference rule (:func:`next_click`) on the volume's worst slice (:func:`worst_slice`); ``avoid`` maps a
    slice to the (x, y) pixels already clicked there. None when the prediction is perfect."""
    gt = np.asarray(gt).astype(bool)
    pred_arr = np.zeros_like(gt) if pred is None else np.asarray(pred).astype(bool)
    z = worst_slice(pred_arr, gt)
    if z is None:
        return None
    click = next_click(pred_arr[z] if pred is not None else None, gt[z], (avoid or {}).get(z))
    if click is None:  # every error pixel of the worst slice was clicked already: the next slice in error order
        errors = np.count_nonzero(pred_arr != gt, axis=(1, 2))
        for k in np.argsort(-errors, kind="stable")[1:]:
            if errors[k] == 0:
                break
            click = next_click(pred_arr[k], gt[k], (avoid or {}).get(int(k)))
            if click is not None:
                return SliceClick(int(k), click)
        return None
    return SliceClick(z, click)
