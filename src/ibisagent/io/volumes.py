"""3D volumes: NIfTI, NRRD and MetaImage files, DICOM series folders and TIFF stacks, and their 2D slices.

Conventions

* ``Volume.array`` is the voxel grid as stored: NIfTI in nibabel's order (i, j, k); NRRD / MetaImage (read with
  SimpleITK) in the same (i, j, k) order (``sitk.GetArrayFromImage`` transposed); a DICOM series as
  (column, row, slice) with slices sorted along the slice normal (ImagePositionPatient, else InstanceNumber) so it
  has the same layout as the NIfTI dcm2niix would write; a TIFF stack (Z, Y, X) is stored as (X, Y, Z).
  ``Volume.affine`` maps voxel indices to RAS+ world millimetres (nibabel's convention; DICOM and ITK grids are LPS
  and are converted with ``diag(-1, -1, 1)``); 4D NIfTI / NRRD / MetaImage keep only the first volume
  (``meta["n_volumes"]`` tells how many there were).
* **3D masks use the same convention**: the mask of a Volume is a boolean array of ``Volume.shape`` indexed like
  ``Volume.array`` (``mask[i, j, k]`` belongs to voxel ``array[i, j, k]``; for a DICOM series ``mask[:, :, k]`` is
  slice ``k`` in sorted order, transposed from the DICOM pixel rows). :mod:`ibisagent.io.volume_masks` writes and
  reads such masks with the source geometry (NIfTI, or DICOM SEG for a DICOM series).
* DICOM series: per-slice RescaleSlope/Intercept; duplicate positions, missing slices, uneven steps and mixed
  orientations are refused with an ImageLoadError naming the files (:func:`load_dicom_series`). Compressed transfer
  syntaxes (JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000, RLE) decode through the pinned pylibjpeg
  plugins.
* Slices: ``slice_index`` counts along voxel ``axis`` of the stored array (2 = the third axis: axial for usual
  scans). The 2D slice is then turned for display according to ``orientation``:

  - ``"radiological"`` (default): from the affine, the slice is flipped/transposed so that the top of the image is
    anterior (axial slices) or superior (coronal, sagittal), and the image left is the patient's right (axial,
    coronal) or anterior (sagittal) -- what a radiology viewer shows. For standard axial DICOM this is exactly the
    stored pixel array.
  - ``"neurological"``: as radiological but mirrored left-right (patient's left on the image left), the default of
    FSL/nilearn viewers.
  - ``"voxel"``: no use of the affine: the stored slice transposed (rows = the second remaining axis), i.e. what
    ``sitk.GetArrayFromImage(img)[k]`` gives.

  The same transform is used by :func:`ibisagent.io.masks_io.load_mask`, so images and masks always line up, and
  is recorded in ``LoadedImage.meta["display_transform"]`` so ``save_mask`` can write a 2D mask back in place.
* Windowing of volume slices uses intensities of the whole volume (consistent contrast across slices): the user's
  ``window``; else the DICOM file's WindowCenter/Width; else for CT (DICOM Modality, or for NIfTI the heuristic
  :func:`guess_modality`: integer-valued, minimum between -3100 and -500 HU, 99.5th percentile below 4000) the
  ``ct-abdomen`` preset (40, 400); else, for uint8 volumes, the identity window (0..255 as stored); else the
  percentile window (0.5-99.5 %).

Intensity scales of the dev volumes (``../shared/data``, see each folder's SOURCE.md) and the default window each
gets from :func:`volume_window` (intensities are never rescaled on reading; only the display window differs):

* HU CT (OpenKBP head-and-neck int16 HU, air -1024; the 3D Slicer chest CT, HU clipped at -1024; the
  TotalSegmentator CT example): the HU heuristic says CT -> ``ct-abdomen`` (40, 400), a soft-tissue window.
* SegTHOR thorax CT: int16 *approximate* HU rebuilt from 8-bit min-max PNGs (air -1000, posterised for about half
  the patients): it passes the HU heuristic too -> ``ct-abdomen`` (40, 400); pass ``window="ct-lung"`` (or the 2D
  rows' own ``window``) for other contrasts.
* MR scaled to 8 bits (the ``*_3d`` folders: BraTS FLAIR/T1c, CHAOS T2-SPIR, LA 2018 LGE-MRI, Lesjak MS FLAIR,
  NCI-ISBI prostate T2: each a 0.5-99.5 percentile of the crop or brain mapped to uint8): the identity window, so
  the stored 0..255 values are the displayed grey levels.
* MR / microscopy on their native scale (int16 or float: the pyradiomics MR cases, the MNI template, the
  TotalSegmentator MR example, StarDist): the 0.5-99.5 % percentile window of the whole volume.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .images import (
    DEFAULT_CT_WINDOW,
    ITK_SUFFIXES,
    ImageLoadError,
    LoadedImage,
    Window,
    WindowSpec,
    _check_file,
    _check_index,
    _suffix,
    apply_rescale,
    apply_window,
    dicom_pixels,
    dicom_rescale,
    dicom_window,
    is_dicom_file,
    read_dicom,
    resolve_window,
    window_info,
)

__all__ = [
    "Volume",
    "ORIENTATIONS",
    "load_volume",
    "load_nifti",
    "load_dicom_series",
    "load_itk_volume",
    "load_tiff_stack",
    "guess_modality",
    "display_transform",
    "to_display",
    "from_display",
    "slice_image",
    "volume_window",
    "iter_slices",
    "choose_slice",
    "release_slice",
    "release_window",
]

ORIENTATIONS = ("radiological", "neurological", "voxel")

#: LPS (DICOM, ITK) world coordinates -> RAS (NIfTI, nibabel)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: (transpose, flip_rows, flip_cols) applied in that order to ``np.take(array, k, axis)``
DisplayTransform = tuple[bool, bool, bool]


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image: ``array`` (voxel grid as stored), ``affine`` (voxel -> RAS mm), ``spacing`` (mm per voxel axis),
    ``header`` (the nibabel header for NIfTI, else None), ``source``, ``kind`` (``"nifti"``, ``"dicom-series"``,
    ``"tiff-stack"``) and ``meta`` (modality, original dtype, DICOM window, number of 4D volumes...)."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: Path
    kind: str
    header: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def n_slices(self, axis: int = 2) -> int:
        """Number of slices along voxel ``axis``."""
        return int(self.array.shape[_check_axis(axis)])

    def slice(self, index: int, axis: int = 2, orientation: str = "radiological") -> np.ndarray:
        """The 2D slice ``index`` along ``axis`` in display orientation (raw intensities)."""
        axis = _check_axis(axis)
        k = _check_index(index, self.n_slices(axis), f"slices along axis {axis}", self.source)
        return to_display(np.take(self.array, k, axis=axis), display_transform(self.affine, axis, orientation))


def _check_volume_index(index: Any, n: int, path: Path) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise ImageLoadError(f"volume_index must be an integer, got {index!r}")
    if not 0 <= int(index) < n:
        raise ImageLoadError(f"volume_index {int(index)} is out of range for {path.name}: it holds {n} "
                             f"volume{'s' if n != 1 else ''} (0..{n - 1})")
    return int(index)


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ImageLoadError(f"axis must be 0, 1 or 2 (a voxel axis of the volume), got {axis!r}")
    return int(axis)


# ------------------------------------------------------------------------------------------------------ orientation


def display_transform(affine: np.ndarray | None, axis: int, orientation: str = "radiological") -> DisplayTransform:
    """How to turn ``np.take(volume, k, axis)`` into a display image (see the module docstring)."""
    if orientation not in ORIENTATIONS:
        raise ImageLoadError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    axis = _check_axis(axis)
    p, q = (a for a in range(3) if a != axis)
    if orientation == "voxel" or affine is None:
        return True, False, False
    import nibabel as nib

    try:
        ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    except Exception:
        return True, False, False
    if not np.all(np.isfinite(ornt)):
        return True, False, False
    world = [int(ornt[a, 0]) for a in range(3)]
    sign = [float(ornt[a, 1]) for a in range(3)]
    sliced = world[axis]
    horiz, vert = {2: (0, 1), 1: (0, 2), 0: (1, 2)}[sliced]
    transpose = world[p] == horiz  # the slice is [p, q]; rows must run along the vertical world axis
    h_ax, v_ax = (p, q) if transpose else (q, p)
    if world[h_ax] != horiz or world[v_ax] != vert:
        return True, False, False
    flip_rows = sign[v_ax] > 0  # top of the image = +world (anterior / superior)
    flip_cols = sign[h_ax] > 0  # radiological: columns run towards -world (patient's left / posterior)
    if orientation == "neurological":
        flip_cols = not flip_cols
    return transpose, flip_rows, flip_cols


def to_display(slice2d: np.ndarray, transform: DisplayTransform) -> np.ndarray:
    """Apply a display transform to a stored slice."""
    transpose, flip_rows, flip_cols = transform
    out = slice2d.T if transpose else slice2d
    if flip_rows:
        out = out[::-1]
    if flip_cols:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def from_display(image2d: np.ndarray, transform: DisplayTransform) -> np.ndarray:
    """Inverse of :func:`to_display`: a display-oriented 2D array back to the stored slice layout."""
    transpose, flip_rows, flip_cols = transform
    out = image2d
    if flip_cols:
        out = out[:, ::-1]
    if flip_rows:
        out = out[::-1]
    if transpose:
        out = out.T
    return np.ascontiguousarray(out)


def _slice_affine(affine: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Affine of the single-slice volume holding slice ``k`` along ``axis``."""
    shift = np.eye(4)
    shift[axis, 3] = k
    return np.asarray(affine, dtype=np.float64) @ shift


# ----------------------------------------------------------------------------------------------------------- loading


def load_volume(path: str | Path, volume_index: int | None = None) -> Volume:
    """A NIfTI file (.nii/.nii.gz), an NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file, a DICOM series folder, a
    multi-frame DICOM file or a TIFF stack as a Volume.

    ``volume_index`` picks one 3D volume of a 4D NIfTI / NRRD / MetaImage file (see :func:`load_nifti`); other
    formats hold one."""
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(f"volume file not found: {p}")
    suffix = _suffix(p)
    if suffix in (".nii", ".nii.gz"):
        return load_nifti(p, volume_index)
    if suffix in ITK_SUFFIXES:
        return load_itk_volume(p, volume_index)
    if volume_index not in (None, 0):
        raise ImageLoadError(f"volume_index={volume_index} applies to 4D NIfTI/NRRD/MHA files; {p.name} holds one "
                             "volume")
    if p.is_dir():
        return load_dicom_series(p)
    if suffix in (".tif", ".tiff"):
        return load_tiff_stack(p)
    if suffix == ".dcm" or is_dicom_file(p):
        return load_dicom_series([p])
    raise ImageLoadError(
        f"unsupported volume format {suffix or '(no extension)'} for {p.name}; supported: .nii, .nii.gz, .nrrd, "
        ".nhdr, .mha, .mhd, .tif/.tiff stacks, .dcm (multi-frame) or a folder of DICOM files"
    )


def load_nifti(path: str | Path, volume_index: int | None = None) -> Volume:
    """A NIfTI volume: 3D as is, 2D -> one slice along axis 2, 4D (a time series or several channels) -> the 3D
    volume ``volume_index`` (default: the first; ``meta["n_volumes"]`` and ``meta["volume_index"]`` say which)."""
    import nibabel as nib

    p = Path(path)
    _check_file(p)
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ImageLoadError(f"cannot read {p}: the NIfTI file is corrupt or truncated ({exc})") from exc
    meta: dict[str, Any] = {"format": "nifti", "original_dtype": str(img.get_data_dtype()), "n_volumes": 1,
                            "volume_index": 0}
    if data.ndim == 2:
        data = data[:, :, None]
    elif data.ndim >= 4:
        data = data.reshape(data.shape[:3] + (-1,))
    elif data.ndim != 3:
        raise ImageLoadError(f"{p.name}: unsupported NIfTI data shape {data.shape}")
    n_vol = int(data.shape[3]) if data.ndim == 4 else 1
    k = 0 if volume_index is None else _check_volume_index(volume_index, n_vol, p)
    if data.ndim == 4:
        meta.update(n_volumes=n_vol, volume_index=k)
        data = data[..., k]
    if data.dtype.kind == "c":
        raise ImageLoadError(f"{p.name} holds complex values; save magnitude images instead")
    if data.dtype == np.float64 and img.get_data_dtype() != np.float64:
        data = data.astype(np.float32)  # scl_slope/scl_inter applied by nibabel: float32 is plenty
    affine = img.affine if img.affine is not None else img.header.get_best_affine()
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    zooms = zooms + (1.0,) * (3 - len(zooms))
    return Volume(
        array=np.ascontiguousarray(data),
        affine=np.asarray(affine, dtype=np.float64),
        spacing=zooms,  # type: ignore[arg-type]
        source=p,
        kind="nifti",
        header=img.header,
        meta=meta,
    )


def load_itk_volume(path: str | Path, volume_index: int | None = None) -> Volume:
    """An NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) volume read with SimpleITK, stored (i, j, k) like NIfTI.

    ITK gives the grid in LPS (NRRD files in other spaces are converted by ITK's reader): ``affine`` is
    ``diag(-1, -1, 1) @ [direction @ diag(spacing) | origin]``, i.e. RAS+ as for NIfTI. 2D images become one slice;
    4D images (time / channels as the 4th grid axis) keep the volume ``volume_index`` as :func:`load_nifti` does.
    Vector / colour pixels are refused."""
    import SimpleITK as sitk

    p = Path(path)
    _check_file(p)
    try:
        img = sitk.ReadImage(str(p))
    except Exception as exc:
        raise ImageLoadError(f"cannot read {p}: the file is corrupt, truncated or its data file is missing ({exc})") from exc
    dim = int(img.GetDimension())
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageLoadError(f"{p.name} has {img.GetNumberOfComponentsPerPixel()} components per voxel (a vector or "
                             "colour image); a volume must hold one intensity per voxel")
    if dim not in (2, 3, 4):
        raise ImageLoadError(f"{p.name}: unsupported {dim}D image; volumes are 2D, 3D or 4D")
    arr = sitk.GetArrayViewFromImage(img)  # reversed axes: (y, x), (z, y, x) or (t, z, y, x)
    if arr.dtype.kind == "c":
        raise ImageLoadError(f"{p.name} holds complex values; save magnitude images instead")
    n_vol = int(arr.shape[0]) if dim == 4 else 1
    k = 0 if volume_index is None else _check_volume_index(volume_index, n_vol, p)
    if dim == 2:
        data = np.asarray(arr).T[:, :, None]
    else:
        data = np.asarray(arr[k] if dim == 4 else arr).transpose(2, 1, 0)
    n = min(dim, 3)
    direction = np.eye(3)
    direction[:n, :n] = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:n, :n]
    spacing = np.ones(3)
    spacing[:n] = np.asarray(img.GetSpacing(), dtype=np.float64)[:n]
    origin = np.zeros(3)
    origin[:n] = np.asarray(img.GetOrigin(), dtype=np.float64)[:n]
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = origin
    fmt = "nrrd" if _suffix(p) in (".nrrd", ".nhdr") else "metaimage"
    meta: dict[str, Any] = {"format": fmt, "original_dtype": str(data.dtype), "n_volumes": n_vol, "volume_index": k}
    return Volume(
        array=np.ascontiguousarray(data),
        affine=_LPS_TO_RAS @ lps,
        spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        source=p,
        kind=fmt,
        header=None,
        meta=meta,
    )


def load_tiff_stack(path: str | Path) -> Volume:
    """A multi-page grayscale TIFF (Z, Y, X) as a Volume stored (X, Y, Z) with an identity affine."""
    import tifffile

    p = Path(path)
    _check_file(p)
    try:
        arr = np.squeeze(tifffile.imread(p))
    except Exception as exc:
        raise ImageLoadError(f"cannot read {p}: the TIFF file is corrupt or uses an unsupported codec ({exc})") from exc
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ImageLoadError(f"{p.name}: a TIFF stack must be (Z, Y, X) grayscale, got shape {arr.shape}")
    meta = {"format": "tiff", "original_dtype": str(arr.dtype)}
    return Volume(np.ascontiguousarray(arr.transpose(2, 1, 0)), np.eye(4), (1.0, 1.0, 1.0), p, "tiff-stack", None, meta)


def _dicom_files(folder: Path) -> list[Path]:
    def wanted(f: Path) -> bool:
        if not f.is_file() or f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            return False
        return _suffix(f) == ".dcm" or is_dicom_file(f)

    return [f for f in sorted(folder.iterdir()) if wanted(f)]


def load_dicom_series(source: str | Path | list[Path], *, series_uid: str | None = None) -> Volume:
    """A DICOM series (folder of single-frame files, or one multi-frame file) as a Volume.

    Slices are sorted by their position along the slice normal (ImagePositionPatient projected on the normal of
    ImageOrientationPatient), else by InstanceNumber. Values are rescaled (RescaleSlope/Intercept, per slice) and
    the volume is float32 whenever a rescale is not the identity. A folder with several series needs ``series_uid``.
    ImageLoadError names the problem for: files with different orientations, duplicate slice positions, missing
    slices (a gap of about a whole number of steps) and otherwise uneven steps (more than
    :data:`SLICE_STEP_TOLERANCE` off the median step). ``meta["files"]`` / ``meta["sop_instance_uids"]`` list the
    slices in stored order (what a DICOM SEG of the volume references).
    """
    if isinstance(source, list):
        files = source
        folder = files[0].parent if files else Path(".")
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise ImageLoadError(f"DICOM series folder not found: {folder}")
        files = _dicom_files(folder)
        if not files:
            raise ImageLoadError(f"{folder} holds no DICOM files (.dcm or files with the DICM preamble)")
    datasets = [(f, read_dicom(f)) for f in files]
    if len(datasets) == 1 and int(datasets[0][1].get("NumberOfFrames", 1) or 1) > 1:
        return _multiframe_volume(*datasets[0])
    by_series: dict[str, list[tuple[Path, Any]]] = {}
    for f, ds in datasets:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if series_uid is not None:
        if series_uid not in by_series:
            raise ImageLoadError(f"series {series_uid} not in {folder}; present: {sorted(by_series)}")
        datasets = by_series[series_uid]
    elif len(by_series) > 1:
        counts = ", ".join(f"{uid or '(none)'}: {len(v)} files" for uid, v in sorted(by_series.items()))
        raise ImageLoadError(
            f"{folder} holds {len(by_series)} DICOM series ({counts}); put each series in its own folder or call "
            "load_dicom_series(folder, series_uid=...)"
        )
    first = datasets[0][1]
    rows, cols = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    for f, ds in datasets:
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, cols):
            raise ImageLoadError(
                f"{f.name} is {ds.get('Rows')}x{ds.get('Columns')} but {datasets[0][0].name} is {rows}x{cols}: "
                "not one series"
            )
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise ImageLoadError(f"{f.name}: colour DICOM series are not supported as volumes")
    iop = first.get("ImageOrientationPatient")
    row_dir = np.array([float(v) for v in iop[:3]]) if iop is not None and len(iop) == 6 else np.array([1.0, 0, 0])
    col_dir = np.array([float(v) for v in iop[3:]]) if iop is not None and len(iop) == 6 else np.array([0, 1.0, 0])
    for f, ds in datasets[1:]:
        other = ds.get("ImageOrientationPatient")
        if (other is None) != (iop is None) or (
            other is not None and not np.allclose([float(v) for v in other], [*row_dir, *col_dir], atol=1e-3)
        ):
            raise ImageLoadError(
                f"{folder}: {f.name} has ImageOrientationPatient {_fmt_values(other)} but {datasets[0][0].name} has "
                f"{_fmt_values(iop)}: the slices are not one 3D series (a localizer mixed in?)"
            )
    normal = np.cross(row_dir, col_dir)
    has_pos = all(ds.get("ImagePositionPatient") is not None for _, ds in datasets)
    if has_pos:
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in datasets])
        keys = positions @ normal
        order = np.argsort(keys, kind="stable")
    else:
        keys = np.array([float(ds.get("InstanceNumber", i) or i) for i, (_, ds) in enumerate(datasets)])
        order = np.argsort(keys, kind="stable")
    _check_slice_steps([datasets[i][0] for i in order], keys[order], folder, "position" if has_pos else "instance")
    datasets = [datasets[i] for i in order]
    slices = []
    rescaled = False
    for f, ds in datasets:
        pix = dicom_pixels(ds, f)
        if pix.shape != (rows, cols):
            raise ImageLoadError(f"{f.name}: pixel array {pix.shape} does not match Rows/Columns {rows}x{cols}")
        slope, inter = dicom_rescale(ds)
        rescaled |= (slope, inter) != (1.0, 0.0)
        slices.append((pix, slope, inter))
    if rescaled:
        data = np.stack([apply_rescale(p, s, i).astype(np.float32) for p, s, i in slices], axis=-1)
    else:
        data = np.stack([p for p, _, _ in slices], axis=-1)
    data = np.ascontiguousarray(data.transpose(1, 0, 2))  # (rows, cols, z) -> (col, row, z)
    spacing_rc = first.get("PixelSpacing") or first.get("ImagerPixelSpacing") or [1.0, 1.0]
    row_sp, col_sp = float(spacing_rc[0]), float(spacing_rc[1])
    if has_pos and len(datasets) > 1:
        p0 = np.array([float(v) for v in datasets[0][1].ImagePositionPatient])
        p1 = np.array([float(v) for v in datasets[-1][1].ImagePositionPatient])
        step = (p1 - p0) / (len(datasets) - 1)
    else:
        thickness = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 1) or 1)
        step = normal * thickness
    origin = np.array([float(v) for v in datasets[0][1].ImagePositionPatient]) if has_pos else np.zeros(3, dtype=float)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_sp
    lps[:3, 1] = col_dir * row_sp
    lps[:3, 2] = step
    lps[:3, 3] = origin
    affine = _LPS_TO_RAS @ lps
    meta = _series_meta(first, data, datasets[0][1])
    meta.update(
        n_files=len(datasets),
        files=[str(f) for f, _ in datasets],
        sorted_by=("position" if has_pos else "InstanceNumber"),
    )
    meta["sop_instance_uids"] = [str(ds.get("SOPInstanceUID", "")) for _, ds in datasets]
    meta["uneven_spacing"] = False  # uneven steps (missing slices) raise in _check_slice_steps
    spacing = (col_sp, row_sp, float(np.linalg.norm(step)) or 1.0)
    return Volume(data, affine, spacing, folder, "dicom-series", None, meta)


#: a slice step may differ from the series' median step by this fraction before the series counts as uneven
SLICE_STEP_TOLERANCE = 0.1


def _fmt_values(values: Any) -> str:
    return "(none)" if values is None else "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _check_slice_steps(files: list[Path], keys: np.ndarray, folder: Path, what: str) -> None:
    """Refuse a sorted series with duplicate slices or missing / unevenly spaced slices (clear ImageLoadError).

    ``keys``: the sorted slice positions along the normal (mm, ``what="position"``) or InstanceNumbers."""
    if len(keys) < 2:
        return
    steps = np.diff(keys)
    unit = " mm" if what == "position" else ""
    dup = np.flatnonzero(steps < (1e-4 if what == "position" else 0.5))
    if dup.size:
        i = int(dup[0])
        label = f"slice position {keys[i]:g} mm along the normal" if what == "position" else f"InstanceNumber {keys[i]:g}"
        raise ImageLoadError(
            f"{folder}: duplicate slices: {files[i].name} and {files[i + 1].name} share {label} ({dup.size} "
            "duplicate pair(s) in all; several echoes / phases / time points, or a file copied twice?); put one 3D "
            "series per folder"
        )
    if what != "position" or len(keys) < 3:
        return
    median = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - median) > SLICE_STEP_TOLERANCE * median)
    if not off.size:
        return
    i = int(off[0])
    missing = round(float(steps[i]) / median) - 1
    if missing >= 1 and abs(steps[i] - (missing + 1) * median) <= SLICE_STEP_TOLERANCE * median:
        problem = (f"missing slices: a gap of {steps[i]:g}{unit} between {files[i].name} ({keys[i]:g}) and "
                   f"{files[i + 1].name} ({keys[i + 1]:g}) where the series steps {median:g}{unit} "
                   f"(about {missing} slice{'s' if missing != 1 else ''} missing)")
    else:
        problem = (f"uneven slice spacing: {steps[i]:g}{unit} between {files[i].name} and {files[i + 1].name}, "
                   f"{median:g}{unit} elsewhere (steps range {float(steps.min()):g}..{float(steps.max()):g})")
    raise ImageLoadError(
        f"{folder}: {problem}; {off.size} irregular step(s) in all. A volume needs evenly spaced slices: add the "
        "missing files or resample the series"
    )


def _series_meta(first: Any, data: np.ndarray, ds: Any) -> dict[str, Any]:
    win = dicom_window(ds)
    return {
        "format": "dicom",
        "modality": str(first.get("Modality", "")),
        "modality_source": "dicom" if first.get("Modality") else "",
        "photometric": str(first.get("PhotometricInterpretation", "")).upper(),
        "original_dtype": str(data.dtype),
        "dicom_window": (win.center, win.width) if win is not None else None,
        "series_uid": str(first.get("SeriesInstanceUID", "")),
    }


def _multiframe_volume(path: Path, ds: Any) -> Volume:
    pix = dicom_pixels(ds, path)
    if pix.ndim != 3:
        raise ImageLoadError(f"{path.name}: multi-frame DICOM with pixel shape {pix.shape} is not a grayscale volume")
    slope, inter = dicom_rescale(ds)
    data = np.ascontiguousarray(apply_rescale(pix, slope, inter).transpose(2, 1, 0))  # (frames, r, c) -> (c, r, f)
    spacing_rc = ds.get("PixelSpacing") or [1.0, 1.0]
    thickness = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 1) or 1)
    affine = np.diag([-float(spacing_rc[1]), -float(spacing_rc[0]), thickness, 1.0])  # axial LPS grid, origin 0
    meta = _series_meta(ds, data, ds)
    meta.update(n_files=1, geometry="approximate (multi-frame: pixel spacing only)")
    return Volume(
        data, affine, (float(spacing_rc[1]), float(spacing_rc[0]), thickness), path, "dicom-series", None, meta
    )


# ------------------------------------------------------------------------------------------------ modality, windows


def guess_modality(volume: Volume) -> str:
    """``"CT"`` or ``""`` (unknown): DICOM Modality when known, else the HU heuristic of the module docstring."""
    if volume.meta.get("modality"):
        return str(volume.meta["modality"])
    data = np.asarray(volume.array)
    flat = data.reshape(-1)
    if flat.size > 2_000_000:
        flat = flat[:: int(np.ceil(flat.size / 2_000_000))]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return ""
    vmin = float(flat.min())
    if not -3100.0 <= vmin < -500.0:
        return ""
    if flat.dtype.kind == "f" and not np.allclose(flat[:10000], np.round(flat[:10000]), atol=1e-3):
        return ""
    if float(np.percentile(flat, 99.5)) >= 4000.0:
        return ""
    return "CT"


def volume_window(volume: Volume, window: WindowSpec = None) -> tuple[Window, str, str]:
    """(window, source, modality) for displaying slices of ``volume`` (see the module docstring)."""
    modality = guess_modality(volume)
    if window is not None:
        return resolve_window(volume.array, window), "user", modality
    file_win = volume.meta.get("dicom_window")
    if file_win:
        return Window(file_win[0], file_win[1], "dicom-file"), "file", modality
    source = "preset"
    spec: WindowSpec
    if modality.upper() == "CT":
        spec = DEFAULT_CT_WINDOW
    elif volume.array.dtype == np.uint8:
        spec = Window(127.5, 255.0, "identity")
    else:
        spec = "percentile"
    return resolve_window(volume.array, spec), source, modality


def slice_image(
    volume: Volume,
    slice_index: int | None,
    *,
    axis: int = 2,
    window: WindowSpec = None,
    orientation: str = "radiological",
    resolved_window: tuple[Window, str, str] | None = None,
    profile: str = "default",
) -> LoadedImage:
    """One slice of ``volume`` as a LoadedImage (``kind`` ``"nifti-slice"``/``"dicom-series-slice"``/...).

    ``resolved_window``: the result of :func:`volume_window` when the caller already computed it (many slices).
    ``profile="reference"``: the public release's slicing instead (:func:`release_slice`, :func:`release_window`):
    ``np.rot90`` of the stored voxel slice (``orientation`` is not used) and, without ``window``, the slice's own
    1-99 percentile window, truncated to uint8; with a window, its low/high bounds are used the release's way.
    """
    if profile not in ("default", "reference"):
        raise ImageLoadError(f"profile must be 'default' or 'reference', got {profile!r}")
    axis = _check_axis(axis)
    n = volume.n_slices(axis)
    if slice_index is None and n == 1:
        slice_index = 0
    k = _check_index(slice_index, n, f"slices along axis {axis}", volume.source)
    transform = (True, True, False) if profile == "reference" else display_transform(volume.affine, axis, orientation)
    raw = to_display(np.take(volume.array, k, axis=axis), transform)  # reference: == release_slice(array, axis, k)
    if profile == "reference" and window is None and resolved_window is None:
        lo, hi = float(np.percentile(raw, 1)), float(np.percentile(raw, 99))
        win, source, modality = Window((lo + hi) / 2.0, hi - lo, "release-percentile"), "slice", guess_modality(volume)
    else:
        win, source, modality = resolved_window if resolved_window is not None else volume_window(volume, window)
    gray = release_window(raw, win.low, win.high) if profile == "reference" else apply_window(raw, win)
    if volume.meta.get("photometric") == "MONOCHROME1":
        gray = 255 - gray
    p, q = (a for a in range(3) if a != axis)
    spacing = (volume.spacing[q], volume.spacing[p]) if transform[0] else (volume.spacing[p], volume.spacing[q])
    kind = {"nifti": "nifti-slice", "dicom-series": "dicom-series-slice"}.get(volume.kind, f"{volume.kind}-slice")
    meta = {
        "format": volume.meta.get("format", volume.kind),
        "slice_index": k,
        "axis": axis,
        "n_slices": n,
        "orientation": orientation,
        "display_transform": transform,
        "spacing": tuple(float(s) for s in spacing),  # (row, column) spacing of the displayed image, mm
        "affine": np.array(volume.affine, copy=True),
        "slice_affine": _slice_affine(volume.affine, axis, k),
        "volume_shape": volume.shape,
        "window": window_info(win, source),
        "modality": modality,
        "original_dtype": volume.meta.get("original_dtype", str(volume.array.dtype)),
        "n_volumes": volume.meta.get("n_volumes", 1),
        "volume_index": volume.meta.get("volume_index", 0),
        "volume_kind": volume.kind,
    }
    if volume.header is not None:
        meta["header"] = volume.header
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    return LoadedImage(array=rgb, raw=raw, source=volume.source, kind=kind, meta=meta)


def release_slice(data: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A slice as the public release cuts it (``trajectory_gen/process_nii.py``): ``np.take(data, index, axis)``
    turned 90 degrees counter-clockwise (``np.rot90``) in the stored voxel order, whatever the affine says."""
    return np.ascontiguousarray(np.rot90(np.take(np.asarray(data), int(index), axis=_check_axis(axis))))


def release_window(slice2d: np.ndarray, window_min: float | None = None, window_max: float | None = None) -> np.ndarray:
    """The release's display window of one slice: ``[window_min, window_max]`` (both None: the slice's own 1st and
    99th percentiles) mapped linearly onto 0..255 in float64 and truncated to uint8 (not rounded); a zero-width
    window gives zeros."""
    raw = np.asarray(slice2d, dtype=np.float64)
    if window_min is None or window_max is None:
        window_min, window_max = float(np.percentile(raw, 1)), float(np.percentile(raw, 99))
    lo, hi = float(window_min), float(window_max)
    if hi - lo == 0:
        return np.zeros(raw.shape, dtype=np.uint8)
    return ((np.clip(raw, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)


def iter_slices(
    volume: Volume,
    axis: int = 2,
    *,
    window: WindowSpec = None,
    orientation: str = "radiological",
    indices: list[int] | None = None,
    profile: str = "default",
) -> Iterator[LoadedImage]:
    """Each slice (or the given ``indices``) along ``axis`` as a LoadedImage, windowed consistently (with
    ``profile="reference"`` and no ``window``: each slice by its own percentiles, as the release does)."""
    resolved = None if profile == "reference" and window is None else volume_window(volume, window)
    for k in range(volume.n_slices(axis)) if indices is None else indices:
        yield slice_image(volume, k, axis=axis, orientation=orientation, resolved_window=resolved, profile=profile)


def choose_slice(mask: np.ndarray | Volume, axis: int = 2, how: str = "largest") -> int:
    """A slice index along ``axis`` from a 3D (label) mask: ``"largest"`` object area, or ``"middle"`` of the
    object's extent. Raises ValueError when the mask is empty."""
    arr = mask.array if isinstance(mask, Volume) else np.asarray(mask)
    if arr.ndim != 3:
        raise ValueError(f"choose_slice needs a 3D mask, got shape {arr.shape}")
    axis = _check_axis(axis)
    other = tuple(a for a in range(3) if a != axis)
    area = np.count_nonzero(arr, axis=other)
    if not area.any():
        raise ValueError("the mask is empty: there is no slice with the object")
    if how == "largest":
        return int(np.argmax(area))
    if how == "middle":
        hits = np.flatnonzero(area)
        return int((hits[0] + hits[-1]) // 2)
    raise ValueError(f"how must be 'largest' or 'middle', got {how!r}")
