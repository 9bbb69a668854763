"""Promptable segmenters behind one interface; see :mod:`ibisagent.segmenters.base`."""

from ibisagent.segmenters.base import (
    Segmenter,
    SegmenterError,
    SegmenterUnavailable,
    SegResult,
    Timings,
    create_segmenter,
    list_segmenters,
    register_segmenter,
)

__all__ = [
    "SegResult",
    "Segmenter",
    "SegmenterError",
    "SegmenterUnavailable",
    "Timings",
    "create_segmenter",
    "list_segmenters",
    "register_segmenter",
]
