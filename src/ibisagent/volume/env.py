"""The volume environment: a 3D episode is :func:`ibisagent.episode.drive` over this env (no second episode loop).

``reset(stack, query, gt)`` -> :class:`VolumeObservation`; ``step(reply)`` parses the reply in the extended grammar
(the volume form, ``Positive Point (x, y, z)``; see :mod:`ibisagent.protocol`), applies it through a
:class:`~ibisagent.volume.session.VolumeSession` and runs the same :class:`~ibisagent.episode.StopTracker` as the 2D
env. A click or box written without a slice index goes to the observation's ``current_slice`` (the slice the policy
was shown: an MLLM prompted with one slice may answer in the 2D form). ``info`` carries what the agent's trace and
the evaluation read: ``mask`` (3D), ``iou`` and ``dice`` (3D, when the ground truth is known), ``score`` (area-weighted
predicted IoU), ``segmenter_s``, ``stop_reason``, ``action``.

The observation for an image-reading (MLLM) policy is :meth:`VolumeObservation.strip`: the current slice's overlay
with ``k`` neighbouring slices on each side, side by side at the same size, each captioned by its index in the
reasoning text rather than drawn (see docs/design.md, "3D episodes").
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ibisagent.episode import ActionParser, StopRules
from ibisagent.masks import dice_3d, iou_3d
from ibisagent.overlay import policy_overlay
from ibisagent.protocol import Action, ActionKind, parse_reply
from ibisagent.segmenters.base import SegmenterError

from .session import VolumeSession
from .stack import SliceStack

__all__ = ["VolumeEnv", "VolumeObservation", "VolumeStepResult"]


@dataclass(frozen=True)
class VolumeObservation:
    """What a volume policy sees at one turn: the stack, the query, the 3D mask (None before the first prompt), the
    per-slice predicted IoU, the prompts so far, and the session (read-only use: slice masks, logits, embeddings)."""

    stack: SliceStack
    query: str
    step: int
    mask: np.ndarray | None
    slice_scores: np.ndarray
    points: np.ndarray  # (N, 3) x, y, z pixels
    labels: np.ndarray  # (N,) 1 / 0
    current_slice: int
    session: VolumeSession = field(repr=False)
    previous_actions: tuple[str, ...] = ()

    @property
    def image(self) -> np.ndarray:
        """The current slice (what ``begin_episode(image=...)`` gets)."""
        return self.stack.image(self.current_slice)

    @property
    def is_first_turn(self) -> bool:
        return self.mask is None

    def slice_overlay(self, z: int) -> np.ndarray:
        m = self.session.slice_mask(z)
        return policy_overlay(self.stack.image(z), m)

    def strip(self, k: int = 2, z: int | None = None) -> tuple[np.ndarray, list[int]]:
        """The overlays of slices ``z - k .. z + k`` (clipped to the volume) side by side, and their indices."""
        z = self.current_slice if z is None else int(z)
        zs = [s for s in range(z - k, z + k + 1) if 0 <= s < self.stack.depth]
        return np.concatenate([self.slice_overlay(s) for s in zs], axis=1), zs


@dataclass(frozen=True)
class VolumeStepResult:
    observation: VolumeObservation
    done: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _volume_parser(reply: str) -> Action:
    return parse_reply(reply, "extended").action


class VolumeEnv:
    """An :class:`ibisagent.episode.EpisodeEnv` over a :class:`VolumeSession`."""

    def __init__(self, session: VolumeSession, rules: StopRules | None = None, *,
                 parser: ActionParser | None = None) -> None:
        self.session = session
        self.rules = rules or StopRules()
        self.parse: ActionParser = parser or _volume_parser
        self._tracker = self.rules.tracker()
        self._query = ""
        self._gt: np.ndarray | None = None
        self._done = True
        self._current = 0
        self._obs: VolumeObservation | None = None

    @property
    def segmenter(self) -> Any:
        return self.session.segmenter

    @property
    def gt(self) -> np.ndarray | None:
        return self._gt

    @property
    def done(self) -> bool:
        return self._done

    @property
    def observation(self) -> VolumeObservation:
        """The current observation (what the next reply answers)."""
        if self._obs is None:
            raise RuntimeError("no episode yet: call reset() first")
        return self._obs

    def reset(self, image: SliceStack, query: str, gt: np.ndarray | None = None) -> VolumeObservation:
        if not isinstance(query, str):
            raise ValueError("query must be a string")
        self.session.set_image(image)
        if gt is not None:
            gt = np.asarray(gt).astype(bool)
            if gt.shape != image.shape:
                raise ValueError(f"ground-truth mask is {gt.shape} but the volume's slice stack is {image.shape} "
                                 "(z, rows, columns; use SliceStack.from_stored for a mask in the volume's layout)")
        self._gt = gt
        self._query = query
        self._done = False
        self._tracker = self.rules.tracker()
        self._current = image.depth // 2
        self._obs = self._observe()
        return self._obs

    def metrics(self) -> tuple[float | None, float | None]:
        """(3D IoU, 3D Dice) of the current mask against the ground truth (None without one)."""
        if self._gt is None:
            return None, None
        m = self.session.mask
        m = np.zeros_like(self._gt) if m is None else m
        return iou_3d(m, self._gt), dice_3d(m, self._gt)

    def step(self, reply: str) -> VolumeStepResult:
        if self._done or self._obs is None:
            raise RuntimeError("episode is over: call reset() first")
        iou_before = self.metrics()[0]
        t0 = time.perf_counter()
        dec0 = self.session.timings.decoder_s + self.session.timings.encoder_s
        reading = self._tracker.read(reply, self.parse)
        info: dict[str, Any] = {"step": self._tracker.step, "raw": reply, "iou_before": iou_before}
        if reading.error is not None:
            info["error"] = reading.error
        apply_error: str | None = None
        action = reading.action
        if action is not None:
            if action.kind is not ActionKind.TERMINATE and action.z is None:
                action = action.on_slice(self._current)
            reading = dataclasses.replace(reading, action=action)
            info["action"] = action
            if reading.needs_apply:
                try:
                    self.session.apply(action)
                    assert action.z is not None
                    self._current = action.z
                except SegmenterError as exc:
                    apply_error = info["error"] = str(exc)
        stop = self._tracker.close(reading, apply_error)
        info["segmenter_s"] = self.session.timings.decoder_s + self.session.timings.encoder_s - dec0
        info["step_s"] = time.perf_counter() - t0
        info["mask"] = self.session.mask
        info["iou"], info["dice"] = self.metrics()
        info["score"] = self.session.score
        self._done = stop is not None
        info["stop_reason"] = stop
        self._obs = self._observe()
        return VolumeStepResult(self._obs, self._done, info)

    def _observe(self) -> VolumeObservation:
        s = self.session
        pts, labs = s.points()
        return VolumeObservation(stack=s.stack, query=self._query, step=self._tracker.step, mask=s.mask,
                                 slice_scores=s.slice_scores, points=pts, labels=labs, current_slice=self._current,
                                 session=s, previous_actions=tuple(self._tracker.actions))
