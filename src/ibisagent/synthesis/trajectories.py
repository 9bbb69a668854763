"""Trajectory records and the rollout engine: oracle (distance-transform) and box-first trajectories.

A trajectory is one case rolled out through a real segmenter: every step keeps the state the action was chosen on
(clicks and labels in pixels, the active box, the previous mask as RLE, IoU before), the full reply (grounded
reasoning + action in the reference grammar), the action line and the IoU after it. The episode ends with
Terminate once IoU >= ``iou_threshold`` or when ``max_steps`` turns are used up (then the case does not reach the
threshold and the runner records it as skipped).

Replaying a trajectory's replies through :class:`ibisagent.env.SegmentationEnv` with the same segmenter reproduces
the recorded masks (coordinates round-trip exactly through the 4-decimal normalized text).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ibisagent.episode import StopRules
from ibisagent.masks import iou, rle_encode
from ibisagent.oracle_click import next_click
from ibisagent.policies.oracle import _target_from_query, box_action, jittered_box
from ibisagent.protocol import Action, format_reply, parse_reply, to_normalized
from ibisagent.reasoning import describe_box, describe_click, describe_stop
from ibisagent.segmenters.base import Segmenter
from ibisagent.session import Session

__all__ = [
    "ROLES",
    "VARIANTS",
    "RolloutConfig",
    "Rollout",
    "StepState",
    "Trajectory",
    "TrajectoryStep",
    "UnreachableError",
    "rollout_box",
    "rollout_oracle",
    "target_name",
    "variant_seed",
]

#: trajectory variants the synthesizer knows
VARIANTS = ("oracle", "box", "reflective", "box-reflective", "lookahead")
#: step roles: ordinary step, the deliberate error, the step that corrects it, the final Terminate
ROLES = ("normal", "error", "correction", "stop")


class UnreachableError(RuntimeError):
    """The rollout cannot go on (no error region left to click, or no valid variant step)."""


@dataclass(frozen=True)
class RolloutConfig:
    """Episode rules for synthesis. The stop rules are the environment's (:attr:`rules`, run by
    :class:`~ibisagent.episode.StopTracker`); ``iou_threshold`` is when the oracle chooses to Terminate."""

    iou_threshold: float = 0.8
    max_steps: int = 20  # turns, the final Terminate included (as the environment counts)
    box_jitter: float = 0.1  # box-first variants: each side moved by up to this fraction of the box size
    lookahead_candidates: int = 8
    reflective_max_error_step: int = 2  # the deliberate error happens at a turn index in [0, this]

    @property
    def rules(self) -> StopRules:
        """The environment's stop rules with this step budget (``EnvConfig(max_steps=...).rules``)."""
        return StopRules(max_steps=self.max_steps)


@dataclass
class StepState:
    """The state an action was chosen on. Pixel coordinates (x = column, y = row)."""

    clicks: list[list[float]]
    labels: list[int]
    box: list[float] | None
    prev_mask_rle: dict | None
    iou_before: float


@dataclass
class TrajectoryStep:
    step: int  # 1-based turn number
    state: StepState
    reply: str
    action: str
    kind: str  # positive / negative / box / terminate
    iou_after: float
    role: str = "normal"
    note: str | None = None  # error kind for error/correction steps

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["iou_after"] = round(self.iou_after, 6)
        d["state"]["iou_before"] = round(self.state.iou_before, 6)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrajectoryStep:
        return cls(**{**d, "state": StepState(**d["state"])})


@dataclass
class Trajectory:
    """One rolled-out case."""

    id: str
    case_id: str
    variant: str
    query: str
    target: str
    width: int
    height: int
    grammar: str
    segmenter: str
    steps: list[TrajectoryStep] = field(default_factory=list)
    final_iou: float = 0.0
    reached: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_interactions(self) -> int:
        return sum(1 for s in self.steps if s.kind != "terminate")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "case_id": self.case_id, "variant": self.variant, "query": self.query,
            "target": self.target, "width": self.width, "height": self.height, "grammar": self.grammar,
            "segmenter": self.segmenter, "final_iou": round(self.final_iou, 6), "reached": self.reached,
            "n_steps": len(self.steps), "n_interactions": self.n_interactions, **self.meta,
            "steps": [s.to_json() for s in self.steps],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Trajectory:
        known = {"id", "case_id", "variant", "query", "target", "width", "height", "grammar", "segmenter",
                 "final_iou", "reached", "steps"}
        meta = {k: v for k, v in d.items() if k not in known | {"n_steps", "n_interactions"}}
        return cls(id=d["id"], case_id=d["case_id"], variant=d["variant"], query=d["query"], target=d["target"],
                   width=d["width"], height=d["height"], grammar=d["grammar"], segmenter=d["segmenter"],
                   steps=[TrajectoryStep.from_json(s) for s in d["steps"]], final_iou=d["final_iou"],
                   reached=d["reached"], meta=meta)


def variant_seed(case_id: str, variant: str, seed: int) -> int:
    """A seed that depends only on the case, the variant and the run seed (never on worker order)."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{variant}:{case_id}".encode()).digest()[:8], "big")


def target_name(query: str, obj: str = "") -> str:
    """Short name of the target for reasoning text ('the polyp'), from the case's object or its query."""
    if obj.strip():
        o = obj.strip()
        return o if o.lower().startswith(("the ", "a ", "an ", "all ")) else f"the {o}"
    return _target_from_query(query)


# ------------------------------------------------------------------------------------------------------------------
# Rollout engine
# ------------------------------------------------------------------------------------------------------------------

class Rollout:
    """A session on one image plus the ground truth; records a step per applied action. Every step goes through the
    environment's stop rules (:class:`~ibisagent.episode.StopTracker`), so a trajectory ends where replaying it
    through :class:`~ibisagent.env.SegmentationEnv` would: ``stop_reason`` is set once they end it."""

    def __init__(self, segmenter: Segmenter, image: np.ndarray, gt: np.ndarray, query: str, target: str,
                 config: RolloutConfig, rng: random.Random) -> None:
        self.session = Session(segmenter)
        self.session.set_image(image)
        self.gt = np.asarray(gt).astype(bool)
        self.query = query
        self.target = target
        self.config = config
        self.rng = rng
        self.np_rng = np.random.default_rng(rng.getrandbits(63))
        self.steps: list[TrajectoryStep] = []
        self.tracker = config.rules.tracker()
        self.stop_reason: str | None = None

    # --- state ------------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.gt.shape  # type: ignore[return-value]

    @property
    def mask(self) -> np.ndarray | None:
        return self.session.mask

    @property
    def current_mask(self) -> np.ndarray:
        m = self.session.mask
        return np.zeros_like(self.gt) if m is None else m

    @property
    def iou(self) -> float:
        return iou(self.current_mask, self.gt)

    @property
    def reached(self) -> bool:
        return self.session.mask is not None and self.iou >= self.config.iou_threshold

    @property
    def clicked(self) -> set[tuple[int, int]]:
        """Pixels clicked so far (never clicked twice, so no action repeats)."""
        return {(int(x), int(y)) for x, y in self.session.points.tolist()}

    @property
    def turns_left(self) -> int:
        return self.tracker.turns_left

    def state(self) -> StepState:
        s = self.session
        m = s.mask
        return StepState(
            clicks=[[float(x), float(y)] for x, y in s.points.tolist()],
            labels=[int(v) for v in s.labels.tolist()],
            box=None if s.box is None else [float(v) for v in s.box],
            prev_mask_rle=None if m is None else rle_encode(m),
            iou_before=self.iou,
        )

    # --- actions ----------------------------------------------------------------------------------------------
    def apply(self, action: Action, reasoning: str, role: str = "normal", note: str | None = None,
              answer: str | None = None) -> TrajectoryStep:
        """Apply an action through the segmenter (and the stop rules) and record the step."""
        if self.stop_reason is not None:
            raise UnreachableError(f"the episode is over ({self.stop_reason})")
        state = self.state()
        reply = format_reply(action, reasoning, answer)
        reading = self.tracker.read(reply, _parse_extended)
        if reading.needs_apply:
            self.session.apply(action)
        self.stop_reason = self.tracker.close(reading)
        step = TrajectoryStep(step=len(self.steps) + 1, state=state, reply=reply, action=action.text(),
                              kind=action.kind.value, iou_after=self.iou, role=role, note=note)
        self.steps.append(step)
        return step

    def undo(self) -> None:
        """Take back the last applied step (used to try candidates)."""
        last = self.steps.pop()
        self.tracker.undo()
        self.stop_reason = None
        if last.kind != "terminate":
            self.session.undo()

    def click(self, positive: bool, x: int, y: int, reasoning: str, role: str = "normal",
              note: str | None = None) -> TrajectoryStep:
        h, w = self.shape
        nx, ny = to_normalized(x, w), to_normalized(y, h)
        return self.apply(Action.positive(nx, ny) if positive else Action.negative(nx, ny), reasoning, role, note)

    def box(self, box: tuple[int, int, int, int], reasoning: str, role: str = "normal",
            note: str | None = None) -> TrajectoryStep:
        h, w = self.shape
        return self.apply(box_action(box, w, h), reasoning, role, note)

    def oracle_step(self, role: str = "normal", note: str | None = None, reasoning: str | None = None
                    ) -> TrajectoryStep:
        """One oracle click (:func:`ibisagent.oracle_click.next_click`) with grounded reasoning."""
        pick = next_click(self.mask, self.gt, self.clicked)
        if pick is None:
            raise UnreachableError("no error region left that has not been clicked")
        h, w = self.shape
        think = reasoning or describe_click(positive=pick.positive, x=pick.x, y=pick.y, width=w, height=h,
                                            target=self.target, region=pick.region, mask=self.mask, rng=self.rng)
        return self.click(pick.positive, pick.x, pick.y, think, role, note)

    def stop(self) -> TrajectoryStep:
        think, answer = describe_stop(mask=self.mask, target=self.target, rng=self.rng)
        return self.apply(Action.terminate(), think, "stop", answer=answer)

    def finish(self, step_fn: Any = None) -> None:
        """Continue with ``step_fn`` (default: oracle clicks) until the threshold (then Terminate) or max turns."""
        step_fn = step_fn or self.oracle_step
        while self.turns_left > 0 and self.stop_reason is None:
            if self.reached:
                self.stop()
                return
            if self.turns_left == 1:
                return  # the last turn is kept for Terminate; not reached
            try:
                step_fn()
            except UnreachableError:
                return

    def trajectory(self, *, traj_id: str, case_id: str, variant: str, grammar: str, segmenter: str,
                   meta: dict[str, Any] | None = None) -> Trajectory:
        h, w = self.shape
        return Trajectory(id=traj_id, case_id=case_id, variant=variant, query=self.query, target=self.target,
                          width=w, height=h, grammar=grammar, segmenter=segmenter, steps=list(self.steps),
                          final_iou=self.iou, reached=bool(self.steps and self.steps[-1].kind == "terminate"),
                          meta=dict(meta or {}))


def _parse_extended(reply: str) -> Action:
    return parse_reply(reply, "extended").action


# ------------------------------------------------------------------------------------------------------------------
# Plain variants
# ------------------------------------------------------------------------------------------------------------------

def rollout_oracle(ro: Rollout) -> None:
    """Distance-transform clicks until the threshold, then Terminate."""
    ro.finish()


def rollout_box(ro: Rollout) -> None:
    """Box-first: the ground truth's box with realistic jitter, then distance-transform clicks."""
    h, w = ro.shape
    box = jittered_box(ro.gt, ro.config.box_jitter, ro.np_rng)
    ro.box(box, describe_box(box=box, width=w, height=h, target=ro.target, rng=ro.rng))
    ro.finish()
