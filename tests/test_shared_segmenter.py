"""Every object that shares a segmenter answers for its OWN image (issue 17): sessions, environments, agents, the
reward scorer and the app/server hub, each tested with two images interleaved on one segmenter."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent.agent import Agent
from ibisagent.env import EnvConfig, SegmentationEnv
from ibisagent.protocol import Action, format_reply
from ibisagent.rewards.core import score_step
from ibisagent.runtime import SegmenterHub
from ibisagent.segmenters.base import SegmenterError
from ibisagent.segmenters.fake import FakeSegmenter
from ibisagent.session import Session


def _images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image A (60x70, a bright block top-left) and B (80x90, a bright block bottom-right), with their masks."""
    a = np.full((60, 70, 3), 20, np.uint8)
    ga = np.zeros((60, 70), bool)
    ga[10:40, 10:40] = True
    a[ga] = 220
    b = np.full((80, 90, 3), 20, np.uint8)
    gb = np.zeros((80, 90), bool)
    gb[30:75, 35:85] = True
    b[gb] = 220
    return a, ga, b, gb


def _alone(image: np.ndarray, clicks: list[tuple[float, float, bool]]) -> np.ndarray:
    s = Session(FakeSegmenter())
    s.set_image(image)
    for x, y, pos in clicks:
        s.add_click(x, y, pos)
    assert s.mask is not None
    return s.mask


def test_two_sessions_on_one_segmenter_each_get_their_own_image():
    a, _, b, _ = _images()
    seg = FakeSegmenter()
    sa, sb = Session(seg), Session(seg)
    sa.set_image(a)
    sb.set_image(b)
    ma = sa.add_click(20, 20)  # the segmenter holds B now
    assert ma.shape == a.shape[:2]
    np.testing.assert_array_equal(ma, _alone(a, [(20, 20, True)]))
    mb = sb.add_click(60, 50)
    np.testing.assert_array_equal(mb, _alone(b, [(60, 50, True)]))
    np.testing.assert_array_equal(sa.add_click(65, 55, False), _alone(a, [(20, 20, True), (65, 55, False)]))
    assert sa.shape == (60, 70) and sb.shape == (80, 90)


def test_a_session_without_its_own_image_refuses():
    a, *_ = _images()
    seg = FakeSegmenter()
    seg.set_image(a)  # someone else's image
    s = Session(seg)
    with pytest.raises(SegmenterError, match="set_image"):
        s.add_click(5, 5)
    with pytest.raises(SegmenterError, match="set_image"):
        s.set_box(1, 1, 10, 10)
    with pytest.raises(SegmenterError, match="set_image"):
        s.apply(Action.positive(0.5, 0.5))


def test_two_environments_interleaved():
    a, ga, b, gb = _images()
    seg = FakeSegmenter()
    ea, eb = SegmentationEnv(seg), SegmentationEnv(seg)
    ea.reset(a, "block", ga)
    eb.reset(b, "block", gb)
    reply = format_reply(Action.positive(0.3, 0.3), "x")
    ra = ea.step(reply)  # (0.3, 0.3) lies in A's block, not in B's
    assert "error" not in ra.info
    np.testing.assert_array_equal(ra.info["mask"], _alone(a, [(ea.session.points[0][0], ea.session.points[0][1],
                                                                True)]))
    assert ra.info["iou"] > 0.85
    rb = eb.step(format_reply(Action.positive(0.7, 0.7), "x"))
    assert rb.info["iou"] > 0.85 and rb.observation.overlay.shape == b.shape


def test_two_agents_interleaved_through_on_step():
    a, ga, b, gb = _images()
    a[42:58, 45:68] = 220  # a second block: agent A needs a second click after agent B's episode
    ga = ga.copy()
    ga[42:58, 45:68] = True
    seg = FakeSegmenter()
    agent_a = Agent("oracle", seg, EnvConfig(max_steps=6))
    agent_b = Agent("oracle", seg, EnvConfig(max_steps=6))
    others = []

    def run_b(rec) -> None:  # a whole episode of agent B on image B between steps 1 and 2 of agent A
        if rec.step == 1:
            others.append(agent_b.segment(b, "block", gb))

    ep_a = agent_a.segment(a, "blocks", ga, on_step=run_b)
    solo = Agent("oracle", FakeSegmenter(), EnvConfig(max_steps=6)).segment(a, "blocks", ga)
    assert sum(s.kind == "positive" for s in solo.steps) >= 2
    assert others and all(o.final_iou is not None and o.final_iou > 0.85 for o in others)
    assert [s.action for s in ep_a.steps] == [s.action for s in solo.steps]
    np.testing.assert_array_equal(ep_a.final_mask, solo.final_mask)


def test_reward_scorer_sees_its_own_image_after_a_session_set_another():
    a, ga, b, _ = _images()
    seg = FakeSegmenter()
    reply = format_reply(Action.positive(0.3, 0.3), "x")
    first = score_step(reply, image=a, gt=ga, step=1, segmenter=seg)
    other = Session(seg)
    other.set_image(b)  # the scorer's segmenter now holds B
    other.add_click(60, 50)
    again = score_step(reply, image=a, gt=ga, step=1, segmenter=seg)
    assert again.iou_after == pytest.approx(first.iou_after) and first.iou_after > 0.85
    assert again.total == pytest.approx(first.total)


def test_hub_rebinds_after_someone_set_another_image_on_its_segmenter():
    a, _, b, _ = _images()
    hub = SegmenterHub(lambda name: FakeSegmenter())
    with hub.bound("fake", a) as seg:
        first = seg.predict(points=[[20, 20]], labels=[1]).mask
    s = Session(hub.get("fake"))  # outside the hub's lock bookkeeping
    s.set_image(b)
    with hub.bound("fake", a) as seg:
        again = seg.predict(points=[[20, 20]], labels=[1]).mask
    np.testing.assert_array_equal(again, first)


def test_hub_does_not_reencode_when_the_block_sets_the_same_image():
    a, ga, _, _ = _images()
    hub = SegmenterHub(lambda name: FakeSegmenter())
    with hub.bound("fake", a) as seg:
        SegmentationEnv(seg).reset(a, "block", ga)  # sets the same array object again
    with hub.bound("fake", a) as seg:
        seg.predict(points=[[20, 20]], labels=[1])
    assert hub.set_image_calls == 1


def test_failed_set_image_leaves_no_stale_image():
    a, *_ = _images()
    seg = FakeSegmenter()
    seg.set_image(a)
    with pytest.raises(SegmenterError, match="minimum size is 2x2"):
        seg.set_image(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(SegmenterError, match="uint8"):
        seg.set_image(np.zeros((5, 5, 3), np.float32))
    assert seg.holds(a)  # refused before touching the state


@pytest.mark.parametrize("points,labels,needle", [
    ([[float("nan"), 3.0]], [1], "NaN"),
    ([[3.0, float("inf")]], [1], "NaN or infinity"),
    ([[3.0, 3.0]], [0.5], "labels must be 1"),
    ([[3.0, 3.0]], [2], "labels must be 1"),
    ([[3.0, 3.0]], ["1"], "labels must be 1"),
])
def test_bad_prompts_say_what_is_wrong(points, labels, needle):
    seg = FakeSegmenter()
    seg.set_image(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(SegmenterError, match=needle):
        seg.predict(points=points, labels=labels)


def test_session_click_nan_is_named():
    s = Session(FakeSegmenter())
    s.set_image(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(SegmenterError, match="finite"):
        s.add_click(float("nan"), 2)


def test_litemedsam_sessions_interleaved_use_the_embedding_cache():
    from ibisagent.segmenters import SegmenterUnavailable, create_segmenter
    from ibisagent.segmenters.embedding_cache import MemoryEmbeddingCache

    a, _, b, _ = _images()
    try:
        seg = create_segmenter("litemedsam-click", memory_cache=MemoryEmbeddingCache())
    except SegmenterUnavailable as exc:
        pytest.skip(str(exc))
    sa, sb = Session(seg), Session(seg)
    sa.set_image(a)
    sb.set_image(b)
    ma = sa.add_click(20, 20).copy()
    sb.add_click(60, 50)
    ref = Session(seg)
    ref.set_image(a)
    np.testing.assert_array_equal(ma, ref.add_click(20, 20))
    assert ma.shape == (60, 70)
    assert seg.encoder_runs == 2  # switching back and forth hit the cache


# --- registry options, episode rules, saved overlays (issue 17) -----------------------------------------------------
def test_unknown_factory_options_list_the_valid_ones():
    from ibisagent.options import UnknownOptionError
    from ibisagent.policies import create_policy
    from ibisagent.segmenters import create_segmenter

    with pytest.raises(UnknownOptionError, match="segmenter 'fake' has no option 'colour'; its options: "
                                                 "radius_frac, tolerance") as exc:
        create_segmenter("fake", colour=1)
    assert isinstance(exc.value, TypeError) and isinstance(exc.value, ValueError)
    with pytest.raises(UnknownOptionError, match="policy 'gt-box' has no option 'seed'; its options: \\(none\\)"):
        create_policy("gt-box", seed=1)
    assert create_segmenter("fake", tolerance=3).tolerance == 3.0


@pytest.mark.parametrize("kw", [{"max_steps": 0}, {"max_steps": -2}, {"max_repeats": 0}, {"max_steps": 2.5},
                                {"max_steps": True}])
def test_env_config_refuses_a_step_budget_below_one(kw):
    with pytest.raises(ValueError, match=">= 1"):
        EnvConfig(**kw)


def test_display_overlay_downscales_huge_images_only():
    from ibisagent.overlay import display_overlay

    img = np.zeros((3000, 1500, 3), np.uint8)
    mask = np.zeros((3000, 1500), bool)
    mask[1000:2000, 500:1000] = True
    vis = display_overlay(img, mask, [(750.0, 1500.0)], [1], max_side=1000)
    assert vis.shape == (1000, 500, 3)
    assert tuple(vis[500, 250]) != (0, 0, 0)  # the click (scaled to 250, 500) is drawn
    small = display_overlay(img[:100, :100], mask[:100, :100], max_side=1000)
    assert small.shape == (100, 100, 3)


def test_saved_overlays_are_downscaled_and_not_repeated(tmp_path, monkeypatch):
    from PIL import Image

    import ibisagent.agent as agent_mod

    monkeypatch.setattr(agent_mod, "DISPLAY_MAX_SIDE", 64)
    a, ga, _, _ = _images()
    ep = Agent("oracle", FakeSegmenter(), EnvConfig(max_steps=5)).segment(a, "block", ga)
    assert ep.steps[-1].kind == "terminate"
    ep.save(tmp_path, a)
    files = sorted(f.name for f in tmp_path.glob("step_*.png"))
    assert f"step_{ep.steps[-1].step:02d}.png" not in files  # the Terminate step changed nothing
    assert len(files) == sum(s.kind in ("positive", "negative", "box") for s in ep.steps)
    assert Image.open(tmp_path / files[0]).size == (64, round(60 * 64 / 70))
    assert np.asarray(Image.open(tmp_path / "mask.png")).shape == (60, 70)  # the mask stays full size


def test_policy_overlay_memory_is_bounded_by_the_image_size():
    import tracemalloc

    from ibisagent.overlay import policy_overlay

    img = np.full((1500, 1500, 3), 90, np.uint8)
    mask = np.zeros((1500, 1500), bool)
    mask[200:400, 300:700] = True
    tracemalloc.start()
    out = policy_overlay(img, mask)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * img.nbytes  # the output copy, the mask, the masked pixels: not a float32 copy (4x)
    assert tuple(out[300, 500]) == (68, 110, 68) and tuple(out[0, 0]) == (90, 90, 90)
