"""Read and write binary masks (PNG/TIFF/BMP/JPEG/NPY, NIfTI label maps).

Reading rules (:func:`load_mask`):

* ``label=None``: any nonzero value is the object (binary masks, 0/255 PNGs and label maps alike);
  ``label=V``: only pixels equal to V.
* ``threshold=T``: pixels ``> T`` are the object (for grayscale / probability masks).
* Values that do not look like a mask are refused with an explanation instead of being silently binarized:
  fractional values (a probability map or a resampled mask) and 8-bit rasters with more than 32 gray levels (a
  grayscale image or a lossy-compressed mask). JPEG masks are lossy by nature: they are thresholded at 127 by
  default.
* Colour masks: a pixel is the object when any colour channel is nonzero (RGBA: the alpha channel when the colour
  is constant).
* NIfTI label maps (and NRRD / MetaImage label maps, read only): ``slice_index``/``axis``/``orientation`` as in
  :func:`ibisagent.io.load_image`, so image and mask slices line up; without ``slice_index`` the whole 3D mask is
  returned in stored voxel order.

Writing (:func:`save_mask`): PNG/BMP/TIFF as 0/255 uint8; ``.npy`` as bool; NIfTI as a uint8 0/1 label map. A 2D
mask of a volume slice (``like`` = the LoadedImage of that slice) is written, by default, **into a volume-shaped
label map** (zeros elsewhere) at its slice index with the source affine and header, so it overlays the source
volume in any viewer; ``slice_only=True`` writes a single-slice NIfTI whose affine places that slice where it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .images import ITK_SUFFIXES, ImageLoadError, LoadedImage, _check_index, _read_pil, _read_tiff, _suffix
from .volumes import Volume, _check_axis, display_transform, from_display, load_volume, to_display

__all__ = [
    "MaskError",
    "MASK_SUFFIXES",
    "load_mask",
    "save_mask",
]

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".npy", ".nii", ".nii.gz")

#: 8-bit raster masks with more distinct values than this are refused (look like a grayscale image)
MAX_GRAY_LEVELS = 32


class MaskError(ValueError):
    """A mask that cannot be used: unreadable, wrong size, empty when it must not be, not a binary/label mask.

    ``kind``: ``"size_mismatch"``, ``"empty"``, ``"geometry_mismatch"`` / ``"not_3d"`` (3D masks on another voxel
    grid / 4D label maps, :mod:`ibisagent.io.volume_masks`) or ``"unreadable"`` (everything else)."""

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _read_mask_array(
    path: Path, slice_index: int | None, axis: int, orientation: str
) -> tuple[np.ndarray, str, np.ndarray | None, str]:
    """(values, kind, all label values or None, where) for a mask file.

    kind: ``"raster"``, ``"lossy"`` (JPEG), ``"npy"`` or ``"volume"``; for a NIfTI slice ``values`` is the slice in
    display orientation and the third item is the whole volume (for the label check); ``where`` names the slice.
    """
    if not path.exists():
        raise MaskError(f"mask file not found: {path}")
    if path.is_dir():
        raise MaskError(f"{path} is a folder, not a mask file")
    if path.stat().st_size == 0:
        raise MaskError(f"mask file {path} is empty (0 bytes)")
    suffix = _suffix(path)
    if suffix not in MASK_SUFFIXES and suffix not in ITK_SUFFIXES:
        raise MaskError(
            f"unsupported mask format {suffix or '(no extension)'} for {path.name}; "
            f"supported: {', '.join(MASK_SUFFIXES + ITK_SUFFIXES)}"
        )
    if suffix in (".nii", ".nii.gz", *ITK_SUFFIXES):
        try:
            vol = load_volume(path)
            n_volumes = int(vol.meta.get("n_volumes", 1) or 1)
            if n_volumes > 1:  # a mask holds one 3D label volume: using the first of several silently is wrong
                raise MaskError(f"mask {path.name} is a 4D NIfTI with {n_volumes} volumes; a mask must be one 2D "
                                "or 3D label map (save the volume you mean on its own)")
            if slice_index is None:
                return vol.array, "volume", None, ""
            axis = _check_axis(axis)
            k = _check_index(slice_index, vol.n_slices(axis), f"slices along axis {axis}", path)
            transform = display_transform(vol.affine, axis, orientation)
        except ImageLoadError as exc:
            raise MaskError(str(exc)) from exc
        values = to_display(np.take(vol.array, k, axis=axis), transform)
        return values, "volume", vol.array, f" at slice {k} (axis {axis})"
    if suffix == ".npy":
        try:
            arr = np.asarray(np.load(path, allow_pickle=False))
        except Exception as exc:
            raise MaskError(f"cannot read {path}: not a valid .npy array ({exc})") from exc
        if slice_index is not None and arr.ndim == 3:
            try:
                k = _check_index(slice_index, arr.shape[_check_axis(axis)], "slices", path)
            except ImageLoadError as exc:
                raise MaskError(str(exc)) from exc
            return np.take(arr, k, axis=axis), "npy", arr, f" at slice {k} (axis {axis})"
        return arr, "npy", None, ""
    arr = None
    errors = []
    if suffix in (".tif", ".tiff"):
        try:
            arr = np.squeeze(_read_tiff(path)[0])
        except Exception as exc:
            errors.append(f"tifffile: {exc}")
    if arr is None:
        try:
            arr = _read_pil(path)[0]
        except Exception as exc:
            errors.append(str(exc))
            raise MaskError(
                f"cannot read mask {path}: the file is corrupt or not a valid image ({'; '.join(errors)})"
            ) from exc
    return np.asarray(arr), ("lossy" if suffix in (".jpg", ".jpeg") else "raster"), None, ""


def _collapse_channels(arr: np.ndarray, kind: str) -> np.ndarray:
    """2D from a colour raster mask: identical channels -> one; RGBA with constant colour -> alpha; else max."""
    if kind in ("volume", "npy") or arr.ndim != 3 or arr.shape[2] not in (2, 3, 4):
        return arr
    color = arr[:, :, : 3 if arr.shape[2] >= 3 else 1]
    alpha = arr[:, :, -1] if arr.shape[2] in (2, 4) else None
    if alpha is not None and np.ptp(color) == 0 and np.ptp(alpha) > 0:
        return alpha
    if all(np.array_equal(color[:, :, 0], color[:, :, c]) for c in range(1, color.shape[2])):
        return color[:, :, 0]
    return color.max(axis=2)


def _binarize(
    values: np.ndarray,
    *,
    name: str,
    kind: str,
    label: int | None,
    threshold: float | None,
    all_values: np.ndarray | None = None,
) -> np.ndarray:
    if values.dtype.kind == "c":
        raise MaskError(f"mask {name} holds complex values")
    if threshold is not None:
        return np.asarray(values > threshold)
    if label is not None:
        pool = values if all_values is None else all_values
        if not np.any(pool == label):
            present = np.unique(pool)
            shown = ", ".join(str(v) for v in present[:20]) + (" ..." if present.size > 20 else "")
            raise MaskError(f"label {label} does not occur in mask {name} (values present: {shown})")
        return np.asarray(values == label)
    if values.dtype == bool:
        return values
    if kind == "lossy":
        return np.asarray(values > 127)
    if values.dtype.kind == "f":
        finite = values[np.isfinite(values)]
        if finite.size and not np.array_equal(finite, np.round(finite)):
            raise MaskError(
                f"mask {name} has fractional values ({float(finite.min()):g}..{float(finite.max()):g}): it looks like "
                "a probability map or a resampled mask; pass threshold=0.5 (or the cut-off you want)"
            )
        return np.asarray(np.nan_to_num(values) != 0)
    if kind == "raster" and values.dtype == np.uint8:
        levels = np.count_nonzero(np.bincount(values.reshape(-1), minlength=256))
        if levels > MAX_GRAY_LEVELS:
            raise MaskError(
                f"mask {name} has {levels} gray levels ({int(values.min())}..{int(values.max())}): it looks like a "
                "grayscale image or a lossy-compressed mask rather than a binary/label mask; pass threshold=127 to "
                "binarize it or label=V to pick one label"
            )
    return np.asarray(values != 0)


def load_mask(
    path: str | Path,
    *,
    shape: tuple[int, ...] | None = None,
    slice_index: int | None = None,
    axis: int = 2,
    label: int | None = None,
    threshold: float | None = None,
    allow_empty: bool = True,
    orientation: str = "radiological",
) -> np.ndarray:
    """A boolean mask (HxW; or the whole 3D mask of a NIfTI label map when ``slice_index`` is None).

    ``shape``: the image size to check against (``(H, W)``, ``(H, W, 3)`` or a 3D volume shape); a mismatch raises
    MaskError("mask is 540x800 but the image is 544x800"). ``allow_empty=False`` refuses masks without any object
    pixel (use it for ground truth). See the module docstring for ``label``/``threshold`` and value checks.
    """
    p = Path(path)
    values, kind, pool, where = _read_mask_array(p, slice_index, axis, orientation)
    values = _collapse_channels(values, kind)
    if values.ndim not in (2, 3) or values.size == 0:
        raise MaskError(f"mask {p.name} has an unusable shape {values.shape}; expected a 2D (or 3D) array")
    mask = _binarize(values, name=p.name, kind=kind, label=label, threshold=threshold, all_values=pool)
    mask = np.ascontiguousarray(mask, dtype=bool)
    if shape is not None:
        expected = tuple(int(s) for s in shape)
        expected = expected[:2] if mask.ndim == 2 else expected
        if mask.shape != expected:
            hint = " (it looks transposed)" if mask.shape == expected[::-1] else ""
            what = "image" if mask.ndim == 2 else "volume"
            raise MaskError(
                f"mask {p.name} is {_shape_text(mask.shape)} but the {what} is {_shape_text(expected)}{hint}; "
                "a mask must have the image's size", "size_mismatch"
            )
    if not allow_empty and not mask.any():
        raise MaskError(f"mask {p.name} is empty{where} (no object pixel); a ground-truth mask must mark the object",
                        "empty")
    return mask


# ----------------------------------------------------------------------------------------------------------- saving


def _as_binary(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] in (3, 4) and m.shape[0] > 4:
        m = m[:, :, 0]
    return m.astype(bool) if m.dtype != bool else m


def save_mask(
    path: str | Path,
    mask: np.ndarray,
    *,
    like: LoadedImage | Volume | None = None,
    slice_only: bool = False,
) -> Path:
    """Write a mask; the format follows the suffix (see the module docstring). Returns the path written.

    NIfTI: ``like`` = a LoadedImage of a volume slice (NIfTI / DICOM series / geometry-carrying DICOM file) places
    the 2D mask at its slice in a volume-shaped label map (or a one-slice NIfTI with ``slice_only=True``);
    ``like`` = a Volume needs a 3D mask of the volume's shape; without ``like`` a 2D mask is written as an (W, H, 1)
    grid with an identity affine (``load_mask(..., slice_index=0, orientation="voxel")`` reads it back).
    """
    p = Path(path)
    m = _as_binary(mask)
    suffix = _suffix(p)
    if suffix not in MASK_SUFFIXES:
        raise MaskError(
            f"unsupported mask format {suffix or '(no extension)'} for {p.name}; use {', '.join(MASK_SUFFIXES)}"
        )
    if suffix in (".jpg", ".jpeg"):
        raise MaskError("JPEG is lossy and would corrupt the mask; save masks as .png (or .tif/.nii.gz)")
    p.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(p, m)
        return p
    if suffix in (".nii", ".nii.gz"):
        _save_nifti(p, m, like, slice_only)
        return p
    if m.ndim != 2:
        raise MaskError(f"a {suffix} mask must be 2D, got shape {m.shape}; save 3D masks as .nii.gz")
    if like is not None and isinstance(like, LoadedImage) and m.shape != like.shape:
        raise MaskError(f"mask is {_shape_text(m.shape)} but the image is {_shape_text(like.shape)}")
    data = m.astype(np.uint8) * 255
    if suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(p, data, photometric="minisblack")
    else:
        from PIL import Image

        Image.fromarray(data, mode="L").save(p)
    return p


def _save_nifti(path: Path, m: np.ndarray, like: LoadedImage | Volume | None, slice_only: bool) -> None:
    import nibabel as nib

    header = None
    if isinstance(like, Volume):
        if m.shape != like.shape:
            raise MaskError(f"mask is {_shape_text(m.shape)} but the volume is {_shape_text(like.shape)}")
        data, affine, header = m, like.affine, like.header
    elif isinstance(like, LoadedImage) and "display_transform" in like.meta and "volume_shape" in like.meta:
        if m.shape != like.shape:
            raise MaskError(f"mask is {_shape_text(m.shape)} but the image is {_shape_text(like.shape)}")
        meta = like.meta
        axis, k = int(meta["axis"]), int(meta["slice_index"])
        stored = from_display(m, tuple(meta["display_transform"]))
        if slice_only:
            data = np.expand_dims(stored, axis)
            affine = np.asarray(meta["slice_affine"])
        else:
            data = np.zeros(tuple(meta["volume_shape"]), dtype=bool)
            index: list[Any] = [slice(None)] * 3
            index[axis] = k
            data[tuple(index)] = stored
            affine = np.asarray(meta["affine"])
        header = meta.get("header")
    elif like is None or isinstance(like, LoadedImage):
        if m.ndim == 2:
            data, affine = m.T[:, :, None], np.eye(4)
            if isinstance(like, LoadedImage) and "spacing" in like.meta:
                row_sp, col_sp = like.meta["spacing"][:2]
                affine = np.diag([float(col_sp), float(row_sp), 1.0, 1.0])
        elif m.ndim == 3:
            data, affine = m, np.eye(4)
        else:
            raise MaskError(f"cannot save a mask of shape {m.shape} as NIfTI")
    else:
        raise MaskError(f"like must be a LoadedImage or a Volume, got {type(like).__name__}")
    out = data.astype(np.uint8)
    if header is not None and isinstance(header, nib.Nifti1Header):
        hdr = header.copy()
        hdr.set_data_dtype(np.uint8)
        hdr.set_data_shape(out.shape)
        img = nib.Nifti1Image(out, affine, header=hdr)
        img.header.set_slope_inter(1.0, 0.0)
    else:
        img = nib.Nifti1Image(out, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    nib.save(img, str(path))
