"""Evaluation of volume episodes (``ibisagent eval --volumes``): the ``is_3d`` rows of a manifest, one 3D episode
each, played by :func:`ibisagent.episode.drive` over :class:`ibisagent.volume.VolumeEnv`.

Per volume (one cases.csv row): 3D Dice and IoU (voxels), NSD (surfel-area weighted, tolerance in mm with the
volume's spacing) and HD95 in mm (:mod:`ibisagent.masks`), the interactions, seconds per volume (``total_s``:
encoder passes, decoding and the policy), encoder seconds, the process's peak resident memory so far
(``peak_rss_mb``, :func:`resource.getrusage`), and for ``--protocol box+5clicks`` the CVPR 2025 3D protocol
(the box on the object's middle slice with its z-range, then 5 clicks at the centre of the largest 3D error
component: ``DSC_AUC``, ``NSD_AUC``, ``DSC_Final``, ``NSD_Final``, as :func:`~ibisagent.evaluation.challenge.
challenge_metrics` computes them for 2D). The 2D policy names map to their volume versions: ``compact`` ->
``compact-3d``, ``oracle`` -> ``oracle-3d``, ``challenge`` -> ``challenge-3d``.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import numpy as np

from ibisagent.episode import StopRules, play
from ibisagent.io.cases import CaseError
from ibisagent.io.manifest import Case
from ibisagent.masks import dice_3d, hd95, iou_3d, nsd, rle_encode
from ibisagent.policies.base import Policy
from ibisagent.segmenters.base import Segmenter
from ibisagent.volume import PropagationConfig, VolumeEnv, VolumeSession, load_volume_stack

from .challenge import CHALLENGE_CLICKS, challenge_metrics, challenge_nsd
from .metrics import noc_measured

__all__ = ["VOLUME_POLICIES", "VolumeRunner", "peak_rss_mb", "volume_policy_name"]

#: 2D policy name -> its volume version (a name not listed is used as given)
VOLUME_POLICIES = {"compact": "compact-3d", "compact-box": "compact-3d", "oracle": "oracle-3d",
                   "challenge": "challenge-3d"}


def volume_policy_name(name: str) -> str:
    return VOLUME_POLICIES.get(name, name)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _r(x: float | None, nd: int = 4) -> float | None:
    if x is None:
        return None
    return x if not np.isfinite(x) else round(float(x), nd)


class VolumeRunner:
    """Plays one volume case with a segmenter and a volume policy (the harness's Runner for ``--volumes``)."""

    def __init__(self, segmenter: Segmenter, policy: Policy, *, challenge: bool, max_steps: int,
                 nsd_tolerance: float, propagation: PropagationConfig | str | None = None) -> None:
        self.segmenter = segmenter
        self.policy = policy
        self.challenge = challenge
        self.nsd_tolerance = float(nsd_tolerance)
        steps = 1 + CHALLENGE_CLICKS if challenge else int(max_steps)
        self.max_interactions = steps
        self.rules = StopRules(max_steps=steps + (1 if challenge else 0), max_repeats=steps + 1 if challenge else 3)
        self.propagation = propagation
        if isinstance(propagation, str):  # fail at start, not on every case: the backend must have a video predictor
            VolumeSession(segmenter, propagation=propagation)

    def run_case(self, case: Case, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        try:
            stack, gt = load_volume_stack(case)
        except CaseError as exc:
            return {**row, "status": "error", "error": str(exc)}, None
        row.update(depth=gt.shape[0], height=gt.shape[1], width=gt.shape[2], area_px=int(gt.sum()))
        try:
            session = VolumeSession(self.segmenter, propagation=self.propagation) \
                if isinstance(self.propagation, str) else VolumeSession(self.segmenter, self.propagation)
            env = VolumeEnv(session, self.rules)
            t0 = time.perf_counter()
            gt_for_policy = gt if getattr(self.policy, "requires_gt", False) else None
            turns = play(env, self.policy, stack, case.query, gt_for_policy)  # type: ignore[arg-type]
            total = time.perf_counter() - t0
            metrics = self._metrics(turns, env, gt, stack.spacing, total)
        except Exception as exc:  # noqa: BLE001 - one broken case must not stop a long run
            return {**row, "status": "error", "error": f"{type(exc).__name__}: {exc}"}, None
        row.update(status="ok", error="", **metrics)
        final = env.session.mask if env.session.mask is not None else np.zeros_like(gt)
        pts, labs = env.session.points()
        pred = {"case_id": case.id, "source": case.source, "shape": list(final.shape),
                "mask_rle": rle_encode(final.reshape(-1, final.shape[2])),  # (Z*H, W): reshape to "shape"
                "points": pts.tolist(), "labels": labs.tolist(), "layout": "z,y,x display slices"}
        return row, pred

    def _metrics(self, turns: list[Any], env: VolumeEnv, gt: np.ndarray, spacing: tuple[float, float, float],
                 total_s: float) -> dict[str, Any]:
        inter = [t for t in turns if t.action is not None and t.action.kind.value != "terminate"
                 and "error" not in t.info]
        masks = [t.info["mask"] for t in inter]
        dice_curve = [dice_3d(m, gt) for m in masks]
        iou_curve = [iou_3d(m, gt) for m in masks]
        final = env.session.mask if env.session.mask is not None else np.zeros_like(gt)
        d = dice_3d(final, gt)
        tim = env.session.timings
        policy_s = float(sum(t.policy_s for t in turns))
        stop = turns[-1].stop_reason if turns else None
        out: dict[str, Any] = {
            "iou": _r(iou_3d(final, gt)), "dice": _r(d), "hd95": _r(hd95(final, gt, spacing=spacing), 3),
            "nsd": _r(nsd(final, gt, tolerance=self.nsd_tolerance, spacing=spacing)),
            "steps": len(turns), "clicks": sum(1 for t in inter if t.action.is_click), "interactions": len(inter),
            "max_interactions": self.max_interactions, "stop_reason": stop or "",
            "encoder_s": _r(tim.encoder_s), "segmenter_s": _r(tim.encoder_s + tim.decoder_s), "policy_s": _r(policy_s),
            "total_s": _r(total_s), "peak_rss_mb": _r(peak_rss_mb(), 1),
            "predicted_iou": _r(getattr(self.policy, "predicted_iou", lambda m: None)(final)),
            "iou_curve": [_r(v) for v in iou_curve], "dice_curve": [_r(v) for v in dice_curve],
        }
        for t in (80, 85, 90):
            out[f"noc_{t}"] = noc_measured(iou_curve, t / 100.0, self.max_interactions, stop)
        if self.challenge:
            nsd_curve = [challenge_nsd(m, gt, dc, tolerance=self.nsd_tolerance, spacing=spacing)
                         for m, dc in zip(masks, dice_curve, strict=True)]
            ch = challenge_metrics(dice_curve, nsd_curve, total_s)
            out.update({k: _r(v) for k, v in ch.items() if not k.endswith("_curve")})
            out["nsd_curve"] = [_r(v) for v in ch["nsd_curve"]]
        return out
