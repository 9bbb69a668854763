"""The episode engine: the stop rules and the one loop that plays a policy against a segmenter.

Every caller that plays episodes goes through this module: the agent and the evaluation harness
(:func:`ibisagent.agent.run_episode`), the web app and the tool server (:mod:`ibisagent.runtime`), the Qwen2.5-VL
GRPO trainer (:mod:`ibisagent.training.trl_grpo`), the test helpers (:mod:`ibisagent.testing`), the compact-policy
trainer's lockstep rollouts (:func:`drive_lockstep`) and the trajectory synthesizer (its scripted oracle, played by
:func:`drive` after any searched prefix, ``resume=True``).

One turn, whoever runs it::

    observation --policy.act--> reply text --parse--> Action --session.apply--> mask --StopTracker--> stop reason

* :class:`StopRules` / :class:`StopTracker`: the episode's stop rules and guards in one place (a Terminate action,
  an unparseable or invalid reply, an action the segmenter rejects, the same action ``max_repeats`` times in a row,
  the ``max_steps`` budget). :class:`ibisagent.env.SegmentationEnv` runs them for one episode,
  :func:`drive_lockstep` for a batch.
* :func:`drive`: the single-episode driver, a generator of :class:`Turn` over any :class:`EpisodeEnv` and any
  :class:`ActingPolicy`; it can first replay ``prior`` replies (a person's clicks) before the policy acts, or
  ``resume`` an episode already under way (trajectory synthesis steps a searched prefix first).
* :func:`drive_lockstep`: the same turn, for a batch of episodes that advance together (one batched policy call and
  one batched segmenter call per turn), with the same :class:`StopTracker`.

The driver knows nothing about images being 2D: it depends only on the small protocols below (an environment that
turns a reply into the next observation, a policy with ``act``, an action parser, a session with ``apply``). A volume
session and a volume segmenter plug in behind :class:`EpisodeEnv` (see ``docs/design.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ibisagent.protocol import Action, ActionKind, ActionParseError

__all__ = [
    "ActingPolicy",
    "ActionParser",
    "EpisodeEnv",
    "EpisodeSession",
    "LockstepResult",
    "Reading",
    "StepOutcome",
    "StopReason",
    "StopRules",
    "StopTracker",
    "Turn",
    "drive",
    "drive_lockstep",
    "play",
]


class StopReason:
    """Why an episode ended (the ``stop_reason`` of traces, CSV rows and logs)."""

    TERMINATE = "terminate"
    UNPARSEABLE = "unparseable"
    INVALID_ACTION = "invalid_action"
    REPEATED = "repeated_action"
    MAX_STEPS = "max_steps"


#: when the repeat rule runs (:attr:`StopRules.repeat_check`)
REPEAT_CHECKS = ("after", "before")

#: parse-error reasons (:class:`~ibisagent.protocol.ActionParseError`) that count as an invalid action, not as an
#: unparseable reply
INVALID_PARSE_REASONS = frozenset({"out_of_range", "invalid_box", "pixel_coordinates", "box_not_allowed",
                                   "invalid_slice", "volume_not_allowed"})


# ----------------------------------------------------------------------------------------------------------------
# Small protocols the driver depends on
# ----------------------------------------------------------------------------------------------------------------

#: reply text -> Action; raises :class:`~ibisagent.protocol.ActionParseError` (e.g. ``parse_reply(r, mode).action``)
ActionParser = Callable[[str], Action]


@runtime_checkable
class EpisodeSession(Protocol):
    """What an environment needs from an interactive session: hold an image (a 2D picture, or a volume), apply one
    action through the segmenter and expose the current mask (None before the first prompt). A 2D
    :class:`~ibisagent.session.Session` is one; a volume session (clicks and boxes on any slice, a 3D mask) is
    another."""

    def set_image(self, image: Any) -> None: ...

    def apply(self, action: Action) -> Any: ...

    @property
    def mask(self) -> Any: ...


class ActingPolicy(Protocol):
    """A policy as the driver sees it (:class:`ibisagent.policies.base.Policy` is one)."""

    def begin_episode(self, *, image: Any, query: str, gt: Any = None) -> None: ...

    def act(self, obs: Any) -> str: ...


class StepOutcome(Protocol):
    """What :meth:`EpisodeEnv.step` returns (:class:`ibisagent.env.StepResult`)."""

    observation: Any
    done: bool
    info: dict[str, Any]


class EpisodeEnv(Protocol):
    """An environment: builds observations, parses replies, applies them through its session, runs the stop rules
    (:class:`ibisagent.env.SegmentationEnv`). ``step(reply).info`` carries at least ``step``, ``stop_reason`` and,
    for a parsed reply, ``action``."""

    def reset(self, image: Any, query: str, gt: Any = None) -> Any: ...

    def step(self, reply: str) -> StepOutcome: ...

    @property
    def gt(self) -> Any: ...

    @property
    def observation(self) -> Any:
        """The current observation (what the next reply answers); ``drive(resume=True)`` starts from it."""
        ...


# ----------------------------------------------------------------------------------------------------------------
# Stop rules
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StopRules:
    """Episode limits. Defaults follow the reference release."""

    max_steps: int = 20  # policy turns per episode (the Terminate turn counts)
    max_repeats: int = 3  # stop when the same action text repeats this many times in a row
    #: when the repeat rule is checked: "after" the action went to the segmenter (ours: the last repeat is applied)
    #: or "before" (the release's inference loop: the repeat that stops the episode is not applied)
    repeat_check: Literal["after", "before"] = "after"

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.repeat_check not in REPEAT_CHECKS:
            raise ValueError(f"repeat_check must be one of {', '.join(REPEAT_CHECKS)}, got {self.repeat_check!r}")

    def tracker(self) -> StopTracker:
        return StopTracker(self)


@dataclass(frozen=True)
class Reading:
    """A reply as read by :meth:`StopTracker.read`: the parsed action (None when it did not parse), the stop reason
    decided before the action is applied (Terminate, unparseable, invalid) and the parse error message."""

    action: Action | None
    stop: str | None
    error: str | None = None

    @property
    def needs_apply(self) -> bool:
        """Whether the action goes to the session (a click or a box that did not stop the episode already)."""
        return self.action is not None and self.stop is None


@dataclass
class StopTracker:
    """The stop rules of one episode, turn by turn: ``reading = tracker.read(reply, parse)``, apply
    ``reading.action`` when ``reading.needs_apply``, then ``stop = tracker.close(reading, apply_error)``.
    ``step`` counts the turns read so far; ``actions`` the action texts (for the repeat rule)."""

    rules: StopRules = field(default_factory=StopRules)
    step: int = 0
    actions: list[str] = field(default_factory=list)
    _acted: list[bool] = field(default_factory=list, repr=False)  # per closed turn: whether it added to actions

    def read(self, reply: str, parse: ActionParser) -> Reading:
        """Start a turn: parse ``reply``. A Terminate stops the episode; a reply that does not parse stops it as
        unparseable, or as invalid when it names an action the grammar cannot accept (out of range, a box in the
        reference grammar, pixel coordinates)."""
        self.step += 1
        try:
            action = parse(reply)
        except ActionParseError as exc:
            reason = StopReason.INVALID_ACTION if exc.reason in INVALID_PARSE_REASONS else StopReason.UNPARSEABLE
            return Reading(None, reason, str(exc))
        if action.kind is ActionKind.TERMINATE:
            return Reading(action, StopReason.TERMINATE)
        if self.rules.repeat_check == "before" and self._repeats(action.text()):
            return Reading(action, StopReason.REPEATED)  # stops before the segmenter sees it
        return Reading(action, None)

    def _repeats(self, text: str) -> bool:
        """Whether ``text`` after the actions so far makes ``max_repeats`` equal actions in a row."""
        k = self.rules.max_repeats
        return len(self.actions) >= k - 1 and all(a == text for a in self.actions[len(self.actions) - (k - 1):])

    def close(self, reading: Reading, apply_error: str | None = None) -> str | None:
        """End the turn: the stop reason (None to go on). ``apply_error`` is the message of a segmenter that
        rejected the action (an invalid action)."""
        stop = reading.stop
        if apply_error is not None and stop is None:
            stop = StopReason.INVALID_ACTION
        self._acted.append(reading.action is not None)
        if reading.action is not None:
            text = reading.action.text()
            if stop is None and self._repeats(text):
                stop = StopReason.REPEATED
            self.actions.append(text)
        if stop is None and self.step >= self.rules.max_steps:
            stop = StopReason.MAX_STEPS
        return stop

    def undo(self) -> None:
        """Take back the last closed turn (synthesis tries candidate actions and keeps one)."""
        if self.step <= 0:
            raise RuntimeError("no turn to undo")
        self.step -= 1
        if self._acted and self._acted.pop():
            self.actions.pop()

    @property
    def turns_left(self) -> int:
        return self.rules.max_steps - self.step


# ----------------------------------------------------------------------------------------------------------------
# The single-episode driver
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Turn:
    """One turn of :func:`drive`: the observation the reply answered, the reply, who wrote it (``"policy"``, or
    ``"user"`` for a replayed prior reply), the environment's step info, the policy's time, and the result."""

    step: int
    observation: Any
    reply: str
    actor: str
    info: dict[str, Any]
    policy_s: float
    next_observation: Any
    done: bool

    @property
    def action(self) -> Action | None:
        return self.info.get("action")

    @property
    def stop_reason(self) -> str | None:
        return self.info.get("stop_reason")


def drive(
    env: EpisodeEnv,
    policy: ActingPolicy,
    image: Any,
    query: str,
    gt: Any = None,
    *,
    prior: Sequence[str] = (),
    guard: Callable[[], AbstractContextManager[Any]] | None = None,
    on_start: Callable[[Any], Any] | None = None,
    resume: bool = False,
) -> Iterator[Turn]:
    """Play one episode, a :class:`Turn` per step, until the environment's stop rules end it.

    ``prior`` replies are replayed first (``actor="user"``, no policy time) before the policy acts. ``guard`` is a
    context-manager factory entered around the reset and around every turn (e.g. a segmenter lock). ``on_start`` is
    called with the first observation, after the reset and the policy's ``begin_episode``. With ``resume`` the
    environment is not reset: the episode goes on from its current ``observation`` (the turns already taken count
    towards its stop rules); ``image``, ``query`` and ``gt`` must be the episode's own.
    """
    enter = guard or nullcontext
    prior = list(prior)
    with enter():
        obs = env.observation if resume else env.reset(image, query, gt)
        policy.begin_episode(image=getattr(obs, "image", image), query=query, gt=env.gt)
    if on_start is not None:
        on_start(obs)
    k = 0
    done = False
    while not done:
        with enter():
            t = time.perf_counter()
            if k < len(prior):
                reply, actor, policy_s = prior[k], "user", 0.0
            else:
                reply = policy.act(obs)
                actor, policy_s = "policy", time.perf_counter() - t
            res = env.step(reply)
        k += 1
        done = bool(res.done)
        turn = Turn(step=int(res.info.get("step", k)), observation=obs, reply=reply, actor=actor, info=res.info,
                    policy_s=policy_s, next_observation=res.observation, done=done)
        obs = res.observation
        yield turn


def play(env: EpisodeEnv, policy: ActingPolicy, image: Any, query: str, gt: Any = None, **kw: Any) -> list[Turn]:
    """:func:`drive` run to the end: the list of turns."""
    return list(drive(env, policy, image, query, gt, **kw))


# ----------------------------------------------------------------------------------------------------------------
# The lockstep driver (a batch of episodes, one batched policy and segmenter call per turn)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class LockstepResult:
    """Per episode of :func:`drive_lockstep`: the replies, their readings (parsed action, error), the stop reason."""

    replies: list[list[str]]
    readings: list[list[Reading]]
    stop_reasons: list[str | None]
    errors: list[list[str | None]]


def drive_lockstep(
    n: int,
    act: Callable[[list[int], int], Sequence[str]],
    apply: Callable[[list[int], list[Action]], Sequence[str | None]],
    parse: ActionParser,
    rules: StopRules,
) -> LockstepResult:
    """Play ``n`` episodes turn by turn in lockstep with the stop rules of :class:`StopTracker` (the same as
    :class:`ibisagent.env.SegmentationEnv`).

    ``act(live, turn)`` writes one reply for each live episode index (0-based ``turn``); ``apply(indices, actions)``
    applies the parsed clicks/boxes of those episodes through the segmenter in one batch and returns an error message
    (the segmenter rejected it) or None per episode. An episode ends on the same turn and for the same reason as it
    would through :func:`drive`.
    """
    trackers = [rules.tracker() for _ in range(n)]
    result = LockstepResult([[] for _ in range(n)], [[] for _ in range(n)], [None] * n, [[] for _ in range(n)])
    live = list(range(n))
    turn = 0
    while live:
        replies = list(act(live, turn))
        if len(replies) != len(live):
            raise ValueError(f"act returned {len(replies)} replies for {len(live)} live episodes")
        readings = {i: trackers[i].read(r, parse) for i, r in zip(live, replies)}
        to_apply = [i for i in live if readings[i].needs_apply]
        errors: dict[int, str | None] = {}
        if to_apply:
            errs = list(apply(to_apply, [readings[i].action for i in to_apply]))  # type: ignore[misc]
            errors = dict(zip(to_apply, errs))
        still = []
        for i, reply in zip(live, replies):
            rd = readings[i]
            err = errors.get(i)
            stop = trackers[i].close(rd, err)
            result.replies[i].append(reply)
            result.readings[i].append(rd)
            result.errors[i].append(err if err is not None else rd.error)
            if stop is None:
                still.append(i)
            else:
                result.stop_reasons[i] = stop
        live = still
        turn += 1
    return result
