"""Release parity (issue 21): the release's RLE codec, its reply parser as the ``reference`` profile, and the
prompt importer. Inputs are small and release-shaped, written by the tests themselves."""

from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest

from ibisagent.masks import rle_decode, rle_decode_release, rle_encode, rle_encode_release


def _release_layout_encode(mask: np.ndarray) -> str:
    """The release's documented layout, written out plainly: C-order runs starting with background, decimal text
    joined by spaces, zlib (default level), base64."""
    flat = [1 if v else 0 for v in np.asarray(mask).reshape(-1)]
    runs: list[int] = []
    current, count = 0, 0
    for v in flat:
        if v == current:
            count += 1
        else:
            runs.append(count)
            current, count = v, 1
    runs.append(count)
    return base64.b64encode(zlib.compress(" ".join(map(str, runs)).encode("utf-8"))).decode("utf-8")


def test_release_rle_decodes_a_mask_encoded_as_the_release_does() -> None:
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[1, 1:4] = 1
    mask[2, 2] = 1
    payload = _release_layout_encode(mask)
    # the payload text is the decimal run list (6 background, 3 fg, 3 bg, 1 fg, 7 bg)
    assert zlib.decompress(base64.b64decode(payload)).decode() == "6 3 3 1 7"
    np.testing.assert_array_equal(rle_decode_release(payload, (4, 5)), mask.astype(bool))
    assert rle_encode_release(mask) == payload


def test_release_rle_first_pixel_foreground_gets_leading_zero_run() -> None:
    mask = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
    payload = rle_encode_release(mask)
    assert zlib.decompress(base64.b64decode(payload)).decode() == "0 2 3 1"
    assert payload == _release_layout_encode(mask)
    np.testing.assert_array_equal(rle_decode_release(payload, (2, 3)), mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_release_rle_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    mask = rng.random((h, w)) < rng.uniform(0.05, 0.95)
    payload = rle_encode_release(mask)
    assert payload == _release_layout_encode(mask)
    np.testing.assert_array_equal(rle_decode_release(payload, (h, w)), mask)


@pytest.mark.parametrize("fill", [False, True])
def test_release_rle_uniform_masks(fill: bool) -> None:
    mask = np.full((3, 7), fill)
    payload = rle_encode_release(mask)
    assert zlib.decompress(base64.b64decode(payload)).decode() == ("0 21" if fill else "21")
    np.testing.assert_array_equal(rle_decode_release(payload, (3, 7)), mask)


def test_release_rle_is_not_our_rle() -> None:
    mask = np.eye(6, dtype=bool)
    ours = rle_encode(mask)
    with pytest.raises(ValueError):
        rle_decode_release(ours["counts"], (6, 6))
    # and ours cannot read the release's text (decimal text is not uint32 runs covering 36 pixels)
    with pytest.raises(ValueError):
        rle_decode({"size": [6, 6], "counts": rle_encode_release(mask)})


def test_release_rle_bad_input_is_a_clear_error() -> None:
    good = rle_encode_release(np.eye(4, dtype=bool))
    with pytest.raises(ValueError, match="expected 20"):
        rle_decode_release(good, (4, 5))
    with pytest.raises(ValueError, match="corrupt"):
        rle_decode_release("not base64!!", (4, 4))
    with pytest.raises(ValueError, match="corrupt"):
        rle_decode_release(base64.b64encode(zlib.compress(b"3 x 4")).decode(), (4, 4))
    with pytest.raises(ValueError, match="empty"):
        rle_decode_release("", (2, 2))
    with pytest.raises(ValueError, match="2D"):
        rle_encode_release(np.zeros((2, 2, 2), bool))
    assert rle_encode_release(np.zeros((0, 3), bool)) == ""
    assert rle_decode_release("", (0, 3)).shape == (0, 3)
