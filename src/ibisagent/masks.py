"""Binary-mask utilities: overlap and boundary metrics, error regions, boxes, our RLE codec and the release's."""

from __future__ import annotations

import base64
import functools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "SURFACE_METRICS",
    "ErrorRegions",
    "MaskShapeError",
    "SurfaceDistances",
    "as_bool",
    "bbox",
    "dice",
    "dice_3d",
    "error_regions",
    "hd95",
    "interior_point",
    "iou",
    "iou_3d",
    "nsd",
    "rle_decode",
    "rle_decode_coco",
    "rle_decode_release",
    "rle_encode",
    "rle_encode_coco",
    "rle_encode_release",
    "surface_distances",
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


def _pair_3d(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 3 or b.ndim != 3:
        raise MaskShapeError(f"expected 3D masks, got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise MaskShapeError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a.astype(bool, copy=False), b.astype(bool, copy=False)


def iou_3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """Voxel IoU of two 3D masks. Two empty masks agree perfectly (1.0)."""
    p, g = _pair_3d(pred, gt)
    union = int(np.count_nonzero(p | g))
    return float(np.count_nonzero(p & g) / union) if union else 1.0


def dice_3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """Voxel Dice of two 3D masks. Two empty masks agree perfectly (1.0)."""
    p, g = _pair_3d(pred, gt)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    return float(2.0 * np.count_nonzero(p & g) / total) if total else 1.0


# ----------------------------------------------------------------------------------------------------------------
# Surface distances (HD95, NSD), as in DeepMind's surface-distance library, which the CVPR 2025 interactive
# segmentation challenge script uses, and MONAI's ``compute_surface_dice(use_subvoxels=True)``: the surface lives on
# the lattice of voxel corners; a corner whose 2x2 (2x2x2) neighbourhood is neither all background nor all object is
# a surface element ("surfel"), weighted by its contour length (2D, marching squares through the edge midpoints) or
# triangle area (3D, marching cubes) in spacing units; distances between surfels are Euclidean in spacing units.
# ----------------------------------------------------------------------------------------------------------------

#: name of the surface-metric definition, recorded with evaluation runs (a run folder never mixes two definitions)
SURFACE_METRICS = "surfel-area-weighted (DeepMind surface-distance / MONAI use_subvoxels)"


@dataclass(frozen=True)
class SurfaceDistances:
    """Per-surfel distances to the other surface and surfel sizes (length in 2D, area in 3D), in spacing units.

    ``pred_to_gt[i]`` is the distance from the i-th predicted surfel (size ``pred_sizes[i]``) to the ground-truth
    surface, ``inf`` when the ground truth is empty; likewise ``gt_to_pred``. An empty mask has no surfels.
    """

    pred_to_gt: np.ndarray
    gt_to_pred: np.ndarray
    pred_sizes: np.ndarray
    gt_sizes: np.ndarray


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    out = tuple(float(s) for s in spacing)
    if len(out) != ndim:
        raise MaskShapeError(f"spacing {out} has {len(out)} values for a {ndim}D mask")
    if not all(math.isfinite(s) and s > 0 for s in out):
        raise ValueError(f"spacing must be positive and finite, got {out}")
    return out


def _surface_pair(pred: np.ndarray, gt: np.ndarray,
                  spacing: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Two boolean masks of one shape, 2D or 3D, and the spacing. A 3-value ``spacing`` (or a 3D array whose last
    axis is not an image channel count of 1, 3 or 4) means volumes; otherwise masks go through :func:`as_bool`."""
    p_arr, g_arr = np.asarray(pred), np.asarray(gt)
    volume = len(spacing) == 3 if spacing is not None else (p_arr.ndim == 3 and p_arr.shape[2] not in (1, 3, 4))
    if not volume:
        p, g = _pair(p_arr, g_arr)
        return p, g, _spacing(spacing, 2)
    if p_arr.ndim != 3 or g_arr.ndim != 3:
        raise MaskShapeError(f"expected 3D masks, got shapes {p_arr.shape} and {g_arr.shape}")
    if p_arr.shape != g_arr.shape:
        raise MaskShapeError(f"mask shapes differ: {p_arr.shape} vs {g_arr.shape}")
    return p_arr.astype(bool), g_arr.astype(bool), _spacing(spacing, 3)


def _contour_length_table(spacing: tuple[float, float]) -> np.ndarray:
    """Contour length inside one 2x2 cell for each of the 16 corner codes (marching squares through the edge
    midpoints). Bit 3 is corner (0, 0), bit 2 (0, 1), bit 1 (1, 0), bit 0 (1, 1), as in the reference code."""
    rows, cols = spacing
    half_diagonal = 0.5 * math.hypot(rows, cols)
    table = np.zeros(16)
    for code in range(16):
        inside = [(code >> (3 - k)) & 1 for k in range(4)]  # (0,0), (0,1), (1,0), (1,1)
        n = sum(inside)
        if n in (1, 3):  # one corner cut off
            table[code] = half_diagonal
        elif n == 2:
            if inside[0] == inside[1]:  # one row inside: the contour runs along axis 1
                table[code] = cols
            elif inside[0] == inside[2]:  # one column inside: the contour runs along axis 0
                table[code] = rows
            else:  # two opposite corners: two cut-offs
                table[code] = 2 * half_diagonal
    return table


@functools.lru_cache(maxsize=32)
def _surfel_table(spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(size per neighbourhood code, code weight per corner offset) for the spacing."""
    if len(spacing) == 2:
        return _contour_length_table(spacing), np.array([[8, 4], [2, 1]])  # type: ignore[arg-type]
    # The 3D areas come from the marching-cubes triangulation of the reference implementation (MONAI's port of
    # DeepMind's table): per-triangle normals, so they cannot be re-derived without that triangulation.
    try:
        from monai.metrics.utils import get_code_to_measure_table
    except ImportError as exc:  # pragma: no cover - monai is a pinned dependency
        raise ImportError("3D surface metrics need monai (pip install monai==1.6.1)") from exc
    table, kernel = get_code_to_measure_table(spacing)
    return np.asarray(table.cpu().numpy(), dtype=np.float64), np.asarray(kernel.cpu().numpy()).reshape(2, 2, 2)


def _corner_codes(mask: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every voxel corner: the weighted sum of the 2^ndim voxels around it (outside is 0)."""
    padded = np.pad(mask, 1).astype(np.int32)
    codes = np.zeros(tuple(n + 1 for n in mask.shape), np.int32)
    for offset in np.ndindex(*weights.shape):
        window = tuple(slice(o, o + n + 1) for o, n in zip(offset, mask.shape))
        codes += int(weights[offset]) * padded[window]
    return codes


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> SurfaceDistances:
    """Surfel distances between the surfaces of ``pred`` and ``gt`` (2D or 3D; ``spacing`` per axis, default 1)."""
    p, g, sp = _surface_pair(pred, gt, spacing)
    both = p | g
    if not both.any():
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    extent = [np.flatnonzero(both.any(axis=tuple(a for a in range(both.ndim) if a != ax))) for ax in range(both.ndim)]
    crop = tuple(slice(int(e[0]), int(e[-1]) + 1) for e in extent)  # every surfel lies on the corners of the union's box
    sizes, weights = _surfel_table(sp)
    full = int(weights.sum())
    code_p, code_g = _corner_codes(p[crop], weights), _corner_codes(g[crop], weights)
    surf_p, surf_g = (code_p != 0) & (code_p != full), (code_g != 0) & (code_g != full)

    def distance_to(surf: np.ndarray) -> np.ndarray:
        if not surf.any():
            return np.full(surf.shape, np.inf)
        return ndimage.distance_transform_edt(~surf, sampling=sp)

    return SurfaceDistances(
        pred_to_gt=distance_to(surf_g)[surf_p], gt_to_pred=distance_to(surf_p)[surf_g],
        pred_sizes=sizes[code_p[surf_p]], gt_sizes=sizes[code_g[surf_g]],
    )


def _weighted_percentile(distances: np.ndarray, sizes: np.ndarray, percent: float) -> float:
    """The smallest distance whose cumulative surfel size reaches ``percent`` of the surface (the reference rule)."""
    if len(distances) == 0:
        return float("inf")
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(sizes[order]) / np.sum(sizes)
    idx = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[order][min(idx, len(distances) - 1)])


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Robust (95th-percentile) symmetric Hausdorff distance between the surfaces, in spacing units (pixels when
    ``spacing`` is None): the larger of the two directed 95th percentiles, each weighted by surfel size, as
    DeepMind's ``compute_robust_hausdorff(..., 95)``. 2D or 3D (see :func:`surface_distances`).

    Empty masks: 0 when both are empty (they agree; the reference gives inf), ``inf`` when exactly one is.
    """
    d = surface_distances(pred, gt, spacing)
    if len(d.pred_sizes) == 0 and len(d.gt_sizes) == 0:
        return 0.0
    return max(_weighted_percentile(d.gt_to_pred, d.gt_sizes, 95.0),
               _weighted_percentile(d.pred_to_gt, d.pred_sizes, 95.0))


def nsd(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0, spacing: Sequence[float] | None = None) -> float:
    """Normalized surface Dice at ``tolerance`` (spacing units; mm with a mm spacing, pixels when ``spacing`` is
    None): the surfel-size-weighted fraction of both surfaces lying within ``tolerance`` of the other surface, as
    DeepMind's ``compute_surface_dice_at_tolerance`` and MONAI's ``compute_surface_dice(use_subvoxels=True)``.

    Empty masks: 1 when both are empty (they agree, as :func:`dice`; the references give NaN), 0 when exactly one is.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"NSD tolerance must be finite and >= 0, got {tolerance}")
    d = surface_distances(pred, gt, spacing)
    total = float(d.pred_sizes.sum() + d.gt_sizes.sum())
    if total == 0.0:
        return 1.0
    within = d.pred_sizes[d.pred_to_gt <= tolerance].sum() + d.gt_sizes[d.gt_to_pred <= tolerance].sum()
    return float(within / total)


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
# Our RLE: run lengths of the row-major flattened mask (starting with a 0-run) as little-endian uint32 bytes,
# zlib-compressed and base64-encoded; the shape travels in the same dict. The release's trajectory files use a
# different payload (decimal run-length text, no shape): see rle_encode_release / rle_decode_release below.
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


# ----------------------------------------------------------------------------------------------------------------
# The release's RLE (trajectory JSON ``mask_rle`` of the public IBISAgent release, trajectory_gen/process_img.py at
# the stored commit, read by us): row-major (C order) flattening; run lengths that alternate background/foreground
# and start with a background run (a leading ``0`` when the first pixel is foreground); the runs written as decimal
# integers joined by single spaces, UTF-8, ``zlib.compress`` at its default level, standard base64 (ASCII text). An
# empty (0-pixel) mask encodes as the empty string. The shape is not in the payload: the release stores
# ``img_data.size = [W, H]`` beside the trajectory, so decoding needs ``(H, W)`` from the caller.
# ----------------------------------------------------------------------------------------------------------------

def rle_encode_release(mask: np.ndarray) -> str:
    """Encode a 2D binary mask in the release's layout (see the comment above); returns base64 text."""
    m = as_bool(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {m.shape}")
    flat = m.ravel()
    if flat.size == 0:
        return ""
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate([[0], runs])
    text = " ".join(str(int(r)) for r in runs)
    return base64.b64encode(zlib.compress(text.encode("utf-8"))).decode("ascii")


def rle_decode_release(payload: str, shape: Sequence[int]) -> np.ndarray:
    """Decode a release-layout RLE string into a bool mask of ``shape`` = (H, W).

    Raises ValueError when the payload is not base64/zlib/decimal text or its runs do not cover H * W pixels.
    """
    try:
        h, w = (int(v) for v in shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"shape must be (H, W), got {shape!r}") from exc
    if h < 0 or w < 0:
        raise ValueError(f"shape must be non-negative, got {(h, w)}")
    if not isinstance(payload, str):
        raise ValueError(f"release RLE must be a string, got {type(payload).__name__}")
    if payload == "":
        if h * w:
            raise ValueError(f"empty release RLE for a {h}x{w} mask")
        return np.zeros((h, w), dtype=bool)
    try:
        text = zlib.decompress(base64.b64decode(payload, validate=True)).decode("utf-8")
        runs = np.array([int(t) for t in text.split()], dtype=np.int64)
    except (ValueError, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt release RLE mask: {exc}") from exc
    if runs.size == 0 or (runs < 0).any():
        raise ValueError("corrupt release RLE mask: no runs or a negative run length")
    if int(runs.sum()) != h * w:
        raise ValueError(f"corrupt release RLE mask: runs cover {int(runs.sum())} pixels, expected {h * w} ({h}x{w})")
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape(h, w)


# ----------------------------------------------------------------------------------------------------------------
# COCO compressed RLE (the ``counts`` string of pycocotools' ``mask.encode``), written here from the published
# format, not copied: column-major (Fortran order) run lengths starting with a background run; each count after the
# second is stored as its difference to the count two places before; every value is written as little-endian 5-bit
# groups, each group + 48 as one ASCII character, with bit 0x20 set while more groups follow, and the last group's
# bit 0x10 carrying the sign. The release's RL converter (trajectory_gen/convert_to_rl_data.py) reads
# ``clicks_list[i].mask = {"counts": base64(zlib(<this string>)), "size": [H, W]}``.
# ----------------------------------------------------------------------------------------------------------------

def _fortran_runs(m: np.ndarray) -> list[int]:
    flat = m.ravel(order="F")
    if flat.size == 0:
        return []
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    runs = [int(r) for r in np.diff(bounds)]
    return [0, *runs] if flat[0] else runs


def rle_encode_coco(mask: np.ndarray) -> str:
    """The COCO compressed-RLE counts string of a 2D binary mask (see the comment above)."""
    m = as_bool(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {m.shape}")
    runs = _fortran_runs(m)
    out: list[str] = []
    for i, count in enumerate(runs):
        x = count - runs[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def rle_decode_coco(counts: str | bytes, shape: Sequence[int]) -> np.ndarray:
    """Decode a COCO compressed-RLE counts string into a bool mask of ``shape`` = (H, W); ValueError when the
    string is not one or its runs do not cover H * W pixels."""
    h, w = (int(v) for v in shape)
    text = counts.decode("ascii", errors="replace") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    x = k = 0
    for ch in text:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise ValueError(f"corrupt COCO RLE: character {ch!r} is outside the format's range")
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
        x = k = 0
    if k:
        raise ValueError("corrupt COCO RLE: the string ends inside a number")
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise ValueError(f"corrupt COCO RLE: runs cover {sum(runs)} pixels, expected {h * w} ({h}x{w})")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    return np.repeat(values, np.asarray(runs, dtype=np.int64)).reshape((h, w), order="F")
