"""Image, volume, mask and dataset-manifest input/output.

* :func:`load_image` -> :class:`LoadedImage` (``array`` HxWx3 uint8 RGB for segmenters, ``raw`` intensities, ``meta``)
  for PNG/JPEG/TIFF/BMP, DICOM (files and series folders) and NIfTI slices, with CT/MR windowing
  (:data:`WINDOW_PRESETS`, :func:`apply_window`).
* :func:`load_volume` -> :class:`Volume` (NIfTI, DICOM series, TIFF stacks), :func:`slice_image`,
  :func:`iter_slices`, :func:`choose_slice`.
* :func:`load_volume` also reads NRRD / MetaImage (SimpleITK).
* :func:`load_mask` / :func:`save_mask` (PNG, TIFF, NPY, NIfTI label maps); 3D masks of a volume with its geometry:
  :func:`save_volume_mask` (NIfTI, DICOM SEG for a DICOM series) and :func:`load_volume_mask`
  (:mod:`ibisagent.io.volume_masks`).
* The one case loader (:mod:`ibisagent.io.cases`): :func:`load_case`, :func:`load_case_arrays` (image + mask as
  arrays), :func:`load_volume_case` for manifest rows (:func:`load_manifest`), :func:`load_rgb` for an image path.

Errors: :class:`ImageLoadError`, :class:`MaskError`, :class:`WindowError`, :class:`ManifestError`, and
:class:`CaseError` (with a ``reason``) for a manifest case that cannot be used (all ValueError).
"""

from .cases import CASE_ERROR_REASONS, CaseError, load_case, load_case_arrays, load_rgb, load_volume_case
from .images import (
    PERCENTILE_RANGE,
    SUPPORTED_SUFFIXES,
    WINDOW_PRESETS,
    ImageLoadError,
    LoadedImage,
    Window,
    WindowError,
    apply_window,
    image_format,
    is_dicom_file,
    resolve_window,
)
from .loader import load_image
from .manifest import VAL_FRACTION, Case, ManifestError, iter_manifest_dirs, load_manifest, split_of
from .masks_io import MASK_SUFFIXES, MaskError, load_mask, save_mask
from .volume_masks import load_volume_mask, save_volume_mask, volume_mask_suffix
from .volumes import (
    ORIENTATIONS,
    Volume,
    choose_slice,
    guess_modality,
    iter_slices,
    load_dicom_series,
    load_nifti,
    load_volume,
    slice_image,
)

__all__ = [
    "CASE_ERROR_REASONS",
    "CaseError",
    "load_case_arrays",
    "load_rgb",
    "PERCENTILE_RANGE",
    "SUPPORTED_SUFFIXES",
    "WINDOW_PRESETS",
    "ImageLoadError",
    "LoadedImage",
    "Window",
    "WindowError",
    "apply_window",
    "image_format",
    "is_dicom_file",
    "load_image",
    "resolve_window",
    "VAL_FRACTION",
    "Case",
    "ManifestError",
    "iter_manifest_dirs",
    "load_manifest",
    "split_of",
    "MASK_SUFFIXES",
    "MaskError",
    "load_case",
    "load_mask",
    "load_volume_case",
    "save_mask",
    "load_volume_mask",
    "save_volume_mask",
    "volume_mask_suffix",
    "ORIENTATIONS",
    "Volume",
    "choose_slice",
    "guess_modality",
    "iter_slices",
    "load_dicom_series",
    "load_nifti",
    "load_volume",
    "slice_image",
]
