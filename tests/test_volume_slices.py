"""2D training cases cut from 3D label volumes: classes, queries, the validation guard, the split, mirroring."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ibisagent.io.manifest import split_of
from ibisagent.io.volumes import load_volume, slice_image
from ibisagent.training.volume_slices import mirror_safe, volume_slice_cases

FOLDER = "vols"
N_SLICES = 12
VAL_SLICE = 6


def _name(split: str, prefix: str, suffix: str) -> str:
    """A file name whose image key falls in ``split`` (the split is a hash of the key)."""
    for i in range(1000):
        name = f"{prefix}{i}{suffix}"
        if split_of(f"{FOLDER}/{name}") == split:
            return name
    raise AssertionError("no name found")


def _volume(root: Path, stem: str) -> tuple[str, str]:
    """A CT-like image volume and a label map with a left kidney (label 1) and a liver (label 2) in every slice;
    the structures move a little from slice to slice so slices differ."""
    rng = np.random.default_rng(0)
    # the background brightens from slice to slice (inside the CT window), so every slice looks different
    img = (rng.normal(0, 5, (40, 32, N_SLICES)) - 150 + 25 * np.arange(N_SLICES)).astype(np.int16)
    lab = np.zeros(img.shape, np.uint8)
    for k in range(N_SLICES):
        lab[5 + k // 3 : 15 + k // 3, 4:12, k] = 1
        lab[22:34, 10 + k // 4 : 26, k] = 2
        img[..., k][lab[..., k] == 1] = 230
        img[..., k][lab[..., k] == 2] = 200
    vol, seg = stem + ".nii.gz", stem + "_labels.nii.gz"
    nib.save(nib.Nifti1Image(img, np.eye(4)), root / "volumes" / vol)
    nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "volumes" / seg)
    (root / "volumes" / (stem + "_classes.json")).write_text(json.dumps({"1": "kidney_left", "2": "liver"}))
    return vol, seg


@pytest.fixture()
def vol_data(tmp_path: Path) -> Path:
    root = tmp_path / FOLDER
    for sub in ("volumes", "images", "masks"):
        (root / sub).mkdir(parents=True)
    rows = []
    train_vol = _name("train", "ct_train", ".nii.gz")
    val_vol = _name("val", "ct_val", ".nii.gz")
    for vol_name in (train_vol, val_vol):
        stem = vol_name.removesuffix(".nii.gz")
        vol, seg = _volume(root, stem)
        rows.append({"id": stem, "image": f"volumes/{vol}", "mask": f"volumes/{seg}", "object": "label map",
                     "is_3d": True, "modality": "CT", "query": "organs"})
    # one validation 2D slice exported from the train volume (as the dev data's TotalSegmentator slices are)
    v = load_volume(root / "volumes" / train_vol)
    png = _name("val", "slice", ".png")
    Image.fromarray(slice_image(v, VAL_SLICE, orientation="neurological").array).save(root / "images" / png)
    lab = load_volume(root / "volumes" / train_vol.replace(".nii.gz", "_labels.nii.gz"))
    m = slice_image(lab, VAL_SLICE, orientation="neurological", window=(0.5, 1.0)).raw == 2
    Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / "val_liver.png")
    rows.append({"id": "val_liver", "image": f"images/{png}", "mask": "masks/val_liver.png", "object": "liver",
                 "modality": "CT", "query": "the liver in this axial CT slice"})
    (root / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_cases_come_from_train_volumes_away_from_validation_slices(vol_data: Path) -> None:
    cases = volume_slice_cases(vol_data, stride=1, min_area=10, guard=2)
    keys = {c.image_key.split("#")[0] for c in cases}
    assert len(keys) == 1 and "ct_train" in next(iter(keys)), keys  # the val-split volume gives nothing
    slices = sorted({int(c.image_key.split("#z")[1]) for c in cases})
    assert slices == [k for k in range(N_SLICES) if abs(k - VAL_SLICE) > 2]
    # two structures per slice, each named in its query
    assert len(cases) == 2 * len(slices)
    by_obj = {c.object for c in cases}
    assert by_obj == {"kidney left", "liver"}
    c = next(c for c in cases if c.object == "kidney left")
    assert c.query == "the kidney left in this axial CT slice"
    # image and mask are the displayed slice and its label
    k = int(c.image_key.split("#z")[1])
    stem = c.id.split("_z")[0]
    v = load_volume(vol_data / "volumes" / f"{stem}.nii.gz")
    np.testing.assert_array_equal(c.image, slice_image(v, k, orientation="neurological").array)
    lab = load_volume(vol_data / "volumes" / f"{stem}_labels.nii.gz")
    np.testing.assert_array_equal(c.gt, slice_image(lab, k, orientation="neurological", window=(0.5, 1.0)).raw == 1)
    assert c.image.dtype == np.uint8 and c.image.shape[:2] == c.gt.shape


def test_stride_min_area_and_no_guard(vol_data: Path) -> None:
    every2 = volume_slice_cases(vol_data, stride=2, min_area=10, guard=0)
    assert sorted({int(c.image_key.split("#z")[1]) for c in every2}) == [0, 2, 4, 8, 10]  # 6 is the val slice
    # the kidney covers 80 px, the liver more: a threshold between them keeps the liver only
    big = volume_slice_cases(vol_data, stride=2, min_area=100, guard=0)
    assert big and {c.object for c in big} == {"liver"}
    with pytest.raises(ValueError, match="stride"):
        volume_slice_cases(vol_data, stride=0)


def test_mirror_safe_refuses_named_sides() -> None:
    assert not mirror_safe("the kidney left in this axial CT slice")
    assert not mirror_safe("the Right lung")
    assert mirror_safe("the liver in this axial CT slice")
    assert mirror_safe("the brightness of the lesion")  # 'bright' is not 'right'


def test_policy_training_uses_volume_slices_without_mirroring_sides(vol_data: Path, tmp_path: Path) -> None:
    from ibisagent.training.policy import PolicyTrainConfig, _Backend, _load_cases, train_policy

    cfg = PolicyTrainConfig(data=str(vol_data), segmenter="fake", volume_stride=2, volume_min_area=10,
                            volume_guard=1)
    cases = _load_cases(cfg, "train", _Backend("fake", "", ""), {}, flip=True)
    assert {c.id.split("__")[1] for c in cases} == {"kidney_left", "liver"}
    assert all((c.emb_flip < 0) == ("left" in c.query) for c in cases)  # "left" must not be mirrored into "right"
    off = _load_cases(PolicyTrainConfig(data=str(vol_data), segmenter="fake"), "train", _Backend("fake", "", ""),
                      {}, flip=True)
    assert off == []  # without --volume-stride the folder has no 2D train case
    run = tmp_path / "run"
    train_policy(PolicyTrainConfig(data=str(vol_data), run_dir=str(run), out=str(run / "w.safetensors"),
                                   segmenter="fake", volume_stride=2, volume_min_area=10, volume_guard=1, sft_steps=2,
                                   sft_batch=4,
                                   rollout_clicks=1, val_cases=0, grpo_iters=1, group_size=2, grpo_cases=2,
                                   max_turns=2, progress=False, dagger_rounds=0))
    assert (run / "w.safetensors").is_file()
    assert f"{len(cases)} train masks" in (run / "train.log").read_text()


def test_cli_flags_reach_the_config(vol_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import ibisagent.training.policy as tp

    seen = {}
    monkeypatch.setattr(tp, "train_policy", lambda cfg: seen.setdefault("cfg", cfg))
    parser = argparse.ArgumentParser()
    from ibisagent.cli.training import add_policy_parser

    add_policy_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["train-policy", "--data", str(vol_data), "--volume-stride", "3", "--volume-datasets",
                              "a,b", "--volume-guard", "5", "--volume-min-area", "12"])
    assert args.func(args) == 0
    cfg = seen["cfg"]
    assert (cfg.volume_stride, cfg.volume_datasets, cfg.volume_guard, cfg.volume_min_area) == (3, ["a", "b"], 5, 12)


def test_a_validation_image_that_cannot_be_located_keeps_the_folder_out(vol_data: Path) -> None:
    # a validation image that is no slice of any volume (e.g. a resampled export): the volumes might hold it
    png = _name("val", "odd", ".png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
        vol_data / "images" / png)
    Image.fromarray(np.full((20, 30), 255, np.uint8)).save(vol_data / "masks" / "odd.png")
    with (vol_data / "index.jsonl").open("a") as f:
        f.write(json.dumps({"id": "odd", "image": f"images/{png}", "mask": "masks/odd.png", "object": "x",
                            "query": "the x"}) + "\n")
    assert volume_slice_cases(vol_data, stride=1, min_area=10, guard=0) == []
