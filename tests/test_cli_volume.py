"""``ibisagent segment VOLUME`` (no --slice): the 3D agent on a whole volume, ``mask.nii.gz`` in the source geometry,
``trace.json``, the overlay montage and a DICOM SEG for a DICOM series; bad volume input exits 2 with one line.

The real-volume test uses a 5-slice crop of one CHAOS T2-SPIR volume around the right kidney (skipped without the
dev data); the others use volumes the tests write and the fake segmenter.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_fixtures import write_blob_volume, write_dicom_series
from ibisagent.agent import LOW_CONFIDENCE
from ibisagent.cli import main
from ibisagent.io.volumes import load_volume

DATA = Path("/work/shared/data/chaos_t2spir_abdomen_mri_3d")


def _crop(tmp_path: Path) -> tuple[Path, Path]:
    if not (DATA / "index.jsonl").is_file():
        pytest.skip("dev data not available")
    img = nib.load(DATA / "volumes/chaos_mr01_image.nii.gz").slicer[:, :, 6:11]
    lab = nib.load(DATA / "volumes/chaos_mr01_label.nii.gz").slicer[:, :, 6:11]
    ip, mp = tmp_path / "crop.nii.gz", tmp_path / "crop_label.nii.gz"
    nib.save(img, ip)
    nib.save(lab, mp)
    return ip, mp


def test_segment_a_real_volume_writes_the_mask_in_the_source_geometry(tmp_path: Path) -> None:
    ip, mp = _crop(tmp_path)
    out = tmp_path / "out"
    rc = main(["segment", str(ip), "--query", "the right kidney in this T2-weighted abdominal MRI volume",
               "--mask", str(mp), "--mask-label", "2", "--policy", "oracle", "--out", str(out), "--quiet"])
    assert rc == 0
    written, source = nib.load(out / "mask.nii.gz"), nib.load(ip)
    assert np.allclose(written.affine, source.affine) and written.shape == source.shape
    mask = np.asarray(written.dataobj) > 0
    gt = np.asarray(nib.load(mp).dataobj) == 2
    assert 2 * (mask & gt).sum() / (mask.sum() + gt.sum()) > 0.85  # measured 0.950 (oracle-3d, litemedsam-click)
    trace = json.loads((out / "trace.json").read_text())
    assert trace["meta"]["policy"] == "oracle-3d" and trace["n_interactions"] >= 1
    assert trace["final_iou"] is not None and (out / "overlay_montage.png").is_file()


def test_segment_a_dicom_series_folder(tmp_path: Path, capsys) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    folder = tmp_path / "series"
    frame_of_reference = generate_uid()
    for f in write_dicom_series(folder, n=5):  # a SEG needs the series' frame of reference
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.save_as(f)
    source = load_volume(folder)
    yy, xx = np.mgrid[:48, :64]
    disk = (yy - 24) ** 2 + (xx - 30) ** 2 <= 12**2  # rows, columns of every slice (app_fixtures)
    stored_disk = np.stack([disk.T] * 5, axis=2)  # DICOM volumes are stored (columns, rows, slices)
    gt = tmp_path / "disk_label.nii.gz"  # the annotator's label map, in the series' geometry
    nib.save(nib.Nifti1Image(stored_disk.astype(np.uint8), source.affine), gt)
    out = tmp_path / "out"
    rc = main(["segment", str(folder), "--query", "the disk", "--policy", "oracle", "--mask", str(gt),
               "--segmenter", "fake", "--out", str(out), "--quiet"])
    assert rc == 0
    written = nib.load(out / "mask.nii.gz")
    assert np.allclose(written.affine, source.affine) and written.shape == source.shape
    mask = np.asarray(written.dataobj) > 0
    assert mask.any() and mask.shape == stored_disk.shape
    assert (mask & stored_disk).sum() > 0.5 * mask.sum()  # most of the mask lies on the disk
    from ibisagent.io.volume_masks import load_volume_mask

    seg = load_volume_mask(out / "mask.dcm", source)  # the DICOM SEG of the series reads back as the same mask
    assert np.array_equal(seg, mask)
    # the default agent (the learned compact-3d policy, no ground truth) runs on the series end to end; what it
    # finds on this synthetic disk depends on the shipped weights (docs/benchmarks.md has its real-volume figures)
    out2 = tmp_path / "out2"
    capsys.readouterr()
    rc = main(["segment", str(folder), "--query", "the disk", "--segmenter", "fake", "--out", str(out2), "--quiet",
               "--json"])
    assert rc == 0 and nib.load(out2 / "mask.nii.gz").shape == source.shape
    trace = json.loads((out2 / "trace.json").read_text())
    assert trace["meta"]["policy"] == "compact-3d" and trace["steps"]
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # its own quality estimate, as in 2D
    assert result["predicted_iou"] == trace["predicted_iou"] and 0 <= result["predicted_iou"] <= 1
    assert result["low_confidence"] == (result["predicted_iou"] < LOW_CONFIDENCE) == trace["low_confidence"]


def _rc_and_line(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_bad_volume_input_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    ip, mp, affine = write_blob_volume(tmp_path)
    four = tmp_path / "four.nii.gz"
    data = np.asarray(nib.load(ip).dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=3), affine), four)
    rc, line = _rc_and_line(["segment", str(four), "-q", "the blob", "--segmenter", "fake", "--out",
                             str(tmp_path / "o1")], capsys)
    assert rc == 2 and "--volume-index" in line
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(mp).dataobj), affine * np.diag([2, 1, 1, 1])), other)
    rc, line = _rc_and_line(["segment", str(ip), "-q", "the blob", "--segmenter", "fake", "--mask", str(other),
                             "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "another geometry" in line
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros_like(data), affine), flat)
    rc, line = _rc_and_line(["segment", str(flat), "-q", "the blob", "--segmenter", "fake", "--out",
                             str(tmp_path / "o3")], capsys)
    assert rc == 2 and "empty volume" in line


def test_only_a_one_series_dicom_folder_is_a_volume(tmp_path: Path) -> None:
    from ibisagent.cli import _is_volume_input

    write_dicom_series(tmp_path / "a", n=2)
    assert _is_volume_input([str(tmp_path / "a")])
    for i, f in enumerate(write_dicom_series(tmp_path / "b", n=2)):  # another series in the same folder
        f.rename(tmp_path / "a" / f"other{i}.dcm")
    assert not _is_volume_input([str(tmp_path / "a")])  # unrelated DICOM images: batch mode
    assert _is_volume_input([str(tmp_path / "v.nii.gz")]) and not _is_volume_input([str(tmp_path / "a"), "x.png"])


def test_agent_segment_volume_returns_the_mask_in_stored_order(tmp_path: Path) -> None:
    from ibisagent import Agent

    ip, mp, _ = write_blob_volume(tmp_path)
    gt = np.asarray(nib.load(mp).dataobj) > 0
    ep = Agent(policy="oracle", segmenter="fake").segment_volume(ip, "the blob", gt=gt)
    assert ep.meta["policy"] == "oracle-3d" and ep.mask.shape == gt.shape and ep.mask.dtype == bool
    assert ep.n_interactions >= 1 and ep.steps[-1]["iou"] is not None
    assert 2 * (ep.mask & gt).sum() / (ep.mask.sum() + gt.sum()) > 0.5  # the fake segmenter on a plain disk
    assert ep.encoder_s >= 0 and ep.total_s > 0


def test_a_volume_run_shows_per_slice_progress(tmp_path: Path, capsys) -> None:
    """Without --quiet the 3D run reports its slices as they are encoded (a log gets a line per tenth of the
    volume); --quiet prints none of it."""
    zz, yy, xx = np.mgrid[:12, :48, :56]
    ball = (zz - 6) ** 2 / 25 + ((yy - 24) ** 2 + (xx - 28) ** 2) / 196 <= 1  # every slice differs: each is encoded
    ip, mp = tmp_path / "ball.nii.gz", tmp_path / "ball_label.nii.gz"
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(np.where(ball, 60.0, -100.0).transpose(2, 1, 0).astype(np.float32), affine), ip)
    nib.save(nib.Nifti1Image(ball.transpose(2, 1, 0).astype(np.uint8), affine), mp)
    args = ["segment", str(ip), "-q", "the ball", "--mask", str(mp), "--policy", "oracle", "--segmenter", "fake"]
    assert main([*args, "--out", str(tmp_path / "o1")]) == 0
    lines = [ln.strip() for ln in capsys.readouterr().err.splitlines() if ln.strip().startswith("encoded ")]
    counts = [int(ln.split()[1].split("/")[0]) for ln in lines]
    assert lines and all(ln.split()[1].endswith("/12") for ln in lines)
    assert counts == sorted(counts) and all(c % 2 == 0 or c == 12 for c in counts)  # every 2 slices (12 / 10 -> 2)
    assert main([*args, "--out", str(tmp_path / "o2"), "--quiet"]) == 0
    assert "encoded " not in capsys.readouterr().err


def test_the_slice_progress_rewrites_one_line_on_a_terminal() -> None:
    import io

    from ibisagent.cli import _SliceProgress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = _SliceProgress(4, stream=out)
    p("encode", 0)
    p("decode", 0)
    p.clear()
    text = out.getvalue()
    assert text.count("\r") == 3 and "1/4 encoded, 1 decoded (slice 0)" in text and "\n" not in text
