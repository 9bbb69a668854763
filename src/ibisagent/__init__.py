"""ibisagent: interactive, text-prompted medical image segmentation by an agent that clicks like an annotator.

Entry points: :class:`ibisagent.agent.Agent` (policy + segmenter + episode rules), :mod:`ibisagent.segmenters`,
:mod:`ibisagent.session`, :mod:`ibisagent.env`, :mod:`ibisagent.protocol`; the ``ibisagent`` command line.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Agent", "Episode", "Session", "create_policy", "create_segmenter", "__version__"]

_LAZY = {
    "Agent": "ibisagent.agent",
    "Episode": "ibisagent.agent",
    "Session": "ibisagent.session",
    "create_policy": "ibisagent.policies",
    "create_segmenter": "ibisagent.segmenters",
}


def __getattr__(name: str) -> Any:  # lazy imports keep `import ibisagent` light
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ibisagent' has no attribute {name!r}")
