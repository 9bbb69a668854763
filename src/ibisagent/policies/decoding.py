"""Decoding settings of the multimodal-LLM policies (``hf``, ``openai``), by profile.

Two profiles, chosen with the policy option ``profile``:

* ``default`` (ours): greedy, at most 256 new tokens. A reply of the trained layout (think + action, and an answer
  on a stop) fits in far fewer; the cap bounds the cost of a model that rambles.
* ``reference``: the release's ``infer/mllm_engine.py`` generation config: greedy (``do_sample=False``; its
  ``temperature=1.0`` has no effect without sampling), one sequence, at most 512 new tokens.

Options given explicitly (``max_new_tokens``, ``temperature``, ``top_p``) win over the profile's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ibisagent.policies.base import PolicyError

__all__ = ["DECODING_PROFILES", "Decoding", "DecodingProfile", "resolve_decoding"]

DecodingProfile = Literal["default", "reference"]


@dataclass(frozen=True)
class Decoding:
    """How a reply is generated: ``temperature == 0`` means greedy (``top_p`` then unused)."""

    max_new_tokens: int
    temperature: float
    top_p: float

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


DECODING_PROFILES: dict[str, Decoding] = {
    "default": Decoding(max_new_tokens=256, temperature=0.0, top_p=1.0),
    "reference": Decoding(max_new_tokens=512, temperature=0.0, top_p=1.0),
}


def resolve_decoding(
    profile: str = "default",
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> Decoding:
    """The profile's settings with the explicitly given ones on top; :class:`PolicyError` for bad values."""
    if profile not in DECODING_PROFILES:
        raise PolicyError(f"unknown decoding profile {profile!r}; choose from {', '.join(DECODING_PROFILES)}")
    base = DECODING_PROFILES[profile]
    out = Decoding(
        max_new_tokens=base.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
        temperature=base.temperature if temperature is None else float(temperature),
        top_p=base.top_p if top_p is None else float(top_p),
    )
    if out.max_new_tokens < 1:
        raise PolicyError("max_new_tokens must be >= 1")
    if not out.temperature >= 0:
        raise PolicyError("temperature must be >= 0 (0 = greedy)")
    if not 0 < out.top_p <= 1:
        raise PolicyError("top_p must be in (0, 1]")
    return out
