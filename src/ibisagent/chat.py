"""The one chat renderer: what a policy is shown at a turn, as chat turns and as messages in each layout.

The environment (``Observation.chat``), the multimodal-LLM policies (``hf``, ``openai`` through
:class:`ibisagent.policies._chat.ChatBuilder`), the LLM trainers and the dataset exports all build their prompts
here, so the prompt a model is trained on is the prompt it is sent:

* :func:`render_chat`: system prompt, earlier turns (when history is on), then ONE user turn: the template's first-turn
  text with the plain image before any mask, its refinement text with the policy overlay afterwards. Every new
  overlay is a ``user`` turn with an image, never a ``tool`` message (Qwen2.5-VL chat templates drop tool images).
* :func:`to_messages`: transformers / OpenAI multimodal layout (``[{"type": "image"}, {"type": "text", ...}]``) and
  the images in order of appearance.
* :func:`to_dataset_messages`: the same layout as stored in a Hugging Face dataset (image parts carry
  ``"text": None`` so every part has one Arrow struct type).
* :func:`to_text_messages`: string contents with an ``<image>`` placeholder per image (verl, LLaMA-Factory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ibisagent.prompts import PromptTemplate

__all__ = ["IMAGE_PLACEHOLDER", "ChatTurn", "render_chat", "to_dataset_messages", "to_messages", "to_text_messages"]

#: the image placeholder of string-content layouts
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ChatTurn:
    """One chat message. ``image`` is the picture attached to a user turn: an HxWx3 uint8 array, or the path of its
    file where a dataset refers to images by path."""

    role: str  # "system", "user" or "assistant"
    text: str
    image: np.ndarray | str | None = None


def render_chat(template: PromptTemplate, query: str, image: np.ndarray | str, *, first_turn: bool,
                history: Sequence[ChatTurn] = ()) -> tuple[ChatTurn, ...]:
    """The chat of one turn: system, ``history`` (earlier user turns and replies), the current user turn with
    ``image`` (the plain image on the first turn, the overlay of the current mask afterwards)."""
    text = template.first(query) if first_turn else template.refine(query)
    return (ChatTurn("system", template.system), *history, ChatTurn("user", text, image))


def to_messages(turns: Sequence[ChatTurn]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Turns -> (messages in the transformers/OpenAI multimodal layout, the images in order of appearance)."""
    msgs: list[dict[str, Any]] = []
    images: list[Any] = []
    for turn in turns:
        content: list[dict[str, Any]] = []
        if turn.image is not None:
            images.append(turn.image)
            content.append({"type": "image"})
        content.append({"type": "text", "text": turn.text})
        msgs.append({"role": turn.role, "content": content})
    return msgs, images


def to_dataset_messages(turns: Sequence[ChatTurn]) -> list[dict[str, Any]]:
    """:func:`to_messages` as stored in a Hugging Face dataset (image parts get ``"text": None``)."""
    msgs, _ = to_messages(turns)
    for m in msgs:
        m["content"] = [{"type": "image", "text": None} if p["type"] == "image" else p for p in m["content"]]
    return msgs


def to_text_messages(turns: Sequence[ChatTurn], placeholder: str = IMAGE_PLACEHOLDER) -> list[dict[str, str]]:
    """Turns as ``{"role", "content": str}`` messages, ``placeholder`` in front of the text of a turn with an image."""
    return [{"role": t.role, "content": (placeholder if t.image is not None else "") + t.text} for t in turns]
