"""Chat building shared by the multimodal-LLM policies (``hf``, ``openai``) and the LLM trainers.

The environment already renders the chat (system prompt, first/refinement turn, optional history) into
``Observation.chat``. A policy may override two things: the prompt wording (a template file, e.g. the released
checkpoint's exact prompts) and whether earlier turns are sent (history on/off). Every new overlay is a ``user`` turn
with an image, never a ``tool`` message: Qwen2.5-VL chat templates drop images from tool messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ibisagent.env import ChatTurn, Observation
from ibisagent.prompts import PromptTemplate, load_prompts

__all__ = ["ChatBuilder", "to_messages"]


def to_messages(turns: tuple[ChatTurn, ...] | list[ChatTurn]) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Turns -> (messages in the transformers multimodal layout, images in order of appearance)."""
    msgs: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    for turn in turns:
        content: list[dict[str, Any]] = []
        if turn.image is not None:
            images.append(turn.image)
            content.append({"type": "image"})
        content.append({"type": "text", "text": turn.text})
        msgs.append({"role": turn.role, "content": content})
    return msgs, images


@dataclass
class ChatBuilder:
    """Builds the chat a policy sends for an observation.

    ``prompts``: None keeps the environment's wording; a template name or JSON path re-renders the system prompt and
    the user turns with that wording. ``history``: None follows the environment (``EnvConfig.history``); False sends
    only system + current turn; True keeps the policy's own transcript of earlier turns and replies.
    """

    prompts: str | PromptTemplate | None = None
    history: bool | None = None
    _template: PromptTemplate | None = field(default=None, init=False, repr=False)
    _transcript: list[ChatTurn] = field(default_factory=list, init=False, repr=False)
    _pending: ChatTurn | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.prompts, PromptTemplate):
            self._template = self.prompts
        elif self.prompts is not None:
            self._template = load_prompts(self.prompts)

    @property
    def template(self) -> PromptTemplate | None:
        return self._template

    def begin_episode(self) -> None:
        self._transcript = []
        self._pending = None

    def turns(self, obs: Observation) -> list[ChatTurn]:
        """The chat for ``obs`` (system, optional history, current user turn with the overlay)."""
        if self._template is not None:
            text = self._template.first(obs.query) if obs.is_first_turn else self._template.refine(obs.query)
            current = ChatTurn("user", text, obs.overlay)
            system = ChatTurn("system", self._template.system)
        else:
            current = obs.chat[-1]
            system = obs.chat[0] if obs.chat and obs.chat[0].role == "system" else ChatTurn("system", "")
        if self.history is False:
            middle: list[ChatTurn] = []
        elif self.history is True:
            middle = list(self._transcript)
        elif self._template is None:
            middle = list(obs.chat[1:-1])  # whatever the environment keeps
        else:  # the environment keeps history in its own wording: re-use ours instead
            middle = list(self._transcript) if len(obs.chat) > 2 else []
        self._pending = current
        return [system, *middle, current]

    def record_reply(self, reply: str) -> None:
        """Remember the last user turn and the reply (used when ``history=True``)."""
        if self._pending is not None:
            self._transcript.extend([self._pending, ChatTurn("assistant", reply)])
            self._pending = None

    def messages(self, obs: Observation) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        return to_messages(self.turns(obs))
