"""Image-space augmentation for policy training: deterministic per image, image and mask warped together."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent.training.augment import (
    AugmentParams,
    augment_image,
    augment_mask,
    augment_params,
    kept_fraction,
)


def _disc(h: int = 80, w: int = 120, cy: int = 40, cx: int = 60, r: int = 14) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.ogrid[:h, :w]
    gt = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = np.full((h, w, 3), 60, np.uint8)
    img[gt] = 210
    return img, gt


def test_params_are_a_function_of_the_image_and_variant_only() -> None:
    a = augment_params("/data/busi/images/x.png", 1)
    assert a == augment_params("/elsewhere/busi/images/x.png", 1)  # where the data lives does not matter
    assert a != augment_params("/data/busi/images/x.png", 2)
    assert a != augment_params("/data/busi/images/y.png", 1)
    assert augment_params("ts/ct.nii.gz#z4", 1) != augment_params("ts/ct.nii.gz#z6", 1)  # slices differ
    for k in range(1, 30):
        p = augment_params(f"/d/s/images/{k}.png", k)
        assert 0.8 <= p.zoom <= 1.25 and abs(p.angle) <= 15 and max(map(abs, p.shift)) <= 0.08
        assert 0.8 <= p.gamma <= 1.25 and 0.8 <= p.contrast <= 1.2
    with pytest.raises(ValueError, match="start at 1"):
        augment_params("x.png", 0)


def test_identity_params_leave_image_and_mask_unchanged() -> None:
    img, gt = _disc()
    np.testing.assert_array_equal(augment_mask(gt, AugmentParams()), gt)
    assert np.abs(augment_image(img, AugmentParams()).astype(int) - img).max() <= 1


@pytest.mark.parametrize("variant", [1, 2, 3, 4, 5])
def test_mask_follows_the_object(variant: int) -> None:
    img, gt = _disc()
    p = augment_params("/d/s/images/disc.png", variant)
    out, m = augment_image(img, p), augment_mask(gt, p)
    assert out.shape == img.shape and out.dtype == np.uint8 and m.shape == gt.shape and m.dtype == bool
    bright = out.mean(2) > 135  # the warped disc, whatever the contrast, brightness and gamma of the variant
    iou = (bright & m).sum() / (bright | m).sum()
    assert iou > 0.9  # the warped mask covers the warped disc
    assert abs(kept_fraction(gt, m, p) - 1) < 0.1  # a central object stays whole, area scaled by zoom^2
    assert not np.array_equal(m, gt)


def test_shifted_zoom_pushes_an_edge_object_out() -> None:
    img, gt = _disc(cy=40, cx=12, r=10)
    p = AugmentParams(zoom=1.2, shift=(-0.08, 0.0))
    assert kept_fraction(gt, augment_mask(gt, p), p) < 0.8
    out = augment_image(img, AugmentParams(zoom=0.8, contrast=1.2, brightness=15))
    assert (out[:, :5] == 0).all() and (out[:, -5:] == 0).all()  # from outside the original: black, not re-lit
    assert (out[40, 30:90] > 60).all()


def test_bad_input_is_refused() -> None:
    img, gt = _disc()
    with pytest.raises(ValueError, match="uint8"):
        augment_image(img.astype(np.float32), AugmentParams())
    with pytest.raises(ValueError, match="H, W"):
        augment_mask(img, AugmentParams())
