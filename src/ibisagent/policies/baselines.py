"""Click-free baselines that read the ground truth once: one prompt, then stop.

* ``gt-box``: the ground truth's tight box as a single box prompt (extended grammar).
* ``center-click``: one positive click at the object pixel nearest the mask's centroid.
"""

from __future__ import annotations

from ibisagent.env import Observation
from ibisagent.masks import bbox, interior_point
from ibisagent.policies.base import BasePolicy, PolicyError, register_policy
from ibisagent.policies.oracle import box_action
from ibisagent.protocol import Action, format_reply, to_normalized

__all__ = ["CenterClickPolicy", "GTBoxPolicy"]


class _OneShot(BasePolicy):
    requires_gt = True

    def _first(self, obs: Observation) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def act(self, obs: Observation) -> str:
        if self.gt is None or not self.gt.any():
            raise PolicyError(f"{self.name} needs a non-empty ground-truth mask")
        if obs.step == 0:
            return self._first(obs)
        return format_reply(Action.terminate(), "One prompt was placed; this baseline stops after it.",
                            "Single-prompt baseline finished.")


class GTBoxPolicy(_OneShot):
    """Ground-truth box, one segmenter call."""

    name = "gt-box"
    grammar = "extended"

    def _first(self, obs: Observation) -> str:
        assert self.gt is not None
        b = bbox(self.gt)
        assert b is not None
        return format_reply(box_action(b, obs.width, obs.height), "Box around the ground-truth object.")


class CenterClickPolicy(_OneShot):
    """One positive click at the centroid-nearest object pixel."""

    name = "center-click"
    grammar = "reference"

    def _first(self, obs: Observation) -> str:
        assert self.gt is not None
        p = interior_point(self.gt)
        assert p is not None
        act = Action.positive(to_normalized(p[0], obs.width), to_normalized(p[1], obs.height))
        return format_reply(act, "Positive click at the object's centre.")


@register_policy("gt-box", "baseline: the ground-truth box as one prompt (needs the ground truth)")
def _make_gt_box(**cfg) -> GTBoxPolicy:
    return GTBoxPolicy(**cfg)


@register_policy("center-click", "baseline: one positive click at the object's centre (needs the ground truth)")
def _make_center(**cfg) -> CenterClickPolicy:
    return CenterClickPolicy(**cfg)
