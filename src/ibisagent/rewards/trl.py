"""TRL-style reward functions: ``(prompts, completions, **kwargs) -> list[float | None]``.

Dataset columns arrive as keyword lists, one value per completion. The functions read the state columns written by
``ibisagent export --format hf`` (:mod:`ibisagent.exports.hf_dataset`): ``image_path``, ``ground_truth`` (mask path
or RLE JSON), ``points``, ``labels``, ``box``, ``step``, ``prev_mask_rle``, ``segmenter``, ``grammar``.

>>> from ibisagent.rewards.trl import make_reward_functions
>>> trainer = GRPOTrainer(..., reward_funcs=make_reward_functions(), train_dataset=ds)

One function per registered component (``format_reward``, ``answer_reward``, ``placement_reward``,
``progress_reward``, ``length_reward``, then any added with :func:`ibisagent.rewards.register_reward`) plus
``total_reward``; TRL logs each under its ``__name__``. They share a small cache, so a completion's action goes
through the segmenter once, not once per component. Scoring is :func:`ibisagent.rewards.core.score_step` on the
row's state (:mod:`ibisagent.rewards.rows`), the same path verl's ``compute_score`` takes. A row whose state columns are missing scores
``None`` ("not applicable"), except ``format_reward`` which needs only the text.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from ibisagent.rewards.core import COMPONENTS, RewardBreakdown, RewardConfig, score_step
from ibisagent.rewards.core import format_reward as _format_reward
from ibisagent.rewards.rows import step_arguments

__all__ = ["completion_text", "make_reward_functions", "reward_functions"]

_STATE_KEYS = ("image_path", "points", "labels", "box", "step", "prev_mask_rle", "segmenter", "grammar")
RewardFn = Callable[..., list[float | None]]


def completion_text(completion: Any) -> str:
    """The reply text of a TRL completion: a string, or a conversational list of messages (last assistant turn;
    content either a string or a list of ``{"type": "text", "text": ...}`` parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, Sequence) and completion:
        msg = completion[-1]
        content = msg.get("content", "") if isinstance(msg, dict) else msg
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _column(kwargs: dict[str, Any], key: str, i: int) -> Any:
    values = kwargs.get(key)
    if values is None:
        return None
    try:
        return values[i]
    except (IndexError, TypeError, KeyError):
        return None


class _Scorer:
    """Scores (completion, row) pairs once with :func:`~ibisagent.rewards.core.score_step` and serves all component
    functions from a small LRU."""

    def __init__(self, config: RewardConfig, segmenter: str | None, max_items: int = 4096) -> None:
        self.config = config
        self.segmenter = segmenter
        self.max_items = max_items
        self._cache: OrderedDict[str, RewardBreakdown] = OrderedDict()

    def row(self, text: str, kwargs: dict[str, Any], i: int) -> RewardBreakdown | None:
        gt = _column(kwargs, "ground_truth", i)
        info = {k: _column(kwargs, k, i) for k in _STATE_KEYS}
        if gt is None or not info.get("image_path"):
            return None
        if self.segmenter:
            info["segmenter"] = self.segmenter
        key = json.dumps([text, str(gt)[:256], info], sort_keys=True, default=str)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        result = score_step(text, **step_arguments(gt, info, "reference", self.config))
        self._cache[key] = result
        if len(self._cache) > self.max_items:
            self._cache.popitem(last=False)
        return result


def _make(name: str, scorer: _Scorer) -> RewardFn:
    def reward(prompts: list[Any] | None = None, completions: list[Any] | None = None,
               **kwargs: Any) -> list[float | None]:
        out: list[float | None] = []
        for i, comp in enumerate(completions or []):
            text = completion_text(comp)
            if name == "format":
                grammar = _column(kwargs, "grammar", i) or "reference"
                out.append(_format_reward(text, grammar))
                continue
            res = scorer.row(text, kwargs, i)
            out.append(None if res is None else float(res.total if name == "total" else res.components()[name]))
        return out

    reward.__name__ = f"{name}_reward"
    reward.__qualname__ = reward.__name__
    reward.__doc__ = f"ibisagent {name} reward for TRL (one value per completion; None when not applicable)."
    return reward


def make_reward_functions(config: RewardConfig | None = None, *, segmenter: str | None = None,
                          components: Sequence[str] | None = None) -> list[RewardFn]:
    """TRL reward functions for the chosen components (default: every registered component and the total).

    Pass only the five to ``GRPOTrainer(reward_funcs=...)`` with equal ``reward_weights`` to reproduce the reference
    total, or only ``("total",)``. ``segmenter`` overrides the row's ``segmenter`` column.
    """
    if components is None:
        components = (*COMPONENTS, "total")
    unknown = [c for c in components if c not in (*COMPONENTS, "total")]
    if unknown:
        raise ValueError(f"unknown reward component(s) {unknown}; choose from {(*COMPONENTS, 'total')}")
    scorer = _Scorer(config or RewardConfig(), segmenter)
    return [_make(c, scorer) for c in components]


def reward_functions() -> dict[str, RewardFn]:
    """Name -> function for every component with the reference configuration (contract tests iterate over it)."""
    return {f.__name__: f for f in make_reward_functions()}


_DEFAULT = reward_functions()
format_reward = _DEFAULT["format_reward"]
answer_reward = _DEFAULT["answer_reward"]
placement_reward = _DEFAULT["placement_reward"]
progress_reward = _DEFAULT["progress_reward"]
length_reward = _DEFAULT["length_reward"]
total_reward = _DEFAULT["total_reward"]
__all__ += ["answer_reward", "format_reward", "length_reward", "placement_reward", "progress_reward", "total_reward"]
