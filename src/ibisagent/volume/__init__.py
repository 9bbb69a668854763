"""3D volumes as first-class episodes (issue 28): a slice stack, a volume session that propagates a 2D promptable
segmenter through the slices, the volume oracles and the volume environment played by :func:`ibisagent.episode.drive`.

Layer 3 (see docs/design.md): it imports ``io``, ``segmenters``, ``protocol``, ``masks``, ``overlay``, ``session``,
``oracle_click`` and ``episode``; the 3D agent (``ibisagent.policies.volume``) and the 3D evaluation
(``ibisagent.evaluation.volume``) build on it.
"""

from ibisagent.volume.cases import case_label, load_volume_stack
from ibisagent.volume.env import VolumeEnv, VolumeObservation, VolumeStepResult
from ibisagent.volume.session import (
    PROPAGATIONS,
    PropagationConfig,
    VideoPropagator,
    VolumeSession,
    VolumeTimings,
)
from ibisagent.volume.stack import SliceStack

__all__ = ["PROPAGATIONS", "PropagationConfig", "SliceStack", "VideoPropagator", "VolumeEnv", "VolumeObservation", "VolumeSession", "VolumeStepResult",
           "VolumeTimings", "case_label", "load_volume_stack"]
