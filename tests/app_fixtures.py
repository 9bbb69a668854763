"""Synthetic cases shared by the app/server tests: a bright disk ("lesion") on a noisy dark background."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

#: disk centre (x, y) and radius of :func:`blob_image`
BLOB_CENTER = (130, 100)
BLOB_RADIUS = 45


def blob_image(h: int = 200, w: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, bool mask) of a bright disk on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.normal(60, 8, (h, w))
    yy, xx = np.mgrid[:h, :w]
    cx, cy = BLOB_CENTER
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= BLOB_RADIUS**2
    img[disk] = 200 + rng.normal(0, 5, int(disk.sum()))
    gray = img.clip(0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2), disk


def write_blob_case(folder: Path, name: str = "blob", seed: int = 0) -> tuple[Path, Path]:
    """Write ``images/<name>.png`` + ``masks/<name>__lesion.png`` and append a row to ``index.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    img, mask = blob_image(seed=seed)
    ip, mp = folder / "images" / f"{name}.png", folder / "masks" / f"{name}__lesion.png"
    Image.fromarray(img).save(ip)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mp)
    row = {"id": name, "image": f"images/{name}.png", "mask": f"masks/{name}__lesion.png",
           "query": "segment the bright lesion", "object": "lesion", "modality": "synthetic"}
    with open(folder / "index.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return ip, mp


def write_blob_volume(path: Path, depth: int = 5) -> tuple[Path, Path, np.ndarray]:
    """A small NIfTI volume (W x H x D, CT-like HU values) with the disk in slices 1..depth-2 and its label map."""
    import nibabel as nib

    yy, xx = np.mgrid[:64, :80]
    mask = (yy - 30) ** 2 + (xx - 42) ** 2 <= 16**2
    vol = np.full((80, 64, depth), -800.0, np.float32)  # air-ish background in HU
    lab = np.zeros((80, 64, depth), np.uint8)
    for k in range(1, depth - 1):
        vol[..., k] = np.where(mask.T, 60.0, -100.0)
        lab[..., k] = mask.T
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 20.0]
    ip, mp = path / "vol.nii.gz", path / "vol_label.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), ip)
    nib.save(nib.Nifti1Image(lab, affine), mp)
    return ip, mp, affine


def write_dicom_series(folder: Path, n: int = 3) -> list[Path]:
    """``n`` single-frame CT DICOM files (the disk at 40 HU in air) along z, as a scanner writes a series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:48, :64]
    disk = (yy - 24) ** 2 + (xx - 30) ** 2 <= 12**2
    stored = np.where(disk, 40 + 1024, -1000 + 1024).astype(np.uint16)
    series, study = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.Modality, ds.InstanceNumber = "CT", k + 1
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelSpacing, ds.SliceThickness = ["0.7", "0.7"], "2.5"
        ds.ImagePositionPatient = ["0", "0", f"{2.5 * k:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelData = stored.tobytes()
        p = folder / f"slice{k}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
