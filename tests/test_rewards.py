"""Rewards: each component on hand-built states, each tier boundary, our decisions, and the verl/TRL entry points."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ibisagent.masks import rle_encode
from ibisagent.protocol import Action, format_reply, to_normalized
from ibisagent.rewards import (
    COMPONENTS,
    RewardConfig,
    RewardInputError,
    answer_reward,
    box_placement_reward,
    compute_score,
    length_reward,
    make_reward_functions,
    progress_reward,
    reward_functions,
    score_step,
    score_transition,
)

H, W = 40, 50


def _gt() -> np.ndarray:
    """A 10x10 object (100 px) at rows 10..19, cols 10..19."""
    gt = np.zeros((H, W), bool)
    gt[10:20, 10:20] = True
    return gt


def _mask_with(n_inside: int, n_outside: int = 0) -> np.ndarray:
    """A mask with n_inside object pixels and n_outside background pixels: IoU = n_inside / (100 + n_outside)."""
    m = np.zeros((H, W), bool)
    idx = np.argwhere(_gt())[:n_inside]
    m[idx[:, 0], idx[:, 1]] = True
    bg = np.argwhere(~_gt())[:n_outside]
    m[bg[:, 0], bg[:, 1]] = True
    return m


def _click(positive: bool, x: int, y: int, text: str = "reasoning") -> str:
    nx, ny = to_normalized(x, W), to_normalized(y, H)
    return format_reply(Action.positive(nx, ny) if positive else Action.negative(nx, ny), text)


STOP = format_reply(Action.terminate(), "done", "segmented")


# --- format ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply,mode,expected", [
    (_click(True, 12, 12), "reference", 1.0),
    (STOP, "reference", 1.0),
    ("<think>\ndone\n</think>\n<action>\nTermination\n</action>\n<answer>\nok\n</answer>", "reference", 1.0),
    ("<think>done</think><action>Positive Point (0.2500, 0.3000)</action>", "reference", 0.0),  # no newlines
    ("<think>\ndone\n</think>\n<action>\nTerminate\n</action>", "reference", 0.0),  # no answer after a stop
    (format_reply(Action.make_box(0.1, 0.1, 0.5, 0.5), "box"), "reference", 0.0),
    (format_reply(Action.make_box(0.1, 0.1, 0.5, 0.5), "box"), "extended", 1.0),
])
def test_format_component(reply: str, mode: str, expected: float) -> None:
    r = score_transition(reply, gt=_gt(), mask_before=_mask_with(50), mask_after=_mask_with(60), step=2, mode=mode)
    assert r.format == expected


# --- answer tiers (strict >) ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_inside,expected", [
    (50, 0.0), (51, 1.0), (70, 1.0), (71, 2.0), (80, 2.0), (81, 3.0), (100, 3.0), (0, 0.0),
])
def test_answer_tier_boundaries(n_inside: int, expected: float) -> None:
    after = _mask_with(n_inside)
    r = score_transition(_click(True, 12, 12), gt=_gt(), mask_before=None, mask_after=after, step=1)
    assert r.iou_after == pytest.approx(n_inside / 100)
    assert r.answer == expected
    assert answer_reward(n_inside / 100) == expected


def test_answer_tiers_configurable() -> None:
    cfg = RewardConfig(answer_tiers=((0.9, 5.0), (0.2, 1.0)))
    assert answer_reward(0.85, cfg) == 1.0
    assert answer_reward(0.95, cfg) == 5.0
    assert answer_reward(0.2, cfg) == 0.0
    with pytest.raises(ValueError, match="ordered"):
        RewardConfig(answer_tiers=((0.5, 1.0), (0.8, 3.0)))


# --- placement ------------------------------------------------------------------------------------------------------

def test_click_placement_on_fn_and_fp() -> None:
    gt = _gt()
    before = _mask_with(50, n_outside=30)  # object rows 10..14 covered, plus background pixels in row 0
    fp_y, fp_x = np.argwhere(before & ~gt)[0]
    cases = [
        (True, 15, 17, 1.0),  # positive on a missed object pixel (FN)
        (True, 12, 10, -1.0),  # positive on an object pixel already in the mask (TP)
        (True, 40, 35, -1.0),  # positive on plain background
        (False, int(fp_x), int(fp_y), 1.0),  # negative on a wrongly included pixel (FP)
        (False, 15, 17, -1.0),  # negative on a missed object pixel
        (False, 40, 35, -1.0),  # negative on background that is not in the mask
    ]
    for positive, x, y, expected in cases:
        assert gt[y, x] == (10 <= y < 20 and 10 <= x < 20)
        r = score_transition(_click(positive, x, y), gt=gt, mask_before=before, mask_after=before, step=2)
        assert r.placement == expected, (positive, x, y)


def test_placement_uses_mask_before_not_after() -> None:
    gt = _gt()
    # the click lands on a pixel that was missed before and is covered after: still a hit
    r = score_transition(_click(True, 15, 17), gt=gt, mask_before=_mask_with(50), mask_after=gt, step=2)
    assert r.placement == 1.0


def test_terminate_placement_decision() -> None:
    gt = _gt()
    good = score_transition(STOP, gt=gt, mask_before=_mask_with(85), mask_after=None, step=3)
    early = score_transition(STOP, gt=gt, mask_before=_mask_with(60), mask_after=None, step=3)
    assert (good.placement, early.placement) == (1.0, -1.0)
    assert good.progress == early.progress == 0.0
    assert good.iou_after == pytest.approx(0.85) and good.answer == 3.0  # the mask stays as it was
    zero = score_transition(STOP, gt=gt, mask_before=_mask_with(60), mask_after=None, step=3,
                            config=RewardConfig(terminate_placement="zero"))
    assert zero.placement == 0.0
    custom = score_transition(STOP, gt=gt, mask_before=_mask_with(60), mask_after=None, step=3,
                              config=RewardConfig(stop_iou=0.5))
    assert custom.placement == 1.0


def test_box_placement_extension() -> None:
    gt = _gt()
    assert box_placement_reward((10, 10, 19, 19), gt) == 1.0
    assert box_placement_reward((5, 5, 30, 30), gt) == -1.0  # loose: IoU 100/676
    assert box_placement_reward((15, 10, 24, 19), gt) == -1.0  # shifted by half: IoU 50/150
    cont = RewardConfig(box_placement="containment")
    assert box_placement_reward((8, 8, 21, 21), gt, cont) == 1.0  # holds the whole object, IoU 100/196 >= 0.3
    assert box_placement_reward((0, 0, W - 1, H - 1), gt, cont) == -1.0  # whole image: contains it but too loose
    assert box_placement_reward((12, 10, 21, 19), gt, cont) == -1.0  # cuts off 20% of the object
    reply = format_reply(Action.make_box(to_normalized(10, W), to_normalized(10, H), to_normalized(19, W),
                                         to_normalized(19, H)), "box")
    r = score_transition(reply, gt=gt, mask_before=None, mask_after=gt, step=1, mode="extended")
    assert (r.format, r.placement, r.action) == (1.0, 1.0, "box")


# --- progress and length -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("before,after,expected", [(50, 60, 1.0), (60, 60, 0.0), (60, 40, 0.0)])
def test_progress_component(before: int, after: int, expected: float) -> None:
    r = score_transition(_click(True, 15, 17), gt=_gt(), mask_before=_mask_with(before),
                         mask_after=_mask_with(after), step=2)
    assert r.progress == expected
    assert progress_reward(before / 100, after / 100) == expected
    assert progress_reward(0.1, 0.9, terminate=True) == 0.0


@pytest.mark.parametrize("step,expected", [(1, 1.0), (5, 1.0), (6, -0.2), (7, -0.4), (10, -1.0), (20, -3.0)])
def test_length_component(step: int, expected: float) -> None:
    assert length_reward(step) == pytest.approx(expected)
    r = score_transition(_click(True, 15, 17), gt=_gt(), mask_before=None, mask_after=_mask_with(90), step=step)
    assert r.length == pytest.approx(expected)
    assert length_reward(4, RewardConfig(optimal_steps=3, length_gamma=0.5)) == pytest.approx(-0.5)


def test_total_is_mean_of_the_five_and_weights_apply() -> None:
    r = score_transition(_click(True, 15, 17), gt=_gt(), mask_before=_mask_with(50), mask_after=_mask_with(75),
                         step=7)
    # format 1, answer 2 (0.75), placement 1, progress 1, length -0.4
    assert (r.format, r.answer, r.placement, r.progress) == (1.0, 2.0, 1.0, 1.0)
    assert r.total == pytest.approx((1 + 2 + 1 + 1 - 0.4) / 5)
    assert set(COMPONENTS) <= set(r.as_dict())
    w = score_transition(_click(True, 15, 17), gt=_gt(), mask_before=_mask_with(50), mask_after=_mask_with(75),
                         step=7, config=RewardConfig(weights=(0, 1, 0, 0, 0)))
    assert w.total == pytest.approx(2.0 / 5)


def test_unparseable_reply_decision() -> None:
    r = score_transition("I think the polyp is on the left.", gt=_gt(), mask_before=_mask_with(90),
                         mask_after=_mask_with(100), step=2)
    assert (r.format, r.answer, r.placement, r.progress, r.length) == (0.0, 0.0, -1.0, 0.0, 1.0)
    assert r.action is None and any("no action" in e for e in r.errors)
    # a reply that is badly formatted but parseable still gets the other rewards (as the reference)
    loose = score_transition("<think>x</think><action>Positive Point (0.31, 0.43)</action>", gt=_gt(),
                             mask_before=_mask_with(50), mask_after=_mask_with(90), step=2)
    assert (loose.format, loose.answer, loose.placement, loose.progress) == (0.0, 3.0, 1.0, 1.0)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(RewardInputError, match="empty"):
        score_transition(STOP, gt=np.zeros((H, W), bool), mask_before=None, mask_after=None, step=1)
    with pytest.raises(RewardInputError, match="ground truth"):
        score_transition(_click(True, 1, 1), gt=_gt(), mask_before=np.zeros((H, W + 1), bool), mask_after=None,
                         step=1)
    with pytest.raises(ValueError, match="unknown reward option"):
        RewardConfig.from_dict({"answer_tier": 1})


# --- with a segmenter ----------------------------------------------------------------------------------------------

def _scene() -> tuple[np.ndarray, np.ndarray]:
    img = np.full((H, W, 3), 30, np.uint8)
    gt = _gt()
    img[gt] = 200
    return img, gt


def test_score_step_runs_the_segmenter() -> None:
    img, gt = _scene()
    r = score_step(_click(True, 14, 14), image=img, gt=gt, step=1, segmenter="fake")
    assert r.iou_before == 0.0 and r.iou_after == pytest.approx(1.0)
    assert (r.format, r.answer, r.placement, r.progress, r.length) == (1.0, 3.0, 1.0, 1.0, 1.0)
    # the state already holds that click: the mask before is recomputed from it; a second positive click on the
    # object is then a placement miss and makes no progress
    r2 = score_step(_click(True, 16, 16), image=img, gt=gt, points=[[14, 14]], labels=[1], step=2, segmenter="fake")
    assert r2.iou_before == pytest.approx(1.0)
    assert (r2.placement, r2.progress) == (-1.0, 0.0)
    stop = score_step(STOP, image=img, gt=gt, points=[[14, 14]], labels=[1], step=2, segmenter="fake")
    assert (stop.placement, stop.answer, stop.progress) == (1.0, 3.0, 0.0)


def _write_case(tmp_path) -> tuple[str, str]:
    img, gt = _scene()
    ip, mp = tmp_path / "img.png", tmp_path / "mask.png"
    Image.fromarray(img).save(ip)
    Image.fromarray(gt.astype(np.uint8) * 255).save(mp)
    return str(ip), str(mp)


def test_compute_score_verl_entry_point(tmp_path) -> None:
    ip, mp = _write_case(tmp_path)
    info = {"image_path": ip, "points": [], "labels": [], "box": None, "step": 1, "segmenter": "fake"}
    out = compute_score("ibisagent/toy", _click(True, 14, 14), mp, info)
    assert out["score"] == pytest.approx((1 + 3 + 1 + 1 + 1) / 5)
    assert {"format", "answer", "placement", "progress", "length"} <= set(out)
    # ground truth as RLE dict and as its JSON string give the same result
    rle = rle_encode(_gt())
    assert compute_score("ibisagent", _click(True, 14, 14), rle, info)["score"] == out["score"]
    assert compute_score("ibisagent", _click(True, 14, 14), json.dumps(rle), info)["score"] == out["score"]
    # the state's previous mask is used as the mask before
    info2 = dict(info, points=[[14, 14]], labels=[1], step=2, prev_mask_rle=json.dumps(rle_encode(_mask_with(40))))
    out2 = compute_score("ibisagent", _click(True, 17, 18), mp, info2)
    assert out2["iou_before"] == pytest.approx(0.4) and out2["placement"] == 1.0
    # boxes: rejected by the reference source, scored by the box source
    box = format_reply(Action.make_box(to_normalized(10, W), to_normalized(10, H), to_normalized(19, W),
                                       to_normalized(19, H)), "box")
    assert compute_score("ibisagent", box, mp, info)["format"] == 0.0
    ext = compute_score("ibisagent-box/toy", box, mp, info)
    assert (ext["format"], ext["placement"], ext["answer"]) == (1.0, 1.0, 3.0)
    with pytest.raises(NotImplementedError, match="no ibisagent scorer"):
        compute_score("gsm8k", _click(True, 14, 14), mp, info)
    with pytest.raises(RewardInputError, match="image_path"):
        compute_score("ibisagent", _click(True, 14, 14), mp, {})


def test_trl_reward_functions(tmp_path) -> None:
    ip, mp = _write_case(tmp_path)
    fns = make_reward_functions(segmenter="fake")
    assert [f.__name__ for f in fns] == [f"{c}_reward" for c in (*COMPONENTS, "total")]
    completions = [
        [{"role": "assistant", "content": [{"type": "text", "text": _click(True, 14, 14)}]}],  # conversational
        _click(False, 40, 30),  # plain string, a negative click on background
    ]
    cols = {"image_path": [ip, ip], "ground_truth": [mp, mp], "points": [[], []], "labels": [[], []],
            "box": [None, None], "step": [1, 6], "prev_mask_rle": ["", ""], "grammar": ["reference", "reference"]}
    got = {f.__name__: f(prompts=[None, None], completions=completions, **cols) for f in fns}
    assert got["format_reward"] == [1.0, 1.0]
    assert got["answer_reward"] == [3.0, 0.0]
    assert got["placement_reward"] == [1.0, -1.0]
    assert got["progress_reward"] == [1.0, 0.0]
    assert got["length_reward"] == pytest.approx([1.0, -0.2])
    assert got["total_reward"] == pytest.approx([1.4, (1 + 0 - 1 + 0 - 0.2) / 5])
    # rows without state columns: not applicable (None), except format
    bare = {f.__name__: f(prompts=[None], completions=[_click(True, 1, 1)]) for f in fns}
    assert bare["format_reward"] == [1.0] and bare["answer_reward"] == [None]
    assert set(reward_functions()) == {f.__name__ for f in fns}
