"""The segmentation MDP: state = image + query + current mask overlay (+ optional history); action = one reply in
the protocol grammar; transition = the promptable segmenter.

Data flows one way: image + query -> :class:`Observation` -> policy -> reply text -> :class:`~ibisagent.protocol.Action`
-> :class:`~ibisagent.session.Session` (segmenter) -> mask -> next observation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ibisagent.chat import ChatTurn, render_chat, to_messages
from ibisagent.episode import ActionParser, EpisodeSession, StopReason, StopRules, StopTracker
from ibisagent.masks import as_bool, iou
from ibisagent.overlay import policy_overlay
from ibisagent.prompts import PromptTemplate, load_prompts
from ibisagent.protocol import PARSER_PROFILES, Action, GrammarMode, ParserProfile, parse_reply
from ibisagent.segmenters.base import Segmenter, SegmenterError
from ibisagent.session import Session

__all__ = ["ChatTurn", "EnvConfig", "Observation", "SegmentationEnv", "StepResult", "StopReason"]


@dataclass(frozen=True)
class EnvConfig:
    """Episode rules. Defaults follow the reference release."""

    max_steps: int = 20  # policy turns per episode (the Terminate turn counts)
    max_repeats: int = 3  # stop when the same action text repeats this many times in a row
    history: bool = False  # send all previous turns (True) or only system + current turn (reference default)
    grammar: GrammarMode = "reference"
    prompts: str = "reference"  # built-in template name or a JSON path
    mask_feedback: bool = True
    #: reply parser: "lenient" (ours) or "reference" (the release's rules, see ibisagent.protocol.parse_action)
    parser: ParserProfile = "lenient"
    #: repeat rule "after" the segmenter ran (ours) or "before" it (the release: the stopping repeat is not applied)
    repeat_check: Literal["after", "before"] = "after"

    def __post_init__(self) -> None:
        self.rules  # noqa: B018 - StopRules checks max_steps and max_repeats (whole numbers >= 1)
        if self.parser not in PARSER_PROFILES:
            raise ValueError(f"parser must be one of {', '.join(PARSER_PROFILES)}, got {self.parser!r}")

    @property
    def rules(self) -> StopRules:
        """The stop rules of these settings (run by :class:`~ibisagent.episode.StopTracker`)."""
        return StopRules(max_steps=self.max_steps, max_repeats=self.max_repeats, repeat_check=self.repeat_check)


@dataclass(frozen=True)
class Observation:
    """What a policy sees at one turn. ``overlay`` is the reference observation image (image with the green mask);
    ``mask``/``logits``/``points``/``labels``/``box`` are the same state as data for non-LLM policies."""

    image: np.ndarray
    overlay: np.ndarray
    query: str
    step: int
    mask: np.ndarray | None
    logits: np.ndarray | None
    points: np.ndarray
    labels: np.ndarray
    box: tuple[float, float, float, float] | None
    chat: tuple[ChatTurn, ...]
    grammar: GrammarMode
    previous_actions: tuple[str, ...] = ()

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def is_first_turn(self) -> bool:
        return self.mask is None

    def messages(self) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        """Chat messages in the transformers/OpenAI multimodal layout and the images they refer to, in order
        (:func:`ibisagent.chat.to_messages`)."""
        return to_messages(self.chat)


@dataclass(frozen=True)
class StepResult:
    observation: Observation
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class SegmentationEnv:
    """Gym-like environment around a :class:`Session`.

    ``reset(image, query, gt=None)`` -> Observation; ``step(reply_text)`` -> StepResult with ``info`` holding the
    parsed action, the mask, IoU (when ``gt`` is known), the stop reason and the segmenter time of the step.
    Episodes are played by :func:`ibisagent.episode.drive`; the stop rules are :class:`~ibisagent.episode.StopTracker`'s.

    ``session`` replaces the default :class:`Session` on ``segmenter`` (anything with the session's interface) and
    ``parser`` the grammar's reply parser (``parse_reply(reply, config.grammar, config.parser).action``).
    """

    def __init__(self, segmenter: Segmenter, config: EnvConfig | None = None,
                 prompts: PromptTemplate | None = None, *, session: EpisodeSession | None = None,
                 parser: ActionParser | None = None) -> None:
        self.config = config or EnvConfig()
        self.prompts = prompts or load_prompts(self.config.prompts)
        self.session: Session = (session if session is not None  # type: ignore[assignment]
                                 else Session(segmenter, mask_feedback=self.config.mask_feedback))
        grammar, profile = self.config.grammar, self.config.parser
        self.parse: ActionParser = parser or (lambda reply: parse_reply(reply, grammar, profile).action)
        self._query = ""
        self._gt: np.ndarray | None = None
        self._done = True
        self._tracker: StopTracker = self.config.rules.tracker()
        self._history: list[ChatTurn] = []
        self._obs: Observation | None = None
        self._applied: list[bool] = []  # per turn: whether its action reached the session (for undo)

    @property
    def segmenter(self) -> Segmenter:
        return self.session.segmenter

    @property
    def done(self) -> bool:
        return self._done

    @property
    def gt(self) -> np.ndarray | None:
        return self._gt

    @property
    def observation(self) -> Observation:
        """The current observation (what the next reply answers)."""
        if self._obs is None:
            raise RuntimeError("no episode: call reset() first")
        return self._obs

    def reset(self, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> Observation:
        if not isinstance(query, str):
            raise ValueError("query must be a string")
        img = np.asarray(image)
        self.session.set_image(img)
        if gt is not None:
            gt = as_bool(gt)
            if gt.shape != self.session.shape:
                raise ValueError(f"ground-truth mask is {gt.shape[0]}x{gt.shape[1]} but the image is "
                                 f"{self.session.shape[0]}x{self.session.shape[1]}")
        self._gt = gt
        self._query = query
        self._done = False
        self._tracker = self.config.rules.tracker()
        self._history = []
        self._applied = []
        self._obs = self._observe()
        return self._obs

    def undo(self) -> Observation:
        """Take back the last step, also one that ended the episode (trajectory synthesis tries candidate actions
        and keeps one): the session, the stop rules' count and the history go back one turn."""
        if not self._applied:
            raise RuntimeError("no step to undo")
        if self._applied.pop():
            self.session.undo()
        self._tracker.undo()
        if self.config.history:
            del self._history[-2:]
        self._done = False
        self._obs = self._observe()
        return self._obs

    def current_iou(self) -> float | None:
        if self._gt is None:
            return None
        mask = self.session.mask
        return iou(mask if mask is not None else np.zeros_like(self._gt), self._gt)

    @property
    def _step(self) -> int:
        return self._tracker.step

    @property
    def _actions(self) -> list[str]:
        return self._tracker.actions

    def step(self, reply: str) -> StepResult:
        if self._done or self._obs is None:
            raise RuntimeError("episode is over: call reset() first")
        iou_before = self.current_iou()
        t0 = time.perf_counter()
        dec0 = self.segmenter.timings.decoder_s
        reading = self._tracker.read(reply, self.parse)
        info: dict[str, Any] = {"step": self._tracker.step, "raw": reply, "iou_before": iou_before}
        if reading.error is not None:
            info["error"] = reading.error
        apply_error: str | None = None
        action: Action | None = reading.action
        applied = False
        if action is not None:
            info["action"] = action
            if reading.needs_apply:
                try:
                    self.session.apply(action)
                    applied = True
                except SegmenterError as exc:
                    apply_error = info["error"] = str(exc)
                    info["segmenter_error"] = True
        self._applied.append(applied)
        stop = self._tracker.close(reading, apply_error)
        info["segmenter_s"] = self.segmenter.timings.decoder_s - dec0
        info["step_s"] = time.perf_counter() - t0
        info["mask"] = self.session.mask
        info["iou"] = self.current_iou()
        info["score"] = self.session.score
        if self.config.history:
            self._history.extend([self._obs.chat[-1], ChatTurn("assistant", reply)])
        self._done = stop is not None
        info["stop_reason"] = stop
        self._obs = self._observe()
        return StepResult(self._obs, self._done, info)

    def _observe(self) -> Observation:
        s = self.session
        mask = s.mask
        overlay = policy_overlay(s.image, mask)
        chat = render_chat(self.prompts, self._query, overlay, first_turn=mask is None, history=self._history)
        return Observation(
            image=s.image, overlay=overlay, query=self._query, step=self._step, mask=mask, logits=s.logits,
            points=s.points, labels=s.labels, box=s.box, chat=chat, grammar=self.config.grammar,
            previous_actions=tuple(self._actions),
        )
