"""Volumes in and out: NRRD / MetaImage geometry (LPS -> RAS), DICOM series checks and compressed transfer syntaxes,
3D masks written with the source geometry (NIfTI, DICOM SEG) and read back, and 3D manifest cases (bad volumes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from ibisagent.io import (
    Case,
    CaseError,
    ImageLoadError,
    MaskError,
    load_image,
    load_manifest,
    load_mask,
    load_volume,
    load_volume_case,
    load_volume_mask,
    save_volume_mask,
    volume_mask_suffix,
)
from ibisagent.io.volumes import volume_window

# ------------------------------------------------------------------------------------------------------- helpers

#: an oblique, flipped direction (columns = voxel axes in LPS), not a permutation, so a sign/transpose slip shows
_ROT = np.array([[0.0, 0.8, 0.6], [-1.0, 0.0, 0.0], [0.0, -0.6, 0.8]])


def _sitk_volume(shape: tuple[int, int, int] = (7, 6, 5)) -> tuple[sitk.Image, np.ndarray]:
    """An int16 ITK image of voxel grid ``shape`` (i, j, k) with known direction, spacing and origin."""
    data = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)  # data[i, j, k], every voxel distinct
    img = sitk.GetImageFromArray(data.transpose(2, 1, 0))  # sitk arrays are (k, j, i)
    img.SetSpacing((0.7, 1.3, 2.5))
    img.SetOrigin((12.0, -30.5, 81.25))
    img.SetDirection(tuple(_ROT.ravel()))
    return img, data


def _ras(img: sitk.Image, index: tuple[int, int, int]) -> np.ndarray:
    """World RAS position of a voxel from ITK's own index -> physical (LPS) transform."""
    x, y, z = img.TransformIndexToPhysicalPoint(tuple(int(v) for v in index))
    return np.array([-x, -y, z])


def _write_series(
    folder: Path,
    z_positions: list[float],
    *,
    slopes: list[float] | None = None,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    shape: tuple[int, int] = (6, 8),
    names: list[str] | None = None,
) -> tuple[list[Path], list[np.ndarray]]:
    """One single-frame CT file per position (along the slice normal), pixel values distinct per slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    series, study, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    paths, values = [], []
    for n, z in enumerate(z_positions):
        slope = 1.0 if slopes is None else slopes[n]
        stored = (np.arange(shape[0] * shape[1]).reshape(shape) + 100 * n).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame_of_ref
        ds.Modality, ds.InstanceNumber = "CT", n + 1
        ds.Rows, ds.Columns = shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", "-1024"
        ds.PixelSpacing, ds.SliceThickness = ["0.7", "0.9"], "2.5"
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:g}" for v in np.array([-20.0, 15.0, 40.0]) + z * normal]
        ds.PixelData = stored.tobytes()
        path = folder / (names[n] if names else f"slice_{n:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        values.append(stored * slope - 1024)
    return paths, values


def _nifti_pair(folder: Path, image: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                mask_affine: np.ndarray | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ip, mp = folder / "img.nii.gz", folder / "lab.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), ip)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine if mask_affine is None else mask_affine), mp)
    return ip, mp


def _case(image: Path, mask: Path, **extra: object) -> Case:
    return Case(id="c1", image=image, mask=mask, query="the object", is_3d=True, extra=dict(extra))


# --------------------------------------------------------------------------------------------- NRRD / MetaImage


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_metaimage_keep_orientation_spacing_origin(tmp_path: Path, suffix: str) -> None:
    img, data = _sitk_volume()
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(img, str(path))
    vol = load_volume(path)
    assert vol.kind == ("nrrd" if suffix == ".nrrd" else "metaimage") and vol.shape == (7, 6, 5)
    assert np.array_equal(vol.array, data)  # stored (i, j, k), like NIfTI
    assert np.allclose(vol.spacing, (0.7, 1.3, 2.5))
    for index in [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1)]:
        assert np.allclose(vol.affine @ [*index, 1.0], [*_ras(img, index), 1.0], atol=1e-6)
    # the same grid written as NIfTI by ITK and read by nibabel has the same RAS affine
    sitk.WriteImage(img, str(tmp_path / "same.nii.gz"))
    assert np.allclose(nib.load(str(tmp_path / "same.nii.gz")).affine, vol.affine, atol=1e-4)
    sl = load_image(path, slice_index=2)  # 2D users read NRRD/MHA slices too
    assert sl.shape == tuple(vol.slice(2).shape) and np.array_equal(sl.raw, vol.slice(2))


def test_itk_vector_images_refused(tmp_path: Path) -> None:
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(ImageLoadError, match="3 components per voxel"):
        load_volume(tmp_path / "rgb.nrrd")


def test_nifti_mask_of_an_nrrd_volume_has_its_geometry(tmp_path: Path) -> None:
    img, data = _sitk_volume()
    sitk.WriteImage(img, str(tmp_path / "vol.nrrd"))
    vol = load_volume(tmp_path / "vol.nrrd")
    assert volume_mask_suffix(vol) == ".nii.gz"
    mask = data % 7 == 3
    out = save_volume_mask(mask, vol, tmp_path / "mask.nii.gz")
    back = sitk.ReadImage(str(out))  # an independent reader sees the source grid
    assert np.allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-5)
    assert np.allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0) > 0, mask)
    assert np.array_equal(load_volume_mask(out, vol), mask)
    labels = sitk.GetImageFromArray(mask.transpose(2, 1, 0).astype(np.uint8))  # a label map saved as NRRD
    labels.CopyInformation(img)
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    assert np.array_equal(load_volume_mask(tmp_path / "labels.nrrd", vol), mask)
    sl = load_image(tmp_path / "vol.nrrd", slice_index=3)
    assert np.array_equal(load_mask(tmp_path / "labels.nrrd", slice_index=3, shape=sl.shape), vol.slice(3) % 7 == 3)
    with pytest.raises(MaskError, match="DICOM SEG needs a DICOM series"):
        save_volume_mask(mask, vol, tmp_path / "mask.dcm")
    with pytest.raises(MaskError, match="looks transposed"):
        save_volume_mask(mask.transpose(2, 1, 0), vol, tmp_path / "t.nii.gz")


def test_nifti_mask_keeps_the_source_qform_sform(tmp_path: Path) -> None:
    q = np.array([[0.0, -0.9, 0.0, 10.0], [0.8, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1]])
    s = q.copy()
    s[:3, 3] += [0.5, 0.25, -1.0]  # sform and qform differ: both must survive
    src = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6), None)
    src.set_qform(q, code=1)
    src.set_sform(s, code=2)
    src.header.set_slope_inter(2.0, -100.0)  # a CT-style scaling must not leak into the mask
    nib.save(src, tmp_path / "src.nii.gz")
    vol = load_volume(tmp_path / "src.nii.gz")
    mask = vol.array > 0
    out = nib.load(str(save_volume_mask(mask, vol, tmp_path / "m.nii.gz")))
    ref = nib.load(str(tmp_path / "src.nii.gz"))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 2)
    assert np.allclose(out.get_qform(), ref.get_qform()) and np.allclose(out.get_sform(), ref.get_sform())
    assert out.get_data_dtype() == np.uint8 and np.array_equal(np.asanyarray(out.dataobj), mask.astype(np.uint8))


# ------------------------------------------------------------------------------------------------- DICOM series


def test_dicom_series_sorted_along_normal_with_per_slice_rescale(tmp_path: Path) -> None:
    zs = [5.0, -2.5, 2.5, 0.0]  # out of order; names in another misleading order
    slopes = [1.0, 2.0, 0.5, 1.0]
    coronal = (1, 0, 0, 0, 0, -1)  # rows along -z: the normal is +y (posterior)
    paths, values = _write_series(tmp_path / "s", zs, slopes=slopes, orientation=coronal,
                                  names=["d.dcm", "a.dcm", "c.dcm", "b.dcm"])
    vol = load_volume(tmp_path / "s")
    order = np.argsort(zs)
    assert [Path(f).name for f in vol.meta["files"]] == [paths[i].name for i in order]
    for k, i in enumerate(order):
        assert np.allclose(vol.array[:, :, k], values[i].T)  # (column, row) per slice, rescaled with its own slope
    step = vol.affine[:3, 2]
    assert np.allclose(step, [0.0, -2.5, 0.0])  # +y in LPS (posterior) = -y in RAS
    assert np.allclose(vol.spacing, (0.9, 0.7, 2.5))


@pytest.mark.parametrize(
    ("zs", "message"),
    [
        ([0.0, 2.5, 5.0, 10.0, 12.5], r"missing slices: a gap of 5 mm between slice_002\.dcm .* and slice_003\.dcm"),
        ([0.0, 2.5, 2.5, 5.0], r"duplicate slices: slice_001\.dcm and slice_002\.dcm share slice position 42\.5 mm"),
        ([0.0, 2.5, 5.0, 6.5, 9.0], r"uneven slice spacing: 1\.5 mm"),
    ],
)
def test_dicom_series_with_missing_duplicate_or_uneven_slices_refused(tmp_path: Path, zs: list[float],
                                                                       message: str) -> None:
    _write_series(tmp_path / "s", zs)
    with pytest.raises(ImageLoadError, match=message):
        load_volume(tmp_path / "s")


def test_dicom_series_with_mixed_orientations_refused(tmp_path: Path) -> None:
    _write_series(tmp_path / "s", [0.0, 2.5, 5.0])
    ds = pydicom.dcmread(tmp_path / "s" / "slice_002.dcm")
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.save_as(tmp_path / "s" / "slice_002.dcm")
    with pytest.raises(ImageLoadError, match=r"slice_002\.dcm has ImageOrientationPatient \[0, 1, 0, 0, 0, -1\]"):
        load_volume(tmp_path / "s")


def _bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)  # only files inside the installed pydicom wheel: no download
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(path)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_lossless_compressed_dicom_decodes_to_the_uncompressed_pixels(name: str) -> None:
    reference = load_image(_bundled("MR_small.dcm"))
    img = load_image(_bundled(name))  # JPEG-LS, JPEG 2000, RLE
    assert np.array_equal(img.raw, reference.raw) and np.array_equal(img.array, reference.array)


def test_lossy_jpeg_12bit_and_jpeg2000_and_jpegls_near_lossless_decode() -> None:
    ext = load_image(_bundled("JPGExtended.dcm"))  # 12-bit JPEG extended (process 2/4)
    j2k = load_image(_bundled("JPEG2000.dcm"))  # the same NM image as JPEG 2000
    assert ext.raw.shape == j2k.raw.shape == (1024, 256)
    assert ext.raw.max() > 255 and np.corrcoef(ext.raw.ravel(), j2k.raw.ravel())[0, 1] > 0.9
    near = load_image(_bundled("JPEGLSNearLossless_16.dcm"))
    assert near.raw.dtype == np.uint16 and near.raw.max() > 255
    with pytest.raises(ImageLoadError, match=r"cannot decode the pixels of JPEG-lossy\.dcm .*JPEG Extended"):
        load_image(_bundled("JPEG-lossy.dcm"))  # the corrupt original of JPGExtended.dcm: a clear error


def test_compressed_dicom_series_folder(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    src = _bundled("MR_small_jpeg_ls_lossless.dcm")
    folder = tmp_path / "jls"
    folder.mkdir()
    for k in range(3):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]), 6.6406 + 5 * k]
        ds.save_as(folder / f"{k}.dcm")
    vol = load_volume(folder)
    ref = load_image(_bundled("MR_small.dcm")).raw
    assert vol.shape == (64, 64, 3) and all(np.array_equal(vol.array[:, :, k], ref.T) for k in range(3))


# ------------------------------------------------------------------------------------------------------ DICOM SEG


def test_dicom_seg_round_trip_maps_frames_to_source_slices(tmp_path: Path) -> None:
    import highdicom as hd

    zs = [7.5, 0.0, 5.0, 2.5, 10.0]
    paths, _ = _write_series(tmp_path / "s", zs, orientation=(1, 0, 0, 0, 0, -1))
    vol = load_volume(tmp_path / "s")
    assert volume_mask_suffix(vol) == ".dcm"
    mask = np.zeros(vol.shape, bool)
    mask[1:4, 2:5, 1] = True
    mask[5, 0, 2] = True
    mask[0:2, 0:3, 4] = True  # slices 0 and 3 stay empty (omitted frames)
    out = save_volume_mask(mask, vol, tmp_path / "seg.dcm", label="left kidney")

    ds = pydicom.dcmread(out)  # plain pydicom: the SEG references the series, each frame its source slice
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.meta["series_uid"]
    assert ds.StudyInstanceUID == pydicom.dcmread(paths[0]).StudyInstanceUID
    assert ds.SegmentSequence[0].SegmentLabel == "left kidney"
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    uid_to_slice = {uid: k for k, uid in enumerate(vol.meta["sop_instance_uids"])}
    seen = []
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = uid_to_slice[uid]
        source = pydicom.dcmread(vol.meta["files"][k], stop_before_pixels=True)
        assert np.allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in source.ImagePositionPatient])
        assert np.array_equal(frames[f] > 0, mask[:, :, k].T)
        seen.append(k)
    assert sorted(seen) == [1, 2, 4]
    seg = hd.seg.segread(out)  # and highdicom / our reader put every voxel back in place
    assert [int(n) for n in seg.segment_numbers] == [1]
    assert np.array_equal(load_volume_mask(out, vol), mask)
    assert np.array_equal(load_volume_mask(out, vol, label=1, allow_empty=False), mask)

    other_paths, _ = _write_series(tmp_path / "other", zs)
    with pytest.raises(MaskError, match="references series") as err:
        load_volume_mask(out, load_volume(tmp_path / "other"))
    assert err.value.kind == "geometry_mismatch"
    nii = save_volume_mask(mask, vol, tmp_path / "seg.nii.gz")  # NIfTI is fine for a DICOM source too
    assert np.allclose(nib.load(str(nii)).affine, vol.affine) and np.array_equal(load_volume_mask(nii, vol), mask)


def test_empty_dicom_seg_still_written(tmp_path: Path) -> None:
    _write_series(tmp_path / "s", [0.0, 2.5, 5.0])
    vol = load_volume(tmp_path / "s")
    out = save_volume_mask(np.zeros(vol.shape, bool), vol, tmp_path / "seg.dcm")
    assert not load_volume_mask(out, vol).any()
    with pytest.raises(MaskError, match="empty"):
        load_volume_mask(out, vol, allow_empty=False)


# ---------------------------------------------------------------------------------------------------- 3D cases


def _labels(shape: tuple[int, int, int] = (10, 12, 8)) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8)
    labels = np.zeros(shape, np.uint8)
    labels[2:5, 3:7, 2:5] = 1
    labels[6:9, 3:7, 4:6] = 2
    return image, labels


def test_volume_case_uses_the_row_label_value(tmp_path: Path) -> None:
    image, labels = _labels()
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    ip, mp = _nifti_pair(tmp_path, image, labels, affine)
    vol, mask = load_volume_case(_case(ip, mp, label_value=2, shape=[10, 12, 8], spacing=[1.5, 1.5, 3.0]))
    assert mask.dtype == bool and np.array_equal(mask, labels == 2) and vol.spacing == (1.5, 1.5, 3.0)
    _, any_label = load_volume_case(_case(ip, mp))
    assert np.array_equal(any_label, labels > 0)


def test_bad_volume_cases_give_clear_errors(tmp_path: Path) -> None:
    image, labels = _labels()
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    ip, mp = _nifti_pair(tmp_path / "ok", image, labels, affine)

    def reason(case: Case, match: str) -> str:
        with pytest.raises(CaseError, match=match) as err:
            load_volume_case(case)
        return err.value.reason

    assert reason(_case(ip, mp, label_value=3), r"label 3 does not occur .*values present: 0, 1, 2") == "empty_mask"
    for bad in (1.5, "2", True, 0):  # not truncated / coerced into some other label
        assert reason(_case(ip, mp, label_value=bad), "label_value must be a positive integer") == "unreadable_mask"
    _, two = load_volume_case(_case(ip, mp, label_value=2.0))  # a JSON 2.0 is label 2
    assert np.array_equal(two, labels == 2)
    ip4, _ = _nifti_pair(tmp_path / "4d", np.stack([image, image], axis=-1), labels, affine)
    assert reason(_case(ip4, mp), r"is 4D \(2 volumes of 10x12x8\)") == "not_3d"
    _, mp_small = _nifti_pair(tmp_path / "small", image, labels[:, :, :6], affine)
    assert reason(_case(ip, mp_small), r"is 10x12x6 but the volume img\.nii\.gz is 10x12x8") == "size_mismatch"
    shifted = affine.copy()
    shifted[:3, 3] = [0.0, 0.0, 12.0]
    _, mp_shift = _nifti_pair(tmp_path / "shift", image, labels, affine, mask_affine=shifted)
    assert reason(_case(ip, mp_shift), r"same size but another geometry .*origin \(0, 0, 12\)") == "geometry_mismatch"
    flipped = np.diag([-1.5, 1.5, 3.0, 1.0])
    _, mp_flip = _nifti_pair(tmp_path / "flip", image, labels, affine, mask_affine=flipped)
    assert reason(_case(ip, mp_flip), r"LAS, 1\.5x1\.5x3 mm, origin \(0, 0, 0\) vs RAS") == "geometry_mismatch"
    assert reason(_case(ip, mp, shape=[10, 12, 9]), r"row says shape \[10, 12, 9\]") == "size_mismatch"
    assert reason(_case(ip, mp, spacing=[1.5, 1.5, 2.0]), r"row says spacing") == "geometry_mismatch"
    empty = tmp_path / "empty"
    _nifti_pair(empty, image, np.zeros_like(labels), affine)
    assert reason(_case(ip, empty / "lab.nii.gz"), "is empty") == "empty_mask"


# ------------------------------------------------------------------------------------------ real dev volumes


@pytest.mark.parametrize(
    ("folder", "case_id", "window"),
    [("chaos_t2spir_abdomen_mri_3d", "chaos_mr01__liver", "identity"),
     ("openkbp_headneck_ct", "openkbp_pt_1__brainstem", "ct-abdomen")],
)
def test_real_volume_cases_and_mask_round_trip(shared_data: Path, tmp_path: Path, folder: str, case_id: str,
                                               window: str) -> None:
    case = next(c for c in load_manifest(shared_data / folder, include_3d=True) if c.id == case_id)
    vol, mask = load_volume_case(case)
    labels = np.asanyarray(nib.load(str(case.mask)).dataobj)
    assert np.array_equal(mask, labels == case.extra["label_value"]) and mask.any()
    assert vol.shape == tuple(case.extra["shape"]) and np.allclose(vol.spacing, case.extra["spacing"], atol=1e-3)
    assert volume_window(vol)[0].name == window  # the intensity handling the volumes module documents
    out = save_volume_mask(mask, vol, tmp_path / "mask.nii.gz")
    src, back = nib.load(str(case.image)), nib.load(str(out))
    assert np.allclose(back.get_qform(), src.get_qform()) and np.allclose(back.get_sform(), src.get_sform())
    assert np.array_equal(load_volume_mask(out, vol, allow_empty=False), mask)


def test_real_volume_copy_with_its_mask_on_another_grid(shared_data: Path, tmp_path: Path) -> None:
    case = next(c for c in load_manifest(shared_data / "chaos_t2spir_abdomen_mri_3d", include_3d=True))
    shutil.copy(case.image, tmp_path / "img.nii.gz")
    lab = nib.load(str(case.mask))
    moved = lab.affine.copy()
    moved[:3, 3] += [0.0, 0.0, 7.7]  # one slice off along z
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), moved), tmp_path / "lab.nii.gz")
    with pytest.raises(CaseError, match="another geometry") as err:
        load_volume_case(_case(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", label_value=1))
    assert err.value.reason == "geometry_mismatch"
