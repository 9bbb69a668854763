"""An interactive segmentation session (nnInteractive style): one image, a list of interactions, the current mask.

Prompts are verbs (``add_click``, ``set_box``), ``undo`` steps back, ``reset`` starts a new object on the same image.
Every call passes ALL interactions so far to the segmenter together with the previous low-res logits (mask
feedback), as the reference does. Pixel coordinates: x = column, y = row.

A session owns its image: several sessions may share one segmenter, and each call first makes sure the segmenter
holds this session's image (``Segmenter.ensure_image``; cheap with an embedding cache). A session without
``set_image`` refuses to predict instead of using whatever image the segmenter last held.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ibisagent.protocol import Action, ActionKind
from ibisagent.segmenters.base import Segmenter, SegmenterError, SegResult

__all__ = ["Interaction", "Session"]


@dataclass(frozen=True)
class Interaction:
    """One prompt: a click (x, y, positive) or a box (x1, y1, x2, y2)."""

    kind: str  # "click" or "box"
    x: float = 0.0
    y: float = 0.0
    positive: bool = True
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class _State:
    mask: np.ndarray | None
    logits: np.ndarray | None
    score: float


class Session:
    """Holds the interactions on one image and the mask they produce.

    >>> s = Session(create_segmenter("fake")); s.set_image(img)
    >>> s.add_click(120, 80, positive=True); s.mask.sum()
    """

    def __init__(self, segmenter: Segmenter, *, mask_feedback: bool = True) -> None:
        self.segmenter = segmenter
        self.mask_feedback = mask_feedback
        self._image: np.ndarray | None = None
        self._interactions: list[Interaction] = []
        self._states: list[_State] = [_State(None, None, float("nan"))]

    # --- image -----------------------------------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> None:
        img = np.asarray(image)
        self.segmenter.set_image(img)
        self._image = img
        self.reset()

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            raise SegmenterError("no image set: call set_image(image) first")
        return self._image

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of this session's image."""
        img = self.image
        return int(img.shape[0]), int(img.shape[1])

    # --- state -----------------------------------------------------------------------------------------------
    @property
    def mask(self) -> np.ndarray | None:
        """Current mask (bool HxW), or None before the first interaction."""
        return self._states[-1].mask

    @property
    def logits(self) -> np.ndarray | None:
        return self._states[-1].logits

    @property
    def score(self) -> float:
        return self._states[-1].score

    @property
    def interactions(self) -> tuple[Interaction, ...]:
        return tuple(self._interactions)

    @property
    def points(self) -> np.ndarray:
        pts = [(i.x, i.y) for i in self._interactions if i.kind == "click"]
        return np.asarray(pts, np.float32).reshape(-1, 2)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([int(i.positive) for i in self._interactions if i.kind == "click"], np.int64)

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        """The active box: the most recent one (a new box replaces the old)."""
        boxes = [i.box for i in self._interactions if i.kind == "box"]
        return boxes[-1] if boxes else None

    # --- verbs -----------------------------------------------------------------------------------------------
    def add_click(self, x: float, y: float, positive: bool = True) -> np.ndarray:
        """Add a click at pixel (x, y) and return the new mask."""
        h, w = self.shape
        if not (np.isfinite(x) and np.isfinite(y)):
            raise SegmenterError(f"click coordinates must be finite numbers, got ({x}, {y})")
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise SegmenterError(f"click ({x}, {y}) lies outside the {w}x{h} image")
        return self._push(Interaction("click", float(x), float(y), bool(positive)))

    def set_box(self, x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
        """Set the box (pixels, inclusive corners; replaces any previous box) and return the new mask."""
        return self._push(Interaction("box", box=(float(x1), float(y1), float(x2), float(y2))))

    def apply(self, action: Action) -> np.ndarray | None:
        """Apply a protocol action (normalized coordinates). Terminate changes nothing and returns the mask."""
        h, w = self.shape
        if action.kind is ActionKind.TERMINATE:
            return self.mask
        if action.z is not None:
            raise SegmenterError(f"{action.text()} names slice {action.z} of a volume, but this session holds a 2D "
                                 "image (use ibisagent.volume.VolumeSession)")
        if action.kind is ActionKind.BOX:
            return self.set_box(*action.pixel_box(w, h))
        x, y = action.pixel(w, h)
        return self.add_click(x, y, positive=action.kind is ActionKind.POSITIVE)

    def undo(self) -> np.ndarray | None:
        """Remove the last interaction; returns the mask before it (None when nothing is left)."""
        if self._interactions:
            self._interactions.pop()
            self._states.pop()
        return self.mask

    def reset(self) -> None:
        """Forget all interactions (same image, new object)."""
        self._interactions = []
        self._states = [_State(None, None, float("nan"))]

    def predict_now(self) -> SegResult:
        """Re-run the segmenter on the current interactions (e.g. after changing segmenter options)."""
        return self._run(self._interactions, self._states[-2].logits if len(self._states) > 1 else None)

    # --- internals -------------------------------------------------------------------------------------------
    def _push(self, inter: Interaction) -> np.ndarray:
        inters = [*self._interactions, inter]
        result = self._run(inters, self.logits)
        self._interactions = inters
        self._states.append(_State(result.mask, result.logits, float(result.score)))
        return result.mask

    def _run(self, inters: list[Interaction], prev_logits: np.ndarray | None) -> SegResult:
        self.segmenter.ensure_image(self.image)  # another user of a shared segmenter may have set its own image
        clicks = [i for i in inters if i.kind == "click"]
        boxes = [i.box for i in inters if i.kind == "box"]
        pts = np.asarray([(c.x, c.y) for c in clicks], np.float32).reshape(-1, 2)
        labs = np.asarray([int(c.positive) for c in clicks], np.int64)
        return self.segmenter.predict(
            pts if len(pts) else None,
            labs if len(labs) else None,
            np.asarray(boxes[-1], np.float32) if boxes else None,
            prev_logits if self.mask_feedback else None,
        )
