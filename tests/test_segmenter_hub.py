"""One default segmenter, one segmenter cache (SegmenterHub) and one image key for the app, server and rewards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ibisagent.segmenters.base as seg_base
from ibisagent.protocol import Action, format_reply, to_normalized
from ibisagent.rewards.core import get_segmenter, score_step
from ibisagent.segmenters.base import SegmenterError, create_segmenter, image_key
from ibisagent.segmenters.hub import SegmenterHub, shared_hub
from ibisagent.testing.tiny_data import synthetic_cases


def test_every_entry_point_resolves_the_same_default(monkeypatch, tmp_path: Path) -> None:
    from ibisagent import cli, runtime, server
    from ibisagent.evaluation.harness import EvalConfig
    from ibisagent.ui import app

    for weights, expected in ((seg_base.CLICK_WEIGHTS, "litemedsam-click"), (tmp_path / "none.st", "litemedsam")):
        monkeypatch.setattr(seg_base, "CLICK_WEIGHTS", weights)
        if expected == "litemedsam-click" and not Path(weights).is_file():
            expected = "litemedsam"  # a checkout without the shipped weights
        assert cli.default_segmenter() == runtime.default_segmenter() == expected
        assert EvalConfig(data="d", out="o").resolved().segmenter == expected
        assert server.ServerConfig(data_root=str(tmp_path)).segmenter == expected
        assert app.AppConfig(segmenters=["fake"], policies=["oracle"]).segmenter == expected


def test_segmenter_knows_which_image_it_holds() -> None:
    a, b = (c.image for c in synthetic_cases(2, seed=5))
    seg = create_segmenter("fake")
    assert seg.image_key is None and seg.ensure_image(a)
    assert seg.image_key == image_key(a) and not seg.ensure_image(a.copy())  # same content
    seg.set_image(b)  # set directly, not through ensure_image
    assert seg.image_key == image_key(b) and seg.ensure_image(a)
    with pytest.raises(SegmenterError):
        seg.set_image(np.zeros((1, 5, 3), np.uint8))
    assert seg.image_key == image_key(a)  # a refused image leaves the previous one set
    seg.reset_image()
    assert seg.image_key is None and seg.ensure_image(a)


def test_hub_sets_an_image_once_and_forgets_it_after_a_crash() -> None:
    a, b = (c.image for c in synthetic_cases(2, seed=5))
    hub = SegmenterHub()
    for img in (a, a, b, b, a):
        with hub.bound("fake", img) as seg:
            assert seg.image_key == image_key(img)
    assert hub.set_image_calls == 3 and hub.loaded() == ["fake"]
    with pytest.raises(RuntimeError), hub.bound("fake", a):
        raise RuntimeError("backend died")
    assert not hub.get("fake").is_image_set
    with hub.bound("fake", a):
        pass
    assert hub.set_image_calls == 4
    assert get_segmenter("fake") is shared_hub().get("fake")  # rewards use the shared hub


def test_reward_segmenter_is_not_fooled_by_an_image_set_elsewhere() -> None:
    """The rewards used to remember the image on a patched attribute that a direct set_image did not update."""
    cases = synthetic_cases(2, seed=6)
    seg = create_segmenter("fake")
    c = cases[0]
    ys, xs = np.nonzero(c.gt)
    h, w = c.gt.shape
    x, y = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
    reply = format_reply(Action.positive(to_normalized(x, w), to_normalized(y, h)), "click the target")
    first = score_step(reply, image=c.image, gt=c.gt, step=1, segmenter=seg)
    seg.set_image(cases[1].image)  # e.g. an environment sharing the instance
    again = score_step(reply, image=c.image, gt=c.gt, step=1, segmenter=seg)
    assert again.iou_after == first.iou_after and again.total == first.total and first.iou_after > 0.3
