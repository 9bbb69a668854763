"""How the reference release's reward function reads a reply (``RewardConfig(profile="reference")``).

Our reading of the release's verl reward (``verl/utils/reward_score/med_seg.py``), rewritten here, not copied:

* The action is read only in the exact tag layout ``<action>\\n...\\n</action>``: a click is ``Positive Point (x, y)``
  or ``Negative Point (x, y)`` right after the newline, with x and y each ``0``, ``0.<digits>``, ``1`` or
  ``1.<zeros>`` (spaces around them allowed, none needed: ``(0.5,0.5)`` reads); a stop is spelled ``Termination``
  (``Terminate``, the spelling of its inference parser, is not read). Anything else reads as no action.
* Format is 1 only when three checks pass: a ``<think>\\n...\\n</think>\\n<action>\\n...\\n</action>`` block
  somewhere in the reply; the first action block's text (stripped) is exactly a click or ``Termination``; and an
  ``<answer>`` tag, when present, is closed after it, while a ``Termination`` without an answer fails.
"""

from __future__ import annotations

import re

from ibisagent.protocol import Action

__all__ = ["release_action", "release_format_ok"]

_NUM = r"(0(?:\.\d+)?|1(?:\.0+)?)"
_CLICK_BODY = rf"(Positive|Negative) Point \(\s*{_NUM}\s*,\s*{_NUM}\s*\)"
_CLICK_BLOCK = re.compile(rf"<action>\n{_CLICK_BODY}\n</action>")
_STOP_BLOCK = re.compile(r"<action>\n\s*Termination\s*\n</action>")
_THINK_THEN_ACTION = re.compile(r"<think>\n.*?\n</think>\n\s*<action>\n.*?\n</action>", re.DOTALL)
_FIRST_ACTION = re.compile(r"<action>\n(.*?)\n</action>", re.DOTALL)
_CLICK_EXACT = re.compile(_CLICK_BODY)


def release_action(reply: str) -> Action | None:
    """The action the release's reward reads from ``reply``: a click (checked first), a Terminate (its
    ``Termination``), or None."""
    m = _CLICK_BLOCK.search(reply)
    if m:
        x, y = float(m.group(2)), float(m.group(3))
        return Action.positive(x, y) if m.group(1) == "Positive" else Action.negative(x, y)
    if _STOP_BLOCK.search(reply):
        return Action.terminate()
    return None


def release_format_ok(reply: str) -> bool:
    """The release's unified format check (think layout, action syntax, answer tags)."""
    if not _THINK_THEN_ACTION.search(reply):
        return False
    first = _FIRST_ACTION.search(reply)
    if first is None:
        return False
    body = first.group(1).strip()
    if not (_CLICK_EXACT.fullmatch(body) or body == "Termination"):
        return False
    if "<answer>" in reply:
        return "</answer>" in reply and reply.index("<answer>") < reply.index("</answer>")
    return not _STOP_BLOCK.search(reply)
