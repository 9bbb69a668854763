"""One played step of an agent episode as the web app lists it (2D and 3D flows)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ibisagent.runtime import USER_REASONING

__all__ = ["StepView", "step_view"]

_THINK = re.compile(r"<think>(.*?)</think>", re.S | re.I)


@dataclass(frozen=True)
class StepView:
    """One played step, ready to show: who acted, the action, the reasoning and the IoU after it."""

    step: int
    actor: str  # "user" or "agent"
    action: str
    reasoning: str
    iou: float | None
    error: str | None = None

    def line(self) -> str:
        head = f"Step {self.step} [{self.actor}] {self.action}"
        if self.iou is not None:
            head += f" (IoU {self.iou:.3f})"
        if self.error:
            head += f" error: {self.error}"
        return head + (f"\n    {self.reasoning}" if self.reasoning and self.actor == "agent" else "")


def step_view(step: int, raw: str, action: str | None, iou_after: float | None, error: str | None) -> StepView:
    """The view of one played step: the reasoning from the reply's ``<think>``, the user's replayed prompts marked
    by :data:`~ibisagent.runtime.USER_REASONING`."""
    m = _THINK.search(raw or "")
    think = " ".join(m.group(1).split()) if m else ""
    actor = "user" if think == USER_REASONING else "agent"
    return StepView(step, actor, action or "(no action)", think, iou_after, error)
