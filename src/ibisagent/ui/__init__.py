"""The annotation web app (:mod:`ibisagent.ui.app`) and its browser-free logic (:mod:`ibisagent.ui.annotator`)."""

from ibisagent.ui.annotator import Annotator, AnnotatorError

__all__ = ["Annotator", "AnnotatorError"]
