import math

import numpy as np
import pytest

from ibisagent.masks import (
    MaskShapeError,
    bbox,
    dice,
    error_regions,
    hd95,
    interior_point,
    iou,
    nsd,
    rle_decode,
    rle_encode,
)


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_iou_dice_hand_computed() -> None:
    a = _rect(10, 10, 0, 4, 0, 4)  # 16 px
    b = _rect(10, 10, 2, 6, 2, 6)  # 16 px, overlap 2x2 = 4
    assert iou(a, b) == pytest.approx(4 / 28)
    assert dice(a, b) == pytest.approx(8 / 32)
    assert iou(a, a) == 1.0 and dice(a, a) == 1.0
    empty = np.zeros((10, 10), bool)
    assert iou(empty, empty) == 1.0 and iou(a, empty) == 0.0


def test_boundary_metrics_hand_computed() -> None:
    a = _rect(40, 40, 10, 20, 10, 20)
    b = _rect(40, 40, 10, 20, 13, 23)  # shifted right by 3 px
    # every border pixel is within 3 px of the other border; the left/right edges are exactly 3 px away
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, a) == 0.0
    assert nsd(a, b, tolerance=3.0) == 1.0
    assert 0.0 < nsd(a, b, tolerance=1.0) < 1.0
    assert math.isinf(hd95(a, np.zeros_like(a)))
    assert hd95(a, b, spacing=(1.0, 0.5)) == pytest.approx(1.5)


def test_shape_mismatch_is_clear() -> None:
    with pytest.raises(MaskShapeError, match="differ"):
        iou(np.zeros((3, 3)), np.zeros((3, 4)))


@pytest.mark.parametrize("seed", range(4))
def test_rle_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = rng.random((37, 53)) > 0.6
    if seed == 1:
        m[0, 0] = True  # starts with foreground
    if seed == 2:
        m[:] = False
    if seed == 3:
        m[:] = True
    rle = rle_encode(m)
    assert rle["size"] == [37, 53]
    assert np.array_equal(rle_decode(rle), m)


def test_rle_corrupt() -> None:
    rle = rle_encode(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="corrupt"):
        rle_decode({"size": [5, 5], "counts": rle["counts"]})
    with pytest.raises(ValueError, match="corrupt"):
        rle_decode({"size": [4, 4], "counts": "not base64!"})


def test_bbox_interior_point() -> None:
    m = _rect(20, 30, 5, 9, 10, 20)
    assert bbox(m) == (10, 5, 19, 8)
    assert bbox(np.zeros((3, 3))) is None
    ring = np.zeros((21, 21), bool)
    ring[2:19, 2:19] = True
    ring[6:15, 6:15] = False  # centroid (10, 10) is in the hole
    x, y = interior_point(ring)
    assert ring[y, x]


def test_error_regions() -> None:
    gt = _rect(20, 20, 5, 15, 5, 15)
    pred = _rect(20, 20, 5, 15, 5, 10)
    er = error_regions(pred, gt)
    assert er.fn.sum() == 50 and er.fp.sum() == 0
    assert er.fn_max == pytest.approx(3.0) and er.fp_max == 0.0
