"""The action protocol: typed actions, the reference text grammar, a strict validator and a lenient parser.

One coordinate convention: text carries coordinates normalized to [0, 1] by image width/height with 4 decimals;
everything inside the package uses pixels. :func:`to_pixel` and :func:`to_normalized` are the only converters.

Grammar (reference release)::

    <think>\n...\n</think>\n<action>\nPositive Point (0.5000, 0.2500)\n</action>
    <think>\n...\n</think>\n<action>\nTerminate\n</action>\n<answer>\n...\n</answer>

The ``extended`` mode adds ``Box (x1, y1, x2, y2)`` (our extension, not in the reference) and the volume form
(issue 28): an action on slice ``z`` of a volume carries the slice index as one more number, a whole number
counted from 0 along the volume's slice axis (not normalized: slice counts differ between volumes and a person or an
MLLM reads "slice 12" directly)::

    Positive Point (0.5000, 0.2500, 12)        a click on slice 12
    Negative Point (0.5000, 0.2500, 12)
    Box (0.1000, 0.2000, 0.4000, 0.6000, 12)   a box on slice 12
    Box (0.1000, 0.2000, 0.4000, 0.6000, 12, 5, 20)
                                               the same box, the object spanning slices 5..20 (the CVPR 2025
                                               challenge's box: drawn on the middle slice, with its z-range)
    Terminate

x and y stay normalized by the slice's width and height. The reference grammar has no volume form.

Two parsing profiles (:data:`ParserProfile`): ``lenient`` (ours, the default) and ``reference`` (the release's
inference parser, for running the released checkpoint as its own scripts do); see :func:`parse_action`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Action",
    "ActionKind",
    "ActionParseError",
    "GrammarMode",
    "PARSER_PROFILES",
    "ParsedReply",
    "ParserProfile",
    "ValidationResult",
    "format_action",
    "format_reply",
    "parse_action",
    "parse_reply",
    "to_normalized",
    "to_pixel",
    "validate_reply",
]

GrammarMode = Literal["reference", "extended"]
#: ``lenient``: our parser (default). ``reference``: the release's inference parser, quirks included.
ParserProfile = Literal["lenient", "reference"]
PARSER_PROFILES: tuple[str, ...] = ("lenient", "reference")


class ActionKind(enum.StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    BOX = "box"
    TERMINATE = "terminate"


class ActionParseError(ValueError):
    """A reply that does not contain a usable action. ``reason`` is a short machine-readable code."""

    def __init__(self, message: str, reason: str = "unparseable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Action:
    """One agent action. Coordinates are normalized to [0, 1] (x by width, y by height).

    ``x``/``y`` are set for clicks; ``box`` (x1, y1, x2, y2) for boxes; ``answer`` may accompany ``TERMINATE``.
    """

    kind: ActionKind
    x: float | None = None
    y: float | None = None
    box: tuple[float, float, float, float] | None = None
    answer: str | None = None
    #: slice index of a volume action (extended grammar); None for a 2D action
    z: int | None = None
    #: (first, last) slice of the object for a volume box (the challenge's z-range); None otherwise
    z_range: tuple[int, int] | None = None

    # --- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def positive(cls, x: float, y: float) -> Action:
        return cls(ActionKind.POSITIVE, x=_check_unit(x, "x"), y=_check_unit(y, "y"))

    @classmethod
    def negative(cls, x: float, y: float) -> Action:
        return cls(ActionKind.NEGATIVE, x=_check_unit(x, "x"), y=_check_unit(y, "y"))

    @classmethod
    def make_box(cls, x1: float, y1: float, x2: float, y2: float) -> Action:
        coords = tuple(_check_unit(v, n) for v, n in zip((x1, y1, x2, y2), ("x1", "y1", "x2", "y2"), strict=True))
        if not coords[0] < coords[2]:
            raise ActionParseError(f"box needs x1 < x2, got x1={x1:.4f}, x2={x2:.4f}", "invalid_box")
        if not coords[1] < coords[3]:
            raise ActionParseError(f"box needs y1 < y2, got y1={y1:.4f}, y2={y2:.4f}", "invalid_box")
        return cls(ActionKind.BOX, box=coords)  # type: ignore[arg-type]

    @classmethod
    def terminate(cls, answer: str | None = None) -> Action:
        return cls(ActionKind.TERMINATE, answer=answer)

    def on_slice(self, z: int, z_range: tuple[int, int] | None = None) -> Action:
        """This click or box placed on slice ``z`` of a volume (``z_range``: the object's first and last slice, for a
        box only)."""
        if self.kind is ActionKind.TERMINATE:
            raise ActionParseError("Terminate has no slice", "invalid_slice")
        zz = _check_slice(z, "z")
        zr = None
        if z_range is not None:
            if self.kind is not ActionKind.BOX:
                raise ActionParseError("only a box carries a z-range", "invalid_slice")
            lo, hi = _check_slice(z_range[0], "z1"), _check_slice(z_range[1], "z2")
            if not lo <= zz <= hi:
                raise ActionParseError(f"box z-range {lo}..{hi} must hold its slice {zz}", "invalid_slice")
            zr = (lo, hi)
        return dataclasses.replace(self, z=zz, z_range=zr)

    @property
    def is_volume(self) -> bool:
        """True for a click or box on a volume slice (it carries ``z``)."""
        return self.z is not None

    # --- helpers ------------------------------------------------------------------------------------------------
    @property
    def is_click(self) -> bool:
        return self.kind in (ActionKind.POSITIVE, ActionKind.NEGATIVE)

    def pixel(self, width: int, height: int) -> tuple[int, int]:
        """Pixel (col, row) of a click on an image of the given size."""
        if not self.is_click:
            raise ValueError(f"{self.kind.value} action has no click point")
        assert self.x is not None and self.y is not None
        return to_pixel(self.x, width), to_pixel(self.y, height)

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel box (x1, y1, x2, y2), inclusive corners, on an image of the given size."""
        if self.kind is not ActionKind.BOX or self.box is None:
            raise ValueError(f"{self.kind.value} action has no box")
        x1, y1, x2, y2 = self.box
        return to_pixel(x1, width), to_pixel(y1, height), to_pixel(x2, width), to_pixel(y2, height)

    def text(self) -> str:
        """The action line in the grammar, e.g. ``Positive Point (0.5000, 0.2500)``."""
        return format_action(self)

    def same_as(self, other: Action | None) -> bool:
        """Equality as written in text (4 decimals), used for the repeated-action stop rule."""
        return other is not None and self.text() == other.text()


def _check_slice(value: float, name: str) -> int:
    v = float(value)
    if not math.isfinite(v) or v < 0 or v != int(v):
        raise ActionParseError(f"{name}={value!r} must be a slice index (a whole number >= 0)", "invalid_slice")
    return int(v)


def _check_unit(value: float, name: str) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or v > 1.0:
        raise ActionParseError(
            f"{name}={value!r} is outside [0, 1]; coordinates must be normalized by image width/height",
            "out_of_range",
        )
    return v


def to_pixel(value: float, size: int) -> int:
    """Normalized coordinate -> pixel index, as the reference: ``min(int(v * size), size - 1)``."""
    return min(max(int(value * size), 0), size - 1)


def to_normalized(pixel: float, size: int) -> float:
    """Pixel index -> normalized coordinate at the pixel's centre, so that ``to_pixel`` maps it back."""
    if size <= 0:
        raise ValueError("size must be positive")
    return min(max((float(pixel) + 0.5) / size, 0.0), 1.0)


# ------------------------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------------------------

def format_action(action: Action) -> str:
    zs = "" if action.z is None else f", {action.z}"
    if action.z_range is not None:
        zs += f", {action.z_range[0]}, {action.z_range[1]}"
    if action.kind is ActionKind.POSITIVE:
        return f"Positive Point ({action.x:.4f}, {action.y:.4f}{zs})"
    if action.kind is ActionKind.NEGATIVE:
        return f"Negative Point ({action.x:.4f}, {action.y:.4f}{zs})"
    if action.kind is ActionKind.BOX:
        assert action.box is not None
        x1, y1, x2, y2 = action.box
        return f"Box ({x1:.4f}, {y1:.4f}, {x2:.4f}, {y2:.4f}{zs})"
    return "Terminate"


def format_reply(action: Action, reasoning: str, answer: str | None = None) -> str:
    """A full reply in the reference layout (newlines inside every tag, as the reference reward expects)."""
    think = " ".join(reasoning.split()) or "No reasoning given."
    text = f"<think>\n{think}\n</think>\n<action>\n{format_action(action)}\n</action>"
    if action.kind is ActionKind.TERMINATE:
        ans = answer if answer is not None else (action.answer or "The segmentation is complete.")
        text += f"\n<answer>\n{' '.join(ans.split())}\n</answer>"
    return text


# ------------------------------------------------------------------------------------------------------------------
# Parsing (lenient, what inference accepts)
# ------------------------------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TAG = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.S | re.I) for name in ("think", "action", "answer")}
_CLICK_RE = re.compile(rf"\b(positive|negative)\s*point\s*[:\-]?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*"
                       rf"(?:,\s*({_NUM})\s*)?\)", re.I)
_BOX_RE = re.compile(rf"\bbox\s*[:\-]?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*"
                     rf"(?:,\s*({_NUM})\s*(?:,\s*({_NUM})\s*,\s*({_NUM})\s*)?)?\)", re.I)
_STOP_RE = re.compile(r"\bterminat(?:e|ion)\b", re.I)
# Strict forms (reference format reward): exactly one action per <action>, 4-decimal floats allowed any precision.
_STRICT_CLICK = re.compile(rf"^(Positive|Negative) Point \(({_NUM}), ({_NUM})(?:, (\d+))?\)$")
_STRICT_BOX = re.compile(rf"^Box \(({_NUM}), ({_NUM}), ({_NUM}), ({_NUM})(?:, (\d+)(?:, (\d+), (\d+))?)?\)$")
_STRICT_STOP = re.compile(r"^(Terminate|Termination)$")


@dataclass(frozen=True)
class ParsedReply:
    action: Action
    reasoning: str
    answer: str | None
    raw: str


def _looks_like_pixels(values: list[float]) -> bool:
    return any(v > 1.0 for v in values) and all(v >= 0 for v in values)


def parse_action(text: str, mode: GrammarMode = "extended", profile: ParserProfile = "lenient") -> Action:
    """Parse one action from a reply (or from an action line).

    ``profile="lenient"`` (default): lenient about spacing, case and tags; without ``<action>`` tags the whole reply
    is searched, and the first action that appears wins. ``profile="reference"``: the release's rules, see
    :func:`_parse_action_reference` (``mode`` is then irrelevant: the release has no Box).

    Raises :class:`ActionParseError` with a reason code: ``no_action``, ``pixel_coordinates`` (values > 1 look like
    pixels: reported, never rescaled by guess), ``out_of_range``, ``invalid_box``, ``box_not_allowed``,
    ``invalid_slice`` (a slice index that is not a whole number >= 0, a z-range without its slice),
    ``volume_not_allowed`` (a point with a slice index in the reference grammar).
    """
    if not isinstance(text, str):
        raise ActionParseError(f"expected a string reply, got {type(text).__name__}", "no_action")
    if profile == "reference":
        return _parse_action_reference(text)
    if profile != "lenient":
        raise ValueError(f"unknown parser profile {profile!r}; choose from {', '.join(PARSER_PROFILES)}")
    m = _TAG["action"].search(text)
    body = m.group(1) if m else text
    click = _CLICK_RE.search(body)
    box = _BOX_RE.search(body)
    stop = _STOP_RE.search(body)
    # The first action that appears wins (the reference takes the first match).
    found = [(mt.start(), kind, mt) for kind, mt in (("click", click), ("box", box), ("stop", stop)) if mt]
    if not found:
        snippet = " ".join(text.split())[:120]
        raise ActionParseError(f"no action found in reply: {snippet!r}", "no_action")
    _, kind, match = min(found, key=lambda t: t[0])
    if kind == "stop":
        answer_m = _TAG["answer"].search(text)
        return Action.terminate(answer_m.group(1).strip() if answer_m else None)
    if kind == "box":
        if mode == "reference":
            raise ActionParseError("Box actions are not part of the reference grammar (use mode='extended')",
                                   "box_not_allowed")
        vals = [float(match.group(i)) for i in range(1, 5)]
        if _looks_like_pixels(vals):
            raise ActionParseError(f"box {vals} looks like pixel coordinates; expected values in [0, 1]",
                                   "pixel_coordinates")
        box_action = Action.make_box(*vals)
        if match.group(5) is None:
            return box_action
        z_range = (float(match.group(6)), float(match.group(7))) if match.group(6) is not None else None
        return box_action.on_slice(float(match.group(5)), z_range)  # type: ignore[arg-type]
    sign, xs, ys = match.group(1), float(match.group(2)), float(match.group(3))
    if _looks_like_pixels([xs, ys]):
        raise ActionParseError(f"point ({xs}, {ys}) looks like pixel coordinates; expected values in [0, 1]",
                               "pixel_coordinates")
    click = Action.positive(xs, ys) if sign.lower() == "positive" else Action.negative(xs, ys)
    if match.group(4) is None:
        return click
    if mode == "reference":
        raise ActionParseError("volume actions (a slice index after x, y) are not part of the reference grammar "
                               "(use mode='extended')", "volume_not_allowed")
    return click.on_slice(float(match.group(4)))  # type: ignore[arg-type]


# The release's inference parser, as we read it (infer/mllm_engine.py ``parse_output`` at the stored commit):
# case-sensitive tag regexes (first match, dot matches newline), the action body stripped; then, in this order,
# the substring ``Terminate`` (so "Termination" is not a stop, and "do not Terminate" is one), ``Positive Point``,
# ``Negative Point``; the first ``(<digits/dots>, <digits/dots>)`` anywhere in the action body gives the point
# (no sign, no exponent, no space before the comma). No <action> tags, no coordinates or no known action: no action
# (the release ends the episode). Deviations, both errors where the release would go on: a number like ``1.2.3``
# (the release's float() raises) and coordinates outside [0, 1] (the release passes them on to its segmenter).
_REF_TAG = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.S) for name in ("think", "action", "answer")}
_REF_POINT = re.compile(r"\(([\d.]+),\s*([\d.]+)\)")


def _parse_action_reference(text: str) -> Action:
    m = _REF_TAG["action"].search(text)
    if not m:
        raise ActionParseError("no <action>...</action> block (the reference parser needs the tags)", "no_action")
    body = m.group(1).strip()
    if "Terminate" in body:
        answer_m = _REF_TAG["answer"].search(text)
        return Action.terminate(answer_m.group(1).strip() if answer_m else None)
    if "Positive Point" in body:
        positive = True
    elif "Negative Point" in body:
        positive = False
    else:
        raise ActionParseError(f"no reference action in <action> block: {body[:120]!r}", "no_action")
    pm = _REF_POINT.search(body)
    if not pm:
        raise ActionParseError(f"no (x, y) in the action {body[:120]!r}", "no_action")
    try:
        x, y = float(pm.group(1)), float(pm.group(2))
    except ValueError as exc:
        raise ActionParseError(f"malformed coordinates in {pm.group(0)!r}", "unparseable") from exc
    if _looks_like_pixels([x, y]):
        raise ActionParseError(f"point ({x}, {y}) looks like pixel coordinates; expected values in [0, 1]",
                               "pixel_coordinates")
    return Action.positive(x, y) if positive else Action.negative(x, y)


def parse_reply(text: str, mode: GrammarMode = "extended", profile: ParserProfile = "lenient") -> ParsedReply:
    """Parse a whole reply: the action (see :func:`parse_action` for the profiles), the reasoning and the answer."""
    action = parse_action(text, mode, profile)
    tags = _REF_TAG if profile == "reference" else _TAG
    think = tags["think"].search(text)
    answer = tags["answer"].search(text)
    return ParsedReply(
        action=action,
        reasoning=think.group(1).strip() if think else "",
        answer=answer.group(1).strip() if answer else None,
        raw=text,
    )


# ------------------------------------------------------------------------------------------------------------------
# Strict validation (the reference format reward's rules)
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValidationResult:
    ok: bool
    errors: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.ok


_STRICT_LAYOUT = re.compile(
    r"^<think>\n(?P<think>.+?)\n</think>\n<action>\n(?P<action>.+?)\n</action>(?:\n<answer>\n(?P<answer>.+?)\n</answer>)?$",
    re.S,
)


def validate_reply(text: str, mode: GrammarMode = "extended") -> ValidationResult:
    """Strict check of a reply, as the reference format reward: layout with newlines, one valid action,
    answer tags present after a stop and absent otherwise, coordinates in [0, 1]."""
    errors: list[str] = []
    if not isinstance(text, str):
        return ValidationResult(False, ("reply is not a string",))
    stripped = text.strip()
    for name in ("think", "action"):
        if len(re.findall(rf"<{name}>", stripped)) != 1 or len(re.findall(rf"</{name}>", stripped)) != 1:
            errors.append(f"expected exactly one <{name}>...</{name}> block")
    if len(re.findall(r"<answer>", stripped)) > 1:
        errors.append("expected at most one <answer>...</answer> block")
    if errors:
        return ValidationResult(False, tuple(errors))
    m = _STRICT_LAYOUT.match(stripped)
    if not m:
        if not errors:
            errors.append("layout must be <think>\\n...\\n</think>\\n<action>\\n...\\n</action>"
                          "[\\n<answer>\\n...\\n</answer>] with nothing around it")
        return ValidationResult(False, tuple(errors))
    think, action_text, answer = m.group("think"), m.group("action").strip(), m.group("answer")
    if not think.strip():
        errors.append("empty <think> block")
    if "<" in think or "<" in action_text:
        errors.append("nested tags inside <think> or <action>")
    is_stop = False
    if (cm := _STRICT_CLICK.match(action_text)):
        vals = [float(cm.group(2)), float(cm.group(3))]
        if any(not (0.0 <= v <= 1.0) for v in vals):
            errors.append(f"point coordinates {vals} must lie in [0, 1]")
        if cm.group(4) is not None and mode == "reference":
            errors.append("a point on a volume slice is not an action of the reference grammar")
    elif (bm := _STRICT_BOX.match(action_text)):
        if mode == "reference":
            errors.append("Box is not an action of the reference grammar")
        vals = [float(bm.group(i)) for i in range(1, 5)]
        if any(not (0.0 <= v <= 1.0) for v in vals):
            errors.append(f"box coordinates {vals} must lie in [0, 1]")
        elif not (vals[0] < vals[2] and vals[1] < vals[3]):
            errors.append("box needs x1 < x2 and y1 < y2")
        if bm.group(6) is not None and not int(bm.group(6)) <= int(bm.group(5)) <= int(bm.group(7)):
            errors.append("a volume box's z-range must hold its slice")
    elif _STRICT_STOP.match(action_text):
        is_stop = True
    else:
        errors.append(f"unrecognized action {action_text!r}")
    if is_stop and answer is None:
        errors.append("Terminate must be followed by <answer>\\n...\\n</answer>")
    if not is_stop and answer is not None:
        errors.append("<answer> is only allowed after Terminate")
    if answer is not None and not answer.strip():
        errors.append("empty <answer> block")
    return ValidationResult(not errors, tuple(errors))
