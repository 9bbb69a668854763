"""Image / volume / mask IO on real files (../shared/data) and on files the tests write (DICOM, TIFF, NIfTI)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from ibisagent.io import (
    WINDOW_PRESETS,
    Case,
    CaseError,
    ImageLoadError,
    MaskError,
    Window,
    WindowError,
    apply_window,
    choose_slice,
    guess_modality,
    iter_slices,
    load_case,
    load_case_arrays,
    load_image,
    load_manifest,
    load_mask,
    load_volume,
    load_volume_case,
    resolve_window,
    save_mask,
)

DATA = Path(os.environ.get("IBISAGENT_DEV_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TS = DATA / "totalsegmentator_examples_ct_mr"
PYRAD = DATA / "pyradiomics_testcases_mri"
needs_data = pytest.mark.skipif(not (TS / "volumes").is_dir(), reason="../shared/data not available")


# ------------------------------------------------------------------------------------------------------- helpers


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    position: tuple[float, float, float] = (0.0, 0.0, 0.0),
    instance: int = 1,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    photometric: str = "MONOCHROME2",
    modality: str = "CT",
) -> Path:
    """A minimal valid single-frame DICOM (explicit VR little endian) holding ``stored`` (uint16 or int16)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = modality
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.PixelSpacing = ["0.7", "0.8"]
    ds.SliceThickness = "2.5"
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_phantom(h: int = 48, w: int = 64) -> np.ndarray:
    """HU phantom: air -1000, soft-tissue disc 40, bone ring 1000, lung-like patch -800."""
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    hu = np.full((h, w), -1000, dtype=np.int32)
    hu[r < 20] = 1000
    hu[r < 17] = 40
    hu[(r < 8) & (xx < w / 2)] = -800
    return hu


# ---------------------------------------------------------------------------------------------------- 2D rasters


@needs_data
def test_dataset_pngs_gray_and_rgb() -> None:
    gray = load_image(DATA / "hc18_fetal_head_ultrasound" / "images" / "hc18_000_HC.png")
    assert gray.kind == "2d" and gray.array.dtype == np.uint8 and gray.array.shape == (540, 800, 3)
    assert gray.raw.shape == (540, 800) and gray.raw.dtype == np.uint8
    assert all(np.array_equal(gray.array[:, :, c], gray.raw) for c in range(3))  # 8-bit kept as is
    rgb = load_image(DATA / "ph2_dermoscopy" / "images" / "ph2_IMD002.png")
    assert rgb.array.shape[2] == 3 and np.array_equal(rgb.array, rgb.raw)
    assert not np.array_equal(rgb.array[:, :, 0], rgb.array[:, :, 2])  # really colour


@needs_data
def test_load_case_real_manifest_rows() -> None:
    cases = load_manifest(DATA, datasets=["ph2_dermoscopy", "sammed2d_demo_ct", "busi_breast_ultrasound"])
    picked = {c.source: c for c in cases}.values()  # one row per dataset
    assert len(picked) == 3
    for case in picked:
        image, mask = load_case(case)
        assert mask.dtype == bool and mask.shape == image.shape
        assert int(mask.sum()) == case.extra["area_px"]


def test_16bit_and_float_tiff_are_scaled_robustly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img16 = (np.linspace(1000, 3000, 64 * 80).reshape(64, 80)).astype(np.uint16)
    img16[0, 0] = 65535  # one hot pixel must not squash the contrast
    tifffile.imwrite(tmp_path / "a16.tif", img16)
    li = load_image(tmp_path / "a16.tif")
    assert li.raw.dtype == np.uint16 and np.array_equal(li.raw, img16)
    g = li.array[:, :, 0]
    assert li.array.dtype == np.uint8 and g.min() == 0 and g.max() == 255
    assert 100 < g[32, 40] < 155  # the middle of the ramp stays mid-gray
    assert li.meta["window"]["name"] == "percentile" and li.meta["original_dtype"] == "uint16"

    flt = rng.normal(0.0, 1e-3, (40, 50)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tiff", flt)
    lf = load_image(tmp_path / "f.tiff")
    assert lf.raw.dtype == np.float32 and lf.array.dtype == np.uint8
    assert lf.array.std() > 40  # tiny float range is stretched, not flattened to one gray

    tifffile.imwrite(tmp_path / "const.tif", np.full((10, 12), 7.5, dtype=np.float32))
    with np.errstate(all="raise"):
        lc = load_image(tmp_path / "const.tif")
    assert not lc.array.any()  # constant image -> 0, no division by zero


def test_tiff_stack_needs_a_page(tmp_path: Path) -> None:
    stack = np.stack([np.full((20, 30), v, dtype=np.uint8) for v in (10, 20, 30)])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    with pytest.raises(ImageLoadError, match=r"3 pages.*slice_index=0\.\.2"):
        load_image(tmp_path / "stack.tif")
    page = load_image(tmp_path / "stack.tif", slice_index=2)
    assert page.kind == "tiff-page" and page.array.shape == (20, 30, 3) and (page.array == 30).all()
    assert page.meta["slice_index"] == 2 and page.meta["n_slices"] == 3
    with pytest.raises(ImageLoadError, match="out of range"):
        load_image(tmp_path / "stack.tif", slice_index=3)


def test_rgba_palette_and_16bit_png(tmp_path: Path) -> None:
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:, :5, 3] = 0  # transparent half -> black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    li = load_image(tmp_path / "rgba.png")
    assert li.array.shape == (8, 10, 3) and (li.array[:, :5] == 0).all() and (li.array[:, 5:, 0] == 200).all()
    assert li.raw.shape == (8, 10, 4)

    pal = Image.fromarray(np.arange(80, dtype=np.uint8).reshape(8, 10) % 3, "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "pal.bmp")
    lp = load_image(tmp_path / "pal.bmp")
    assert (
        lp.array.shape == (8, 10, 3) and tuple(lp.array[0, 0]) == (255, 0, 0) and tuple(lp.array[0, 1]) == (0, 255, 0)
    )

    ramp = np.tile(np.linspace(0, 4000, 50).astype(np.uint16), (6, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    l16 = load_image(tmp_path / "g16.png")
    assert l16.raw.dtype in (np.uint16, np.int32) and int(l16.raw.max()) == 4000
    assert l16.array[0, 0, 0] == 0 and l16.array[0, -1, 0] == 255


def test_jpeg_loads(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 16, 3), (10, 120, 240), dtype=np.uint8)).save(tmp_path / "x.jpg", quality=95)
    li = load_image(tmp_path / "x.jpg")
    assert li.array.shape == (16, 16, 3) and abs(int(li.array[8, 8, 2]) - 240) < 6


# ---------------------------------------------------------------------------------------------------- bad inputs


def test_missing_corrupt_unsupported(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageLoadError, match=r"corrupt or not a valid PNG"):
        load_image(bad)
    (tmp_path / "scan.xyz").write_bytes(b"hello")
    with pytest.raises(ImageLoadError, match=r"unsupported image format \.xyz.*\.png.*\.dcm.*\.nii\.gz"):
        load_image(tmp_path / "scan.xyz")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(tmp_path / "empty.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(ImageLoadError, match="out of range.*a 2D image"):
        load_image(tmp_path / "ok.png", slice_index=3)
    with pytest.raises(WindowError, match="unknown window"):
        load_image(bad, window="ct-kidney-special")


def test_truncated_nifti_is_a_clear_error(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), str(tmp_path / "v.nii.gz"))
    blob = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.nii.gz", slice_index=0)


# ------------------------------------------------------------------------------------------------------- windows


def test_apply_window_presets_and_edge_cases() -> None:
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 1000.0]], dtype=np.float32)
    assert apply_window(hu, "ct-abdomen").tolist() == [[0, 0, 128, 255, 255]]
    assert apply_window(hu, (40, 400)).tolist() == apply_window(hu, "abdomen").tolist()
    lung = apply_window(hu, "ct-lung")  # (-600, 1500): -1350..150
    assert lung[0, 0] == round((-1000 + 1350) / 1500 * 255) and lung[0, 4] == 255
    assert resolve_window(hu, "ct-bone") == WINDOW_PRESETS["ct-bone"]
    assert {"ct-soft-tissue", "ct-lung", "ct-bone", "ct-brain", "ct-liver", "ct-mediastinum", "mr"} <= set(
        WINDOW_PRESETS
    )
    assert not apply_window(np.full((4, 4), 3.0), "percentile").any()
    with_nan = apply_window(np.array([np.nan, 0.0, 1.0]), "minmax")
    assert with_nan.tolist() == [0, 0, 255]
    with pytest.raises(WindowError, match="positive"):
        apply_window(hu, (40, 0))
    with pytest.raises(WindowError):
        apply_window(hu, "nonsense")
    # percentile window ignores a few outliers
    ramp = np.linspace(0, 1, 10000)
    ramp[:3] = 1e6
    w = resolve_window(ramp, "percentile")
    assert w.high < 2.0 and isinstance(w, Window)


# ---------------------------------------------------------------------------------------------------------- DICOM


def test_dicom_ct_rescale_and_windows(tmp_path: Path) -> None:
    hu = ct_phantom()
    stored = ((hu + 1024) * 2).astype(np.uint16)  # slope 0.5, intercept -1024
    f = write_dicom(tmp_path / "ct.dcm", stored, slope=0.5, intercept=-1024, position=(-10.0, 20.0, 30.0))
    li = load_image(f)
    assert li.kind == "dicom" and li.raw.dtype == np.float32
    assert np.array_equal(li.raw, hu.astype(np.float32))  # HU recovered
    assert li.meta["modality"] == "CT" and li.meta["rescale_slope"] == 0.5 and li.meta["rescale_intercept"] == -1024
    assert li.meta["window"]["name"] == "ct-abdomen" and li.meta["window"]["source"] == "preset"
    g = li.array[:, :, 0]
    assert g[0, 0] == 0 and g[24, 32 + 10] == 128 and g[24, 32 + 18] == 255  # air / soft tissue / bone
    assert li.meta["spacing"] == (0.7, 0.8) and li.meta["original_dtype"] == "uint16"

    lung = load_image(f, window="ct-lung")
    assert lung.array[24, 32 - 4, 0] == round((-800 + 1350) / 1500 * 255)
    assert load_image(f, window=(40, 80)).meta["window"]["width"] == 80

    # the file's own WindowCenter/Width wins over the preset; UID-named file found by its DICM preamble
    g2 = write_dicom(tmp_path / "1.2.840.99.7", hu.astype(np.int16), window=(-600, 1500))
    l2 = load_image(g2)
    assert l2.raw.dtype == np.int16 and l2.meta["window"]["source"] == "file"
    assert np.array_equal(l2.array[:, :, 0], apply_window(hu, (-600, 1500)))

    # a mask drawn on this DICOM image can be written as NIfTI in the patient geometry (LPS -> RAS)
    seg = save_mask(tmp_path / "seg.nii.gz", li.raw > 500, like=li)
    assert np.allclose(nib.load(str(seg)).affine[:3, 3], [10.0, -20.0, 30.0])
    assert nib.aff2axcodes(nib.load(str(seg)).affine) == ("L", "P", "S")
    assert np.array_equal(load_mask(seg, slice_index=0, shape=li.shape), li.raw > 500)

    inv = load_image(write_dicom(tmp_path / "m1.dcm", stored, slope=0.5, intercept=-1024, photometric="MONOCHROME1"))
    assert np.array_equal(inv.array, 255 - li.array)


def test_dicom_series_folder_sorted_by_position(tmp_path: Path) -> None:
    hu = ct_phantom(24, 32)
    folder = tmp_path / "series"
    folder.mkdir()
    zs = [7.5, 0.0, 5.0, 2.5]  # written out of order, file names in a misleading order too
    for i, z in enumerate(zs):
        stored = (hu + 1024 + int(z * 10)).astype(np.uint16)
        write_dicom(folder / f"im{i}.dcm", stored, intercept=-1024, position=(-10.0, 20.0, z), instance=9 - i)
    vol = load_volume(folder)
    assert vol.kind == "dicom-series" and vol.shape == (32, 24, 4)
    offsets = [float(np.mean(vol.array[:, :, k]) - np.mean(hu)) for k in range(4)]
    assert np.allclose(offsets, [0, 25, 50, 75], atol=1e-3)  # sorted by z
    assert np.allclose(vol.affine[:3, 3], [10.0, -20.0, 0.0]) and np.isclose(vol.affine[2, 2], 2.5)
    assert np.allclose(vol.spacing, (0.8, 0.7, 2.5)) and vol.meta["uneven_spacing"] is False
    sl = load_image(folder, slice_index=1)
    assert sl.kind == "dicom-series-slice" and sl.shape == (24, 32)
    assert np.array_equal(sl.raw, (hu + 25).astype(np.float32))  # radiological slice == the stored pixel array
    assert sl.meta["window"]["name"] == "ct-abdomen"
    with pytest.raises(ImageLoadError, match="slice_index"):
        load_image(folder)


# -------------------------------------------------------------------------------------------------------- NIfTI


@needs_data
def test_nifti_ct_slice_window_and_labels() -> None:
    vol_path = TS / "volumes" / "example_ct_sm.nii.gz"
    lab_path = TS / "volumes" / "example_seg_labels.nii.gz"
    neuro = load_image(vol_path, slice_index=13, orientation="neurological")
    assert neuro.kind == "nifti-slice" and neuro.array.dtype == np.uint8 and neuro.shape == (101, 122)
    assert neuro.meta["modality"] == "CT" and neuro.meta["window"]["name"] == "ct-abdomen"
    assert np.allclose(neuro.meta["affine"], nib.load(str(vol_path)).affine)
    # the dataset's own 2D slice (made with the (40, 400) window) is reproduced pixel for pixel
    png = np.asarray(Image.open(TS / "images" / "ts_ct_z13.png"))
    assert np.array_equal(neuro.array[:, :, 0], png)
    g = neuro.array[:, :, 0]
    assert g.std() > 40 and (g == 0).mean() > 0.1  # air is black, body has contrast
    spleen = load_mask(lab_path, slice_index=13, label=1, orientation="neurological", shape=neuro.shape)
    assert np.array_equal(spleen, load_mask(TS / "masks" / "ts_ct_z13__spleen.png"))
    assert spleen.sum() == 284
    radio = load_image(vol_path, slice_index=13)  # default: radiological = mirrored neurological
    assert np.array_equal(radio.array, neuro.array[:, ::-1])
    assert np.array_equal(load_mask(lab_path, slice_index=13, label=1), spleen[:, ::-1])
    assert g.mean() != load_image(vol_path, slice_index=13, window="ct-lung").array.mean()
    with pytest.raises(ImageLoadError, match=r"30 slices along axis 2.*slice_index=0\.\.29"):
        load_image(vol_path)
    with pytest.raises(ImageLoadError, match="out of range"):
        load_image(vol_path, slice_index=30)
    with pytest.raises(MaskError, match="label 12 does not occur"):
        load_mask(lab_path, slice_index=13, label=12)


@needs_data
def test_nifti_mr_slice_percentile_and_label() -> None:
    img = load_image(PYRAD / "volumes" / "brain1_image.nii.gz", slice_index=13, orientation="voxel")
    assert img.meta["modality"] == "" and img.meta["window"]["name"] == "percentile"
    g = img.array[:, :, 0]
    assert g.dtype == np.uint8 and np.percentile(g, 99) > 150 and g.std() > 30
    assert img.raw.dtype == np.int16 and img.meta["spacing"] == (0.78125, 0.78125)
    png = np.asarray(Image.open(PYRAD / "images" / "brain1_z13.png")).astype(float)
    assert np.corrcoef(png.ravel(), g.ravel())[0, 1] > 0.99  # same slice, same orientation as the dataset's PNG
    tumor = load_mask(PYRAD / "volumes" / "brain1_label.nii.gz", slice_index=13, orientation="voxel", shape=img.shape)
    assert tumor.any() and np.array_equal(tumor, load_mask(PYRAD / "masks" / "brain1_z13__brain_tumor.png"))
    assert not load_mask(PYRAD / "volumes" / "brain1_label.nii.gz", slice_index=0).any()  # tumor not in slice 0
    with pytest.raises(MaskError, match="empty at slice 0"):
        load_mask(PYRAD / "volumes" / "brain1_label.nii.gz", slice_index=0, allow_empty=False)


@needs_data
def test_3d_rows_volume_case_and_slice_choice() -> None:
    rows = [c for c in load_manifest(PYRAD, include_3d=True) if c.is_3d]
    assert rows and not any(c.is_3d for c in load_manifest(PYRAD))  # 2D only by default
    case = next(c for c in rows if c.id.startswith("breast1"))
    vol, mask = load_volume_case(case)
    assert mask.shape == vol.shape == (45, 120, 21) and mask.dtype == bool and mask.any()
    k = choose_slice(mask)
    assert mask[:, :, k].sum() == max(mask[:, :, z].sum() for z in range(21))
    slices = list(iter_slices(vol, indices=[k, k + 1]))
    assert [s.meta["slice_index"] for s in slices] == [k, k + 1]
    assert slices[0].meta["window"] == slices[1].meta["window"]  # one window for the whole volume
    assert slices[0].meta["window"]["source"] == "preset" and slices[0].meta["window"]["name"] == "percentile"
    assert guess_modality(vol) == "" and guess_modality(load_volume(TS / "volumes" / "example_ct_sm.nii.gz")) == "CT"
    with pytest.raises(CaseError, match="3D row") as err:
        load_case(case)
    assert err.value.reason == "not_2d"


def test_4d_nifti_uses_first_volume(tmp_path: Path) -> None:
    data = np.stack([np.full((6, 5, 4), t, dtype=np.float32) + np.arange(4) for t in (0, 100)], axis=-1)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), str(tmp_path / "t.nii"))
    vol = load_volume(tmp_path / "t.nii")
    assert vol.shape == (6, 5, 4) and vol.meta["n_volumes"] == 2 and vol.array.max() == 3
    sl = load_image(tmp_path / "t.nii", slice_index=3)
    assert sl.shape == (5, 6) and (sl.raw == 3).all() and (sl.array == 255).all()  # window of the whole volume


# --------------------------------------------------------------------------------------------------------- masks


def test_mask_size_mismatch_empty_and_nonbinary(tmp_path: Path) -> None:
    m = np.zeros((540, 800), dtype=np.uint8)
    m[100:200, 300:400] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    with pytest.raises(MaskError, match=r"mask m\.png is 540x800 but the image is 544x800"):
        load_mask(tmp_path / "m.png", shape=(544, 800, 3))
    assert load_mask(tmp_path / "m.png", shape=(540, 800)).sum() == 100 * 100
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "empty.png")
    assert not load_mask(tmp_path / "empty.png").any()
    with pytest.raises(MaskError, match="empty"):
        load_mask(tmp_path / "empty.png", allow_empty=False)
    gray = np.tile(np.arange(0, 250, 2, dtype=np.uint8), (4, 1))  # a grayscale image passed as mask
    Image.fromarray(gray).save(tmp_path / "gray.png")
    with pytest.raises(MaskError, match=r"125 gray levels.*threshold=127"):
        load_mask(tmp_path / "gray.png")
    assert load_mask(tmp_path / "gray.png", threshold=127).sum() == 4 * np.count_nonzero(np.arange(0, 250, 2) > 127)
    prob = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    tifffile.imwrite(tmp_path / "prob.tif", prob)
    with pytest.raises(MaskError, match="fractional values.*threshold=0.5"):
        load_mask(tmp_path / "prob.tif")
    labels = np.array([[0, 1, 2], [2, 2, 0]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    assert load_mask(tmp_path / "labels.png").sum() == 4  # any nonzero label
    assert load_mask(tmp_path / "labels.png", label=2).sum() == 3
    with pytest.raises(MaskError, match="not found"):
        load_mask(tmp_path / "none.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(MaskError, match="corrupt"):
        load_mask(tmp_path / "bad.png")


def _tiny_dataset(tmp_path: Path, image: np.ndarray, mask: np.ndarray) -> Case:
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "a__obj.png")
    row = {"id": "a__obj", "image": "images/a.png", "mask": "masks/a__obj.png", "query": "the object"}
    (tmp_path / "index.jsonl").write_text(json.dumps(row) + "\n")
    (case,) = load_manifest(tmp_path)
    return case


def test_load_case_rejects_mismatched_and_empty_masks(tmp_path: Path) -> None:
    case = _tiny_dataset(tmp_path / "a", np.zeros((544, 800), np.uint8), np.full((540, 800), 255, np.uint8))
    with pytest.raises(CaseError, match=r"case a__obj: mask a__obj\.png is 540x800 but the image is 544x800") as err:
        load_case(case)
    assert err.value.reason == "size_mismatch" and isinstance(err.value.__cause__, MaskError)
    case = _tiny_dataset(tmp_path / "b", np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8))
    with pytest.raises(CaseError, match="case a__obj: .*empty") as err:
        load_case(case)
    assert err.value.reason == "empty_mask"
    (tmp_path / "b" / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(CaseError, match="case a__obj: cannot read") as err:
        load_case_arrays(case)
    assert err.value.reason == "unreadable_image"
    (tmp_path / "b" / "masks" / "a__obj.png").unlink()
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "b" / "images" / "a.png")
    with pytest.raises(CaseError, match="not found") as err:
        load_case(case)
    assert err.value.reason == "unreadable_mask"
    good = np.zeros((20, 30), np.uint8)
    good[5:10, 5:10] = 255
    image, mask = load_case(_tiny_dataset(tmp_path / "c", np.full((20, 30), 9, np.uint8), good))
    assert image.shape == mask.shape == (20, 30) and mask.sum() == 25
    arr, mask2 = load_case_arrays(_tiny_dataset(tmp_path / "d", np.full((20, 30), 9, np.uint8), good))
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8 and (arr == 9).all() and np.array_equal(mask2, mask)


def test_save_load_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    m = rng.random((33, 47)) > 0.6
    p = save_mask(tmp_path / "out" / "m.png", m)
    assert set(np.unique(np.asarray(Image.open(p)))) == {0, 255}
    assert np.array_equal(load_mask(p), m)
    assert np.array_equal(load_mask(save_mask(tmp_path / "m.tif", m)), m)
    with pytest.raises(MaskError, match="lossy"):
        save_mask(tmp_path / "m.jpg", m)

    # a NIfTI slice mask goes back into a volume-shaped label map with the source geometry
    affine = np.array([[-0.8, 0, 0, 50], [0, 0.8, 0, -30], [0, 0, 2.0, 10], [0, 0, 0, 1]])
    vol = rng.integers(-1000, 1000, (40, 30, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "ct.nii.gz"))
    sl = load_image(tmp_path / "ct.nii.gz", slice_index=4)
    m2 = rng.random(sl.shape) > 0.5
    out = save_mask(tmp_path / "seg.nii.gz", m2, like=sl)
    back = nib.load(str(out))
    assert back.shape == (40, 30, 6) and np.allclose(back.affine, affine)
    assert np.array_equal(load_mask(out, slice_index=4, shape=sl.shape), m2)
    assert not np.asarray(back.dataobj)[:, :, [0, 1, 2, 3, 5]].any()
    one = nib.load(str(save_mask(tmp_path / "one.nii.gz", m2, like=sl, slice_only=True)))
    assert one.shape == (40, 30, 1) and np.allclose(one.affine, sl.meta["slice_affine"])
    assert np.allclose(one.affine[:3, 3], affine[:3, :3] @ [0, 0, 4] + affine[:3, 3])
    assert np.array_equal(load_mask(tmp_path / "one.nii.gz", slice_index=0), m2)
    # whole 3D mask with a Volume as template
    m3 = vol > 500
    v = load_volume(tmp_path / "ct.nii.gz")
    out3 = save_mask(tmp_path / "m3.nii", m3, like=v)
    assert np.allclose(nib.load(str(out3)).affine, affine)
    assert np.array_equal(load_mask(out3, shape=v.shape), m3)
    with pytest.raises(MaskError, match="but the volume is"):
        save_mask(tmp_path / "bad.nii.gz", m3[:, :, :2], like=v)


# --------------------------------------------------------------------------------------------- one case loader


def _training_pixels_before_issue_18(path: Path) -> np.ndarray:
    """What segmenter and policy training read before the loaders were merged (Pillow's convert("RGB")): the shipped
    weights and the on-disk embedding cache (keyed on these bytes) were made from it."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


@needs_data
@pytest.mark.parametrize("image", [
    "acdc_cardiac_mri/images/acdc_patient001_f01_z03.png",  # 8-bit gray PNG
    "drive_retinal_vessels/images/drive_training_21.png",  # 8-bit RGB PNG
    "bkai_neopolyp_endoscopy/images/neopolyp_0081835cf877.jpg",  # RGB JPEG
    "medseg_covid19_ct/images/medseg_test_006.jpg",  # gray JPEG
])
def test_case_loader_gives_training_the_same_bytes_as_before(image: str) -> None:
    from ibisagent.io import load_rgb
    from ibisagent.segmenters.embedding_cache import embedding_key

    path = DATA / image
    if not path.is_file():
        pytest.skip(f"{image} is not in this copy of the dev data")
    with Image.open(path) as im:
        assert im.mode in ("L", "RGB")
    old = _training_pixels_before_issue_18(path)
    new = load_rgb(path)
    assert new.dtype == np.uint8 and new.shape == old.shape and new.tobytes() == old.tobytes()
    assert embedding_key(new, "enc") == embedding_key(old, "enc")
    case = next(c for c in load_manifest(path.parents[1]) if c.image == path)
    arr, gt = load_case_arrays(case)
    assert arr.tobytes() == old.tobytes()
    with Image.open(case.mask) as im:
        assert np.array_equal(gt, np.asarray(im) > 0)  # training's old mask rule: nonzero = object


def test_training_loader_windows_16_bit_images_like_inference(tmp_path: Path) -> None:
    from ibisagent.io import load_rgb

    ramp = np.tile(np.linspace(0, 4000, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ct16.png")
    arr = load_rgb(tmp_path / "ct16.png")
    assert arr.tobytes() == load_image(tmp_path / "ct16.png").array.tobytes()
    assert arr.shape == (8, 64, 3) and arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert len(np.unique(arr)) > 50  # windowed, not clipped to a few saturated levels
