"""What a text query says about the image beyond the object's name."""

from __future__ import annotations

import re

__all__ = ["mirror_safe"]

_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_safe(query: str) -> bool:
    """Whether a left-right mirrored image still matches ``query`` (False when it names a side: the mirrored
    "left kidney" is the right one)."""
    return _SIDE.search(query) is None
