"""The medical interactive-segmentation challenge protocol (``--protocol box+5clicks``).

As in the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image Segmentation" (public
evaluation script ``CVPR25_iter_eval.py``), applied to 2D images:

1. The first prediction comes from the ground truth's tight bounding box.
2. Then 5 refinement clicks, each with the previous prediction fed back (our session passes the previous
   logits) and all earlier prompts kept. The challenge clicker places a click at the centre of the *largest
   connected error component* (error = prediction != ground truth, 8-connectivity in 2D, the analogue of the
   26-connectivity used in 3D): the component pixel with the largest Euclidean distance to the component's border
   (the image edge counts as border); ties are broken by a fixed-seed (42) uniform draw among the maxima. The
   click is positive where the ground truth is set (under-segmentation), negative otherwise. A perfect prediction
   gets no click (the prediction stays).
3. Metrics per case over the 6 predictions (box + 5 clicks): DSC and NSD (:func:`challenge_nsd`: the challenge's
   surfel-area-weighted NSD, :func:`ibisagent.masks.nsd`, at tolerance 2 in spacing units: 2 mm on volumes, 2 px
   on our 2D images, which carry no pixel spacing; NSD is set to 0 when DSC <= 0.2, as the challenge does). ``DSC_AUC`` / ``NSD_AUC`` are the trapezoidal areas under the metric
   over the 5 click predictions at unit spacing (the challenge leaves the box prediction out of the AUC because
   the box prompt is optional there), so they range 0..4. ``DSC_Final`` / ``NSD_Final`` are the values after the
   last click; ``seconds_per_interaction`` is the case's total time (encoder + decoder + policy) / 6.

Any policy can supply the clicks after the box (``BoxFirstPolicy`` wraps it); the default is
:class:`ChallengeClicker`. A policy that stops before 5 clicks keeps its last prediction for the remaining steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ibisagent.env import Observation
from ibisagent.masks import bbox, nsd
from ibisagent.oracle_click import challenge_click
from ibisagent.policies.base import BasePolicy, Policy, PolicyError, register_policy
from ibisagent.policies.oracle import box_action
from ibisagent.protocol import Action, format_reply, to_normalized

from .metrics import curve_auc, pad_curve

__all__ = [
    "CHALLENGE_CLICKS",
    "CHALLENGE_PROTOCOL",
    "NSD_MIN_DSC",
    "NSD_TOLERANCE",
    "BoxFirstPolicy",
    "ChallengeClicker",
    "challenge_click",
    "challenge_metrics",
    "challenge_nsd",
]

CHALLENGE_PROTOCOL = "box+5clicks"
#: refinement clicks after the box
CHALLENGE_CLICKS = 5
#: NSD is only computed when DSC exceeds this (else 0), as in the challenge script
NSD_MIN_DSC = 0.2
#: the challenge's NSD tolerance (2 mm with the volume's spacing; 2 px on 2D images without a spacing)
NSD_TOLERANCE = 2.0


class ChallengeClicker(BasePolicy):
    """Challenge click simulator: ground-truth box first, then clicks at the centre of the largest error component.

    It never stops on its own before ``max_clicks`` clicks unless the prediction is perfect.
    """

    name = "challenge"
    requires_gt = True
    grammar = "extended"

    def __init__(self, max_clicks: int = CHALLENGE_CLICKS) -> None:
        super().__init__()
        self.max_clicks = int(max_clicks)
        self._clicks = 0

    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None:
        super().begin_episode(image=image, query=query, gt=gt)
        if self.gt is None or not self.gt.any():
            raise PolicyError("the challenge protocol needs a non-empty ground-truth mask")
        self._clicks = 0

    def act(self, obs: Observation) -> str:
        assert self.gt is not None
        if obs.mask is None and obs.box is None:
            return gt_box_reply(self.gt)
        if self._clicks >= self.max_clicks:
            return format_reply(Action.terminate(), "All refinement clicks are used.", "Challenge protocol done.")
        click = challenge_click(obs.mask, self.gt)
        if click is None:
            return format_reply(Action.terminate(), "The prediction matches the ground truth.", "No error left.")
        x, y, positive = click
        h, w = self.gt.shape
        nx, ny = to_normalized(x, w), to_normalized(y, h)
        self._clicks += 1
        action = Action.positive(nx, ny) if positive else Action.negative(nx, ny)
        where = "missed object" if positive else "wrongly included background"
        return format_reply(action, f"Click at the centre of the largest error region ({where}).")


def gt_box_reply(gt: np.ndarray) -> str:
    """A reply carrying the ground truth's tight box as a Box action."""
    b = bbox(gt)
    if b is None:
        raise PolicyError("the ground-truth mask is empty: no box can be drawn")
    h, w = np.asarray(gt).shape
    return format_reply(box_action(b, w, h), "Box around the ground-truth object (challenge protocol).")


class BoxFirstPolicy(BasePolicy):
    """Wraps any policy: the first turn is the ground-truth box, later turns come from ``inner``."""

    requires_gt = True
    grammar = "extended"

    def __init__(self, inner: Policy) -> None:
        super().__init__()
        self.inner = inner
        self.name = f"box-first({getattr(inner, 'name', type(inner).__name__)})"

    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None:
        super().begin_episode(image=image, query=query, gt=gt)
        if self.gt is None or not self.gt.any():
            raise PolicyError("the challenge protocol needs a non-empty ground-truth mask")
        self.inner.begin_episode(image=image, query=query, gt=gt)

    def act(self, obs: Observation) -> str:
        assert self.gt is not None
        if obs.mask is None and obs.box is None:
            return gt_box_reply(self.gt)
        return self.inner.act(obs)


def challenge_nsd(pred: np.ndarray, gt: np.ndarray, dsc: float, tolerance: float = NSD_TOLERANCE,
                  spacing: Sequence[float] | None = None) -> float:
    """The NSD the challenge script reports for one prediction with Dice ``dsc``: :func:`ibisagent.masks.nsd`
    (surfel-area weighted) when ``dsc`` exceeds :data:`NSD_MIN_DSC`, else 0."""
    return nsd(pred, gt, tolerance=tolerance, spacing=spacing) if dsc > NSD_MIN_DSC else 0.0


def challenge_metrics(
    dsc_curve: Sequence[float],
    nsd_curve: Sequence[float],
    total_seconds: float,
    n_clicks: int = CHALLENGE_CLICKS,
) -> dict[str, Any]:
    """The challenge's per-case numbers from the DSC/NSD after each interaction (box first, then clicks).

    Curves shorter than ``1 + n_clicks`` are padded with their last value (a policy that stopped early keeps its
    prediction); an empty curve counts as 0.
    """
    n = 1 + n_clicks
    dsc = pad_curve(dsc_curve, n)
    nsd = pad_curve(nsd_curve, n)
    return {
        "dsc_auc": curve_auc(dsc[1:]),
        "nsd_auc": curve_auc(nsd[1:]),
        "dsc_final": dsc[-1],
        "nsd_final": nsd[-1],
        "seconds_per_interaction": float(total_seconds) / n,
        "dsc_curve": dsc,
        "nsd_curve": nsd,
    }


@register_policy("challenge", "challenge clicker: ground-truth box, then clicks at the centre of the largest error")
def _make_challenge(**cfg: Any) -> ChallengeClicker:
    return ChallengeClicker(**cfg)
