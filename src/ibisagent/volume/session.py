"""The volume session: clicks and boxes on any slice of a volume, one 3D mask, by propagating a 2D segmenter.

How a 3D mask is made (the MedSAM2 / SAM-video idea with a 2D promptable segmenter):

* An **anchor** is a slice the user (or the policy) prompted. Its mask comes from its own prompts (all clicks on that
  slice and its latest box), with the slice's previous logits as mask feedback, as in the 2D
  :class:`~ibisagent.session.Session`.
* **Propagation** walks from each anchor outward, both directions in lockstep (with ``batch_decode`` the fronts of a
  step decode in one :meth:`~ibisagent.segmenters.base.Segmenter.predict_batch` call): slice ``s`` is predicted from
  the previous slice's mask, its box (widened by ``box_margin``) as the box prompt and, with ``mask_input``, its
  low-resolution logits as the mask input. A front stops where the object ends: the mask is
  smaller than ``min_area`` pixels, shrinks below ``min_area_ratio`` (or grows above ``max_area_ratio``) of the
  previous slice's area, or the backend's
  predicted IoU falls below ``min_score``; the slices that front had filled beyond that point are cleared. It also
  stops at another anchor, at a slice nearer to another anchor that already holds that anchor's mask, at the
  z-range of a box that carries one, and, when it re-propagates after a correction, where its new mask agrees with
  the slice's old one (Dice >= ``agree_stop``): a correction only changes the slices it reaches before that.
* **SAM2's video predictor** (``propagation="sam2-video"``, a SAM2 / MedSAM2 segmenter only): instead of the walk
  above, the prompts go to SAM2's own ``SAM2VideoPredictor`` with the slices as video frames (held in memory; see
  :mod:`ibisagent.segmenters.sam2_video`). Each interaction sets its slice's prompts (``add_new_points_or_box``:
  every click on that slice and its latest box; a slice a propagation reached gets its tracked mask fed back, as in
  SAM2) and then ``propagate_in_video`` runs from the first prompted slice to the last slice and, ``reverse=True``,
  back to slice 0, within a box's z-range when it carries one: every slice is re-predicted with the memory of the
  prompted slices (SAM2's object score, not an area rule, decides where the object ends; :class:`PropagationConfig`
  does not apply). A slice's owner is the nearest prompted slice, its score SAM2's object probability. Undo
  restores the previous masks at once and replays the remaining interactions into a fresh predictor state before
  the next one (the predictor has no undo of its own).
* **Encoding**: every slice is encoded once per session (an in-session table by slice index; the backend's own
  caches are keyed by the slice image's content, so a second session on the same volume reuses them too).
* **Progress**: ``on_slice(phase, z)``, when set, is called as each slice is done: ``"encode"`` after slice ``z`` is
  encoded (the slow part on a CPU: about a second per slice), ``"decode"`` after it is decoded (an anchor or a
  propagation step). SAM2's video predictor encodes and tracks inside its own calls: it reports nothing.

The session implements :class:`ibisagent.episode.EpisodeSession`: ``set_image(stack)``, ``apply(action)`` for
volume actions (:attr:`ibisagent.protocol.Action.z`), ``mask`` (Z, H, W) bool or None before the first prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ibisagent.masks import bbox
from ibisagent.protocol import Action, ActionKind
from ibisagent.segmenters.base import PromptSet, Segmenter, SegmenterError, SegResult
from ibisagent.session import Interaction

from .stack import SliceStack

__all__ = ["PROPAGATIONS", "PropagationConfig", "VideoPropagator", "VolumeSession", "VolumeTimings"]

#: the propagation choices of :class:`VolumeSession` (and ``Agent.segment_volume`` / ``--propagation``)
PROPAGATIONS = ("slices", "sam2-video")


@runtime_checkable
class VideoPropagator(Protocol):
    """A video-style propagation backend (what ``SAM2Segmenter.video_propagator()`` returns): frames of one stack,
    prompts per frame, and a propagation that re-predicts every frame it visits (results with ``mask``, ``logits``,
    ``score``)."""

    name: str
    encoder_runs: int
    encoder_s: float

    def set_frames(self, frames: np.ndarray) -> None: ...

    def reset(self) -> None: ...

    def add_prompts(self, z: int, points: np.ndarray | None = None, labels: np.ndarray | None = None,
                    box: tuple[float, float, float, float] | None = None) -> Any: ...

    def propagate(self, z_range: tuple[int, int] | None = None) -> dict[int, Any]: ...


@dataclass(frozen=True)
class PropagationConfig:
    """When a propagation front goes on and how it prompts each slice (see the module docstring)."""

    min_area: int = 10  # pixels: a smaller mask means the object has ended
    min_area_ratio: float = 0.15  # a mask below this fraction of the previous slice's area means it has ended
    max_area_ratio: float = 1.5  # a mask above this multiple of the previous slice's area is a leak (0: no limit)
    min_score: float = 0.3  # the backend's predicted IoU below this means it has ended (NaN scores never stop)
    box_margin: float = 0.0  # the previous slice's box grows by this fraction of its size on each side
    box_min_margin: float = 0.0  # ... and by at least this many pixels
    clip_to_box: bool = True  # keep only the part of a propagated mask inside its box prompt
    mask_input: bool = False  # feed the previous slice's logits as the mask input
    agree_stop: float = 0.97  # a re-propagation stops where its mask matches the slice's old one at this Dice
    keep_box_on_correction: bool = True  # a click on a propagated slice keeps that slice's propagation box
    #: decode the fronts of a step in one predict_batch call; off by default: LiteMedSAM's batch path is its PyTorch
    #: decoder, measured slower here than one ONNX decode per slice (2 CPU cores: batch of 2 1.5 s, predict 0.2 s)
    batch_decode: bool = False

    def __post_init__(self) -> None:
        if self.min_area < 0 or not 0 <= self.min_area_ratio < 1 or not 0 <= self.agree_stop <= 1:
            raise ValueError("min_area >= 0, 0 <= min_area_ratio < 1 and 0 <= agree_stop <= 1 are required")
        if self.box_margin < 0:
            raise ValueError(f"box_margin must be >= 0, got {self.box_margin}")


@dataclass
class VolumeTimings:
    """Seconds in the image encoder and the decoder, encoder runs and slice decodes of one session."""

    encoder_s: float = 0.0
    decoder_s: float = 0.0
    encoded_slices: int = 0
    decoded_slices: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class _Slice:
    """One slice's state: its mask, low-res logits, predicted IoU, the anchor whose propagation made it (or its own
    index for an anchor; -1 when empty) and the box it was propagated with."""

    mask: np.ndarray | None = None
    logits: np.ndarray | None = None
    score: float = float("nan")
    owner: int = -1
    box: tuple[float, float, float, float] | None = None


@dataclass
class _Step:
    """What one interaction changed (for undo): the slices' previous states and the anchor's previous prompts."""

    z: int
    before: dict[int, _Slice] = field(default_factory=dict)
    anchor_before: list[Interaction] | None = None
    z_range_before: tuple[int, int] | None = None
    interaction: Interaction | None = None
    #: video propagation: the slice's prompts and the z-range after this interaction (what a replay sets again)
    video: tuple[list[Interaction], tuple[int, int] | None] | None = None


class VolumeSession:
    """Prompts on the slices of one volume and the 3D mask they produce.

    >>> s = VolumeSession(create_segmenter("litemedsam-click")); s.set_image(SliceStack.from_volume(vol))
    >>> s.set_box(40, 30, 90, 70, z=12); s.add_click(60, 50, z=15); s.mask.shape  # (Z, H, W)

    ``propagation``: ``"slices"`` (default: the 2D segmenter slice by slice, tuned by ``config``), ``"sam2-video"``
    (SAM2's video predictor; the segmenter must be SAM2 / MedSAM2) or a :class:`VideoPropagator` object.
    """

    def __init__(self, segmenter: Segmenter, config: PropagationConfig | None = None, *,
                 propagation: str | VideoPropagator = "slices",
                 on_slice: Callable[[str, int], Any] | None = None) -> None:
        self.segmenter = segmenter
        self.on_slice = on_slice
        self._video = _video_backend(segmenter, propagation)
        if self._video is not None and config is not None:
            raise ValueError("a PropagationConfig tunes the slice-by-slice propagation; "
                             f"propagation={self._video.name!r} takes none")
        self.propagation = "slices" if self._video is None else self._video.name
        self.config = config or PropagationConfig()
        self.timings = VolumeTimings()
        self._stack: SliceStack | None = None
        self._emb: dict[int, np.ndarray] = {}
        self._video_stale = False
        self._reset_state(0)

    # --- image -------------------------------------------------------------------------------------------------
    def set_image(self, image: SliceStack) -> None:
        if not isinstance(image, SliceStack):
            raise SegmenterError(f"a volume session takes a SliceStack, got {type(image).__name__}")
        self._stack = image
        self._emb = {}
        self.timings = VolumeTimings()
        if self._video is not None:
            t = time.perf_counter()
            self._video.set_frames(image.images)
            self._count_video(t, 0)
        self._video_stale = False
        self._reset_state(image.depth)

    @property
    def stack(self) -> SliceStack:
        if self._stack is None:
            raise SegmenterError("no volume set: call set_image(SliceStack) first")
        return self._stack

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.stack.shape

    def reset(self) -> None:
        """Forget every prompt (same volume, new object); embeddings are kept."""
        self._reset_state(self.stack.depth)
        if self._video is not None:
            self._video.reset()
            self._video_stale = False

    def _reset_state(self, depth: int) -> None:
        self._slices = [_Slice() for _ in range(depth)]
        self._anchors: dict[int, list[Interaction]] = {}
        self._z_range: tuple[int, int] | None = None
        self._steps: list[_Step] = []

    # --- state -------------------------------------------------------------------------------------------------
    @property
    def mask(self) -> np.ndarray | None:
        """The 3D mask (Z, H, W) bool, or None before the first prompt."""
        if not self._steps:
            return None
        z, (h, w) = self.stack.depth, self.stack.slice_shape
        out = np.zeros((z, h, w), bool)
        for k, s in enumerate(self._slices):
            if s.mask is not None:
                out[k] = s.mask
        return out

    def slice_mask(self, z: int) -> np.ndarray | None:
        return self._slices[z].mask

    def slice_logits(self, z: int) -> np.ndarray | None:
        return self._slices[z].logits

    @property
    def slice_scores(self) -> np.ndarray:
        """The backend's predicted IoU per slice (NaN where the slice holds no mask)."""
        return np.array([s.score if s.mask is not None and s.mask.any() else math.nan for s in self._slices])

    @property
    def owners(self) -> np.ndarray:
        """Per slice: the anchor whose prompts or propagation made its mask (-1: none)."""
        return np.array([s.owner for s in self._slices], np.int64)

    @property
    def score(self) -> float:
        """Area-weighted mean predicted IoU of the slices with a mask (NaN without one)."""
        areas = np.array([int(s.mask.sum()) if s.mask is not None else 0 for s in self._slices], float)
        scores = self.slice_scores
        ok = (areas > 0) & np.isfinite(scores)
        return float((scores[ok] * areas[ok]).sum() / areas[ok].sum()) if ok.any() else math.nan

    @property
    def anchors(self) -> dict[int, tuple[Interaction, ...]]:
        """Prompted slices -> their prompts."""
        return {z: tuple(v) for z, v in sorted(self._anchors.items())}

    @property
    def interactions(self) -> tuple[tuple[int, Interaction], ...]:
        """Every prompt as (slice, interaction), in the order given."""
        return tuple((st.z, st.interaction) for st in self._steps if st.interaction is not None)

    @property
    def z_range(self) -> tuple[int, int] | None:
        return self._z_range

    def points(self, z: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Clicks as ((N, 3) x, y, z pixels, (N,) labels 1/0); on slice ``z`` only when given ((N, 2) x, y)."""
        rows = [(i.x, i.y, k, int(i.positive)) for k, v in sorted(self._anchors.items()) for i in v
                if i.kind == "click" and (z is None or k == z)]
        arr = np.asarray(rows, np.float32).reshape(-1, 4)
        xy = arr[:, :2] if z is not None else arr[:, :3]
        return xy, arr[:, 3].astype(np.int64)

    def slice_box(self, z: int) -> tuple[float, float, float, float] | None:
        """The active box on slice ``z``: its latest box prompt, else the box it was propagated with."""
        boxes = [i.box for i in self._anchors.get(z, []) if i.kind == "box"]
        return boxes[-1] if boxes else self._slices[z].box

    # --- verbs -------------------------------------------------------------------------------------------------
    def add_click(self, x: float, y: float, z: int, positive: bool = True) -> np.ndarray:
        """A click at pixel (x, y) of slice ``z``; returns the new 3D mask."""
        h, w = self.stack.slice_shape
        z = self._check_z(z)
        if not (np.isfinite(x) and np.isfinite(y)) or not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise SegmenterError(f"click ({x}, {y}) lies outside the {w}x{h} slice")
        return self._interact(z, Interaction("click", float(x), float(y), bool(positive)))

    def set_box(self, x1: float, y1: float, x2: float, y2: float, z: int,
                z_range: tuple[int, int] | None = None) -> np.ndarray:
        """A box (pixels, inclusive corners) on slice ``z``; ``z_range`` (first, last slice) bounds propagation, as the
        challenge's 3D box does. Returns the new 3D mask."""
        z = self._check_z(z)
        zr = None
        if z_range is not None:
            lo, hi = self._check_z(z_range[0]), self._check_z(z_range[1])
            if not lo <= z <= hi:
                raise SegmenterError(f"the box's z-range {lo}..{hi} does not hold its slice {z}")
            zr = (lo, hi)
        return self._interact(z, Interaction("box", box=(float(x1), float(y1), float(x2), float(y2))), zr)

    def apply(self, action: Action) -> np.ndarray | None:
        """Apply a volume action (normalized x, y on slice ``action.z``). Terminate changes nothing."""
        if action.kind is ActionKind.TERMINATE:
            return self.mask
        if action.z is None:
            raise SegmenterError(f"{action.text()} names no slice; a volume action carries one, e.g. "
                                 "'Positive Point (0.5000, 0.5000, 12)'")
        h, w = self.stack.slice_shape
        if action.kind is ActionKind.BOX:
            return self.set_box(*action.pixel_box(w, h), z=action.z, z_range=action.z_range)
        x, y = action.pixel(w, h)
        return self.add_click(x, y, action.z, positive=action.kind is ActionKind.POSITIVE)

    def undo(self) -> np.ndarray | None:
        """Take back the last prompt and what its propagation changed."""
        if not self._steps:
            return None
        st = self._steps.pop()
        for k, old in st.before.items():
            self._slices[k] = old
        if st.anchor_before is None:
            self._anchors.pop(st.z, None)
        else:
            self._anchors[st.z] = st.anchor_before
        self._z_range = st.z_range_before
        if self._video is not None:
            self._video_stale = True  # the predictor has no undo: replayed before the next interaction
        return self.mask

    # --- internals: one interaction ----------------------------------------------------------------------------
    def _check_z(self, z: int) -> int:
        n = self.stack.depth
        if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not 0 <= int(z) < n:
            raise SegmenterError(f"slice {z!r} is outside the volume (0..{n - 1})")
        return int(z)

    def _interact(self, z: int, inter: Interaction, z_range: tuple[int, int] | None = None) -> np.ndarray:
        step = _Step(z, anchor_before=list(self._anchors[z]) if z in self._anchors else None,
                     z_range_before=self._z_range, interaction=inter)
        if self._video is not None:
            return self._interact_video(step, z_range)
        cur = self._slices[z]
        prompts = list(self._anchors.get(z, []))
        if (not prompts and inter.kind == "click" and self.config.keep_box_on_correction and cur.box is not None
                and cur.mask is not None and cur.mask.any()):
            prompts.append(Interaction("box", box=cur.box))  # a correction keeps the box the slice was made with
        prompts.append(inter)
        result = self._decode([self._prompt_set(z, prompts, cur.logits)])[0]
        self._anchors[z] = prompts
        if inter.kind == "box":
            self._z_range = z_range
        step.before[z] = cur
        self._slices[z] = _Slice(result.mask, result.logits, float(result.score), z, None)
        self._steps.append(step)
        self._propagate([z], step)
        return self.mask  # type: ignore[return-value]

    def _prompt_set(self, z: int, prompts: list[Interaction], mask_input: np.ndarray | None) -> PromptSet:
        clicks = [i for i in prompts if i.kind == "click"]
        boxes = [i.box for i in prompts if i.kind == "box"]
        pts = np.asarray([(c.x, c.y) for c in clicks], np.float32).reshape(-1, 2)
        labs = np.asarray([int(c.positive) for c in clicks], np.int64)
        box = np.asarray(boxes[-1], np.float32) if boxes else None
        return PromptSet(shape=self.stack.slice_shape, points=pts, labels=labs, box=box,
                         mask_input=mask_input if self.config.mask_input else None, image=self.stack.image(z),
                         embedding=z)  # the slice index; _decode swaps in the embedding

    # --- internals: video propagation --------------------------------------------------------------------------
    def _interact_video(self, step: _Step, z_range: tuple[int, int] | None) -> np.ndarray:
        """Set the slice's prompts in the video predictor and propagate; every slice takes the new result (the
        tracked mask a correction refines is fed back by the predictor itself, so no box is kept here)."""
        assert self._video is not None and step.interaction is not None
        z, inter = step.z, step.interaction
        prompts = list(self._anchors.get(z, [])) + [inter]
        zr = z_range if inter.kind == "box" else self._z_range
        first = min([*self._anchors, z])
        if zr is not None and not zr[0] <= first <= zr[1]:
            raise SegmenterError(f"the box's z-range {zr[0]}..{zr[1]} leaves out the prompted slice {first}, "
                                 "where SAM2's video propagation starts")
        if self._video_stale:
            self._replay_video()
        step.video = (prompts, zr)
        try:
            results = self._run_video(z, prompts, zr)
        except Exception:
            self._video_stale = True  # the predictor may hold part of this interaction: replay before the next
            raise
        self._anchors[z] = prompts
        self._z_range = zr
        self._write_video(results, step)
        self._steps.append(step)
        return self.mask  # type: ignore[return-value]

    def _run_video(self, z: int, prompts: list[Interaction], z_range: tuple[int, int] | None) -> dict[int, Any]:
        assert self._video is not None
        ps = self._prompt_set(z, prompts, None)
        t, runs = time.perf_counter(), self._video.encoder_runs
        box = None if ps.box is None else tuple(float(v) for v in ps.box)
        self._video.add_prompts(z, ps.points if len(ps.points) else None, ps.labels if len(ps.labels) else None,
                                box)  # type: ignore[arg-type]
        results = self._video.propagate(z_range)
        self._count_video(t, runs)
        self.timings.decoded_slices += len(results) + 1
        return results

    def _count_video(self, t: float, runs: int) -> None:
        """Split the seconds since ``t`` into encoder time (the backend's own count) and decoder time."""
        assert self._video is not None
        enc_before = self.timings.encoder_s
        self.timings.encoded_slices += self._video.encoder_runs - runs
        self.timings.encoder_s = self._video.encoder_s
        self.timings.decoder_s += max(0.0, time.perf_counter() - t - (self.timings.encoder_s - enc_before))

    def _write_video(self, results: dict[int, Any], step: _Step) -> None:
        anchors = sorted(self._anchors)
        for k in range(self.stack.depth):
            step.before.setdefault(k, self._slices[k])
            r = results.get(k)
            if r is None or not r.mask.any():
                self._slices[k] = _Slice()
                continue
            owner = min(anchors, key=lambda a: (abs(a - k), a))
            self._slices[k] = _Slice(r.mask, r.logits, float(r.score), owner, None)

    def _replay_video(self) -> None:
        """Bring the predictor to the state of the remaining interactions: a fresh state, then each one's prompts
        and propagation again, in order (the session's masks already are that state's; they are not rewritten)."""
        assert self._video is not None
        self._video.reset()
        for st in self._steps:
            assert st.video is not None
            self._run_video(st.z, *st.video)
        self._video_stale = False

    # --- internals: propagation --------------------------------------------------------------------------------
    def _propagate(self, starts: list[int], step: _Step) -> None:
        """Walk outward from each start anchor in both directions, all fronts in lockstep (one batch per step)."""
        fronts = [(a, d, a) for a in starts for d in (-1, 1)]  # (anchor, direction, last slice written)
        while fronts:
            todo: list[tuple[int, int, int]] = []
            items: list[PromptSet] = []
            for a, d, prev in fronts:
                s = prev + d
                if not self._may_write(a, d, s):
                    continue
                p = self._slices[prev]
                assert p.mask is not None
                box = self._grow_box(p.mask)
                if box is None:
                    continue
                todo.append((a, d, s))
                items.append(PromptSet(shape=self.stack.slice_shape, points=np.zeros((0, 2), np.float32),
                                       labels=np.zeros((0,), np.int64), box=np.asarray(box, np.float32),
                                       mask_input=p.logits if self.config.mask_input else None,
                                       image=self.stack.image(s), embedding=s))
            if not items:
                return
            results = self._decode(items)
            fronts = []
            for (a, d, s), res, it in zip(todo, results, items, strict=True):
                if self.config.clip_to_box and it.box is not None:
                    res = _clip(res, it.box)
                prev_area = int(self._slices[s - d].mask.sum())  # type: ignore[union-attr]
                if self._ended(res, prev_area):
                    self._clear_from(a, d, s, step)
                    continue
                old = self._slices[s]
                step.before.setdefault(s, old)
                box = tuple(float(v) for v in it.box) if it.box is not None else None
                self._slices[s] = _Slice(res.mask, res.logits, float(res.score), a, box)  # type: ignore[arg-type]
                if old.owner >= 0 and old.mask is not None and _dice(old.mask, res.mask) >= self.config.agree_stop:
                    continue  # converged with the slice's earlier mask: the slices beyond stay as they are
                fronts.append((a, d, s))

    def _may_write(self, a: int, d: int, s: int) -> bool:
        n = self.stack.depth
        if not 0 <= s < n or s in self._anchors:
            return False
        if self._z_range is not None and not self._z_range[0] <= s <= self._z_range[1]:
            return False
        owner = self._slices[s].owner
        if owner in (-1, a):
            return True
        # held by another anchor's front: give way when that anchor is nearer (ties to the lower anchor)
        da, do = abs(s - a), abs(s - owner)
        return da < do or (da == do and a < owner)

    def _ended(self, res: SegResult, prev_area: int) -> bool:
        area = int(res.mask.sum())
        cfg = self.config
        if area < max(cfg.min_area, 1) or area < cfg.min_area_ratio * prev_area:
            return True
        if cfg.max_area_ratio > 0 and area > cfg.max_area_ratio * prev_area:
            return True
        return math.isfinite(res.score) and res.score < cfg.min_score

    def _clear_from(self, a: int, d: int, s: int, step: _Step) -> None:
        """The object ended at slice ``s``: clear it and the slices beyond that anchor ``a``'s front had filled."""
        k = s
        while 0 <= k < self.stack.depth and k not in self._anchors and self._slices[k].owner in (a, -1):
            if self._slices[k].owner == a:
                step.before.setdefault(k, self._slices[k])
                self._slices[k] = _Slice()
            elif k != s:
                break
            k += d

    def _grow_box(self, mask: np.ndarray) -> tuple[float, float, float, float] | None:
        b = bbox(mask)
        if b is None:
            return None
        h, w = mask.shape
        x1, y1, x2, y2 = b
        mx = max(self.config.box_min_margin, self.config.box_margin * (x2 - x1 + 1))
        my = max(self.config.box_min_margin, self.config.box_margin * (y2 - y1 + 1))
        x1, x2 = max(0.0, x1 - mx), min(w - 1.0, x2 + mx)
        y1, y2 = max(0.0, y1 - my), min(h - 1.0, y2 + my)
        if x2 <= x1 or y2 <= y1:
            return None
        return float(x1), float(y1), float(x2), float(y2)

    # --- internals: encoder and decoder ------------------------------------------------------------------------
    def _embedding(self, z: int) -> np.ndarray | None:
        if z in self._emb:
            return self._emb[z]
        t = time.perf_counter()
        before = self.segmenter.encoder_runs
        emb = self.segmenter.embedding(self.stack.image(z))
        self.timings.encoder_s += time.perf_counter() - t
        self.timings.encoded_slices += self.segmenter.encoder_runs - before
        if self.segmenter.encoder_runs > before:
            self._report("encode", z)
        if emb is not None:
            self._emb[z] = np.asarray(emb, np.float16)  # half the memory; the decoder takes any float array
        return None if emb is None else self._emb[z]

    def _report(self, phase: str, z: int) -> None:
        if self.on_slice is not None:
            self.on_slice(phase, z)

    def embedding(self, z: int) -> np.ndarray | None:
        """Slice ``z``'s image embedding (encoded once per session), or None for a backend without one."""
        return self._embedding(self._check_z(z))

    def _decode(self, items: list[PromptSet]) -> list[SegResult]:
        """Decode prompt sets whose ``embedding`` holds a slice index: in one batch from the slices' embeddings when
        the backend has them, else one by one on the slice images (``ensure_image`` + ``predict``)."""
        zs = [int(it.embedding) for it in items]
        embs = [self._embedding(z) for z in zs]
        t = time.perf_counter()
        if self.config.batch_decode and all(e is not None for e in embs):
            batch = [PromptSet(it.shape, it.points, it.labels, it.box, it.mask_input, None, e)
                     for it, e in zip(items, embs, strict=True)]
            out = self.segmenter.predict_batch(batch)
        else:
            out = []
            for it, e in zip(items, embs, strict=True):
                t_enc = time.perf_counter()
                # with an embedding in the table, setting the image is a cache hit; without one it encodes
                if self.segmenter.ensure_image(it.image) and e is None:  # type: ignore[arg-type]
                    self.timings.encoded_slices += 1
                    self._report("encode", int(it.embedding))  # type: ignore[arg-type]
                enc = time.perf_counter() - t_enc
                self.timings.encoder_s += enc
                t += enc  # encoder time is not decoder time
                out.append(self.segmenter.predict(it.points if len(it.points) else None,
                                                  it.labels if len(it.labels) else None, it.box, it.mask_input))
        self.timings.decoder_s += time.perf_counter() - t
        self.timings.decoded_slices += len(items)
        for z in zs:
            self._report("decode", z)
        return out


def _video_backend(segmenter: Segmenter, propagation: str | VideoPropagator) -> VideoPropagator | None:
    """None for the slice-by-slice propagation, else the video backend ``propagation`` names (or is)."""
    if isinstance(propagation, str):
        if propagation == "slices":
            return None
        if propagation != "sam2-video":
            raise ValueError(f"unknown propagation {propagation!r}; choose one of: {', '.join(PROPAGATIONS)}")
        make = getattr(segmenter, "video_propagator", None)
        if not callable(make):
            raise SegmenterError(f"propagation 'sam2-video' needs a SAM2 / MedSAM2 segmenter (backend 'sam2'); "
                                 f"{getattr(segmenter, 'name', type(segmenter).__name__)!r} has no video predictor "
                                 "(use propagation='slices')")
        return make()
    if isinstance(propagation, VideoPropagator):
        return propagation
    raise ValueError(f"propagation must be one of {', '.join(PROPAGATIONS)} or a VideoPropagator, got "
                     f"{type(propagation).__name__}")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def _clip(res: SegResult, box: np.ndarray) -> SegResult:
    """``res`` with its mask cut to the pixels inside ``box`` (x1, y1, x2, y2, inclusive)."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    keep = np.zeros_like(res.mask)
    keep[y1 : y2 + 1, x1 : x2 + 1] = True
    return SegResult(res.mask & keep, res.logits, res.score)
