"""The train/val split: by group (patient / volume / video), stable, with the legacy image split kept."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibisagent.io.manifest import ManifestError, load_manifest, split_of


def _folder(root: Path, name: str, rows: list[dict]) -> None:
    d = root / name
    (d / "images").mkdir(parents=True)
    for r in rows:
        if not r.get("is_3d"):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / r["image"])
    (d / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _rows(n_patients: int, slices: int) -> list[dict]:
    return [{"id": f"p{p}_s{s}", "image": f"images/p{p}_s{s}.png", "query": "the liver", "group": f"pat{p}"}
            for p in range(n_patients) for s in range(slices)]


def test_group_split_keeps_each_patient_on_one_side(tmp_path: Path) -> None:
    _folder(tmp_path, "ct", _rows(40, 6))
    cases = load_manifest(tmp_path)
    sides = defaultdict(set)
    for c in cases:
        sides[c.group].add(c.split)
    assert all(len(s) == 1 for s in sides.values())
    n_val = sum(1 for s in sides.values() if s == {"val"})
    assert 0 < n_val < 40
    # the image split (legacy) puts one patient's slices on both sides for some patient
    legacy = defaultdict(set)
    for c in load_manifest(tmp_path, split_by="image"):
        legacy[c.group].add(c.split)
    assert any(len(s) == 2 for s in legacy.values())


def test_split_is_independent_of_location_and_shared_with_3d_sibling(tmp_path: Path) -> None:
    rows = _rows(30, 2)
    _folder(tmp_path / "a", "ct", rows)
    _folder(tmp_path / "b", "ct", rows)
    vols = [{"id": f"v{p}", "image": f"volumes/p{p}.nii.gz", "mask": f"volumes/p{p}_l.nii.gz", "query": "the liver",
             "is_3d": True, "group": f"pat{p}"} for p in range(30)]
    _folder(tmp_path / "a", "ct_3d", vols)
    a = {c.id: c.split for c in load_manifest(tmp_path / "a")}
    b = {c.id: c.split for c in load_manifest(tmp_path / "b")}
    assert a == b
    v = {c.group: c.split for c in load_manifest(tmp_path / "a" / "ct_3d", include_3d=True)}
    two_d = {c.group: c.split for c in load_manifest(tmp_path / "a" / "ct")}
    assert v == two_d


def test_rows_without_group_split_by_image(tmp_path: Path) -> None:
    rows = [{"id": f"i{k}", "image": f"images/i{k}.png", "query": "x"} for k in range(20)]
    _folder(tmp_path, "d", rows)
    for c in load_manifest(tmp_path):
        assert c.group == "" and c.split == split_of(c.image_key)


def test_bad_split_by_is_refused(tmp_path: Path) -> None:
    _folder(tmp_path, "d", _rows(2, 1))
    with pytest.raises(ManifestError, match="split_by"):
        load_manifest(tmp_path, split_by="patient")


def test_dev_data_has_no_group_on_both_sides(shared_data: Path) -> None:
    sides = defaultdict(set)
    for c in load_manifest(shared_data, include_3d=True):
        if c.group:
            sides[(c.source.removesuffix("_3d"), c.group)].add(c.split)
    assert sides and all(len(s) == 1 for s in sides.values())
    val = sum(1 for s in sides.values() if s == {"val"})
    assert 0.1 < val / len(sides) < 0.3


def test_per_dataset_spreads_over_patients(tmp_path: Path) -> None:
    from ibisagent.evaluation.harness import spread_per_dataset

    _folder(tmp_path, "ct", _rows(5, 4))
    _folder(tmp_path, "us", _rows(2, 1))
    cases = load_manifest(tmp_path)
    picked = spread_per_dataset(cases, 6)
    ct = [c for c in picked if c.source == "ct"]
    assert len(ct) == 6 and len({c.group for c in ct}) == 5  # every patient before a second slice of one
    assert len([c for c in picked if c.source == "us"]) == 2
    assert {c.id for c in picked} == {c.id for c in spread_per_dataset(list(reversed(cases)), 6)}  # order-free
