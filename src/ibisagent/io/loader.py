"""``load_image``: one entry point for every supported image format, above the 2D readers and the volume readers.

:mod:`ibisagent.io.images` reads raster files and DICOM, :mod:`ibisagent.io.volumes` reads NIfTI / DICOM series /
TIFF stacks and cuts slices; this module picks between them by format (see :mod:`ibisagent.io.images` for what each
format supports).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import ImageLoadError, LoadedImage, WindowSpec, _load_dicom, _load_raster, image_format, resolve_window
from .volumes import load_volume, slice_image

__all__ = ["load_image"]


def load_image(
    path: str | Path,
    *,
    slice_index: int | None = None,
    axis: int = 2,
    window: WindowSpec = None,
    orientation: str = "radiological",
    volume_index: int | None = None,
) -> LoadedImage:
    """Load a 2D image (or one slice/frame/page of a volume) as a :class:`LoadedImage`.

    ``slice_index`` is required for volumes (NIfTI, DICOM series folders, multi-frame DICOM, TIFF stacks) and picks
    the slice along ``axis`` (NIfTI / DICOM series: voxel axis of the stored array, 2 = the third axis, axial for
    usual scans), the frame (multi-frame DICOM) or the page (TIFF). Negative indices count from the end.
    ``window``: preset name (:data:`WINDOW_PRESETS`), ``(center, width)``, :class:`Window`, ``"percentile"`` or
    ``"minmax"``; None = automatic (see :mod:`ibisagent.io.images`). ``orientation`` applies to volume slices only
    (see :func:`ibisagent.io.volumes.slice_image`). ``volume_index`` picks the 3D volume of a 4D NIfTI file (default
    the first; ``meta["n_volumes"]`` / ``meta["volume_index"]`` report it).
    """
    p = Path(path)
    fmt = image_format(p)
    if window is not None:
        resolve_window(np.zeros(1, dtype=np.float32), window)  # validate the spec early with a clear error
    if volume_index not in (None, 0) and fmt not in ("nifti", "itk"):
        raise ImageLoadError(f"volume_index={volume_index} applies to 4D NIfTI/NRRD/MHA files; {p.name} holds one "
                             "volume")
    if fmt == "raster":
        return _load_raster(p, slice_index, window)
    if fmt == "dicom":
        return _load_dicom(p, slice_index, window)
    vol = load_volume(p, volume_index)
    return slice_image(vol, slice_index, axis=axis, window=window, orientation=orientation)
