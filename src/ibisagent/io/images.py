"""Read 2D images (raster files and DICOM) as the HxWx3 uint8 RGB array every segmenter and policy consumes, and the
intensity windowing shared with volumes. :func:`ibisagent.io.loader.load_image` dispatches over these readers and
:mod:`ibisagent.io.volumes` (this module imports neither).

Supported inputs (``load_image``):

* raster files ``.png .jpg .jpeg .tif .tiff .bmp``: 8-bit, 16-bit and float; grayscale, RGB, RGBA, palette.
  8-bit pixels are kept as they are. 16-bit / float grayscale (and 16-bit / float colour) pixels are scaled with a
  robust percentile window (0.5-99.5 %) unless a ``window`` is given. Transparent pixels (RGBA, LA, palette with
  transparency) are composited onto black. Multi-page TIFF stacks need ``slice_index`` (the page).
* DICOM ``.dcm`` (and files without a known extension that carry the ``DICM`` preamble, e.g. UID-named files): the
  stored values go through RescaleSlope/RescaleIntercept (so CT ``raw`` is in HU), then the file's
  WindowCenter/WindowWidth (first pair) when present, else a preset (``ct-abdomen`` for CT, the percentile window
  for other modalities, identity for 8-bit data). MONOCHROME1 is inverted after windowing. Multi-frame files need
  ``slice_index`` (the frame).
* NIfTI ``.nii .nii.gz``, NRRD ``.nrrd .nhdr``, MetaImage ``.mha .mhd`` and folders of DICOM files (a series): volumes; ``slice_index`` picks a slice along ``axis``
  (see :mod:`ibisagent.io.volumes` for orientation and windowing of volumes).

Windowing: :data:`WINDOW_PRESETS` and :func:`apply_window` (``window`` may be a preset name, ``(center, width)``, a
:class:`Window`, ``"percentile"`` or ``"minmax"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ImageLoadError",
    "WindowError",
    "LoadedImage",
    "Window",
    "WINDOW_PRESETS",
    "PERCENTILE_RANGE",
    "RASTER_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "apply_window",
    "resolve_window",
    "image_format",
    "is_dicom_file",
    "to_rgb_uint8",
]

#: raster formats read with tifffile (TIFF) or Pillow
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: every suffix ``load_image`` accepts (plus extensionless DICOM files and DICOM series folders)
#: volume formats read with SimpleITK (NRRD, MetaImage)
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_SUFFIXES = (*RASTER_SUFFIXES, ".dcm", ".nii", ".nii.gz", *ITK_SUFFIXES)

#: robust intensity range for non-CT 16-bit / float data and MR volumes (lower, upper percentile)
PERCENTILE_RANGE = (0.5, 99.5)


class ImageLoadError(ValueError):
    """An image that cannot be loaded: missing, unreadable/corrupt, unsupported, or a volume without a slice index."""


class WindowError(ValueError):
    """A display window that is not understood (unknown preset name, non-positive width...)."""


@dataclass(frozen=True)
class Window:
    """A linear display window: values in ``[center - width/2, center + width/2]`` map onto 0..255."""

    center: float
    width: float
    name: str = ""

    @property
    def low(self) -> float:
        return self.center - self.width / 2.0

    @property
    def high(self) -> float:
        return self.center + self.width / 2.0


#: Display windows. CT presets are (center, width) in Hounsfield units; "percentile"/"mr" use PERCENTILE_RANGE of the
#: data, "minmax" the full data range.
WINDOW_PRESETS: dict[str, Window | str] = {
    "ct-soft-tissue": Window(40, 400, "ct-soft-tissue"),
    "ct-abdomen": Window(40, 400, "ct-abdomen"),
    "ct-lung": Window(-600, 1500, "ct-lung"),
    "ct-bone": Window(400, 1800, "ct-bone"),
    "ct-brain": Window(40, 80, "ct-brain"),
    "ct-liver": Window(60, 160, "ct-liver"),
    "ct-mediastinum": Window(50, 350, "ct-mediastinum"),
    "mr": "percentile",
    "percentile": "percentile",
    "minmax": "minmax",
}

#: default preset for CT data without a window of its own
DEFAULT_CT_WINDOW = "ct-abdomen"

WindowSpec = str | tuple[float, float] | Window | None


@dataclass(frozen=True)
class LoadedImage:
    """A loaded 2D image.

    ``array``: HxWx3 uint8 RGB (what segmenters and policies consume).
    ``raw``: the original intensities aligned with ``array`` (HxW for single-channel data, in the native dtype, or
    float32 once a rescale slope/intercept was applied; HxWxC for colour files).
    ``source``: the file (or DICOM folder). ``kind``: ``"2d"``, ``"tiff-page"``, ``"dicom"``, ``"nifti-slice"`` or
    ``"dicom-series-slice"``. ``meta``: spacing, window used, original dtype, DICOM modality, and for volume slices
    the affine, slice index/axis, orientation and display transform (used by ``save_mask`` to write masks back).
    """

    array: np.ndarray
    raw: np.ndarray
    source: Path
    kind: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.array.shape[0]), int(self.array.shape[1])


# ----------------------------------------------------------------------------------------------------------- windows


def _normalize_name(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def _finite_sample(raw: np.ndarray, max_values: int = 1_000_000) -> np.ndarray:
    """Finite values of ``raw`` (a strided subsample for big arrays, enough for robust percentiles)."""
    flat = np.asarray(raw).reshape(-1)
    if flat.size > max_values:
        flat = flat[:: int(np.ceil(flat.size / max_values))]
    flat = flat.astype(np.float64, copy=False)
    return flat[np.isfinite(flat)]


def resolve_window(raw: np.ndarray, window: WindowSpec) -> Window:
    """The concrete linear window for ``raw``: presets and ``(center, width)`` as given, data-driven ones computed.

    ``"percentile"`` (and ``"mr"``) use :data:`PERCENTILE_RANGE`; when that range is degenerate (e.g. a mostly-zero
    image) it falls back to min/max. A constant image gets width 0 (apply_window maps it to 0).
    """
    if window is None:
        window = "percentile"
    if isinstance(window, Window):
        spec: Window | str = window
    elif isinstance(window, str):
        key = _normalize_name(window)
        if key not in WINDOW_PRESETS and f"ct-{key}" in WINDOW_PRESETS:
            key = f"ct-{key}"
        if key not in WINDOW_PRESETS:
            names = ", ".join(WINDOW_PRESETS)
            raise WindowError(f"unknown window {window!r}; use one of {names} or a (center, width) pair")
        spec = WINDOW_PRESETS[key]
    elif isinstance(window, tuple | list) and len(window) == 2:
        try:
            spec = Window(float(window[0]), float(window[1]), "custom")
        except (TypeError, ValueError) as exc:
            raise WindowError(f"window must be (center, width) numbers, got {window!r}") from exc
    else:
        raise WindowError(f"window must be a preset name, a (center, width) pair or a Window, got {window!r}")
    if isinstance(spec, Window):
        degenerate_ok = spec.name in ("percentile", "minmax") and spec.width == 0  # computed from constant data
        if not (np.isfinite(spec.center) and np.isfinite(spec.width)) or (spec.width <= 0 and not degenerate_ok):
            raise WindowError(f"window width must be a positive number, got center={spec.center} width={spec.width}")
        return spec
    values = _finite_sample(raw)
    if values.size == 0:
        return Window(0.0, 0.0, spec)
    vmin, vmax = float(values.min()), float(values.max())
    if spec == "percentile":
        lo, hi = (float(v) for v in np.percentile(values, PERCENTILE_RANGE))
        if hi <= lo:  # mostly-constant image: fall back to the full range
            lo, hi = vmin, vmax
    else:
        lo, hi = vmin, vmax
    return Window((lo + hi) / 2.0, hi - lo, spec)


def apply_window(raw: np.ndarray, window: WindowSpec = None) -> np.ndarray:
    """Map intensities onto uint8 through a linear window (same shape as ``raw``).

    Values below the window are 0, above are 255; NaN is 0. A zero-width (constant-data) window gives all zeros.
    """
    win = resolve_window(raw, window)
    data = np.asarray(raw, dtype=np.float32)
    if win.width <= 0:
        return np.zeros(data.shape, dtype=np.uint8)
    scaled = (data - np.float32(win.low)) * np.float32(255.0 / win.width)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def window_info(win: Window, source: str) -> dict[str, Any]:
    """The ``meta["window"]`` record: name, center, width, low, high and where it came from."""
    return {
        "name": win.name,
        "center": float(win.center),
        "width": float(win.width),
        "low": float(win.low),
        "high": float(win.high),
        "source": source,
    }


def to_rgb_uint8(raw: np.ndarray, window: WindowSpec = None) -> tuple[np.ndarray, dict[str, Any] | None]:
    """HxWx3 uint8 from a 2D or HxWxC array, with the window record (None when pixels were used as they are).

    uint8/bool single-channel and uint8 colour pixels are used as they are unless ``window`` is given; other dtypes
    get ``window`` (default: the percentile window; colour channels share one window so hues are preserved).
    """
    data = np.asarray(raw)
    if data.dtype == bool:
        data = data.astype(np.uint8) * 255
    info = None
    if data.dtype == np.uint8 and window is None:
        out = data
    else:
        win = resolve_window(data, window)
        out = apply_window(data, win)
        info = window_info(win, "user" if window is not None else "auto")
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    elif out.ndim == 3 and out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif out.ndim == 3 and out.shape[2] == 2:  # gray + alpha
        out = np.repeat(_composite(out[:, :, :1], out[:, :, 1]), 3, axis=2)
    elif out.ndim == 3 and out.shape[2] >= 4:  # RGBA (extra channels beyond 4 dropped)
        out = _composite(out[:, :, :3], out[:, :, 3])
    elif not (out.ndim == 3 and out.shape[2] == 3):
        raise ImageLoadError(f"cannot display an array of shape {data.shape} as an image")
    return np.ascontiguousarray(out, dtype=np.uint8), info


def _composite(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite uint8 colour onto black with a uint8 alpha channel."""
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    return np.clip(np.rint(color.astype(np.float32) * a), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- format sniffing


def is_dicom_file(path: str | Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def image_format(path: str | Path) -> str:
    """``"raster"``, ``"dicom"``, ``"nifti"``, ``"itk"`` (NRRD / MetaImage volumes) or ``"dicom-series"`` (a folder);
    ImageLoadError when not supported.

    Files whose suffix is not a known one are accepted when they are DICOM (preamble check).
    """
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(f"image file not found: {p}")
    if p.is_dir():
        return "dicom-series"
    suffix = _suffix(p)
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix == ".dcm":
        return "dicom"
    if suffix in (".nii", ".nii.gz"):
        return "nifti"
    if suffix in ITK_SUFFIXES:
        return "itk"
    if is_dicom_file(p):
        return "dicom"
    shown = suffix or "(no extension)"
    raise ImageLoadError(
        f"unsupported image format {shown} for {p.name}; supported: {', '.join(SUPPORTED_SUFFIXES)}, "
        "DICOM files without extension, or a folder of DICOM files"
    )


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(f"cannot read {path}: {exc}") from exc
    if size == 0:
        raise ImageLoadError(f"image file {path} is empty (0 bytes)")


def _check_index(index: int | None, n: int, what: str, path: Path) -> int:
    if index is None:
        raise ImageLoadError(
            f"{path.name} holds {n} {what} (a volume/stack); pass slice_index=0..{n - 1} to pick one 2D image"
        )
    try:
        k = int(index)
    except (TypeError, ValueError) as exc:
        raise ImageLoadError(f"slice_index must be an integer, got {index!r}") from exc
    if not -n <= k < n:
        raise ImageLoadError(f"slice_index {k} is out of range for {path.name}: it has {n} {what} (0..{n - 1})")
    return k % n


# ------------------------------------------------------------------------------------------------------ raster files


def _read_tiff(path: Path) -> tuple[np.ndarray, str, str]:
    """(array, axes, photometric) via tifffile; raises on failure."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr = series.asarray()
        axes = series.axes
        photometric = str(getattr(tif.pages[0], "photometric", "")).split(".")[-1].upper()
    return np.asarray(arr), axes, photometric


def _read_pil(path: Path) -> tuple[np.ndarray, str]:
    """(array, PIL mode) via Pillow; raises on failure."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "1":
            return np.asarray(im.convert("L")), "L"
        if mode in ("P", "PA"):
            im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif mode in ("La", "RGBa"):
            im = im.convert(mode.upper())
        return np.asarray(im), im.mode


def _load_raster(path: Path, slice_index: int | None, window: WindowSpec) -> LoadedImage:
    _check_file(path)
    suffix = _suffix(path)
    meta: dict[str, Any] = {"format": suffix.lstrip(".")}
    kind = "2d"
    arr: np.ndarray | None = None
    errors: list[str] = []
    if suffix in (".tif", ".tiff"):
        try:
            arr, axes, photometric = _read_tiff(path)
            meta.update(tiff_axes=axes, photometric=photometric)
            color = "S" in axes or (photometric in ("RGB", "YCBCR", "PALETTE") and arr.ndim >= 3)
            arr = np.squeeze(arr) if arr.ndim > 2 else arr
            if color and arr.ndim == 3 and arr.shape[-1] not in (3, 4) and arr.shape[0] in (3, 4):
                arr = np.moveaxis(arr, 0, -1)  # planar RGB
            stacked = arr.ndim == 4 or (arr.ndim == 3 and not (color and arr.shape[-1] in (2, 3, 4)))
            if stacked:
                if arr.ndim > 4:
                    raise ImageLoadError(f"TIFF {path.name} has axes {axes} (shape {arr.shape}); save one 2D plane")
                n_pages = int(arr.shape[0])
                k = _check_index(slice_index, n_pages, "pages", path)
                arr = arr[k]
                kind = "tiff-page"
                meta.update(slice_index=k, n_slices=n_pages)
        except ImageLoadError:
            raise
        except Exception as exc:  # tifffile could not decode (e.g. a codec it lacks): try Pillow below
            errors.append(f"tifffile: {exc}")
            arr = None
    if arr is None:
        try:
            arr, mode = _read_pil(path)
            meta["mode"] = mode
        except Exception as exc:
            errors.append(str(exc))
            raise ImageLoadError(
                f"cannot read {path}: the file is corrupt or not a valid {suffix.lstrip('.').upper()} image "
                f"({'; '.join(errors)})"
            ) from exc
    if kind == "2d" and slice_index is not None:
        _check_index(slice_index, 1, "slice (a 2D image)", path)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or arr.size == 0 or min(arr.shape[:2]) == 0:
        raise ImageLoadError(f"{path.name} has an unusable pixel array of shape {arr.shape}")
    if arr.dtype.kind == "c":
        raise ImageLoadError(f"{path.name} holds complex values; save magnitude images instead")
    meta["original_dtype"] = str(arr.dtype)
    raw = np.ascontiguousarray(arr)
    rgb, win = to_rgb_uint8(raw, window)
    meta["window"] = win
    meta["channels"] = 1 if raw.ndim == 2 else int(raw.shape[2])
    return LoadedImage(array=rgb, raw=raw, source=path, kind=kind, meta=meta)


# ----------------------------------------------------------------------------------------------------------- DICOM


def read_dicom(path: Path, *, stop_before_pixels: bool = False) -> Any:
    """pydicom Dataset of ``path`` with ImageLoadError for missing / non-DICOM / corrupt files."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_file(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=_suffix(path) == ".dcm")
    except InvalidDicomError as exc:
        raise ImageLoadError(f"cannot read {path}: not a valid DICOM file ({exc})") from exc
    except Exception as exc:
        raise ImageLoadError(f"cannot read {path}: the DICOM file is corrupt or truncated ({exc})") from exc


def dicom_pixels(ds: Any, path: Path) -> np.ndarray:
    """The decoded pixel array (frames first for multi-frame, RGB last for colour) with clear errors."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(
            f"{path.name} is a DICOM file without pixel data (a DICOMDIR, report or segmentation object?)"
        )
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts))
        raise ImageLoadError(
            f"cannot decode the pixels of {path.name} (transfer syntax {ts_name}): {exc}. Compressed DICOM needs the "
            "decoders pinned in ibisagent's dependencies (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
            "pylibjpeg-rle); if they are installed the data is corrupt, or decompress it (e.g. `gdcmconv --raw`)"
        ) from exc


def _first_number(value: Any) -> float | None:
    """First value of a (possibly multi-valued) DICOM number, or None."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
            return float(value)
        return float(value[0]) if len(value) else None
    except (TypeError, ValueError):
        return None


def _functional_group_value(ds: Any, frame: int, seq: str, keyword: str) -> Any:
    """A value from the enhanced multi-frame per-frame (else shared) functional groups, or None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index and seq in items[index]:
            inner = items[index][seq]
            if len(inner) and keyword in inner[0]:
                return inner[0][keyword].value
    return None


def dicom_rescale(ds: Any, frame: int = 0) -> tuple[float, float]:
    """(slope, intercept) of the modality LUT (1, 0 when absent)."""
    slope = _first_number(ds.get("RescaleSlope"))
    inter = _first_number(ds.get("RescaleIntercept"))
    if slope is None:
        slope = _first_number(_functional_group_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    if inter is None:
        inter = _first_number(
            _functional_group_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        )
    return (1.0 if slope is None or slope == 0 else slope), (0.0 if inter is None else inter)


def dicom_window(ds: Any, frame: int = 0) -> Window | None:
    """The file's own VOI window (first WindowCenter/WindowWidth pair), or None."""
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is None or width is None:
        center = _first_number(_functional_group_value(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
        width = _first_number(_functional_group_value(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None or not width > 0:
        return None
    return Window(center, width, "dicom-file")


def apply_rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values -> modality values (e.g. HU); the native dtype is kept when the rescale is the identity."""
    if slope == 1.0 and intercept == 0.0:
        return stored
    return (stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def default_window(raw: np.ndarray, modality: str, file_window: Window | None) -> tuple[WindowSpec, str]:
    """The window to use when the user gave none: the file's, a CT preset, identity for 8-bit, else percentile."""
    if file_window is not None:
        return file_window, "file"
    if modality.upper() == "CT":
        return DEFAULT_CT_WINDOW, "preset"
    if raw.dtype == np.uint8:
        return Window(127.5, 255.0, "identity"), "preset"
    return "percentile", "preset"


def _dicom_geometry(ds: Any) -> dict[str, Any]:
    """Pixel spacing, and when position/orientation are present the voxel->RAS affine of this plane."""
    out: dict[str, Any] = {}
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is not None and len(spacing) == 2:
        out["spacing"] = (float(spacing[0]), float(spacing[1]))  # (row spacing, column spacing) in mm
    thickness = _first_number(ds.get("SliceThickness"))
    if thickness:
        out["slice_thickness"] = thickness
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6 and "spacing" in out:
        row_dir = np.array([float(v) for v in iop[:3]])
        col_dir = np.array([float(v) for v in iop[3:]])
        normal = np.cross(row_dir, col_dir)
        lps = np.eye(4)
        lps[:3, 0] = row_dir * out["spacing"][1]
        lps[:3, 1] = col_dir * out["spacing"][0]
        lps[:3, 2] = normal * (thickness or 1.0)
        lps[:3, 3] = [float(v) for v in ipp]
        out["affine"] = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return out


def _load_dicom(path: Path, slice_index: int | None, window: WindowSpec) -> LoadedImage:
    ds = read_dicom(path)
    pixels = dicom_pixels(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    n_frames = int(_first_number(ds.get("NumberOfFrames")) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    modality = str(ds.get("Modality", ""))
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": modality,
        "photometric": photometric,
        "original_dtype": str(pixels.dtype),
        "n_frames": n_frames,
    }
    frame = 0
    if n_frames > 1:
        frame = _check_index(slice_index, n_frames, "frames", path)
        pixels = pixels[frame]
        meta["slice_index"] = frame
    elif slice_index is not None:
        _check_index(slice_index, 1, "frame (a 2D image)", path)
    if samples == 1 and pixels.ndim != 2:
        raise ImageLoadError(f"{path.name}: unexpected DICOM pixel array shape {pixels.shape}")
    meta.update(_dicom_geometry(ds))
    if samples > 1:  # colour DICOM (ultrasound, photographs): pixels are already display values
        raw = pixels
        rgb, win = to_rgb_uint8(raw, window)
        meta["window"] = win
        return LoadedImage(array=rgb, raw=raw, source=path, kind="dicom", meta=meta)
    slope, intercept = dicom_rescale(ds, frame)
    raw = apply_rescale(pixels, slope, intercept)
    meta.update(rescale_slope=slope, rescale_intercept=intercept)
    if window is not None:
        spec, source = window, "user"
    else:
        spec, source = default_window(raw, modality, dicom_window(ds, frame))
    win = resolve_window(raw, spec)
    gray = apply_window(raw, win)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    meta["window"] = window_info(win, source)
    if "affine" in meta and n_frames == 1:  # a one-slice volume: lets save_mask write NIfTI masks in this geometry
        meta.update(volume_shape=(raw.shape[1], raw.shape[0], 1), slice_index=0, axis=2, orientation="voxel")
        meta.update(display_transform=(True, False, False), slice_affine=meta["affine"])
    return LoadedImage(array=np.repeat(gray[:, :, None], 3, axis=2), raw=raw, source=path, kind="dicom", meta=meta)
