"""The oracle annotator (reference click simulator) and its box-first variant.

The click rule is :func:`ibisagent.oracle_click.next_click` (shared with trajectory synthesis and policy training).
Stop (Terminate) once IoU >= ``iou_threshold`` (default 0.8), or when no error pixel is left to click (trajectory
synthesis instead ends such an episode without a Terminate: ``when_exhausted="raise"``).
"""

from __future__ import annotations

import random

import numpy as np

from ibisagent.env import Observation
from ibisagent.masks import bbox, iou
from ibisagent.oracle_click import CLICK_RULES, OracleClick, next_click
from ibisagent.policies.base import BasePolicy, PolicyError, register_policy
from ibisagent.protocol import Action, format_reply, to_normalized
from ibisagent.reasoning import describe_box, describe_click, describe_stop

__all__ = ["OracleClick", "OracleExhausted", "OraclePolicy", "jittered_box", "next_click"]


class OracleExhausted(PolicyError):
    """No error pixel is left to click below the threshold (raised with ``when_exhausted="raise"``)."""


def jittered_box(gt: np.ndarray, jitter: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The ground truth's tight box with each side moved by up to ``jitter`` x the box size (clipped to the image)."""
    b = bbox(gt)
    if b is None:
        raise ValueError("cannot make a box from an empty mask")
    x1, y1, x2, y2 = b
    h, w = gt.shape
    bw, bh = x2 - x1 + 1, y2 - y1 + 1
    if jitter > 0:
        d = rng.uniform(-jitter, jitter, size=4) * np.array([bw, bh, bw, bh])
        x1, y1, x2, y2 = (int(round(v)) for v in (x1 + d[0], y1 + d[1], x2 + d[2], y2 + d[3]))
    x1, x2 = sorted((min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)))
    y1, y2 = sorted((min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)))
    if x2 == x1:
        x2 = min(x1 + 1, w - 1) if x1 < w - 1 else x1
        x1 = x2 - 1
    if y2 == y1:
        y2 = min(y1 + 1, h - 1) if y1 < h - 1 else y1
        y1 = y2 - 1
    return x1, y1, x2, y2


def box_action(box: tuple[int, int, int, int], width: int, height: int) -> Action:
    """A pixel box (inclusive corners) as a normalized protocol action that maps back to the same pixels."""
    x1, y1, x2, y2 = box
    return Action.make_box(to_normalized(x1, width), to_normalized(y1, height),
                           to_normalized(x2, width), to_normalized(y2, height))


class OraclePolicy(BasePolicy):
    """Reference distance-transform clicker; needs the ground-truth mask."""

    name = "oracle"
    requires_gt = True

    def __init__(self, iou_threshold: float = 0.8, first_action: str = "click", box_jitter: float = 0.0,
                 seed: int = 0, target: str | None = None, *, when_exhausted: str = "terminate",
                 click_rule: str = "ours") -> None:
        """``click_rule="release"`` clicks by the release's rule (:func:`ibisagent.oracle_click.next_click`);
        ``when_exhausted="raise"`` raises :class:`OracleExhausted` where the oracle would otherwise Terminate below
        the threshold (no error pixel left to click)."""
        super().__init__()
        if click_rule not in CLICK_RULES:
            raise ValueError(f"click_rule must be one of {', '.join(CLICK_RULES)}, got {click_rule!r}")
        self.click_rule = click_rule
        if first_action not in ("click", "box"):
            raise ValueError("first_action must be 'click' or 'box'")
        if when_exhausted not in ("terminate", "raise"):
            raise ValueError("when_exhausted must be 'terminate' or 'raise'")
        self.when_exhausted = when_exhausted
        self.iou_threshold = float(iou_threshold)
        self.first_action = first_action
        self.box_jitter = float(box_jitter)
        self.seed = seed
        self.grammar = "extended" if first_action == "box" else "reference"
        self._target = target
        self._rng = random.Random(seed)
        self._nrng = np.random.default_rng(seed)

    def use_streams(self, rng: random.Random, np_rng: np.random.Generator) -> OraclePolicy:
        """Draw reasoning text from ``rng`` and box jitter from ``np_rng`` instead of the generators seeded with
        ``seed``, so a caller that also draws from them (trajectory synthesis) keeps one stream. Returns self."""
        self._rng, self._nrng = rng, np_rng
        return self

    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None:
        super().begin_episode(image=image, query=query, gt=gt)
        if self.gt is not None and not self.gt.any():
            raise PolicyError("the ground-truth mask is empty: the oracle has nothing to segment")

    def target_name(self) -> str:
        return self._target or _target_from_query(self.query)

    def reached(self, mask: np.ndarray | None) -> bool:
        """Whether ``mask`` is good enough to stop (IoU with the ground truth >= the threshold)."""
        assert self.gt is not None, "begin_episode must be called with gt"
        return mask is not None and iou(mask, self.gt) >= self.iou_threshold

    def stop_reply(self, mask: np.ndarray | None) -> str:
        """A Terminate reply with grounded reasoning about ``mask``."""
        think, answer = describe_stop(mask=mask, target=self.target_name(), rng=self._rng)
        return format_reply(Action.terminate(), think, answer)

    def act(self, obs: Observation) -> str:
        assert self.gt is not None, "begin_episode must be called with gt"
        gt = self.gt
        h, w = gt.shape
        target = self.target_name()
        pred = obs.mask
        if self.reached(pred):
            return self.stop_reply(pred)
        if pred is None and self.first_action == "box":
            box = jittered_box(gt, self.box_jitter, self._nrng)
            return format_reply(box_action(box, w, h), describe_box(box=box, width=w, height=h, target=target,
                                                                     rng=self._rng))
        click = next_click(pred, gt, avoid=obs.points, rule=self.click_rule)
        if click is None:
            if self.when_exhausted == "raise":
                raise OracleExhausted("no error region left that has not been clicked")
            return self.stop_reply(pred)
        x, y = to_normalized(click.x, w), to_normalized(click.y, h)
        action = Action.positive(x, y) if click.positive else Action.negative(x, y)
        think = describe_click(positive=click.positive, x=click.x, y=click.y, width=w, height=h, target=target,
                               region=click.region, mask=pred, rng=self._rng)
        return format_reply(action, think)


def _target_from_query(query: str) -> str:
    """A short name of the target from a query like 'the polyp in this colonoscopy video frame'."""
    q = " ".join(query.strip().split())
    for sep in (" in this ", " in the ", " on this ", " of this "):
        if sep in q:
            q = q.split(sep)[0]
            break
    return q or "the target"


@register_policy("oracle", "reference distance-transform clicker (needs the ground-truth mask)")
def _make_oracle(**cfg) -> OraclePolicy:
    return OraclePolicy(**cfg)


@register_policy("oracle-box", "box-first oracle: ground-truth box (optional jitter), then corrective clicks")
def _make_oracle_box(**cfg) -> OraclePolicy:
    cfg.setdefault("first_action", "box")
    return OraclePolicy(**cfg)
