"""The segmenter interface's batch call (``predict_batch``) and embedding accessor, and training's use of them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ibisagent.segmenters.base import PromptSet, SegmenterError, create_segmenter
from ibisagent.testing.tiny_data import synthetic_cases

DATA = Path(os.environ.get("IBISAGENT_DEV_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_default_batch_call_is_predict_per_item() -> None:
    seg = create_segmenter("fake")
    cases = synthetic_cases(3, seed=2)
    items, expected = [], []
    for k, c in enumerate(cases):
        ys, xs = np.nonzero(c.gt)
        pts = np.array([[xs[0], ys[0]], [xs[-1], ys[-1]], [0, 0]][: k + 1], np.float32)
        lab = np.array([1, 1, 0][: k + 1])
        seg.set_image(c.image)
        expected.append(seg.predict(pts, lab))
        items.append(PromptSet(shape=c.gt.shape, points=pts, labels=lab, image=c.image))
    got = create_segmenter("fake").predict_batch(items)
    assert len(got) == 3
    for r, e in zip(got, expected):
        assert np.array_equal(r.mask, e.mask) and np.array_equal(r.logits, e.logits)
    assert seg.encoder_id is None and seg.embedding(cases[0].image) is None
    with pytest.raises(SegmenterError, match="image="):
        seg.predict_batch([PromptSet(shape=(4, 4), points=np.zeros((1, 2)), labels=np.ones(1))])


def _real_images() -> list[np.ndarray]:
    from ibisagent.io import load_case_arrays, load_manifest

    if not (DATA / "ph2_dermoscopy" / "index.jsonl").is_file():
        pytest.skip("real dev data folder (../shared/data) not available")
    out = []
    for ds in ("ph2_dermoscopy", "busi_breast_ultrasound"):
        out.append(load_case_arrays(load_manifest(DATA, split="val", datasets=[ds])[0]))
    return out


def _old_backend_decode(parts, embs, shapes, points, labels, logits):
    """training/policy._Backend.decode before issue 18 (it called LiteMedSAM's internals directly)."""
    import torch
    import torch.nn.functional as F

    from ibisagent.segmenters.litemedsam import decode_batch, points_to_model

    results = [None] * len(points)
    groups: dict = {}
    for i, (p, lg) in enumerate(zip(points, logits)):
        groups.setdefault((len(p), lg is not None), []).append(i)
    for (_, has_lg), idx in groups.items():
        emb = torch.stack([embs[i] for i in idx]).float()
        coords = torch.from_numpy(np.stack([points_to_model(points[i], shapes[i]) for i in idx]))
        labs = torch.from_numpy(np.stack([labels[i].astype(np.int64) for i in idx]))
        mi = torch.from_numpy(np.stack([np.asarray(logits[i], np.float32).reshape(1, 256, 256)
                                        for i in idx])) if has_lg else None
        with torch.inference_mode():
            low, _ = decode_batch(parts, emb, coords, labs, None, mi, multimask=False)
        for j, i in enumerate(idx):
            h, w = shapes[i]
            up = F.interpolate(low[j : j + 1, :1], size=(h, w), mode="bilinear", align_corners=False)
            results[i] = ((up[0, 0] > 0).numpy(), low[j, :1].numpy().astype(np.float32))
    return results


@pytest.mark.slow
def test_training_backend_decodes_through_the_interface_as_before() -> None:
    """_Backend now uses only embedding()/predict_batch(): same masks and logits as the old direct path."""
    from ibisagent.oracle_click import next_click
    from ibisagent.training.policy import _Backend, _Case

    pairs = _real_images()
    be = _Backend("litemedsam-click", "", "")
    cases = []
    for k, (img, gt) in enumerate(pairs):
        row = be.embed(img)
        cases.append(_Case(f"c{k}", "s", "q", 0, row, gt, np.zeros((64, 64), np.float32)))
    assert be.lite and len(be.embs) == 2 and be.embs[0].dtype.is_floating_point
    # round 1: one click each, no mask; round 2: the oracle's next click with the previous logits
    pts = [np.array([[next_click(None, gt).x, next_click(None, gt).y]], np.float32) for _, gt in pairs]
    labs = [np.ones(1, np.int64) for _ in pairs]
    lgs: list = [None, None]
    for _ in range(2):
        new = be.decode(cases, pts, labs, lgs)
        old = _old_backend_decode(be.seg.parts, [be.embs[c.emb] for c in cases], [c.shape for c in cases],
                                  pts, labs, lgs)
        for (m, lg), (m0, lg0) in zip(new, old):
            assert m.dtype == bool and m.shape == m0.shape and np.array_equal(m, m0)
            assert lg.shape == (1, 256, 256) and np.array_equal(lg, lg0)
        nxt = [next_click(m, gt, p) for (m, _), (_, gt), p in zip(new, pairs, pts)]
        pts = [np.vstack([p, [[c.x, c.y]]]).astype(np.float32) for p, c in zip(pts, nxt)]
        labs = [np.append(lab, int(c.positive)) for lab, c in zip(labs, nxt)]
        lgs = [lg for _, lg in new]
    assert be.calls == 4


@pytest.mark.slow
def test_litemedsam_batch_call_matches_single_predictions() -> None:
    """Mixed batch (different click counts, a box, mask feedback) vs one predict call per item (torch decoder)."""
    from ibisagent.masks import bbox, iou

    pairs = _real_images()
    seg = create_segmenter("litemedsam-click", decoder="torch")
    embs = [seg.embedding(img) for img, _ in pairs]
    assert all(e.shape == (1, 256, 64, 64) for e in embs) and all(seg.embedding_cached(img) for img, _ in pairs)
    items, singles = [], []
    for (img, gt), emb in zip(pairs, embs):
        ys, xs = np.nonzero(gt)
        c = len(ys) // 2
        pts = np.array([[xs[c], ys[c]]], np.float32)
        lab = np.ones(1, np.int64)
        seg.set_image(img)
        first = seg.predict(pts, lab)
        box = np.asarray(bbox(gt), np.float32)
        for p, lb, bx, mi in ((pts, lab, None, None), (np.vstack([pts, [[0, 0]]]), np.array([1, 0]), None,
                                                       first.logits), (pts, lab, box, None)):
            singles.append(seg.predict(p, lb, bx, mi))
            items.append(PromptSet(shape=gt.shape, points=p, labels=lb, box=bx, mask_input=mi, embedding=emb))
    batch = seg.predict_batch(items)
    for r, s in zip(batch, singles):
        assert r.mask.shape == s.mask.shape and r.logits.shape == s.logits.shape == (1, 256, 256)
        np.testing.assert_allclose(r.logits, s.logits, atol=2e-3)
        assert iou(r.mask, s.mask) > 0.995 and abs(r.score - s.score) < 1e-3
    with pytest.raises(SegmenterError, match="embedding="):
        seg.predict_batch([PromptSet(shape=(4, 4), points=np.zeros((1, 2)), labels=np.ones(1))])
