"""Reward components as a registry: the values of the five reference rewards are pinned on transitions (computed with
the code before the registry, commit 4fd26e0), and a component added with ``register_reward`` reaches the breakdown,
the total, verl's ``compute_score`` and the TRL reward functions without touching anything else."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from ibisagent.protocol import Action, format_reply, to_normalized
from ibisagent.rewards import (
    COMPONENTS,
    REWARDS,
    RewardBreakdown,
    RewardConfig,
    Transition,
    compute_score,
    make_reward_functions,
    register_reward,
    score_transition,
)

H, W = 40, 50
GT = np.zeros((H, W), bool)
GT[10:20, 10:20] = True
FIVE = ("format", "answer", "placement", "progress", "length")


def _mask(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[r0:r1, c0:c1] = True
    return m


def _click(positive: bool, x: int, y: int) -> str:
    nx, ny = to_normalized(x, W), to_normalized(y, H)
    return format_reply(Action.positive(nx, ny) if positive else Action.negative(nx, ny), "r")


def _box(x1: int, y1: int, x2: int, y2: int) -> str:
    a = Action.make_box(to_normalized(x1, W), to_normalized(y1, H), to_normalized(x2, W), to_normalized(y2, H))
    return format_reply(a, "r")


STOP = format_reply(Action.terminate(), "done", "segmented")

# name: (reply, mask before, mask after, step, RewardConfig options, grammar)
TRANSITIONS = {
    "pos_hit_progress": (_click(True, 15, 15), _mask(10, 14, 10, 20), _mask(10, 19, 10, 20), 1, {}, "reference"),
    "neg_miss_late": (_click(False, 15, 15), _mask(10, 20, 10, 20), _mask(10, 20, 10, 16), 7, {}, "reference"),
    "neg_hit_fp": (_click(False, 30, 30), _mask(10, 35, 10, 35), _mask(10, 21, 10, 21), 3, {}, "reference"),
    "stop_good": (STOP, _mask(10, 20, 10, 19), None, 4, {}, "reference"),
    "stop_bad_zero": (STOP, _mask(10, 13, 10, 13), None, 9, {"terminate_placement": "zero"}, "reference"),
    "unparseable": ("no tags here", _mask(10, 15, 10, 15), _mask(10, 20, 10, 20), 6, {}, "reference"),
    "box_ref_mode": (_box(10, 10, 19, 19), None, _mask(10, 20, 10, 20), 1, {}, "reference"),
    "box_ext_iou": (_box(10, 10, 19, 19), None, _mask(10, 20, 10, 20), 1, {}, "extended"),
    "box_ext_contain": (_box(8, 8, 21, 21), None, _mask(10, 20, 10, 20), 2, {"box_placement": "containment"},
                        "extended"),
    "weighted": (_click(True, 12, 18), _mask(10, 15, 10, 20), _mask(10, 20, 10, 20), 6,
                 {"weights": (2.0, 0.5, 1.0, 3.0, 1.5), "length_gamma": 0.5, "optimal_steps": 3}, "reference"),
}

# name: (format, answer, placement, progress, length), total, action kind -- from commit 4fd26e0
PINNED = {
    "box_ext_contain": ([1.0, 3.0, 1.0, 1.0, 1.0], 1.4, "box"),
    "box_ext_iou": ([1.0, 3.0, 1.0, 1.0, 1.0], 1.4, "box"),
    "box_ref_mode": ([0.0, 0.0, -1.0, 0.0, 1.0], 0.0, None),
    "neg_hit_fp": ([1.0, 3.0, 1.0, 1.0, 1.0], 1.4, "negative"),
    "neg_miss_late": ([1.0, 1.0, -1.0, 0.0, -0.4], 0.12, "negative"),
    "pos_hit_progress": ([1.0, 3.0, 1.0, 1.0, 1.0], 1.4, "positive"),
    "stop_bad_zero": ([1.0, 0.0, 0.0, 0.0, -0.8], 0.039999999999999994, "terminate"),
    "stop_good": ([1.0, 3.0, 1.0, 0.0, 1.0], 1.2, "terminate"),
    "unparseable": ([0.0, 0.0, -1.0, 0.0, -0.2], -0.24, None),
    "weighted": ([1.0, 3.0, 1.0, 1.0, -1.5], 1.05, "positive"),
}


def _score(name: str, **extra_cfg):
    reply, before, after, step, cfg, mode = TRANSITIONS[name]
    return score_transition(reply, gt=GT, mask_before=before, mask_after=after, step=step,
                            config=RewardConfig(**{**cfg, **extra_cfg}), mode=mode)


@pytest.mark.parametrize("name", sorted(TRANSITIONS))
def test_five_reference_rewards_are_unchanged(name: str) -> None:
    values, total, kind = PINNED[name]
    rb = _score(name)
    assert tuple(COMPONENTS) == FIVE
    assert [getattr(rb, c) for c in FIVE] == values
    assert list(rb.components().values()) == values
    assert rb.total == total  # exact: same products, same summation order
    assert rb.action == kind
    assert list(rb.as_dict())[:6] == [*FIVE, "total"]


@pytest.fixture
def files(tmp_path):
    img = np.zeros((H, W, 3), np.uint8)
    img[10:20, 10:20] = 200
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(GT.astype(np.uint8) * 255).save(tmp_path / "gt.png")
    return str(tmp_path / "img.png"), str(tmp_path / "gt.png")


def _trl_columns(img: str, gt: str, **more) -> dict:
    return {"ground_truth": [gt] * 4, "image_path": [img] * 4, "points": [[[12, 12]], [], [], [[12, 12]]],
            "labels": [[1], [], [], [1]], "box": [None] * 4, "step": [1, 2, 3, 8], **more}


TRL_REPLIES = [_click(True, 15, 15), _click(False, 2, 2), STOP, "garbage"]


def test_adapters_are_unchanged(files) -> None:
    img, gt = files
    info = {"image_path": img, "points": [[12, 12]], "labels": [1], "box": None, "step": 2, "segmenter": "fake"}
    assert compute_score("ibisagent", _click(True, 15, 15), gt, info) == {
        "score": 0.8, "format": 1.0, "answer": 3.0, "placement": -1.0, "progress": 0.0, "length": 1.0,
        "iou_before": 1.0, "iou_after": 1.0}
    assert compute_score("ibisagent", STOP, gt, info)["score"] == 1.2
    assert compute_score("ibisagent-box", _box(9, 9, 20, 20), gt, {**info, "points": [], "labels": []}) == {
        "score": 1.0, "format": 1.0, "answer": 3.0, "placement": -1.0, "progress": 1.0, "length": 1.0,
        "iou_before": 0.0, "iou_after": 1.0}
    got = {f.__name__: f(prompts=[None] * 4, completions=TRL_REPLIES, **_trl_columns(img, gt))
           for f in make_reward_functions(segmenter="fake")}
    assert got == {
        "format_reward": [1.0, 1.0, 1.0, 0.0], "answer_reward": [3.0, 0.0, 0.0, 0.0],
        "placement_reward": [-1.0, -1.0, -1.0, -1.0], "progress_reward": [0.0, 0.0, 0.0, 0.0],
        "length_reward": [1.0, 1.0, 1.0, -0.6000000000000001], "total_reward": [0.8, 0.2, 0.2, -0.32]}


def test_trl_row_without_grammar_scores_every_component_in_the_reference_grammar(files) -> None:
    """Before the registry, a Box reply on a row without a ``grammar`` column got format 0 (reference) but the
    answer/placement/progress of an applied box (extended): total 1.4 for a reply the reference grammar rejects."""
    img, gt = files
    cols = {"ground_truth": [gt], "image_path": [img], "points": [[]], "labels": [[]], "box": [None], "step": [1]}
    fns = {f.__name__: f for f in make_reward_functions(segmenter="fake")}
    reply = [_box(10, 10, 19, 19)]
    without = {k: f(prompts=[None], completions=reply, **cols) for k, f in fns.items()}
    with_ref = {k: f(prompts=[None], completions=reply, **cols, grammar=["reference"]) for k, f in fns.items()}
    assert without == with_ref
    assert without["total_reward"] == [0.0]
    ext = {k: f(prompts=[None], completions=reply, **cols, grammar=["extended"]) for k, f in fns.items()}
    assert ext["format_reward"] == [1.0] and ext["answer_reward"] == [3.0]


def test_weights_by_name_equal_weights_by_position() -> None:
    by_pos = _score("weighted")
    by_name = _score("weighted", weights={"format": 2.0, "answer": 0.5, "progress": 3.0, "length": 1.5})
    assert by_name.total == by_pos.total
    assert RewardConfig(weights={"answer": 2.0}).weight("answer") == 2.0
    assert RewardConfig(weights={"answer": 2.0}).weight("format") == 1.0
    assert RewardConfig.from_dict({"weights": {"answer": 2.0}}) == RewardConfig(weights=(1, 2, 1, 1, 1))
    with pytest.raises(ValueError, match="unknown reward component"):
        RewardConfig(weights={"nope": 1.0})
    with pytest.raises(ValueError, match="needs 5 values"):
        RewardConfig(weights=(1.0, 2.0))


def test_breakdown_keywords_attributes_and_pickle() -> None:
    rb = RewardBreakdown(total=0.5, format=1.0, answer=0.0, placement=0.0, progress=0.0, length=1.0)
    assert rb.format == 1.0 and rb.length == 1.0 and rb.components()["answer"] == 0.0
    assert pickle.loads(pickle.dumps(rb)) == rb
    with pytest.raises(AttributeError, match="nope"):
        _ = rb.nope
    with pytest.raises(ValueError, match="not one of"):
        register_reward("total")


@pytest.fixture
def extra_reward():
    """A sixth component: +1 when the mask after the action covers the object's centre pixel."""

    @register_reward("covers_centre")
    def covers_centre(t: Transition, config: RewardConfig) -> float:
        return 1.0 if t.after[15, 15] else 0.0

    yield covers_centre
    del REWARDS["covers_centre"]


def test_a_registered_reward_reaches_every_consumer(extra_reward, files) -> None:
    assert tuple(COMPONENTS) == (*FIVE, "covers_centre")
    rb = _score("pos_hit_progress", weights={"covers_centre": 2.0})
    assert rb.covers_centre == 1.0
    assert rb.total == pytest.approx((1 + 3 + 1 + 1 + 1 + 2 * 1) / 6)
    img, gt = files
    info = {"image_path": img, "points": [], "labels": [], "box": None, "step": 1, "segmenter": "fake"}
    assert compute_score("ibisagent", _click(True, 15, 15), gt, info)["covers_centre"] == 1.0
    fns = {f.__name__: f for f in make_reward_functions(segmenter="fake")}
    assert "covers_centre_reward" in fns
    assert fns["covers_centre_reward"](prompts=[None] * 4, completions=TRL_REPLIES,
                                       **_trl_columns(img, gt)) == [1.0, 0.0, 0.0, 1.0]
