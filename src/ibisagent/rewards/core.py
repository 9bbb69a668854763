"""The five reference rewards (format, answer, placement, progress, length) and their mean, each returned separately.

Reference release (verl ``compute_score``), with its exact thresholds and weights as the defaults of
:class:`RewardConfig`:

* format: 1 if the reply has the ``<think>\\n...\\n</think>\\n<action>\\n...\\n</action>`` layout, a valid action and
  answer tags exactly after a stop, else 0 (:func:`ibisagent.protocol.validate_reply`).
* answer: IoU of the mask after the action with the ground truth; 3 if IoU > 0.8, 2 if > 0.7, 1 if > 0.5, else 0.
* placement: +1 if a positive click lands in the false-negative region (a negative click in the false-positive
  region) of the mask BEFORE the action, else -1.
* progress: 1 if IoU after > IoU before, else 0 (0 for Terminate).
* length: 1 while step <= 5, else -0.2 * (step - 5).
* total: (format + answer + placement + progress + length) / 5.

``RewardConfig(profile="reference")`` scores as the release's reward function does, quirks included
(:mod:`ibisagent.rewards.release` reads the reply; docs/full_scale.md, "Release parity"): its own format check
(``(0.5,0.5)`` passes, only the ``Termination`` spelling stops), no action read outside ``<action>\n...\n</action>``
(answer, placement and progress 0), placement 0 on a stop, and length 0 when the step is unknown (``step=None``).

Our decisions where the reference is silent, and our box extension, are documented in ``docs/rewards.md``:
Terminate's placement (+1 for a stop at IoU >= ``stop_iou``, else -1), unparseable replies (format 0, answer 0,
placement -1, progress 0, length as usual) and box placement (IoU of the box with the ground truth's tight box, or
containment of the object).

``score_transition`` never calls a segmenter (the caller already applied the action); ``score_step`` applies the
action through a segmenter itself.

The components are a registry (:data:`REWARDS`, in registration order = the reference's order). A new reward is one
function and its weight: ``@register_reward("name")`` on ``fn(t: Transition, config: RewardConfig) -> float`` and,
when it should not weigh 1, ``RewardConfig(weights={"name": w})``. It then appears in :data:`COMPONENTS`, in every
:class:`RewardBreakdown` (``breakdown.name``), in the total, in verl's ``compute_score`` result, as a TRL reward
function and in the trainers' logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ibisagent.masks import MaskShapeError, as_bool, bbox, iou
from ibisagent.protocol import (
    Action,
    ActionKind,
    ActionParseError,
    GrammarMode,
    parse_reply,
    validate_reply,
)
from ibisagent.rewards.release import release_action, release_format_ok
from ibisagent.segmenters.base import Segmenter, SegmenterError

__all__ = [
    "COMPONENTS",
    "DEFAULT_CONFIG",
    "REWARDS",
    "RewardBreakdown",
    "RewardConfig",
    "RewardInputError",
    "Transition",
    "answer_reward",
    "box_placement_reward",
    "click_placement_reward",
    "format_reward",
    "get_segmenter",
    "length_reward",
    "progress_reward",
    "register_reward",
    "score_step",
    "score_transition",
]

# ------------------------------------------------------------------------------------------------------------------
# The registry of reward components
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transition:
    """What a reward component sees: one reply, its parsed action and the masks around it (all checked, HxW bool).

    ``action`` is None when the reply did not parse (nothing was applied: ``after`` is ``before`` and ``iou_after`` is
    ``iou_before``); for Terminate ``after`` is ``before`` too. ``step`` is the 1-based turn of the reply (None:
    unknown, only with the ``reference`` profile); ``format_ok`` whether the reply passed the format check of the
    profile (``mode``'s strict check by default, the release's under ``reference``).
    """

    reply: str
    action: Action | None
    gt: np.ndarray
    before: np.ndarray
    after: np.ndarray
    iou_before: float
    iou_after: float
    step: int | None
    format_ok: bool
    mode: GrammarMode
    #: the IoU the progress reward compares ``iou_after`` with (None: ``iou_before``); the release's rows carry it as
    #: ``pre_iou`` (0 when missing) instead of measuring the mask before the action
    progress_from: float | None = None

    @property
    def terminate(self) -> bool:
        return self.action is not None and self.action.kind is ActionKind.TERMINATE


RewardFn = Callable[[Transition, "RewardConfig"], float]

#: name -> component, in registration order (the built-ins: the reference's order)
REWARDS: dict[str, RewardFn] = {}

#: names a component may not take: they are the other fields of :class:`RewardBreakdown` or TRL's ``total_reward``
_RESERVED = frozenset({"total", "iou_before", "iou_after", "action", "errors", "values", "components", "as_dict"})


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: add ``fn(transition, config) -> float`` as the reward component ``name`` (weight 1 unless
    ``RewardConfig.weights`` says otherwise). Re-registering a name replaces its function in place."""
    if not name.isidentifier() or name in _RESERVED:
        raise ValueError(f"reward name {name!r} must be an identifier and not one of {sorted(_RESERVED)}")

    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


class _ComponentNames(Sequence[str]):
    """The registered component names, live (a reward registered later shows up); compares equal to a tuple."""

    def __getitem__(self, i):  # type: ignore[override]
        return tuple(REWARDS)[i]

    def __len__(self) -> int:
        return len(REWARDS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(REWARDS))

    def __contains__(self, name: object) -> bool:
        return name in REWARDS

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


#: the reward components' names, in order: the reference's five (format, answer, placement, progress, length), then
#: any registered later
COMPONENTS: Sequence[str] = _ComponentNames()


class RewardInputError(ValueError):
    """Inputs a reward cannot be computed from (empty or size-mismatched ground truth, masks of the wrong size)."""


@dataclass(frozen=True)
class RewardConfig:
    """Reward thresholds and weights. Defaults are the release's tiers and weights; the release's reward function
    has quirks these rules do not follow (see docs/full_scale.md, "Release parity")."""

    #: answer reward tiers: (IoU bound, value), checked from the top with a strict ``>``
    answer_tiers: tuple[tuple[float, float], ...] = ((0.8, 3.0), (0.7, 2.0), (0.5, 1.0))
    #: placement reward for a click in the right error region / anywhere else
    placement_hit: float = 1.0
    placement_miss: float = -1.0
    #: progress reward when IoU rises (0 otherwise)
    progress_value: float = 1.0
    #: length reward: 1 while step <= optimal_steps, else -length_gamma * (step - optimal_steps)
    optimal_steps: int = 5
    length_gamma: float = 0.2
    #: component weights: a mapping name -> weight (unnamed components weigh 1), or one number per component in
    #: :data:`COMPONENTS` order; total = sum(w * r) / number of components (reference: the mean). Stored as
    #: ``((name, weight), ...)`` pairs of the weights that are not 1.
    weights: Mapping[str, float] | Sequence[float] | tuple[tuple[str, float], ...] = ()
    #: placement for Terminate (our decision): "threshold" = hit if IoU before >= stop_iou else miss; "zero" = 0
    terminate_placement: Literal["threshold", "zero"] = "threshold"
    #: the IoU at which stopping counts as correct (the synthesis threshold)
    stop_iou: float = 0.8
    #: box placement (our extension): "iou" = hit if IoU(box, gt box) >= box_iou; "containment" = hit if the box holds
    #: >= box_containment of the object and IoU(box, gt box) >= box_min_iou (so a whole-image box does not pay)
    box_placement: Literal["iou", "containment"] = "iou"
    box_iou: float = 0.7
    box_containment: float = 0.95
    box_min_iou: float = 0.3
    #: "default" (the rules above) or "reference" (the release's reward function with its quirks; thresholds and
    #: weights still come from these fields)
    profile: Literal["default", "reference"] = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _weight_pairs(self.weights))
        if self.profile not in ("default", "reference"):
            raise ValueError("profile must be 'default' or 'reference'")
        if self.optimal_steps < 0:
            raise ValueError("optimal_steps must be >= 0")
        if self.terminate_placement not in ("threshold", "zero"):
            raise ValueError("terminate_placement must be 'threshold' or 'zero'")
        if self.box_placement not in ("iou", "containment"):
            raise ValueError("box_placement must be 'iou' or 'containment'")
        bounds = [b for b, _ in self.answer_tiers]
        if bounds != sorted(bounds, reverse=True):
            raise ValueError(f"answer_tiers must be ordered from the highest IoU bound down, got {self.answer_tiers}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RewardConfig:
        """Build from a plain dict (YAML/JSON); unknown keys raise ValueError naming the known ones."""
        if not data:
            return cls()
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown reward option(s) {unknown}; known: {sorted(known)}")
        kw = dict(data)
        if "answer_tiers" in kw:
            kw["answer_tiers"] = tuple((float(b), float(v)) for b, v in kw["answer_tiers"])
        return cls(**kw)

    def weight(self, name: str) -> float:
        """The weight of component ``name`` (1 unless ``weights`` names it)."""
        return dict(self.weights).get(name, 1.0)  # type: ignore[arg-type]


def _weight_pairs(weights: Any) -> tuple[tuple[str, float], ...]:
    """``weights`` as ((name, weight), ...) in component order; a plain sequence of numbers is positional."""
    if isinstance(weights, Mapping):
        items = list(weights.items())
    else:
        items = list(weights)
        if not items:
            return ()
        if all(isinstance(w, Sequence) and not isinstance(w, str) and len(w) == 2 for w in items):
            items = [(str(n), w) for n, w in items]
        else:
            if len(items) != len(COMPONENTS):
                raise ValueError(f"weights needs {len(COMPONENTS)} values ({', '.join(COMPONENTS)}) or a mapping "
                                 f"name -> weight, got {weights}")
            items = list(zip(COMPONENTS, items))
    unknown = sorted(str(n) for n, _ in items if n not in REWARDS)
    if unknown:
        raise ValueError(f"weights for unknown reward component(s) {unknown}; known: {', '.join(COMPONENTS)}")
    given = {n: float(w) for n, w in items}
    return tuple((n, given[n]) for n in REWARDS if given.get(n, 1.0) != 1.0)  # canonical: only weights != 1


@dataclass(frozen=True, init=False)
class RewardBreakdown:
    """Every component's value and their weighted mean, plus what they were computed from.

    Components are read as attributes (``breakdown.format``, ``breakdown.answer``, ...) or all at once with
    :meth:`components`. Build with keywords: ``RewardBreakdown(total=..., format=1.0, answer=3.0, ...)``.
    """

    values: dict[str, float]
    total: float
    iou_before: float = 0.0
    iou_after: float = 0.0
    action: str | None = None  # the action kind ("positive", "negative", "box", "terminate") or None if unparseable
    errors: tuple[str, ...] = field(default_factory=tuple)

    def __init__(self, values: Mapping[str, float] | None = None, *, total: float, iou_before: float = 0.0,
                 iou_after: float = 0.0, action: str | None = None, errors: Sequence[str] = (),
                 **components: float) -> None:
        for name, value in (("values", {**(values or {}), **components}), ("total", total),
                            ("iou_before", iou_before), ("iou_after", iou_after), ("action", action),
                            ("errors", tuple(errors))):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> float:
        values = self.__dict__.get("values")
        if values is not None and name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute or reward component {name!r}")

    def as_dict(self) -> dict[str, Any]:
        """Components, total, IoU before/after, the action kind and format errors as a JSON-able dict."""
        return {**self.values, "total": self.total, "iou_before": self.iou_before, "iou_after": self.iou_after,
                "action": self.action, "errors": list(self.errors)}

    def components(self) -> dict[str, float]:
        return dict(self.values)


#: the reference configuration
DEFAULT_CONFIG = RewardConfig()


# ------------------------------------------------------------------------------------------------------------------
# The individual rewards (pure functions)
# ------------------------------------------------------------------------------------------------------------------

def format_reward(reply: str, mode: GrammarMode = "reference") -> float:
    """1.0 if the reply passes the strict reference format check, else 0.0 (both stop spellings are accepted)."""
    return 1.0 if validate_reply(reply, mode) else 0.0


def answer_reward(iou_after: float, config: RewardConfig = DEFAULT_CONFIG) -> float:
    """Tiered IoU reward: the value of the first tier whose bound IoU strictly exceeds (3/2/1 at 0.8/0.7/0.5)."""
    for bound, value in config.answer_tiers:
        if iou_after > bound:
            return float(value)
    return 0.0


def click_placement_reward(positive: bool, x: int, y: int, gt: np.ndarray, mask_before: np.ndarray,
                           config: RewardConfig = DEFAULT_CONFIG) -> float:
    """+1 if a positive click is in FN (gt & ~mask) or a negative click in FP (mask & ~gt) at pixel (x, y), else -1."""
    inside_gt = bool(gt[y, x])
    inside_mask = bool(mask_before[y, x])
    hit = (inside_gt and not inside_mask) if positive else (inside_mask and not inside_gt)
    return config.placement_hit if hit else config.placement_miss


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, ix2 - ix1 + 1) * max(0, iy2 - iy1 + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / float(area_a + area_b - inter)


def box_placement_reward(box: tuple[int, int, int, int], gt: np.ndarray,
                         config: RewardConfig = DEFAULT_CONFIG) -> float:
    """Our extension: placement of a pixel box (inclusive corners) against the ground truth.

    ``"iou"``: hit if IoU(box, tight gt box) >= ``box_iou``. ``"containment"``: hit if the box holds at least
    ``box_containment`` of the object's pixels and its IoU with the tight box is >= ``box_min_iou``.
    """
    gt_box = bbox(gt)
    if gt_box is None:
        raise RewardInputError("the ground-truth mask is empty: no box can be scored against it")
    biou = _box_iou(box, gt_box)
    if config.box_placement == "iou":
        hit = biou >= config.box_iou
    else:
        x1, y1, x2, y2 = box
        inside = int(gt[y1 : y2 + 1, x1 : x2 + 1].sum())
        hit = inside >= config.box_containment * int(gt.sum()) and biou >= config.box_min_iou
    return config.placement_hit if hit else config.placement_miss


def progress_reward(iou_before: float, iou_after: float, terminate: bool = False,
                    config: RewardConfig = DEFAULT_CONFIG) -> float:
    """``progress_value`` if IoU strictly rose, else 0; always 0 for Terminate."""
    if terminate:
        return 0.0
    return config.progress_value if iou_after > iou_before else 0.0


def length_reward(step: int, config: RewardConfig = DEFAULT_CONFIG) -> float:
    """1 while ``step`` (1-based turn number of this reply) <= optimal, else -gamma * (step - optimal)."""
    if step <= config.optimal_steps:
        return 1.0
    return -config.length_gamma * (step - config.optimal_steps)


def _total(values: Mapping[str, float], config: RewardConfig) -> float:
    return float(sum(config.weight(k) * v for k, v in values.items()) / len(values))


# ------------------------------------------------------------------------------------------------------------------
# Whole transitions
# ------------------------------------------------------------------------------------------------------------------

def _check_gt(gt: np.ndarray) -> np.ndarray:
    try:
        g = as_bool(gt)
    except MaskShapeError as exc:
        raise RewardInputError(f"ground truth: {exc}") from exc
    if not g.any():
        raise RewardInputError("the ground-truth mask is empty: rewards need an object to compare with")
    return g


def _check_mask(mask: np.ndarray | None, gt: np.ndarray, what: str) -> np.ndarray:
    if mask is None:
        return np.zeros_like(gt)
    try:
        m = as_bool(mask)
    except MaskShapeError as exc:
        raise RewardInputError(f"{what}: {exc}") from exc
    if m.shape != gt.shape:
        raise RewardInputError(f"{what} is {m.shape[0]}x{m.shape[1]} but the ground truth is "
                               f"{gt.shape[0]}x{gt.shape[1]}")
    return m


def _parse(reply: str, mode: GrammarMode, config: RewardConfig = DEFAULT_CONFIG) -> tuple[Action | None, str | None]:
    if config.profile == "reference":
        action = release_action(reply) if isinstance(reply, str) else None
        return action, None if action is not None else "no action the release's reward reads"
    try:
        return parse_reply(reply, mode).action, None
    except ActionParseError as exc:
        return None, str(exc)


def _placement(action: Action, gt: np.ndarray, before: np.ndarray, iou_before: float,
               config: RewardConfig) -> float:
    h, w = gt.shape
    if action.kind is ActionKind.TERMINATE:
        if config.terminate_placement == "zero":
            return 0.0
        return config.placement_hit if iou_before >= config.stop_iou else config.placement_miss
    if action.kind is ActionKind.BOX:
        return box_placement_reward(action.pixel_box(w, h), gt, config)
    x, y = action.pixel(w, h)
    return click_placement_reward(action.kind is ActionKind.POSITIVE, x, y, gt, before, config)


def _breakdown(reply: str, action: Action | None, parse_error: str | None, gt: np.ndarray, before: np.ndarray,
               after: np.ndarray, step: int | None, config: RewardConfig, mode: GrammarMode,
               progress_from: float | None = None) -> RewardBreakdown:
    validation = validate_reply(reply, mode) if isinstance(reply, str) else None
    errors = tuple(validation.errors) if validation is not None else ("reply is not a string",)
    format_ok = bool(validation)
    if config.profile == "reference":
        format_ok = isinstance(reply, str) and release_format_ok(reply)
        errors = () if format_ok else ("fails the release's format check",)
    elif step is None:
        raise RewardInputError("step is required (only the reference profile scores an unknown step, as 0 length)")
    iou_before = iou(before, gt)
    if action is None:  # unparseable: nothing was applied
        after, iou_after = before, iou_before
        errors += (parse_error,) if parse_error else ()
    elif action.kind is ActionKind.TERMINATE:
        iou_after = iou_before
    else:
        iou_after = iou(after, gt)
    t = Transition(reply, action, gt, before, after, iou_before, iou_after, step, format_ok, mode, progress_from)
    values = {name: float(fn(t, config)) for name, fn in REWARDS.items()}
    return RewardBreakdown(values, total=_total(values, config), iou_before=iou_before, iou_after=iou_after,
                           action=None if action is None else action.kind.value, errors=errors)


# The reference's five components. Unparseable replies (our decision): no answer credit, a placement miss, no
# progress, length as usual.

@register_reward("format")
def _format_component(t: Transition, config: RewardConfig) -> float:
    return 1.0 if t.format_ok else 0.0


@register_reward("answer")
def _answer_component(t: Transition, config: RewardConfig) -> float:
    return 0.0 if t.action is None else answer_reward(t.iou_after, config)


@register_reward("placement")
def _placement_component(t: Transition, config: RewardConfig) -> float:
    if config.profile == "reference" and (t.action is None or t.terminate):
        return 0.0  # the release scores clicks only
    if t.action is None:
        return config.placement_miss
    return _placement(t.action, t.gt, t.before, t.iou_before, config)


@register_reward("progress")
def _progress_component(t: Transition, config: RewardConfig) -> float:
    base = t.iou_before if t.progress_from is None else t.progress_from
    return 0.0 if t.action is None else progress_reward(base, t.iou_after, t.terminate, config)


@register_reward("length")
def _length_component(t: Transition, config: RewardConfig) -> float:
    return 0.0 if t.step is None else length_reward(t.step, config)  # None: the release's missing current_step


def score_transition(
    reply: str,
    *,
    gt: np.ndarray,
    mask_before: np.ndarray | None,
    mask_after: np.ndarray | None,
    step: int | None,
    config: RewardConfig = DEFAULT_CONFIG,
    mode: GrammarMode = "reference",
) -> RewardBreakdown:
    """Score one reply whose action the caller already applied.

    Args:
        reply: the policy's full reply text.
        gt: ground-truth mask (HxW, nonzero = object; must not be empty).
        mask_before: the mask the action was chosen on (None = no mask yet, i.e. empty).
        mask_after: the mask after applying the action (ignored for Terminate and unparseable replies; None = empty).
        step: 1-based turn number of this reply in its episode (for the length reward); None only with
            ``config.profile == "reference"`` (the release's rows without ``current_step``: length 0).
        config: thresholds and weights (defaults = reference).
        mode: ``"reference"`` (boxes fail the format check and score as unparseable) or ``"extended"``.
    """
    g = _check_gt(gt)
    before = _check_mask(mask_before, g, "mask_before")
    action, err = _parse(reply, mode, config)
    after = before if action is None or action.kind is ActionKind.TERMINATE else _check_mask(mask_after, g,
                                                                                             "mask_after")
    return _breakdown(reply, action, err, g, before, after, _step(step), config, mode)


# ------------------------------------------------------------------------------------------------------------------
# With a segmenter
# ------------------------------------------------------------------------------------------------------------------

def get_segmenter(segmenter: str | Segmenter) -> Segmenter:
    """A segmenter instance; names come from the process-wide :func:`~ibisagent.segmenters.hub.shared_hub`."""
    if isinstance(segmenter, Segmenter):
        return segmenter
    from ibisagent.segmenters.hub import shared_hub

    return shared_hub().get(segmenter)


def _predict(seg: Segmenter, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None,
             mask_input: np.ndarray | None) -> np.ndarray:
    if not len(points) and box is None:
        return np.zeros(seg.image_shape, bool)
    res = seg.predict(points if len(points) else None, labels if len(labels) else None, box, mask_input)
    return res.mask


def score_step(
    reply: str,
    *,
    image: np.ndarray,
    gt: np.ndarray,
    points: np.ndarray | list | None = None,
    labels: np.ndarray | list | None = None,
    box: tuple[float, float, float, float] | list | None = None,
    prev_logits: np.ndarray | None = None,
    step: int | None,
    segmenter: str | Segmenter,
    config: RewardConfig = DEFAULT_CONFIG,
    mode: GrammarMode = "reference",
    mask_before: np.ndarray | None = None,
    progress_from: float | None = None,
) -> RewardBreakdown:
    """Apply the reply's action through ``segmenter`` on the state (``points``/``labels``/``box`` in pixels, the
    prompts so far) and score it.

    ``mask_before`` is the state's current mask; when it is not given it is recomputed from the prompts so far
    without mask feedback (as the reference's HTTP segmenter does). ``prev_logits`` (the state's low-res logits),
    when given, is passed as mask feedback for the new prediction; without it the new mask comes from the prompts
    alone (reference behaviour). ``progress_from`` replaces the IoU before the action in the progress reward only
    (the release's ``pre_iou`` row field).
    """
    g = _check_gt(gt)
    seg = get_segmenter(segmenter)
    img = np.asarray(image)
    if img.shape[:2] != g.shape:
        raise RewardInputError(f"image is {img.shape[0]}x{img.shape[1]} but the ground truth is "
                               f"{g.shape[0]}x{g.shape[1]}")
    pts = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
    labs = np.zeros((0,), np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
    bx = None if box is None else np.asarray(box, np.float32).reshape(4)
    action, err = _parse(reply, mode, config)
    need_before = mask_before is None
    need_after = action is not None and action.kind is not ActionKind.TERMINATE
    if need_before or need_after:
        try:
            seg.ensure_image(img)  # set_image unless the segmenter holds this image already
        except SegmenterError as exc:
            raise RewardInputError(f"image: {exc}") from exc
    before = _check_mask(mask_before, g, "mask_before") if not need_before else _predict(seg, pts, labs, bx, None)
    after = before
    if need_after:
        assert action is not None
        h, w = g.shape
        n_pts, n_labs, n_box = pts, labs, bx
        if action.kind is ActionKind.BOX:
            n_box = np.asarray(action.pixel_box(w, h), np.float32)
        else:
            x, y = action.pixel(w, h)
            n_pts = np.concatenate([pts, np.asarray([[x, y]], np.float32)])
            n_labs = np.concatenate([labs, np.asarray([int(action.kind is ActionKind.POSITIVE)], np.int64)])
        after = _predict(seg, n_pts, n_labs, n_box, prev_logits)
    return _breakdown(reply, action, err, g, before, after, _step(step), config, mode, progress_from)


def _step(step: int | None) -> int | None:
    return None if step is None else int(step)
