"""Rewards for RL on the segmentation MDP: the five reference rewards, each returned separately, with verl and TRL
entry points. See ``docs/rewards.md`` for every deviation from the reference release.

* :func:`register_reward` — add a component (``fn(transition, config) -> float``); :data:`COMPONENTS` lists them.
* :func:`score_transition` — score a reply whose action the caller already applied (no segmenter call).
* :func:`score_step` — apply the reply's action through a segmenter, then score it.
* :func:`compute_score` — verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)``.
* :func:`make_reward_functions` — TRL ``(prompts, completions, **kwargs) -> list[float]`` functions.
"""

from ibisagent.rewards.core import (
    COMPONENTS,
    DEFAULT_CONFIG,
    REWARDS,
    RewardBreakdown,
    RewardConfig,
    RewardInputError,
    Transition,
    answer_reward,
    box_placement_reward,
    click_placement_reward,
    format_reward,
    length_reward,
    progress_reward,
    register_reward,
    score_step,
    score_transition,
)
from ibisagent.rewards.trl import make_reward_functions, reward_functions
from ibisagent.rewards.verl import SCORERS, compute_score, register_scorer

__all__ = [
    "COMPONENTS",
    "DEFAULT_CONFIG",
    "REWARDS",
    "SCORERS",
    "RewardBreakdown",
    "RewardConfig",
    "RewardInputError",
    "Transition",
    "answer_reward",
    "box_placement_reward",
    "click_placement_reward",
    "compute_score",
    "format_reward",
    "length_reward",
    "make_reward_functions",
    "progress_reward",
    "register_reward",
    "register_scorer",
    "reward_functions",
    "score_step",
    "score_transition",
]
