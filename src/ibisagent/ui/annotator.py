"""What the web app does, without the web: one annotator's image, clicks, agent runs and exports.

:class:`Annotator` is the per-browser-session state behind :mod:`ibisagent.ui.app`. It opens 2D images and volume
slices through :mod:`ibisagent.io`, keeps a :class:`~ibisagent.session.Session` of the user's and the agent's
prompts on the shared segmenter (:class:`~ibisagent.runtime.SegmenterHub`), plays agent episodes step by step, and
exports the mask (PNG, or NIfTI in the source geometry).

A volume opens in one of two modes (``volume_mode``): ``"3d"`` hands it to
:class:`~ibisagent.ui.volume3d.VolumeAnnotator` (prompts on any slice, one propagated 3D mask, the 3D agent, label
volume export); ``"2d"`` segments the shown slice alone, as a 2D image.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.agent import Episode, StepRecord
from ibisagent.masks import dice, iou
from ibisagent.overlay import display_overlay
from ibisagent.runtime import SegmenterHub, env_for, image_key, iter_episode
from ibisagent.session import Session
from ibisagent.ui.steps import StepView, step_view

__all__ = ["Annotator", "AnnotatorError", "StepView", "VOLUME_FORMATS", "VOLUME_MODES", "WINDOW_CHOICES",
           "default_volume_policy", "step_view"]

#: formats opened as volumes (slice slider): NIfTI, NRRD / MetaImage, a DICOM series
VOLUME_FORMATS = ("nifti", "itk", "dicom-series")
#: how a volume is segmented: "3d" (one mask through the volume, propagated from prompts on any slice) or "2d"
#: (the shown slice alone)
VOLUME_MODES = ("3d", "2d")
#: window presets offered in the app ("auto" = the loader's default for the data)
WINDOW_CHOICES = ("auto", "ct-soft-tissue", "ct-lung", "ct-bone", "ct-brain", "ct-liver", "mr", "minmax")

class AnnotatorError(ValueError):
    """Something the user must fix (no image loaded, a policy that needs a ground-truth mask, a bad file...)."""


def _view(rec: StepRecord) -> StepView:
    return step_view(rec.step, rec.raw, rec.action, rec.iou, rec.error)


class Annotator:
    """State of one annotator. All segmenter use goes through ``hub`` (shared by all sessions of a process).

    >>> a = Annotator(hub, segmenter="fake", policy="oracle")
    >>> a.open("case.png", mask_path="case_mask.png", query="segment the lesion")
    >>> for view in a.run_agent(): ...
    >>> a.click(120, 80, positive=False); a.export("png")
    """

    def __init__(self, hub: SegmenterHub, segmenter: str, policy: str = "oracle", max_steps: int = 20, *,
                 volume_mode: str = "2d", volume_policy: str | None = None, max_voxels: int | None = None) -> None:
        from ibisagent.runtime import MAX_VOLUME_VOXELS

        if volume_mode not in VOLUME_MODES:
            raise AnnotatorError(f"volume_mode must be one of {', '.join(VOLUME_MODES)}, got {volume_mode!r}")
        self.hub = hub
        self.segmenter_name = segmenter
        self.policy_name = policy
        self.max_steps = int(max_steps)
        self.volume_mode = volume_mode
        self.volume_policy = volume_policy or default_volume_policy()
        self.max_voxels = int(max_voxels or MAX_VOLUME_VOXELS)
        self.vol3d: Any = None  # ibisagent.ui.volume3d.VolumeAnnotator of a volume opened in 3D
        self.path: Path | None = None
        self.name = ""
        self.format: str | None = None
        self.loaded: Any = None  # ibisagent.io.LoadedImage of the shown image / slice
        self.volume: Any = None  # ibisagent.io.Volume for volumes
        self.slice_index: int | None = None
        self.window: str | None = None
        self.mask_path: Path | None = None
        self.gt: np.ndarray | None = None
        self.query = ""
        self.session: Session | None = None
        self.views: list[StepView] = []
        self.episode: Episode | None = None
        self._key = ""

    # --- loading ---------------------------------------------------------------------------------------------
    @property
    def image(self) -> np.ndarray:
        if self.vol3d is not None:
            return self.vol3d.image
        if self.loaded is None:
            raise AnnotatorError("open an image first (upload one or pick a bundled example)")
        return self.loaded.array

    @property
    def has_image(self) -> bool:
        return self.loaded is not None or self.vol3d is not None

    @property
    def is_3d(self) -> bool:
        """A volume segmented in 3D (one mask through the volume)."""
        return self.vol3d is not None

    @property
    def is_volume(self) -> bool:
        return self.volume is not None

    @property
    def n_slices(self) -> int:
        return int(self.volume.n_slices(2)) if self.volume is not None else 1

    def open(self, path: str | Path, *, mask_path: str | Path | None = None, query: str | None = None,
             slice_index: int | None = None, window: str | None = None) -> None:
        """Open an image (PNG/JPEG/TIFF/DICOM file) or a volume (NIfTI, DICOM-series folder), optionally with a
        ground-truth mask (same file type as the image for volumes) and the query; clears all prompts."""
        from ibisagent.io import image_format, load_volume

        p = Path(path)
        try:
            fmt = image_format(p)
            self._check_size(p, fmt)
            volume = load_volume(p) if fmt in VOLUME_FORMATS else None
        except ValueError as exc:
            raise AnnotatorError(str(exc)) from exc
        if volume is not None:
            _check_volume(volume, p)
        self.path, self.format, self.volume = p, fmt, volume
        self.name = p.name  # what the status line and the exported file names call it
        self.window = None if window in (None, "", "auto") else window
        self.mask_path = Path(mask_path) if mask_path else None
        if volume is not None and slice_index is None:
            slice_index = self._default_slice()
        self.slice_index = slice_index
        self.vol3d = None
        if volume is not None and self.volume_mode == "3d":
            self._open_3d()
        else:
            self._load_slice()
        if query is not None:
            self.query = query
        self.views, self.episode = [], None

    def _check_size(self, path: Path, fmt: str) -> None:
        """Refuse a file whose header declares more voxels than ``max_voxels`` (before any pixel is decoded)."""
        from ibisagent.runtime import DECLARED_HUGE, declared_size

        size = declared_size(path)
        if size is None:
            return
        h, w, total = size
        if h >= DECLARED_HUGE or total > self.max_voxels:
            what = "volume" if fmt in VOLUME_FORMATS else "image"
            shown = "far more" if h >= DECLARED_HUGE else f"{total}"
            raise AnnotatorError(f"{path.name}: the {what} holds {shown} voxels; the app opens at most "
                                 f"{self.max_voxels} (crop or downsample it first)")

    def _open_3d(self) -> None:
        """Hand the open volume to a :class:`~ibisagent.ui.volume3d.VolumeAnnotator` (with its ground truth)."""
        from ibisagent.ui.volume3d import VolumeAnnotator

        gt = self._volume_gt(self.mask_path) if self.mask_path is not None else None
        try:
            self.vol3d = VolumeAnnotator(self.hub, self.segmenter_name, self.volume, window=self.window, gt=gt,
                                         max_steps=self.max_steps, slice_index=self.slice_index)
        except ValueError as exc:
            raise AnnotatorError(str(exc)) from exc
        self.loaded, self.gt, self.session, self._key = None, None, None, ""

    def _volume_gt(self, mask_path: str | Path) -> np.ndarray:
        """The ground-truth label map of the open volume, in its stored layout (same voxel grid required)."""
        from ibisagent.io.volume_masks import load_volume_mask

        try:
            return load_volume_mask(mask_path, self.volume)
        except ValueError as exc:
            raise AnnotatorError(f"ground truth for a volume in 3D: {exc} (a NIfTI / NRRD / MHA label map or a "
                                 "DICOM SEG of this volume)") from exc

    def set_volume_mode(self, mode: str) -> None:
        """Segment volumes in ``"3d"`` or ``"2d"`` (the shown slice alone); an open volume is reopened in the new
        mode on the same slice (its prompts are cleared)."""
        if mode not in VOLUME_MODES:
            raise AnnotatorError(f"volume mode must be one of {', '.join(VOLUME_MODES)}, got {mode!r}")
        if mode == self.volume_mode:
            return
        self.volume_mode = mode
        if self.volume is None or self.path is None:
            return
        z = self.vol3d.z if self.vol3d is not None else self.slice_index
        self.slice_index = z
        self.vol3d = None
        if mode == "3d":
            self._open_3d()
        else:
            self._load_slice()
        self.views, self.episode = [], None

    def open_files(self, paths: list[str | Path], **kwargs: Any) -> None:
        """Open uploaded files: one file as :meth:`open`; several DICOM files as one series (they are linked into
        a temporary folder, which the loader reads as a DICOM series volume)."""
        from ibisagent.io import is_dicom_file

        files = [Path(p) for p in paths if p]
        if not files:
            raise AnnotatorError("no file given")
        if len(files) == 1:
            self.open(files[0], **kwargs)
            return
        not_dicom = [f.name for f in files if not (f.suffix.lower() == ".dcm" or is_dicom_file(f))]
        if not_dicom:
            raise AnnotatorError(f"several files can only be opened as one DICOM series; not DICOM: "
                                 f"{', '.join(not_dicom[:5])}")
        folder = Path(tempfile.mkdtemp(prefix="ibisagent-series-"))
        for i, f in enumerate(files):
            (folder / f"{i:05d}_{f.name}").symlink_to(f.resolve())
        self.open(folder, **kwargs)
        self.name = f"{files[0].stem}_series"  # not the temporary folder's name

    def _default_slice(self) -> int:
        from ibisagent.io import choose_slice, load_mask

        if self.mask_path is not None:
            try:
                return choose_slice(load_mask(self.mask_path))
            except ValueError:
                pass
        return self.n_slices // 2

    def _load_slice(self) -> None:
        from ibisagent.io import load_image, load_mask, slice_image

        assert self.path is not None
        try:
            if self.volume is not None:
                loaded = slice_image(self.volume, self.slice_index, window=self.window)
            else:
                loaded = load_image(self.path, slice_index=self.slice_index, window=self.window)
            gt = None
            if self.mask_path is not None:
                kwargs = {"slice_index": self.slice_index} if self.volume is not None else {}
                gt = load_mask(self.mask_path, shape=loaded.shape, **kwargs)
        except ValueError as exc:
            raise AnnotatorError(str(exc)) from exc
        self.loaded, self.gt = loaded, gt
        self._key = image_key(loaded.array)
        self._new_session()

    def set_mask(self, mask_path: str | Path | None) -> None:
        """Attach (or with None, drop) the ground-truth mask of the current image."""
        from ibisagent.io import load_mask

        if mask_path is None:
            self.mask_path, self.gt = None, None
            if self.vol3d is not None:
                self.vol3d.set_gt(None)
            return
        if self.vol3d is not None:
            self.vol3d.set_gt(self._volume_gt(mask_path))
            self.mask_path = Path(mask_path)
            return
        kwargs = {"slice_index": self.slice_index} if self.volume is not None else {}
        try:
            gt = load_mask(mask_path, shape=self.image.shape, **kwargs)
        except ValueError as exc:
            raise AnnotatorError(str(exc)) from exc
        self.mask_path, self.gt = Path(mask_path), gt

    def set_slice(self, index: int) -> None:
        """Show another slice of the volume (prompts are per slice: they are cleared)."""
        if self.volume is None:
            return
        if self.vol3d is not None:  # in 3D the prompts and the mask belong to the volume: they stay
            try:
                self.vol3d.set_slice(int(index))
            except ValueError as exc:
                raise AnnotatorError(str(exc)) from exc
            self.slice_index = self.vol3d.z
            return
        self.slice_index = int(index)
        self._load_slice()
        self.views, self.episode = [], None

    def set_window(self, window: str | None) -> None:
        """Change the display window (preset name or ``auto``); prompts are cleared as the image changes."""
        if self.path is None:
            self.window = None if window in (None, "", "auto") else window
            return
        self.window = None if window in (None, "", "auto") else window
        if self.vol3d is not None:
            self.slice_index = self.vol3d.z
            self._open_3d()
        else:
            self._load_slice()
        self.views, self.episode = [], None

    def set_segmenter(self, name: str) -> None:
        """Switch the segmenter; the current prompts are re-applied with the new one."""
        if name == self.segmenter_name:
            return
        if self.vol3d is not None:
            try:
                self.vol3d.set_segmenter(name)
            except ValueError as exc:
                raise AnnotatorError(str(exc)) from exc
            self.segmenter_name = name
            return
        old = self.session.interactions if self.session is not None else ()
        self.segmenter_name = name
        if self.loaded is not None:
            self._new_session()
            with self._bound():
                for inter in old:
                    if inter.kind == "box":
                        assert inter.box is not None
                        self.session.set_box(*inter.box)  # type: ignore[union-attr]
                    else:
                        self.session.add_click(inter.x, inter.y, inter.positive)  # type: ignore[union-attr]

    # --- prompts ---------------------------------------------------------------------------------------------
    def _bound(self) -> Any:
        return self.hub.bound(self.segmenter_name, self.image, self._key)

    def _new_session(self) -> None:
        with self._bound() as seg:
            s = Session(seg)
            s.set_image(self.image)
        self.session = s

    def _require_session(self) -> Session:
        if self.session is None:
            raise AnnotatorError("open an image first (upload one or pick a bundled example)")
        return self.session

    @property
    def mask(self) -> np.ndarray | None:
        """The current mask: H x W, or for a volume in 3D the ``[z, y, x]`` mask (None before the first prompt)."""
        if self.vol3d is not None:
            return self.vol3d.mask
        return self.session.mask if self.session is not None else None

    def click(self, x: float, y: float, positive: bool = True) -> np.ndarray:
        """Add a user click at pixel (x, y) (of the shown slice of a volume in 3D); returns the new mask."""
        if self.vol3d is not None:
            try:
                return self.vol3d.click(x, y, positive)
            except ValueError as exc:
                raise AnnotatorError(str(exc)) from exc
        s = self._require_session()
        h, w = self.image.shape[:2]
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise AnnotatorError(f"click ({x}, {y}) lies outside the {w}x{h} image")
        try:
            with self._bound():
                mask = s.add_click(float(x), float(y), positive=positive)
        except ValueError as exc:  # SegmenterError
            raise AnnotatorError(str(exc)) from exc
        self.views.append(StepView(len(self.views) + 1, "user",
                                   f"{'Positive' if positive else 'Negative'} click ({int(x)}, {int(y)})", "",
                                   self.current_iou()))
        self.episode = None  # the state is the user's now, not the end of an agent episode
        return mask

    def undo(self) -> None:
        if self.vol3d is not None:
            self.vol3d.undo()
            return
        s = self._require_session()
        if s.interactions:
            s.undo()
            self.views.append(StepView(len(self.views) + 1, "user", "Undo", "", self.current_iou()))
            self.episode = None

    def reset(self) -> None:
        if self.vol3d is not None:
            self.vol3d.reset()
            return
        s = self._require_session()
        s.reset()
        self.views, self.episode = [], None

    # --- agent -----------------------------------------------------------------------------------------------
    def run_agent(self, query: str | None = None, policy: str | None = None, *,
                  from_current: bool = False) -> Iterator[StepView]:
        """Play an agent episode step by step (a generator of the steps). ``from_current=True`` lets the agent
        continue from the current prompts (they are replayed first), else it starts from an empty mask."""
        from ibisagent.policies.base import PolicyError, create_policy

        if self.vol3d is None:
            s = self._require_session()
        if query is not None:
            self.query = query
        if not self.query.strip():
            raise AnnotatorError("type a query first, e.g. 'segment the tumor'")
        if self.vol3d is not None:
            yield from self._run_agent_3d(policy, from_current)
            return
        if policy is not None:
            self.policy_name = policy
        try:
            pol = create_policy(self.policy_name)
        except KeyError as exc:
            raise AnnotatorError(str(exc.args[0])) from None
        if getattr(pol, "requires_gt", False) and self.gt is None:
            raise AnnotatorError(f"policy {self.policy_name!r} needs a ground-truth mask: add one (or pick a bundled "
                                 "example), or choose a policy that works without it")
        prior = s.interactions if from_current else ()
        seg = self.hub.get(self.segmenter_name)
        env = env_for(seg, pol, max_steps=self.max_steps, extra_steps=len(prior))
        if not from_current:
            self.views = []
        n_user, base = len(prior), len(self.views)
        try:
            for rec, ep in iter_episode(env, pol, self.image, self.query, self.gt, prior, step_guard=self._bound):
                self.session, self.episode = env.session, ep
                if rec.step <= n_user:
                    continue  # the user's own prompts, replayed: already listed
                view = _view(rec)
                view = StepView(base + rec.step - n_user, view.actor, view.action, view.reasoning, view.iou, view.error)
                self.views.append(view)
                yield view
        except (PolicyError, ValueError) as exc:
            raise AnnotatorError(str(exc)) from exc

    def _run_agent_3d(self, policy: str | None, from_current: bool) -> Iterator[StepView]:
        if policy is not None:
            self.volume_policy = policy
        try:
            for view in self.vol3d.run_agent(self.query, self.volume_policy, from_current=from_current):
                self.slice_index = self.vol3d.z
                yield view
        except (KeyError, ValueError) as exc:
            msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            raise AnnotatorError(msg) from exc
        finally:
            self.slice_index = self.vol3d.z

    # --- display / export ------------------------------------------------------------------------------------
    def current_iou(self) -> float | None:
        if self.vol3d is not None:
            return self.vol3d.metrics()[0]
        if self.gt is None:
            return None
        m = self.mask
        return iou(m if m is not None else np.zeros_like(self.gt), self.gt)

    def render(self, show_gt: bool = True) -> np.ndarray:
        """The image with the mask overlay, clicks (green positive / red negative) and the ground-truth contour."""
        if self.vol3d is not None:
            return self.vol3d.render(show_gt)
        s = self._require_session()
        return display_overlay(self.image, s.mask, s.points.tolist(), s.labels.tolist(), s.box,
                               gt=self.gt if show_gt else None)

    def status(self) -> str:
        """A one-paragraph summary: image, prompts, mask area, IoU/Dice when the ground truth is known."""
        if self.vol3d is not None:
            name = self.name or "volume"
            return " | ".join([f"**{name}**", *self.vol3d.status_parts(), f"segmenter {self.segmenter_name}"])
        if self.loaded is None or self.session is None:
            return "No image loaded."
        h, w = self.image.shape[:2]
        s = self.session
        parts = [f"**{self.name or 'image'}** {w}x{h}"]
        if self.volume is not None:
            parts.append(f"slice {self.slice_index} / {self.n_slices - 1}")
        n_pos = int((s.labels == 1).sum())
        parts.append(f"{n_pos} positive, {len(s.labels) - n_pos} negative clicks")
        m = s.mask
        parts.append(f"mask {int(m.sum()) if m is not None else 0} px")
        if self.gt is not None:
            mm = m if m is not None else np.zeros_like(self.gt)
            parts.append(f"IoU {iou(mm, self.gt):.3f}, Dice {dice(mm, self.gt):.3f}")
        if self.episode is not None and self.episode.stop_reason:
            parts.append(f"agent stopped: {self.episode.stop_reason}")
            est = self.episode.predicted_iou
            if est is not None and m is not None and np.array_equal(self.episode.final_mask, m):
                # the policy's own estimate of the mask it left (no ground truth); gone once the user edits it
                note = " - low confidence: check the mask" if self.episode.low_confidence else ""
                parts.append(f"agent's predicted IoU {est:.2f}{note}")
        parts.append(f"segmenter {self.segmenter_name}")
        return " | ".join(parts)

    def log_text(self) -> str:
        views = self.vol3d.views if self.vol3d is not None else self.views
        return "\n".join(v.line() for v in views)

    def projection(self) -> np.ndarray | None:
        """The three-plane projection of the 3D mask (a volume in 3D), else None."""
        return self.vol3d.projection() if self.vol3d is not None else None

    def export(self, fmt: str = "png", out_dir: str | Path | None = None) -> Path:
        """Write the current mask: ``png`` (0/255) or ``nifti`` (``.nii.gz``; volume slices go back into a
        volume-shaped label map with the source affine). A volume in 3D writes its label volume: ``nifti`` with the
        source affine, ``dicom-seg`` (a DICOM SEG; DICOM series sources only), or ``png`` for the shown slice.
        Returns the file path."""
        from ibisagent.io import save_mask

        out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ibisagent-mask-"))
        stem = (self.name or "image").split(".")[0]
        if self.vol3d is not None:
            fmt = "nifti" if fmt in ("nii", "nii.gz") else fmt
            try:
                return self.vol3d.export(fmt, out, stem, label=_seg_label(self.query))
            except ValueError as exc:
                raise AnnotatorError(str(exc)) from exc
        s = self._require_session()
        mask = s.mask if s.mask is not None else np.zeros(self.image.shape[:2], bool)
        if self.volume is not None:
            stem += f"_slice{self.slice_index}"
        if fmt == "png":
            target = out / f"{stem}_mask.png"
            return save_mask(target, mask)
        if fmt in ("nifti", "nii", "nii.gz"):
            target = out / f"{stem}_mask.nii.gz"
            geometry = "affine" in self.loaded.meta or "slice_affine" in self.loaded.meta
            return save_mask(target, mask, like=self.loaded if geometry else None)
        raise AnnotatorError(f"unknown export format {fmt!r}: use png or nifti")


def default_volume_policy() -> str:
    """The 3D agent (``compact-3d``) when the learned policy is installed, else the volume oracle."""
    from ibisagent.policies.base import default_policy

    return "compact-3d" if default_policy() == "compact" else "oracle-3d"


def _check_volume(volume: Any, path: Path) -> None:
    """Refuse what the app cannot segment as one volume: 4D data and empty volumes."""
    n = int(volume.meta.get("n_volumes", 1) or 1)
    if n > 1:
        raise AnnotatorError(f"{path.name} is 4D: {n} volumes of {'x'.join(str(s) for s in volume.shape)} voxels; "
                             "the app segments one 3D volume (save the volume you want as its own file)")
    if volume.array.size == 0 or min(volume.shape) < 1:
        raise AnnotatorError(f"{path.name} is an empty volume {volume.shape}")


def _seg_label(query: str) -> str:
    """A DICOM SEG segment label from the query (at most 64 characters, as the LO value representation allows)."""
    text = " ".join(query.split()) or "object"
    return text[:64]
