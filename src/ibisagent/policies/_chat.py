"""Chat building shared by the multimodal-LLM policies (``hf``, ``openai``) and the LLM trainers.

The environment already renders the chat (system prompt, first/refinement turn, optional history) into
``Observation.chat`` with :func:`ibisagent.chat.render_chat`. A policy may override two things: the prompt wording
(a template file, e.g. the released checkpoint's exact prompts; re-rendered with the same function) and whether
earlier turns are sent (history on/off, with the policy's own transcript).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ibisagent.chat import ChatTurn, render_chat, to_messages
from ibisagent.env import Observation
from ibisagent.prompts import PromptTemplate, load_prompts

__all__ = ["ChatBuilder"]


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
        if self.history is False:
            middle: list[ChatTurn] = []
        elif self.history is True:
            middle = list(self._transcript)
        elif self._template is None:
            middle = list(obs.chat[1:-1])  # whatever the environment keeps
        else:  # the environment keeps history in its own wording: re-use ours instead
            middle = list(self._transcript) if len(obs.chat) > 2 else []
        if self._template is not None:
            chat = list(render_chat(self._template, obs.query, obs.overlay, first_turn=obs.is_first_turn,
                                    history=middle))
        else:
            system = obs.chat[0] if obs.chat and obs.chat[0].role == "system" else ChatTurn("system", "")
            chat = [system, *middle, obs.chat[-1]]
        self._pending = chat[-1]
        return chat

    def record_reply(self, reply: str) -> None:
        """Remember the last user turn and the reply (used when ``history=True``)."""
        if self._pending is not None:
            self._transcript.extend([self._pending, ChatTurn("assistant", reply)])
            self._pending = None

    def messages(self, obs: Observation) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        return to_messages(self.turns(obs))
