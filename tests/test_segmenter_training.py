"""Click fine-tuning of LiteMedSAM: click simulation, a tiny real training run + resume, and the shipped weights'
acceptance test (one oracle click gives a usable mask; more oracle clicks do not make it worse)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ibisagent.training.segmenter import (
    SegmenterTrainConfig,
    _lr_at,
    first_click,
    jitter_box,
    next_click,
    seg_loss,
    train_segmenter,
)

DATA = Path(os.environ.get("IBISAGENT_DEV_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "busi_breast_ultrasound").is_dir(), reason="real data not available")


def _cache_dir(tmp_path_factory) -> Path:
    """A shared embedding cache if the environment names one (content-addressed, so sharing is safe), else a temp."""
    env = os.environ.get("IBISAGENT_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("emb")


def _disk(r0: int, c0: int, rad: int, shape=(64, 80)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - r0) ** 2 + (xx - c0) ** 2 <= rad**2


# --- click simulation -----------------------------------------------------------------------------------------
def test_first_click_is_inside_and_centre_biased():
    gt = _disk(30, 40, 12)
    rng = np.random.default_rng(0)
    pts = [first_click(gt, rng) for _ in range(200)]
    assert all(gt[int(y), int(x)] for x, y in pts)
    d = np.mean([np.hypot(x - 40, y - 30) for x, y in pts])
    assert d < 6  # uniform sampling in a radius-12 disk would average 8
    assert first_click(gt, None, jitter=False) == (40.0, 30.0)


def test_next_click_corrects_the_larger_error():
    gt = _disk(30, 40, 12)
    small = _disk(30, 40, 4)  # prediction too small: false negatives dominate -> positive click in the ring
    x, y, lab = next_click(small, gt, None)
    assert lab == 1 and gt[int(y), int(x)] and not small[int(y), int(x)]
    big = _disk(30, 40, 12) | _disk(10, 10, 9)  # a false-positive blob bigger than any FN -> negative click
    x, y, lab = next_click(big, gt, np.random.default_rng(1))
    assert lab == 0 and big[int(y), int(x)] and not gt[int(y), int(x)]
    x, y, lab = next_click(gt.copy(), gt, None)  # perfect mask: a harmless positive click inside
    assert lab == 1 and gt[int(y), int(x)]


def test_jitter_box_stays_valid():
    gt = np.zeros((256, 256), bool)
    gt[250:256, 0:4] = True  # touching the border
    rng = np.random.default_rng(0)
    for _ in range(50):
        b = jitter_box(gt, rng)
        assert 0 <= b[0] < b[2] <= 255 and 0 <= b[1] < b[3] <= 255


def test_seg_loss_prefers_the_right_mask():
    gt = torch.from_numpy(_disk(30, 40, 12).astype(np.float32))[None, None]
    good = seg_loss((gt * 2 - 1) * 8, gt)
    bad = seg_loss(-(gt * 2 - 1) * 8, gt)
    assert torch.isfinite(good) and good < 0.05 < bad


def test_image_variants_move_the_mask_with_the_image():
    from ibisagent.training.segmenter import image_variants

    rng = np.random.default_rng(0)
    img = (rng.random((90, 120, 3)) * 60).astype(np.uint8)
    mask = np.zeros((90, 120), bool)
    mask[20:50, 70:110] = True  # an off-centre bright object: its pixels must stay under the mask
    img[mask] = 250
    variants = image_variants(img, flip=True, zoom=2, tone=1)
    assert len(variants) == 5
    again = image_variants(img, flip=True, zoom=2, tone=1)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(variants, again))  # deterministic per image
    for k, (im, fn) in enumerate(variants):
        m = fn(mask)
        assert m.shape == im.shape[:2]
        if k < 4:  # geometric variants: the object's pixels are exactly the bright ones
            assert np.array_equal(m, im[..., 0] == 250)
        else:  # intensity variant: same geometry, different values
            assert np.array_equal(m, mask) and not np.array_equal(im, img)
            assert im[mask].mean() > im[~mask].mean()
    assert variants[1][0][0, 0, 0] == img[0, -1, 0]  # the mirror


def test_config_errors():
    with pytest.raises(ValueError, match="--data"):
        train_segmenter(SegmenterTrainConfig())


# --- a tiny real run ------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_data
def test_tiny_training_runs_and_resumes(tmp_path, tmp_path_factory):
    cfg = SegmenterTrainConfig(
        data=str(DATA), datasets=["busi_breast_ultrasound"], max_images=2, out=str(tmp_path / "w.safetensors"),
        run_dir=str(tmp_path / "run"), cache_dir=str(_cache_dir(tmp_path_factory)), steps=2, batch_size=2,
        warmup=1, max_clicks=3, short_max=2, grad_rounds=2, flip=False, zoom=1, tone=0, val_cases=0, ckpt_every=1, seed=3,
    )
    out = train_segmenter(cfg)
    assert out.is_file() and out.stat().st_size > 1_000_000
    with (tmp_path / "run" / "losses.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ck["step"] == 2

    cfg.steps, cfg.resume = 3, True
    train_segmenter(cfg)
    with (tmp_path / "run" / "losses.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # continued, not restarted
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 3

    from ibisagent.segmenters import create_segmenter

    seg = create_segmenter("litemedsam-click", weights=out)  # the written file loads as a backend
    assert seg.fine_tuned


@pytest.mark.slow
@needs_data
def test_training_is_reproducible_from_the_seed(tmp_path, tmp_path_factory):
    """Same command, same seed -> the same losses and the same weights (the model card's command reproduces them)."""
    from safetensors.torch import load_file

    outs = []
    for k in range(2):
        cfg = SegmenterTrainConfig(
            data=str(DATA), datasets=["busi_breast_ultrasound"], max_images=2, out=str(tmp_path / f"w{k}.safetensors"),
            run_dir=str(tmp_path / f"run{k}"), cache_dir=str(_cache_dir(tmp_path_factory)), steps=2, batch_size=2,
            warmup=1, max_clicks=3, short_max=2, grad_rounds=2, flip=True, zoom=0, tone=0, val_cases=0, seed=5,
        )
        outs.append(train_segmenter(cfg))
    losses = [(tmp_path / f"run{k}" / "losses.csv").read_text().splitlines() for k in range(2)]
    strip = [[",".join(r.split(",")[:-1]) for r in rows] for rows in losses]  # last column: wall time
    assert strip[0] == strip[1]
    a, b = load_file(str(outs[0])), load_file(str(outs[1]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_fails(tmp_path):
    cfg = SegmenterTrainConfig(data=str(DATA), run_dir=str(tmp_path), resume=True)
    with pytest.raises(FileNotFoundError, match="resume"):
        train_segmenter(cfg)


# --- acceptance: the shipped weights --------------------------------------------------------------------------
@pytest.mark.slow
@needs_data
def test_shipped_weights_follow_oracle_clicks(tmp_path_factory):
    from ibisagent.io import load_mask, load_rgb
    from ibisagent.io.manifest import load_manifest
    from ibisagent.masks import iou
    from ibisagent.segmenters import create_segmenter
    from ibisagent.segmenters.litemedsam import CLICK_WEIGHTS

    assert CLICK_WEIGHTS.is_file(), "shipped weights missing: run `ibisagent train-segmenter`"
    cases = []
    for ds in ("ph2_dermoscopy", "hc18_fetal_head_ultrasound", "busi_breast_ultrasound"):
        cases += load_manifest(DATA, split="val", datasets=[ds])[:2]
    seg = create_segmenter("litemedsam-click", cache_dir=_cache_dir(tmp_path_factory))
    curves = []
    for case in cases:
        img, gt = load_rgb(case.image), load_mask(case.mask)
        seg.set_image(img)
        x, y = first_click(gt, None, jitter=False)
        pts, labels, logits, curve = [[x, y]], [1], None, []
        for k in range(5):
            res = seg.predict(points=np.array(pts), labels=np.array(labels), mask_input=logits)
            curve.append(iou(res.mask, gt))
            logits = res.logits
            if k < 4:
                x, y, lab = next_click(res.mask, gt, None)
                pts.append([x, y])
                labels.append(lab)
        curves.append(curve)
    mean = np.mean(curves, axis=0)
    assert mean[0] > 0.5, f"IoU after one oracle click {mean[0]:.3f}"
    assert all(mean[k] >= mean[k - 1] for k in range(1, 5)), f"IoU fell with more clicks: {mean.round(3)}"


def test_init_starts_from_given_click_weights(tmp_path):
    """--init puts existing click weights over the box-only decoder (warm start); a missing file is a clear error."""
    from safetensors.torch import load_file

    from ibisagent.segmenters.litemedsam import CLICK_WEIGHTS, copy_trainable, load_base_model, trainable_state_dict
    from ibisagent.training.segmenter import _load_init

    parts = copy_trainable(load_base_model())
    before = {k: v.clone() for k, v in trainable_state_dict(parts).items()}
    _load_init(parts, "shipped")
    after = trainable_state_dict(parts)
    shipped = load_file(str(CLICK_WEIGHTS))
    key = next(k for k in shipped if k.startswith("mask_decoder."))
    assert torch.equal(after[key], shipped[key].float())
    assert not torch.equal(before[key], after[key])
    with pytest.raises(FileNotFoundError, match="--init"):
        _load_init(parts, str(tmp_path / "missing.safetensors"))


@pytest.mark.slow
@needs_data
def test_stop_step_keeps_the_schedule_of_steps(tmp_path, tmp_path_factory):
    """--stop-step ends the run early (saved, resumable) with the learning rates of the full --steps schedule."""
    cfg = SegmenterTrainConfig(
        data=str(DATA), datasets=["busi_breast_ultrasound"], max_images=2, out=str(tmp_path / "w.safetensors"),
        run_dir=str(tmp_path / "run"), cache_dir=str(_cache_dir(tmp_path_factory)), steps=6, stop_step=2,
        batch_size=2, warmup=1, max_clicks=3, short_max=2, grad_rounds=2, flip=False, zoom=0, tone=0, val_cases=0,
        ckpt_every=1, seed=3,
    )
    assert train_segmenter(cfg).is_file()
    with (tmp_path / "run" / "losses.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert float(rows[1]["lr"]) == pytest.approx(float(f"{_lr_at(1, cfg):.3g}"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 2
