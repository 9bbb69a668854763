"""The web app's 3D flow without a browser (issue 28, item 6): a volume opened in 3D, the 3D agent, clicks on any
slice that re-propagate, the 3D mask on every slice and its projection, NIfTI / DICOM SEG export, bad uploads.

Fast: the pure-numpy ``fake`` segmenter and the volume oracle on small synthetic volumes (``app_fixtures``)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_fixtures import write_blob_volume, write_dicom_series
from ibisagent.runtime import SegmenterHub, declared_size
from ibisagent.ui.annotator import Annotator, AnnotatorError
from ibisagent.ui.volume3d import projection_view


@pytest.fixture()
def hub():
    return SegmenterHub()


@pytest.fixture()
def vol(tmp_path):
    return write_blob_volume(tmp_path, depth=7)  # (image path, label path, affine); the disk on slices 1..5


def _annotator(hub, vol, **kw) -> Annotator:
    ip, mp, _ = vol
    a = Annotator(hub, "fake", "oracle", volume_mode="3d", volume_policy="oracle-3d", **kw)
    a.open(ip, mask_path=mp, query="segment the bright lesion")
    return a


def test_3d_agent_then_clicks_on_another_slice_and_nifti_export(hub, vol, tmp_path):
    a = _annotator(hub, vol)
    assert a.is_3d and a.is_volume and a.n_slices == 7 and a.mask is None
    assert "80x64x7 volume in 3D" in a.status() and "mask 0 voxels" in a.status()
    views = list(a.run_agent())
    assert views[0].action.startswith("Box") and views[-1].action == "Terminate"
    m = a.mask
    assert m.shape == (7, 64, 80) and a.current_iou() == pytest.approx(1.0)
    assert [z for z in range(7) if m[z].any()] == [1, 2, 3, 4, 5]  # one prompt, the object on every slice
    assert a.slice_index == a.vol3d.z == 3  # the shown slice follows the agent's prompt
    # another slice shows its part of the 3D mask; moving keeps the prompts (unlike the 2D flow)
    a.set_slice(1)
    assert a.mask is not None and np.array_equal(a.mask, m)
    rendered = a.render()
    assert rendered.shape == (64, 80, 3)
    # a negative click inside the lesion on slice 1 re-propagates: slice 1 loses it, and so may its neighbours
    cy, cx = (int(v) for v in np.argwhere(m[1]).mean(axis=0))
    after = a.click(cx, cy, positive=False)
    assert after[1].sum() < m[1].sum() and after.sum() < m.sum()
    assert "2 prompts on 2 slices" in a.status() and "on slice 1" in a.log_text()
    a.undo()
    assert np.array_equal(a.mask, m)
    a.click(cx, cy, positive=False)
    # the label volume: NIfTI with the source shape and affine, the mask in the stored voxel order
    out = a.export("nifti", tmp_path / "out")
    img = nib.load(str(out))
    assert out.name == "vol_mask.nii.gz" and img.shape == (80, 64, 7)
    np.testing.assert_allclose(img.affine, vol[2])
    np.testing.assert_array_equal(np.asarray(img.dataobj) > 0, a.vol3d.stack.to_stored(a.mask))
    png = a.export("png", tmp_path / "out")
    assert png.name == "vol_slice1_mask.png"
    with pytest.raises(AnnotatorError, match="DICOM SEG needs a DICOM series"):
        a.export("dicom-seg", tmp_path / "out")


def test_projection_view_shows_the_mask_at_its_physical_aspect():
    m = np.zeros((4, 20, 40), bool)
    m[1:3, 5:10, 10:30] = True
    view = projection_view(m, (5.0, 1.0, 1.0), z=1)
    # panels: 20x40 mm (rows x cols), 20x40 mm (slices x cols), 20x20 mm (slices x rows), long side 160 px
    assert view.shape == (160, 160 + 6 + 160 + 6 + 160, 3)
    green = (view[..., 1] > 150) & (view[..., 0] < 100)
    axial = green[:, :160]
    assert axial[20:40, 40:120].all() and not axial[:18].any()  # rows 5..9 -> 20..39 px, cols 10..29 -> 40..119
    blue = (view[..., 2] == 255) & (view[..., 0] == 80)
    assert blue[30, 166:326].all() and blue[60, 332:].all()  # the shown slice (1 of 4) at (1.5 / 4) of each side view
    assert not blue[:, :160].any()
    assert projection_view(None, (5.0, 1.0, 1.0), gt=m).shape == view.shape
    with pytest.raises(ValueError):
        projection_view(None, (1, 1, 1))


def test_continue_from_user_clicks_in_3d(hub, vol):
    a = _annotator(hub, vol)
    z, cy, cx = 3, 30, 42
    a.set_slice(z)
    shown = a.vol3d.stack.from_stored(nib.load(str(vol[1])).get_fdata() > 0)
    cy, cx = (int(v) for v in np.argwhere(shown[z]).mean(axis=0))
    a.click(cx, cy)
    views = list(a.run_agent(from_current=True))
    assert [v.actor for v in a.vol3d.views][:1] == ["user"] and views and views[0].actor == "agent"
    assert a.current_iou() > 0.9 and "agent stopped" in a.status()


def test_volume_mode_switch_policies_and_ground_truth(hub, vol, tmp_path):
    a = _annotator(hub, vol)
    with pytest.raises(AnnotatorError, match="plays 2D images"):
        list(a.run_agent(policy="oracle"))
    a.set_volume_mode("2d")  # the shown slice as a 2D image
    assert not a.is_3d and a.mask is None and a.image.shape == (64, 80, 3)
    assert a.click(40, 30).shape == (64, 80)
    a.set_volume_mode("3d")
    assert a.is_3d and a.mask is None
    a.set_mask(None)
    with pytest.raises(AnnotatorError, match="needs a ground-truth mask"):
        list(a.run_agent(policy="oracle-3d"))
    other = tmp_path / "other.nii.gz"  # a label map on another voxel grid
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 7), np.uint8), np.eye(4)), str(other))
    with pytest.raises(AnnotatorError, match="ground truth for a volume in 3D"):
        a.set_mask(other)
    a.set_mask(vol[1])
    assert a.current_iou() == 0.0 and "3D IoU 0.000" in a.status()
    a.set_window("ct-lung")  # a new window: new slice images, the prompts are cleared
    assert a.is_3d and a.mask is None


def test_bad_uploads_give_a_message(hub, vol, tmp_path):
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), str(four_d))
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a NIfTI file at all" * 20)
    a = Annotator(hub, "fake", volume_mode="3d")
    with pytest.raises(AnnotatorError, match=r"four_d.nii.gz is 4D: 3 volumes of 8x8x4"):
        a.open(four_d)
    with pytest.raises(AnnotatorError, match="junk.nii.gz"):
        a.open(junk)
    small = Annotator(hub, "fake", volume_mode="3d", max_voxels=1000)
    with pytest.raises(AnnotatorError, match=r"holds 35840 voxels; the app opens at most 1000"):
        small.open(vol[0])
    assert not small.has_image and small.status() == "No image loaded."


def test_declared_size_reads_nrrd_and_mha_headers(hub, tmp_path):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.zeros((5, 12, 16), np.int16))  # z, y, x
    for name in ("v.nrrd", "v.mha"):
        sitk.WriteImage(img, str(tmp_path / name))
        assert declared_size(tmp_path / name) == (16, 12, 16 * 12 * 5)
        a = Annotator(hub, "fake", volume_mode="3d")
        a.open(tmp_path / name)  # NRRD / MetaImage volumes open in 3D too
        assert a.is_3d and a.n_slices == 5


def test_dicom_series_exports_dicom_seg(hub, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    from ibisagent.io.volume_masks import load_volume_mask

    files = write_dicom_series(tmp_path / "upload", n=3)
    frame = generate_uid()  # a SEG lives in its source's frame of reference
    for f in files:
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = frame
        ds.save_as(f)
    a = Annotator(hub, "fake", volume_mode="3d")
    a.open_files([str(f) for f in files], query="segment the disk")
    assert "slice0_series" in a.status()
    assert a.is_3d and a.n_slices == 3
    a.set_slice(1)
    m = a.click(30, 24)
    assert all(m[z, 24, 30] for z in range(3))  # the click propagates to the other slices
    seg = a.export("dicom-seg", tmp_path / "out")
    assert seg.name == "slice0_series_seg.dcm"
    back = load_volume_mask(seg, a.volume)
    np.testing.assert_array_equal(back, a.vol3d.stack.to_stored(m))


def test_app_handlers_switch_the_policy_list_for_volumes(hub, vol, tmp_path):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from ibisagent.ui.app import MODE_2D, AppConfig, _Handlers, build_app

    cfg = AppConfig(segmenters=["fake"], segmenter="fake", policies=["oracle"], policy="oracle",
                    volume_policies=["oracle-3d", "compact-3d"], volume_policy="oracle-3d", examples=[])
    h = _Handlers(cfg, hub)
    ann, canvas, status, log, proj, slider, policy = h.on_upload([str(vol[0])], None, "fake", "oracle", "auto")
    assert ann.is_3d and "volume in 3D" in status and canvas.shape[2] == 3
    assert policy["choices"] == ["oracle-3d", "compact-3d"] and policy["value"] == "oracle-3d"
    assert proj["visible"] is True and proj["value"].ndim == 3
    assert slider["visible"] is True and slider["maximum"] == 6
    ann, *_ = h.on_mask(str(vol[1]), ann, "fake", "oracle-3d")
    outs = list(h.on_run("segment the bright lesion", "oracle-3d", "fake", ann))
    assert "agent stopped" in outs[-1][2] and outs[-1][5]["value"] == 3  # the slider follows the agent
    ann, _, status, *_ = h.on_slice(1, ann, "fake", "oracle-3d")
    assert "slice 1 / 6" in status and "this slice 0 px" not in status
    path = h.on_export("NIfTI (.nii.gz)", ann, "fake", "oracle-3d")
    assert nib.load(path).shape == (80, 64, 7)
    ann, *_, policy = h.on_mode(MODE_2D, ann, "fake", "oracle-3d")
    assert not ann.is_3d and policy["choices"] == ["oracle"]
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), str(four_d))
    with pytest.raises(gr.Error, match="is 4D"):
        h.on_upload([str(four_d)], None, "fake", "oracle", "auto")
    demo = build_app(cfg)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"projection", "vmode", "slice", "fmt"} <= ids
    assert Path(path).name == "vol_mask.nii.gz"


def test_a_3d_run_in_the_app_shows_per_slice_progress(hub, tmp_path):
    """The run handler hooks a progress bar (``gr.Progress`` in the app) to the session: one update per slice
    encoded, counted against the volume's depth; it is unhooked after the run."""
    from ibisagent.ui.app import AppConfig, _Handlers

    zz, yy, xx = np.mgrid[:9, :48, :56]
    ball = (zz - 4) ** 2 / 12 + ((yy - 24) ** 2 + (xx - 28) ** 2) / 196 <= 1  # every slice differs
    ip, mp = tmp_path / "ball.nii.gz", tmp_path / "ball_label.nii.gz"
    nib.save(nib.Nifti1Image(np.where(ball, 60.0, -100.0).transpose(2, 1, 0).astype(np.float32), np.eye(4)), ip)
    nib.save(nib.Nifti1Image(ball.transpose(2, 1, 0).astype(np.uint8), np.eye(4)), mp)
    cfg = AppConfig(segmenters=["fake"], segmenter="fake", policies=["oracle"], policy="oracle",
                    volume_policies=["oracle-3d"], volume_policy="oracle-3d", examples=[])
    h = _Handlers(cfg, hub)
    ann, *_ = h.on_upload([str(ip)], None, "fake", "oracle", "auto")
    ann, *_ = h.on_mask(str(mp), ann, "fake", "oracle-3d")
    bar: list[tuple] = []
    outs = list(h.on_run("the ball", "oracle-3d", "fake", ann, lambda value, **kw: bar.append((value, kw))))
    assert "agent stopped" in outs[-1][2]
    counts = [v[0] for v, _ in bar]
    assert len(bar) >= 3 and counts == list(range(1, len(bar) + 1)) and all(v[1] == 9 for v, _ in bar)
    assert bar[0][1]["desc"].startswith("encoding slices") and bar[0][1]["unit"] == "slices"
    assert ann.vol3d.on_slice is None
