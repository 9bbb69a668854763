"""One oracle click rule: the oracle policy and trajectory synthesis click the same pixels on the same states."""

from __future__ import annotations

import random

import numpy as np

from ibisagent.env import EnvConfig, SegmentationEnv
from ibisagent.oracle_click import next_click
from ibisagent.policies.oracle import OraclePolicy
from ibisagent.protocol import ActionKind, parse_reply
from ibisagent.segmenters.base import Segmenter, SegResult, create_segmenter
from ibisagent.synthesis.trajectories import Rollout, RolloutConfig, rollout_oracle
from ibisagent.testing.tiny_data import synthetic_cases


class _StuckSegmenter(Segmenter):
    """Returns the same mask whatever the prompts: clicks it ignores use up error pixels one by one."""

    name = "stuck"

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.mask = mask

    def _encode(self, image: np.ndarray) -> None:
        return None

    def _decode(self, points, labels, box, mask_input) -> SegResult:
        return SegResult(self.mask.copy(), np.where(self.mask, 4.0, -4.0).astype(np.float32)[None], float("nan"))


def _stuck_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gt = a square plus one isolated pixel; the stuck prediction = the square plus a 3x3 false-positive block."""
    gt = np.zeros((32, 32), bool)
    gt[4:8, 4:8] = True
    gt[25, 5] = True  # one-pixel miss (distance 1)
    pred = gt.copy()
    pred[25, 5] = False
    pred[20:23, 20:23] = True  # 3x3 leak (centre distance 2, rim distance 1)
    image = np.full((32, 32, 3), 90, np.uint8)
    return image, gt, pred


def test_exhausted_region_falls_through_to_the_other_region() -> None:
    _, gt, pred = _stuck_case()
    first = next_click(pred, gt)
    assert first is not None and not first.positive and (first.x, first.y) == (21, 21) and first.depth == 2.0
    # the leak (deeper) stays the chosen region while it has unclicked pixels: its rim
    leak = [(x, y) for y, x in zip(*np.nonzero(pred & ~gt))]
    second = next_click(pred, gt, avoid=[(21, 21)])
    assert second is not None and not second.positive and (second.x, second.y) in leak
    assert second.region.sum() == 9  # the connected leak that holds the click
    # the leak is used up: the click goes to the one-pixel miss instead of giving up
    third = next_click(pred, gt, avoid=np.array(leak, np.float64))
    assert third is not None and third.positive and (third.x, third.y) == (5, 25) and third.depth == 1.0
    assert third.region.sum() == 1 and third.region[25, 5]
    every = [*leak, (5, 25)]
    assert next_click(pred, gt, avoid=every) is None
    assert next_click(gt, gt) is None


def _policy_clicks(segmenter: Segmenter, image: np.ndarray, gt: np.ndarray, query: str) -> list[str]:
    env = SegmentationEnv(segmenter, EnvConfig(max_steps=20))
    policy = OraclePolicy()
    obs = env.reset(image, query, gt)
    policy.begin_episode(image=image, query=query, gt=gt)
    actions: list[str] = []
    done = False
    while not done:
        reply = policy.act(obs)
        action = parse_reply(reply).action
        if action.kind is not ActionKind.TERMINATE:
            actions.append(action.text())
        res = env.step(reply)
        obs, done = res.observation, res.done
    return actions


def _synthesis_clicks(segmenter: Segmenter, image: np.ndarray, gt: np.ndarray, query: str) -> list[str]:
    ro = Rollout(segmenter, image, gt, query, "the target", RolloutConfig(), random.Random(0),
                 EnvConfig(max_steps=20))
    rollout_oracle(ro)
    return [s.action for s in ro.steps if s.kind != "terminate"]


def test_synthesis_and_oracle_policy_click_the_same_pixels_when_a_region_is_used_up() -> None:
    image, gt, pred = _stuck_case()
    policy = _policy_clicks(_StuckSegmenter(pred), image, gt, "the square")
    synth = _synthesis_clicks(_StuckSegmenter(pred), image, gt, "the square")
    assert policy == synth
    # the first click on the empty mask, the nine leak pixels (the segmenter ignores them), then the miss
    assert len(policy) == 1 + 9 + 1
    assert all(a.startswith("Negative") for a in policy[1:10]) and policy[10].startswith("Positive")


def test_synthesis_and_oracle_policy_agree_through_a_real_segmenter() -> None:
    for case in synthetic_cases(3, seed=4):
        policy = _policy_clicks(create_segmenter("fake"), case.image, case.gt, case.query)
        synth = _synthesis_clicks(create_segmenter("fake"), case.image, case.gt, case.query)
        assert policy and policy == synth
