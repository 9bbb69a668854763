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
* :func:`render_volume_chat`: the same turn for a volume episode (issue 28): the image is a strip of slices side by
  side and the texts say which slices they are and how a volume action names its slice (extended grammar).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ibisagent.prompts import PromptTemplate

__all__ = ["IMAGE_PLACEHOLDER", "VOLUME_SYSTEM_NOTE", "ChatTurn", "render_chat", "render_volume_chat", "to_dataset_messages",
           "to_messages", "to_text_messages", "volume_turn_note"]

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


#: appended to the system prompt of a volume episode (our wording; the reference grammar has no volume form)
VOLUME_SYSTEM_NOTE = (
    "The image is a 3D volume shown as a strip of its slices side by side, left to right, each at the same size. "
    "Every point or box names the slice it is drawn on, as one more number: Positive Point (x, y, z), "
    "Negative Point (x, y, z), Box (x1, y1, x2, y2, z). x and y are normalized to [0, 1] by the width and height "
    "of ONE slice (not of the strip); z is the slice index, a whole number counted from 0. The segmentation model "
    "propagates each prompt through the neighbouring slices; the green mask on every slice shown is the current 3D "
    "segmentation."
)


def volume_turn_note(slices: Sequence[int], depth: int, current: int, *, overview: bool) -> str:
    """The sentence of a volume turn that says what the strip shows (slice indices left to right)."""
    listed = ", ".join(str(int(z)) for z in slices)
    if overview:
        return (f"The strip shows {len(slices)} slices spread over the volume's {depth} (slices {listed}, left to "
                "right): choose the slice where the target is clearest and prompt there.")
    return (f"The strip shows slices {listed} of {depth}, left to right; slice {int(current)} (the middle one where "
            "the volume allows) is where the last prompt went.")


def render_volume_chat(template: PromptTemplate, query: str, strip: np.ndarray, slices: Sequence[int], *,
                       depth: int, current: int, first_turn: bool, overview: bool | None = None,
                       history: Sequence[ChatTurn] = ()) -> tuple[ChatTurn, ...]:
    """:func:`render_chat` for a volume episode: the template's system prompt plus :data:`VOLUME_SYSTEM_NOTE`, and
    one user turn whose image is ``strip`` (the slices ``slices`` side by side) and whose text is the template's
    first/refinement text followed by :func:`volume_turn_note`. ``overview`` (default: ``first_turn``) says the
    strip is spread over the whole volume rather than around ``current``."""
    if not len(slices):
        raise ValueError("a volume turn needs at least one slice")
    overview = first_turn if overview is None else overview
    text = template.first(query) if first_turn else template.refine(query)
    note = volume_turn_note(slices, depth, current, overview=overview)
    return (ChatTurn("system", f"{template.system}\n{VOLUME_SYSTEM_NOTE}"), *history,
            ChatTurn("user", f"{text}\n{note}", strip))


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
