"""Trajectory synthesis: oracle, box-first, reflective, lookahead rollouts through a real segmenter, written as
resumable JSONL shards (``ibisagent synthesize``).

>>> from ibisagent.synthesis import SynthesisConfig, run_synthesis, iter_trajectories
>>> run_synthesis("/data/ph2_dermoscopy", "out/", SynthesisConfig(variants=("oracle", "reflective"), workers=2))
>>> for traj in iter_trajectories("out/"): ...
"""

from ibisagent.synthesis.runner import (
    SynthesisConfig,
    SynthesisError,
    SynthesisResult,
    iter_skipped,
    iter_trajectories,
    run_synthesis,
    synthesize_case,
)
from ibisagent.synthesis.trajectories import VARIANTS, RolloutConfig, Trajectory, TrajectoryStep

__all__ = [
    "VARIANTS",
    "RolloutConfig",
    "SynthesisConfig",
    "SynthesisError",
    "SynthesisResult",
    "Trajectory",
    "TrajectoryStep",
    "iter_skipped",
    "iter_trajectories",
    "run_synthesis",
    "synthesize_case",
]
