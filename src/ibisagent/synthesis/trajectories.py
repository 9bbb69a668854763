"""Trajectory records and the rollout engine: oracle (distance-transform) and box-first trajectories.

A trajectory is one case rolled out through a real segmenter: every step keeps the state the action was chosen on
(clicks and labels in pixels, the active box, the previous mask as RLE, IoU before), the full reply (grounded
reasoning + action in the reference grammar), the action line and the IoU after it. The episode ends with
Terminate once IoU >= ``iou_threshold`` or when ``max_steps`` turns are used up (then the case does not reach the
threshold and the runner records it as skipped).

Every episode runs in a :class:`~ibisagent.env.SegmentationEnv` and is played by the one episode driver
(:func:`ibisagent.episode.drive`) with :class:`ScriptedOracle`, so SFT trajectories follow evaluation's stop rules and
guards. Replaying a trajectory's replies through :class:`ibisagent.env.SegmentationEnv` with the same segmenter reproduces
the recorded masks (coordinates round-trip exactly through the 4-decimal normalized text).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ibisagent.env import EnvConfig, Observation, SegmentationEnv
from ibisagent.episode import drive
from ibisagent.masks import iou, rle_encode
from ibisagent.oracle_click import next_click
from ibisagent.policies.oracle import OracleExhausted, OraclePolicy, _target_from_query, box_action
from ibisagent.protocol import Action, ActionKind, format_reply, to_normalized
from ibisagent.reasoning import describe_click
from ibisagent.segmenters.base import Segmenter, SegmenterError
from ibisagent.session import Session

__all__ = [
    "ROLES",
    "VARIANTS",
    "RolloutConfig",
    "Rollout",
    "ScriptedOracle",
    "StepState",
    "Trajectory",
    "TrajectoryStep",
    "UnreachableError",
    "click_action",
    "rollout_box",
    "rollout_oracle",
    "rollout_release",
    "target_name",
    "variant_seed",
]

#: trajectory variants the synthesizer knows
VARIANTS = ("oracle", "box", "reflective", "box-reflective", "lookahead", "release")
#: step roles: ordinary step, the deliberate error, the step that corrects it, the final Terminate
ROLES = ("normal", "error", "correction", "stop")


class UnreachableError(RuntimeError):
    """The rollout cannot go on (no error region left to click, or no valid variant step)."""


@dataclass(frozen=True)
class RolloutConfig:
    """How the synthesis oracle plays. The episode's stop rules and step budget are the environment's
    (:class:`~ibisagent.env.EnvConfig`, passed to :class:`Rollout`); ``iou_threshold`` is when the oracle chooses
    to Terminate."""

    iou_threshold: float = 0.8
    box_jitter: float = 0.1  # box-first variants: each side moved by up to this fraction of the box size
    lookahead_candidates: int = 8
    reflective_max_error_step: int = 2  # the deliberate error happens at a turn index in [0, this]


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

#: a variant's own choice of the next reply on an observation (e.g. lookahead); None = the oracle's click
StepFn = Callable[[Observation], str]


class _OutOfTurns(Exception):
    """The last turn is kept for Terminate and the threshold is not reached: the episode ends unreached."""


class ScriptedOracle:
    """The synthesis policy: the oracle policy (:class:`~ibisagent.policies.oracle.OraclePolicy`, the one oracle
    click) with the rollout's random streams, played by :func:`ibisagent.episode.drive`. It Terminates once IoU >=
    ``iou_threshold``; below it, it gives up (the episode ends without Terminate, unreached) when only the last turn
    is left or no error pixel is left to click. ``step`` replaces the oracle's click (the lookahead variant);
    ``first_action="box"`` is the box-first oracle (a jittered ground-truth box on the empty mask); ``click_rule``
    the oracle's click rule (:data:`ibisagent.oracle_click.CLICK_RULES`)."""

    def __init__(self, ro: Rollout, step: StepFn | None = None, first_action: str = "click",
                 click_rule: str = "ours") -> None:
        self.ro = ro
        self.step = step
        self.oracle = OraclePolicy(ro.config.iou_threshold, first_action, ro.config.box_jitter, target=ro.target,
                                   when_exhausted="raise", click_rule=click_rule).use_streams(ro.rng, ro.np_rng)

    def begin_episode(self, *, image: Any, query: str, gt: Any = None) -> None:
        self.oracle.begin_episode(image=image, query=query, gt=gt)

    def act(self, obs: Observation) -> str:
        if self.oracle.reached(obs.mask):
            return self.oracle.stop_reply(obs.mask)
        if self.ro.env.config.max_steps - obs.step <= 1:
            raise _OutOfTurns
        return self.step(obs) if self.step is not None else self.oracle.act(obs)


class Rollout:
    """One synthesis episode of a case: a :class:`~ibisagent.env.SegmentationEnv` (its session, stop rules and
    guards, the same as evaluation's) plus the ground truth, recording a step per turn. Variants that search (an
    error step and its correction, a box fix) step candidates through the env and take them back with
    :meth:`undo`; :meth:`finish` plays the rest of the episode through :func:`ibisagent.episode.drive` with the
    :class:`ScriptedOracle`. ``stop_reason`` is set once the env's stop rules end the episode."""

    def __init__(self, segmenter: Segmenter, image: np.ndarray, gt: np.ndarray, query: str, target: str,
                 config: RolloutConfig, rng: random.Random, env_config: EnvConfig | None = None) -> None:
        self.env = SegmentationEnv(segmenter, env_config or EnvConfig(grammar="extended"))
        self.image = image
        self.query = query
        self.env.reset(image, query, gt)
        self.gt: np.ndarray = self.env.gt  # type: ignore[assignment]
        self.target = target
        self.config = config
        self.rng = rng
        self.np_rng = np.random.default_rng(rng.getrandbits(63))
        self.steps: list[TrajectoryStep] = []
        self.stop_reason: str | None = None

    # --- state ------------------------------------------------------------------------------------------------
    @property
    def session(self) -> Session:
        return self.env.session

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
        return self.env.config.max_steps - self.env.observation.step

    # --- actions ----------------------------------------------------------------------------------------------
    def _record(self, obs: Observation, reply: str, info: dict[str, Any], role: str, note: str | None
                ) -> TrajectoryStep:
        """The step of one env turn (``obs`` the observation it answered); a segmenter that rejected the action
        ends the case (:class:`~ibisagent.segmenters.base.SegmenterError`)."""
        if info.get("segmenter_error"):
            raise SegmenterError(info["error"])
        action: Action = info["action"]
        m = obs.mask
        state = StepState(clicks=[[float(x), float(y)] for x, y in obs.points.tolist()],
                          labels=[int(v) for v in obs.labels.tolist()],
                          box=None if obs.box is None else [float(v) for v in obs.box],
                          prev_mask_rle=None if m is None else rle_encode(m), iou_before=float(info["iou_before"]))
        if role == "normal" and action.kind is ActionKind.TERMINATE:
            role = "stop"
        self.stop_reason = info["stop_reason"]
        step = TrajectoryStep(step=len(self.steps) + 1, state=state, reply=reply, action=action.text(),
                              kind=action.kind.value, iou_after=float(info["iou"]), role=role, note=note)
        self.steps.append(step)
        return step

    def apply(self, action: Action, reasoning: str, role: str = "normal", note: str | None = None,
              answer: str | None = None) -> TrajectoryStep:
        """Step an action through the env (segmenter and stop rules) and record the step."""
        if self.stop_reason is not None:
            raise UnreachableError(f"the episode is over ({self.stop_reason})")
        obs = self.env.observation
        reply = format_reply(action, reasoning, answer)
        return self._record(obs, reply, self.env.step(reply).info, role, note)

    def probe(self, action: Action) -> float:
        """The IoU ``action`` would reach from the current state (applied to the session and taken back)."""
        self.session.apply(action)
        try:
            return self.iou
        finally:
            self.session.undo()

    def undo(self) -> None:
        """Take back the last recorded step (used to try candidates)."""
        self.steps.pop()
        self.env.undo()
        self.stop_reason = None

    def click(self, positive: bool, x: int, y: int, reasoning: str, role: str = "normal",
              note: str | None = None) -> TrajectoryStep:
        return self.apply(click_action(positive, x, y, *self.shape), reasoning, role, note)

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

    def finish(self, step: StepFn | None = None, first_action: str = "click", click_rule: str = "ours") -> None:
        """Play the rest of the episode through :func:`ibisagent.episode.drive` with the :class:`ScriptedOracle`
        (``step`` replacing its click): to the threshold and Terminate, or until it gives up or the stop rules end
        the episode."""
        if self.stop_reason is not None:
            return
        policy = ScriptedOracle(self, step, first_action, click_rule)
        try:
            for turn in drive(self.env, policy, self.image, self.query, self.gt, resume=True):
                self._record(turn.observation, turn.reply, turn.info, "normal", None)
        except (_OutOfTurns, OracleExhausted, UnreachableError):
            return

    def trajectory(self, *, traj_id: str, case_id: str, variant: str, grammar: str, segmenter: str,
                   meta: dict[str, Any] | None = None) -> Trajectory:
        h, w = self.shape
        return Trajectory(id=traj_id, case_id=case_id, variant=variant, query=self.query, target=self.target,
                          width=w, height=h, grammar=grammar, segmenter=segmenter, steps=list(self.steps),
                          final_iou=self.iou, reached=bool(self.steps and self.steps[-1].kind == "terminate"),
                          meta=dict(meta or {}))


def click_action(positive: bool, x: int, y: int, height: int, width: int) -> Action:
    """A pixel click as a normalized protocol action that maps back to the same pixel."""
    nx, ny = to_normalized(x, width), to_normalized(y, height)
    return Action.positive(nx, ny) if positive else Action.negative(nx, ny)


# ------------------------------------------------------------------------------------------------------------------
# Plain variants
# ------------------------------------------------------------------------------------------------------------------

def rollout_oracle(ro: Rollout) -> None:
    """Distance-transform clicks until the threshold, then Terminate."""
    ro.finish()


def rollout_box(ro: Rollout) -> None:
    """Box-first: the ground truth's box with realistic jitter (the box-first oracle's first action), then
    distance-transform clicks."""
    ro.finish(first_action="box")


def rollout_release(ro: Rollout) -> None:
    """The release's trajectory generator (``trajectory_gen/process_img.py``, our reading): its click rule
    (``next_click(rule="release")``: OpenCV distance transform, repeats allowed), the IoU threshold checked before
    every click, at most the run's ``max_steps`` clicks. Its files have no Terminate; ours ends with one when the
    threshold is reached (``export --format release-trajectories`` leaves it out). The runner gives this variant's
    environment one extra turn for that Terminate and no repeat limit (:meth:`SynthesisConfig.env_config`)."""
    ro.finish(click_rule="release")
