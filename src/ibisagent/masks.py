"""Binary-mask utilities: overlap and boundary metrics, error regions, boxes, the reference RLE codec."""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "MaskShapeError",
    "ErrorRegions",
    "as_bool",
    "bbox",
    "dice",
    "error_regions",
    "hd95",
    "interior_point",
    "iou",
    "nsd",
    "rle_decode",
    "rle_encode",
]


class MaskShapeError(ValueError):
    """Two masks that should have the same size do not."""


def as_bool(mask: np.ndarray) -> np.ndarray:
    """Any nonzero value is the object."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] in (1, 3, 4):
        m = m[..., 0]
    if m.ndim != 2:
        raise MaskShapeError(f"expected a 2D mask, got shape {m.shape}")
    return m.astype(bool) if m.dtype != bool else m


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_bool(a), as_bool(b)
    if a.shape != b.shape:
        raise MaskShapeError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union. Two empty masks agree perfectly (1.0)."""
    p, g = _pair(pred, gt)
    union = np.logical_or(p, g).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, g).sum() / union)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient. Two empty masks agree perfectly (1.0)."""
    p, g = _pair(pred, gt)
    total = p.sum() + g.sum()
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, g).sum() / total)


def _border(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask that touch the background (4-connectivity)."""
    if not mask.any():
        return mask
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return mask & ~eroded


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each border pixel of a to the border of b, and vice versa (in spacing units)."""
    ba, bb = _border(a), _border(b)
    dt_b = ndimage.distance_transform_edt(~bb, sampling=spacing)
    dt_a = ndimage.distance_transform_edt(~ba, sampling=spacing)
    return dt_b[ba], dt_a[bb]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between mask borders (pixels unless ``spacing`` is given).

    Returns 0 when both masks are empty and ``inf`` when exactly one is empty.
    """
    p, g = _pair(pred, gt)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return float("inf")
    d_pg, d_gp = _surface_distances(p, g, spacing)
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


def nsd(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """Normalized surface Dice: the fraction of both borders that lie within ``tolerance`` of the other border."""
    p, g = _pair(pred, gt)
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    d_pg, d_gp = _surface_distances(p, g, spacing)
    return float(((d_pg <= tolerance).sum() + (d_gp <= tolerance).sum()) / (len(d_pg) + len(d_gp)))


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (x1, y1, x2, y2), inclusive pixel corners, or None for an empty mask."""
    m = as_bool(mask)
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def interior_point(mask: np.ndarray) -> tuple[int, int] | None:
    """The object pixel nearest the mask's centroid (x, y): a centroid that falls outside (a ring, a C shape) is moved
    to the closest pixel that is inside. None for an empty mask."""
    m = as_bool(mask)
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        return None
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[k]), int(ys[k])


@dataclass(frozen=True)
class ErrorRegions:
    """False-negative / false-positive regions of a prediction and their distance-transform maxima."""

    fn: np.ndarray
    fp: np.ndarray
    fn_dt: np.ndarray
    fp_dt: np.ndarray

    @property
    def fn_max(self) -> float:
        return float(self.fn_dt.max()) if self.fn.any() else 0.0

    @property
    def fp_max(self) -> float:
        return float(self.fp_dt.max()) if self.fp.any() else 0.0


def error_regions(pred: np.ndarray, gt: np.ndarray) -> ErrorRegions:
    """FN = gt & ~pred, FP = pred & ~gt, each with its Euclidean distance transform (distance to the region's border,
    counting the image edge as border, as interactive-segmentation click simulators do)."""
    p, g = _pair(pred, gt)
    fn, fp = g & ~p, p & ~g
    return ErrorRegions(fn, fp, _inner_distance(fn), _inner_distance(fp))


def _inner_distance(region: np.ndarray) -> np.ndarray:
    if not region.any():
        return np.zeros(region.shape, np.float32)
    padded = np.pad(region, 1, constant_values=False)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# RLE as in the reference release: run lengths of the row-major flattened mask (starting with a 0-run),
# zlib-compressed and base64-encoded; the shape travels beside it.
# ----------------------------------------------------------------------------------------------------------------

def rle_encode(mask: np.ndarray) -> dict:
    """Encode a binary mask as ``{"size": [H, W], "counts": <base64 zlib of uint32 run lengths>}``."""
    m = as_bool(mask)
    flat = m.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).astype(np.uint32)
    if flat.size and flat[0] == 1:  # runs always start with background
        runs = np.concatenate([[0], runs]).astype(np.uint32)
    payload = base64.b64encode(zlib.compress(runs.tobytes(), 6)).decode("ascii")
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": payload}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of :func:`rle_encode`. Raises ValueError on a corrupt payload."""
    try:
        h, w = (int(v) for v in rle["size"])
        runs = np.frombuffer(zlib.decompress(base64.b64decode(rle["counts"])), dtype=np.uint32)
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise ValueError(f"corrupt RLE mask: {exc}") from exc
    if int(runs.sum()) != h * w:
        raise ValueError(f"corrupt RLE mask: runs cover {int(runs.sum())} pixels, expected {h * w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs.astype(np.int64)).reshape(h, w)
