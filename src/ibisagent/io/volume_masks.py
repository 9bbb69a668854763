"""3D masks of a :class:`~ibisagent.io.volumes.Volume`, written and read back with the source geometry.

Array convention: a volume mask is a boolean array of ``volume.shape`` indexed like ``volume.array`` (stored voxel
order, see :mod:`ibisagent.io.volumes`): ``mask[i, j, k]`` is the voxel ``volume.array[i, j, k]``; for a DICOM
series ``mask[:, :, k]`` is the k-th slice along the normal (``volume.meta["files"][k]``), transposed from the
DICOM pixel rows (``mask[:, :, k].T`` is that slice's Rows x Columns frame).

Output (:func:`save_volume_mask`, format from the suffix; :func:`volume_mask_suffix` gives the natural one):

* ``.nii`` / ``.nii.gz`` for any volume: a uint8 0/1 label map with the volume's affine (for NIfTI sources the
  source header's qform / sform and their codes, through :func:`ibisagent.io.save_mask`). This is the output for
  NIfTI, NRRD and MetaImage sources.
* ``.dcm`` for a DICOM series (single-frame files): a binary DICOM SEG (highdicom) with one segment named by
  ``label``, in the source's study and frame of reference, each frame referencing its source slice
  (DerivationImageSequence) with the slice's ImagePositionPatient; empty slices are omitted (highdicom's default).
  Source files lacking the patient / study attributes a SEG must copy (Type 2: PatientID, StudyDate...) get them
  empty in the SEG.

Input (:func:`load_volume_mask`): a NIfTI / NRRD / MetaImage label map, or a DICOM SEG of the volume's series,
read into the volume's voxel grid; a mask on another grid (shape, affine or referenced series) raises
:class:`~ibisagent.io.MaskError` (``kind`` ``"size_mismatch"`` / ``"geometry_mismatch"``) instead of being resampled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import ImageLoadError, _suffix, is_dicom_file, read_dicom
from .masks_io import MaskError, _binarize, _shape_text, save_mask
from .volumes import Volume, load_volume

__all__ = ["GEOMETRY_ATOL_MM", "check_same_grid", "load_volume_mask", "save_volume_mask", "volume_mask_suffix"]

#: largest difference (mm) between two affines' entries that still counts as the same voxel grid
GEOMETRY_ATOL_MM = 1e-3

_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Type 2 patient / study attributes highdicom copies from the source images into a SEG
_TYPE2_SOURCE_ATTRS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")


def volume_mask_suffix(volume: Volume) -> str:
    """``".dcm"`` (DICOM SEG) for a DICOM series of single-frame files, else ``".nii.gz"``."""
    return ".dcm" if _seg_sources(volume) is not None else ".nii.gz"


def _seg_sources(volume: Volume) -> list[Path] | None:
    files = volume.meta.get("files")
    if volume.kind != "dicom-series" or not files or len(files) != volume.shape[2]:
        return None
    return [Path(f) for f in files]


def _check_mask(mask: np.ndarray, volume: Volume) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != volume.shape:
        hint = " (it looks transposed: masks use the stored voxel order of Volume.array)" if (
            m.shape == volume.shape[::-1]) else ""
        raise MaskError(f"mask is {_shape_text(m.shape)} but the volume is {_shape_text(volume.shape)}{hint}",
                        "size_mismatch")
    if m.dtype != bool:
        if m.dtype.kind == "f" and not np.array_equal(m, np.round(m)):
            raise MaskError("the volume mask has fractional values; threshold it first (mask > 0.5)")
        m = m != 0
    return m


def save_volume_mask(mask: np.ndarray, volume: Volume, path: str | Path, *, label: str = "object") -> Path:
    """Write a 3D mask of ``volume`` (see the module docstring for formats and the array convention).

    ``label`` names the segment of a DICOM SEG (e.g. the query's object). Returns the path written."""
    p = Path(path)
    m = _check_mask(mask, volume)
    suffix = _suffix(p)
    if suffix in (".nii", ".nii.gz"):
        return save_mask(p, m, like=volume)
    if suffix != ".dcm":
        raise MaskError(f"unsupported volume-mask format {suffix or '(no extension)'} for {p.name}; use .nii.gz "
                        "(any volume) or .dcm (DICOM SEG, for a DICOM series)")
    sources = _seg_sources(volume)
    if sources is None:
        raise MaskError(f"a DICOM SEG needs a DICOM series of single-frame files as its source; {volume.source.name} "
                        f"is a {volume.kind} volume: write the mask as .nii.gz")
    p.parent.mkdir(parents=True, exist_ok=True)
    _write_seg(p, m, sources, label)
    return p


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ibisagent")
    except PackageNotFoundError:
        return "0"


def _write_seg(path: Path, mask: np.ndarray, sources: list[Path], label: str) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets = []
    for f in sources:
        try:
            ds = read_dicom(f, stop_before_pixels=True)
        except ImageLoadError as exc:
            raise MaskError(f"cannot write the DICOM SEG: the source slice {f} is unreadable ({exc})") from exc
        for keyword in _TYPE2_SOURCE_ATTRS:
            if keyword not in ds:
                setattr(ds, keyword, "")
        datasets.append(ds)
    version = _software_version()
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=(label or "object")[:64],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.AnatomicalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="ibisagent", version=version, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    frames = np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8)  # (slice, row, column)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=hd.UID(),
            series_number=int(datasets[0].get("SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="ibisagent",
            manufacturer_model_name="ibisagent",
            software_versions=version,
            device_serial_number="0",
            series_description=f"ibisagent: {label}"[:64],
            omit_empty_frames=bool(mask.any()),  # an empty mask keeps its frames (a SEG needs at least one)
        )
        seg.save_as(path)
    except Exception as exc:  # highdicom validates the source attributes: report which one is missing or wrong
        raise MaskError(f"cannot write the DICOM SEG {path.name} for the series in {sources[0].parent}: {exc}") from exc


def _is_seg(path: Path) -> bool:
    if path.is_dir() or not (_suffix(path) == ".dcm" or is_dicom_file(path)):
        return False
    try:
        ds = read_dicom(path, stop_before_pixels=True)
    except ImageLoadError as exc:
        raise MaskError(str(exc)) from exc
    return str(ds.get("SOPClassUID", "")) == _SEG_SOP_CLASS


def load_volume_mask(
    path: str | Path, volume: Volume, *, label: int | None = None, allow_empty: bool = True
) -> np.ndarray:
    """A 3D boolean mask of ``volume`` (its shape and voxel order) from a label-map file or a DICOM SEG.

    ``label``: the label value of a label map, or the segment number of a SEG (default: any nonzero label / any
    segment). ``allow_empty=False`` refuses an empty result (ground truth). MaskError ``kind``:
    ``"size_mismatch"``, ``"geometry_mismatch"`` (another affine or series), ``"not_3d"`` (a 4D label map),
    ``"empty"`` or ``"unreadable"``."""
    p = Path(path)
    if not p.exists():
        raise MaskError(f"mask file not found: {p}")
    if _is_seg(p):
        mask = _read_seg(p, volume, label)
    else:
        try:
            labels = load_volume(p)
        except ImageLoadError as exc:
            raise MaskError(str(exc)) from exc
        n_volumes = int(labels.meta.get("n_volumes", 1) or 1)
        if n_volumes > 1:
            raise MaskError(f"mask {p.name} is 4D ({n_volumes} volumes); a mask is one 3D label map", "not_3d")
        if labels.shape != volume.shape:
            raise MaskError(f"mask {p.name} is {_shape_text(labels.shape)} but the volume {volume.source.name} is "
                            f"{_shape_text(volume.shape)}", "size_mismatch")
        check_same_grid(labels, volume, what=f"mask {p.name}")
        if label is not None and not np.any(labels.array == label):
            present = np.unique(labels.array)
            shown = ", ".join(f"{v:g}" for v in present[:20]) + (" ..." if present.size > 20 else "")
            raise MaskError(f"label {label} does not occur in mask {p.name} (values present: {shown})", "empty")
        mask = np.ascontiguousarray(
            _binarize(labels.array, name=p.name, kind="volume", label=label, threshold=None), dtype=bool
        )
    if not allow_empty and not mask.any():
        what = f"label {label}" if label is not None else "no object voxel"
        raise MaskError(f"mask {p.name} is empty ({what}); a ground-truth mask must mark the object", "empty")
    return mask


def check_same_grid(a: Volume, b: Volume, *, what: str) -> None:
    """MaskError ``geometry_mismatch`` unless ``a`` and ``b`` share shape and affine (within GEOMETRY_ATOL_MM)."""
    if a.shape != b.shape:
        raise MaskError(f"{what} is {_shape_text(a.shape)} but {b.source.name} is {_shape_text(b.shape)}",
                        "size_mismatch")
    diff = float(np.max(np.abs(np.asarray(a.affine) - np.asarray(b.affine))))
    if diff > GEOMETRY_ATOL_MM:
        import nibabel as nib

        def describe(v: Volume) -> str:
            codes = "".join(nib.aff2axcodes(v.affine))
            sp = "x".join(f"{s:g}" for s in v.spacing)
            org = ", ".join(f"{x:g}" for x in np.asarray(v.affine)[:3, 3])
            return f"{codes}, {sp} mm, origin ({org})"

        raise MaskError(
            f"{what} has the same size but another geometry than {b.source.name} ({describe(a)} vs {describe(b)}; "
            f"affines differ by up to {diff:g} mm): it is on another voxel grid; resample it onto the image first",
            "geometry_mismatch",
        )


def _read_seg(path: Path, volume: Volume, segment: int | None) -> np.ndarray:
    import highdicom as hd

    uids = volume.meta.get("sop_instance_uids")
    if volume.kind != "dicom-series" or not uids or len(uids) != volume.shape[2]:
        raise MaskError(f"{path.name} is a DICOM SEG; it can be read onto a DICOM series volume only, not onto "
                        f"{volume.source.name} ({volume.kind})", "geometry_mismatch")
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise MaskError(f"cannot read the DICOM SEG {path}: {exc}") from exc
    referenced = {str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])}
    series = str(volume.meta.get("series_uid", ""))
    if series and referenced and series not in referenced:
        raise MaskError(f"the DICOM SEG {path.name} references series {', '.join(sorted(referenced))}, not the "
                        f"volume's series {series}", "geometry_mismatch")
    numbers = [int(n) for n in seg.segment_numbers]
    if segment is not None and segment not in numbers:
        raise MaskError(f"segment {segment} is not in the DICOM SEG {path.name} (segments: {numbers})", "empty")
    try:
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(uids),
            segment_numbers=None if segment is None else [segment],
            combine_segments=True,
            skip_overlap_checks=True,
            assert_missing_frames_are_empty=True,  # slices without a frame are empty (omit_empty_frames)
        )
    except Exception as exc:
        raise MaskError(f"the DICOM SEG {path.name} does not map onto the slices of {volume.source.name}: {exc}",
                        "geometry_mismatch") from exc
    frames = np.asarray(frames)
    if frames.shape != (volume.shape[2], volume.shape[1], volume.shape[0]):
        raise MaskError(f"the DICOM SEG {path.name} frames are {_shape_text(frames.shape[1:])} but the series slices "
                        f"are {volume.shape[1]}x{volume.shape[0]}", "size_mismatch")
    return np.ascontiguousarray(frames.transpose(2, 1, 0) > 0)
