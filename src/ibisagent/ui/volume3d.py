"""The web app's 3D flow, without the web: one volume, prompts on any slice, one 3D mask.

:class:`VolumeAnnotator` is what :class:`ibisagent.ui.annotator.Annotator` hands a volume to in its ``"3d"`` mode.
It turns the volume into a :class:`~ibisagent.volume.SliceStack`, keeps a
:class:`~ibisagent.volume.VolumeSession` on the shared segmenter (a click on any slice re-propagates from there),
plays the 3D agent (a volume policy: ``compact-3d``, ``oracle-3d``, ``challenge-3d``) through
:class:`~ibisagent.volume.VolumeEnv` and the one driver (:func:`ibisagent.episode.drive`), step by step, shows the 3D
mask on whichever slice is shown plus a three-plane projection of it (:func:`projection_view`), and exports the label
volume in the source geometry (NIfTI, or DICOM SEG for a DICOM series) through
:func:`ibisagent.io.volume_masks.save_volume_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.masks import dice_3d, iou_3d
from ibisagent.overlay import display_overlay
from ibisagent.ui.steps import StepView, step_view

__all__ = ["VOLUME_EXPORTS", "VolumeAnnotator", "projection_view"]

#: export formats of the 3D flow: the label volume (NIfTI, DICOM SEG for a DICOM series) or the shown slice (PNG)
VOLUME_EXPORTS = ("nifti", "dicom-seg", "png")
#: long side (pixels) of each panel of the projection view
PROJECTION_SIDE = 160

_MASK_RGB = np.array([34, 200, 80], np.uint8)
_GT_RGB = np.array([250, 220, 40], np.uint8)
_LINE_RGB = np.array([80, 160, 255], np.uint8)


def _resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    rows = np.minimum((np.arange(h) * a.shape[0] / h).astype(int), a.shape[0] - 1)
    cols = np.minimum((np.arange(w) * a.shape[1] / w).astype(int), a.shape[1] - 1)
    return a[rows][:, cols]


def projection_view(mask: np.ndarray | None, spacing: tuple[float, float, float], z: int | None = None,
                    gt: np.ndarray | None = None, side: int = PROJECTION_SIDE) -> np.ndarray:
    """Three maximum projections of a ``[z, y, x]`` mask side by side (RGB uint8): along the slices (the slice
    plane, rows x columns), along the rows (slices x columns) and along the columns (slices x rows), each at its
    physical aspect (``spacing`` mm along z, y, x) with its long side ``side`` pixels; slice 0 at the top of the
    two side views. The mask is green, a ground-truth outline yellow, the shown slice ``z`` a blue line."""
    if mask is None and gt is None:
        raise ValueError("projection_view needs a mask or a ground truth")
    ref = mask if mask is not None else gt
    assert ref is not None
    m = np.zeros(ref.shape, bool) if mask is None else np.asarray(mask, bool)
    depth, height, width = m.shape
    sz, sy, sx = (float(s) if s and math.isfinite(s) and s > 0 else 1.0 for s in spacing)
    planes = [(m.any(0), None if gt is None else gt.any(0), (height * sy, width * sx), False),
              (m.any(1), None if gt is None else gt.any(1), (depth * sz, width * sx), True),
              (m.any(2), None if gt is None else gt.any(2), (depth * sz, height * sy), True)]
    tiles = []
    for proj, gproj, (ph, pw), has_z in planes:
        k = side / max(ph, pw)
        h, w = max(1, round(ph * k)), max(1, round(pw * k))
        tile = np.full((h, w, 3), 28, np.uint8)
        tile[_resize_nearest(proj, h, w)] = _MASK_RGB
        if gproj is not None:
            g = _resize_nearest(gproj, h, w)
            inner = g.copy()
            inner[1:-1, 1:-1] = g[1:-1, 1:-1] & g[:-2, 1:-1] & g[2:, 1:-1] & g[1:-1, :-2] & g[1:-1, 2:]
            tile[g & ~inner] = _GT_RGB
        if has_z and z is not None and depth > 0:
            row = min(h - 1, int((z + 0.5) * h / depth))
            tile[row] = _LINE_RGB
        tiles.append(tile)
    hmax = max(t.shape[0] for t in tiles)
    gap = np.full((hmax, 6, 3), 255, np.uint8)
    padded = [np.concatenate([t, np.full((hmax - t.shape[0], t.shape[1], 3), 255, np.uint8)]) for t in tiles]
    return np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1)


def _action_reply(z: int, inter: Any, width: int, height: int, z_range: tuple[int, int] | None) -> str:
    """A volume-form protocol reply that re-creates one session prompt (the user's reasoning marker)."""
    from ibisagent.protocol import Action, format_reply, to_normalized
    from ibisagent.runtime import USER_REASONING

    if inter.kind == "box":
        x1, y1, x2, y2 = inter.box
        action = Action.make_box(to_normalized(x1, width), to_normalized(y1, height), to_normalized(x2, width),
                                 to_normalized(y2, height)).on_slice(z, z_range)
    else:
        x, y = to_normalized(inter.x, width), to_normalized(inter.y, height)
        action = (Action.positive(x, y) if inter.positive else Action.negative(x, y)).on_slice(z)
    return format_reply(action, USER_REASONING)


class VolumeAnnotator:
    """One volume in 3D: prompts on any slice, one propagated 3D mask, 3D agent runs and exports.

    ``hub`` is the process's :class:`~ibisagent.runtime.SegmenterHub` (its lock serializes the segmenter between
    browser sessions); ``window`` a preset name, ``[center, width]`` or None (the loader's default); ``gt`` a mask in
    the volume's stored layout (or None)."""

    def __init__(self, hub: Any, segmenter: str, volume: Any, *, window: Any = None, gt: np.ndarray | None = None,
                 max_steps: int = 20, slice_index: int | None = None) -> None:
        from ibisagent.volume import SliceStack

        self.hub = hub
        self.segmenter_name = segmenter
        self.volume = volume
        self.max_steps = int(max_steps)
        self.stack = SliceStack.from_volume(volume, window=window)
        self.gt: np.ndarray | None = None if gt is None else self.stack.from_stored(np.asarray(gt))
        self.z = self.stack.depth // 2 if slice_index is None else self._check_z(slice_index)
        self.views: list[StepView] = []
        self.stop_reason: str | None = None
        self.predicted_iou: float | None = None
        self._version = 0  # bumped on every change of the prompts: the key of the cached 3D mask
        self._cached: tuple[int, np.ndarray | None] | None = None
        #: ``on_slice(phase, z)`` while set: per-slice progress of the session's encoding and decoding (the app's bar)
        self.on_slice: Any = None
        self.session = self._new_session()

    # --- state -------------------------------------------------------------------------------------------------
    def _check_z(self, z: int) -> int:
        n = self.stack.depth
        if not 0 <= int(z) < n:
            raise ValueError(f"slice {z} is outside the volume (0..{n - 1})")
        return int(z)

    def _new_session(self) -> Any:
        from ibisagent.volume import VolumeSession

        self._changed()
        return VolumeSession(self.hub.get(self.segmenter_name), on_slice=self._slice_done)

    def _slice_done(self, phase: str, z: int) -> None:
        if self.on_slice is not None:
            self.on_slice(phase, z)

    def _changed(self) -> None:
        self._version += 1

    def _bound(self) -> Any:
        """The hub's lock on the segmenter (bound to the shown slice; the session sets the other slices itself)."""
        return self.hub.bound(self.segmenter_name, self.stack.image(self.z))

    def _ensure_stack(self) -> None:
        if self.session._stack is not self.stack:  # first prompt: the session takes the stack
            self.session.set_image(self.stack)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.stack.shape

    @property
    def image(self) -> np.ndarray:
        """The shown slice (HxWx3 uint8)."""
        return self.stack.image(self.z)

    @property
    def mask(self) -> np.ndarray | None:
        """The 3D mask ``[z, y, x]`` (None before the first prompt; built once per change of the prompts)."""
        if self._cached is None or self._cached[0] != self._version:
            m = self.session.mask if self.session._stack is self.stack else None
            self._cached = (self._version, m)
        return self._cached[1]

    def slice_mask(self, z: int | None = None) -> np.ndarray | None:
        """One slice of the 3D mask (None before the first prompt or where the slice holds none)."""
        if self.session._stack is not self.stack or not self.session.interactions:
            return None
        return self.session.slice_mask(self.z if z is None else int(z))

    def metrics(self) -> tuple[float | None, float | None]:
        """(3D IoU, 3D Dice) against the ground truth (None without one)."""
        if self.gt is None:
            return None, None
        m = self.mask if self.mask is not None else np.zeros_like(self.gt)
        return iou_3d(m, self.gt), dice_3d(m, self.gt)

    def set_slice(self, z: int) -> None:
        """Show slice ``z`` (prompts and the 3D mask stay)."""
        self.z = self._check_z(z)

    def set_gt(self, gt: np.ndarray | None) -> None:
        self.gt = None if gt is None else self.stack.from_stored(np.asarray(gt))

    def set_segmenter(self, name: str) -> None:
        """Switch the segmenter; the prompts are replayed with the new one."""
        if name == self.segmenter_name:
            return
        old = self.session.interactions if self.session._stack is self.stack else ()
        z_range = self.session.z_range if old else None
        self.segmenter_name = name
        self.session = self._new_session()
        if old:
            with self._bound():
                self._ensure_stack()
                for z, inter in old:
                    if inter.kind == "box":
                        self.session.set_box(*inter.box, z=z, z_range=z_range)
                    else:
                        self.session.add_click(inter.x, inter.y, z, inter.positive)
            self._changed()

    # --- prompts -----------------------------------------------------------------------------------------------
    def click(self, x: float, y: float, positive: bool = True) -> np.ndarray:
        """A user click at pixel (x, y) of the shown slice; the mask re-propagates from there. Returns the 3D mask."""
        from ibisagent.segmenters.base import SegmenterError

        h, w = self.stack.slice_shape
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise ValueError(f"click ({x}, {y}) lies outside the {w}x{h} slice")
        try:
            with self._bound():
                self._ensure_stack()
                mask = self.session.add_click(float(x), float(y), self.z, positive=positive)
        except SegmenterError as exc:
            raise ValueError(str(exc)) from exc
        finally:
            self._changed()
        self._log_user(f"{'Positive' if positive else 'Negative'} click ({int(x)}, {int(y)}) on slice {self.z}")
        return mask

    def undo(self) -> None:
        if self.mask is not None and self.session.interactions:
            self.session.undo()
            self._changed()
            self._log_user("Undo")

    def reset(self) -> None:
        self.session = self._new_session()
        self.views, self.stop_reason, self.predicted_iou = [], None, None

    def _log_user(self, action: str) -> None:
        self.views.append(StepView(len(self.views) + 1, "user", action, "", self.metrics()[0]))
        self.stop_reason, self.predicted_iou = None, None  # the state is the user's now

    # --- the 3D agent ------------------------------------------------------------------------------------------
    def run_agent(self, query: str, policy: str, *, from_current: bool = False) -> Iterator[StepView]:
        """Play a 3D agent episode (a generator of :class:`~ibisagent.ui.annotator.StepView`). ``policy`` must be a
        volume policy. ``from_current=True`` replays the current prompts first and lets the agent go on from there,
        else it starts from an empty volume. The shown slice follows the agent's prompts."""
        from ibisagent.episode import StopRules, drive
        from ibisagent.policies.base import PolicyError, create_policy, list_policies
        from ibisagent.segmenters.base import SegmenterError
        from ibisagent.volume import VolumeEnv

        volume_policies = list_policies(volume=True)
        if policy not in volume_policies:
            raise ValueError(f"policy {policy!r} plays 2D images; for a volume in 3D pick one of "
                             f"{', '.join(volume_policies)} (or switch the volume mode to 2D)")
        pol = create_policy(policy)
        if getattr(pol, "requires_gt", False) and self.gt is None:
            raise ValueError(f"policy {policy!r} needs a ground-truth mask: add the volume's label map (NIfTI or "
                             "DICOM SEG), or choose compact-3d, which works from the query alone")
        prior: list[str] = []
        if from_current and self.mask is not None:
            h, w = self.stack.slice_shape
            prior = [_action_reply(z, inter, w, h, self.session.z_range) for z, inter in self.session.interactions]
        session = self._new_session()
        env = VolumeEnv(session, StopRules(max_steps=self.max_steps + len(prior)))
        if not from_current:
            self.views = []
        base, n_user = len(self.views), len(prior)
        self.stop_reason, self.predicted_iou = None, None
        try:
            for turn in drive(env, pol, self.stack, query, self.gt, prior=prior, guard=self._bound):
                self.session = session
                self._changed()
                info = turn.info
                action = info.get("action")
                if action is not None and action.z is not None:
                    self.z = int(action.z)
                if turn.done:
                    self.stop_reason = turn.stop_reason
                    estimate = getattr(pol, "predicted_iou", None)
                    m = session.mask
                    self.predicted_iou = estimate(m) if callable(estimate) and m is not None else None
                if info["step"] <= n_user:
                    continue  # the user's own prompts, replayed: already listed
                v = step_view(base + info["step"] - n_user, turn.reply, action.text() if action else None,
                              info.get("iou"), info.get("error"))
                self.views.append(v)
                yield v
        except (PolicyError, SegmenterError) as exc:
            raise ValueError(str(exc)) from exc
        finally:
            self._changed()

    # --- display / export --------------------------------------------------------------------------------------
    def render(self, show_gt: bool = True) -> np.ndarray:
        """The shown slice with the 3D mask's slice, the clicks on that slice, its box prompt and the ground-truth
        contour."""
        m = self.slice_mask()
        pts: list[list[float]] = []
        labels: list[int] = []
        box = None
        if self.session._stack is self.stack:
            xy, labs = self.session.points(self.z)
            pts, labels = xy.tolist(), labs.tolist()
            boxes = [i.box for i in self.session.anchors.get(self.z, ()) if i.kind == "box"]
            box = boxes[-1] if boxes else None
        gt = self.gt[self.z] if (show_gt and self.gt is not None) else None
        return display_overlay(self.image, m, pts, labels, box, gt=gt)

    def projection(self) -> np.ndarray:
        """The three-plane maximum projection of the 3D mask (see :func:`projection_view`)."""
        m = self.mask if self.mask is not None else np.zeros(self.stack.shape, bool)
        return projection_view(m, self.stack.spacing, self.z, self.gt)

    def status_parts(self) -> list[str]:
        z, h, w = self.stack.shape
        parts = [f"{w}x{h}x{z} volume in 3D", f"slice {self.z} / {z - 1}"]
        m = self.mask
        n_prompts = len(self.session.interactions) if m is not None else 0
        n_slices = len(self.session.anchors) if m is not None else 0
        parts.append(f"{n_prompts} prompts on {n_slices} slices")
        if m is None or not m.any():
            parts.append("mask 0 voxels")
        else:
            zs = np.flatnonzero(m.any((1, 2)))
            parts.append(f"mask {int(m.sum())} voxels on slices {zs[0]}-{zs[-1]}")
        parts.append(f"this slice {int(m[self.z].sum()) if m is not None else 0} px")
        iou, dice = self.metrics()
        if iou is not None:
            parts.append(f"3D IoU {iou:.3f}, Dice {dice:.3f}")
        if self.stop_reason:
            parts.append(f"agent stopped: {self.stop_reason}")
            if self.predicted_iou is not None:
                parts.append(f"agent's predicted IoU {self.predicted_iou:.2f}")
        return parts

    def export(self, fmt: str, out_dir: Path, stem: str, label: str = "object") -> Path:
        """Write the label volume (``nifti``: ``.nii.gz`` with the source affine; ``dicom-seg``: a DICOM SEG of the
        source series) or the shown slice's mask (``png``)."""
        from ibisagent.io import save_mask
        from ibisagent.io.volume_masks import save_volume_mask, volume_mask_suffix

        m = self.mask if self.mask is not None else np.zeros(self.stack.shape, bool)
        if fmt == "png":
            return save_mask(out_dir / f"{stem}_slice{self.z}_mask.png", m[self.z])
        stored = self.stack.to_stored(m)
        if fmt == "nifti":
            return save_volume_mask(stored, self.volume, out_dir / f"{stem}_mask.nii.gz")
        if fmt == "dicom-seg":
            if volume_mask_suffix(self.volume) != ".dcm":
                raise ValueError("DICOM SEG needs a DICOM series as the source (upload all files of the series); "
                                 "export NIfTI for this volume")
            return save_volume_mask(stored, self.volume, out_dir / f"{stem}_seg.dcm", label=label or "object")
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(VOLUME_EXPORTS)}")

