"""What the web app does, without the web: one annotator's image, clicks, agent runs and exports.

:class:`Annotator` is the per-browser-session state behind :mod:`ibisagent.ui.app`. It opens 2D images and volume
slices through :mod:`ibisagent.io`, keeps a :class:`~ibisagent.session.Session` of the user's and the agent's
prompts on the shared segmenter (:class:`~ibisagent.runtime.SegmenterHub`), plays agent episodes step by step, and
exports the mask (PNG, or NIfTI in the source geometry).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.agent import Episode, StepRecord
from ibisagent.masks import dice, iou
from ibisagent.overlay import display_overlay
from ibisagent.runtime import USER_REASONING, SegmenterHub, env_for, image_key, iter_episode
from ibisagent.session import Session

__all__ = ["Annotator", "AnnotatorError", "StepView", "VOLUME_FORMATS", "WINDOW_CHOICES"]

#: formats opened as volumes (slice slider)
VOLUME_FORMATS = ("nifti", "dicom-series")
#: window presets offered in the app ("auto" = the loader's default for the data)
WINDOW_CHOICES = ("auto", "ct-soft-tissue", "ct-lung", "ct-bone", "ct-brain", "ct-liver", "mr", "minmax")

_THINK = re.compile(r"<think>(.*?)</think>", re.S | re.I)


class AnnotatorError(ValueError):
    """Something the user must fix (no image loaded, a policy that needs a ground-truth mask, a bad file...)."""


@dataclass(frozen=True)
class StepView:
    """One played step, ready to show: who acted, the action, the reasoning and the IoU after it."""

    step: int
    actor: str  # "user" or "agent"
    action: str
    reasoning: str
    iou: float | None
    error: str | None = None

    def line(self) -> str:
        head = f"Step {self.step} [{self.actor}] {self.action}"
        if self.iou is not None:
            head += f" (IoU {self.iou:.3f})"
        if self.error:
            head += f" error: {self.error}"
        return head + (f"\n    {self.reasoning}" if self.reasoning and self.actor == "agent" else "")


def _view(rec: StepRecord) -> StepView:
    m = _THINK.search(rec.raw or "")
    think = " ".join(m.group(1).split()) if m else ""
    actor = "user" if think == USER_REASONING else "agent"
    return StepView(rec.step, actor, rec.action or "(no action)", think, rec.iou, rec.error)


class Annotator:
    """State of one annotator. All segmenter use goes through ``hub`` (shared by all sessions of a process).

    >>> a = Annotator(hub, segmenter="fake", policy="oracle")
    >>> a.open("case.png", mask_path="case_mask.png", query="segment the lesion")
    >>> for view in a.run_agent(): ...
    >>> a.click(120, 80, positive=False); a.export("png")
    """

    def __init__(self, hub: SegmenterHub, segmenter: str, policy: str = "oracle", max_steps: int = 20) -> None:
        self.hub = hub
        self.segmenter_name = segmenter
        self.policy_name = policy
        self.max_steps = int(max_steps)
        self.path: Path | None = None
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
        if self.loaded is None:
            raise AnnotatorError("open an image first (upload one or pick a bundled example)")
        return self.loaded.array

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
            volume = load_volume(p) if fmt in VOLUME_FORMATS else None
        except ValueError as exc:
            raise AnnotatorError(str(exc)) from exc
        self.path, self.format, self.volume = p, fmt, volume
        self.window = None if window in (None, "", "auto") else window
        self.mask_path = Path(mask_path) if mask_path else None
        if volume is not None and slice_index is None:
            slice_index = self._default_slice()
        self.slice_index = slice_index
        self._load_slice()
        if query is not None:
            self.query = query
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
        self.slice_index = int(index)
        self._load_slice()
        self.views, self.episode = [], None

    def set_window(self, window: str | None) -> None:
        """Change the display window (preset name or ``auto``); prompts are cleared as the image changes."""
        if self.path is None:
            self.window = None if window in (None, "", "auto") else window
            return
        self.window = None if window in (None, "", "auto") else window
        self._load_slice()
        self.views, self.episode = [], None

    def set_segmenter(self, name: str) -> None:
        """Switch the segmenter; the current prompts are re-applied with the new one."""
        if name == self.segmenter_name:
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
        return self.session.mask if self.session is not None else None

    def click(self, x: float, y: float, positive: bool = True) -> np.ndarray:
        """Add a user click at pixel (x, y); returns the new mask."""
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
        s = self._require_session()
        if s.interactions:
            s.undo()
            self.views.append(StepView(len(self.views) + 1, "user", "Undo", "", self.current_iou()))
            self.episode = None

    def reset(self) -> None:
        s = self._require_session()
        s.reset()
        self.views, self.episode = [], None

    # --- agent -----------------------------------------------------------------------------------------------
    def run_agent(self, query: str | None = None, policy: str | None = None, *,
                  from_current: bool = False) -> Iterator[StepView]:
        """Play an agent episode step by step (a generator of the steps). ``from_current=True`` lets the agent
        continue from the current prompts (they are replayed first), else it starts from an empty mask."""
        from ibisagent.policies.base import PolicyError, create_policy

        s = self._require_session()
        if query is not None:
            self.query = query
        if not self.query.strip():
            raise AnnotatorError("type a query first, e.g. 'segment the tumor'")
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

    # --- display / export ------------------------------------------------------------------------------------
    def current_iou(self) -> float | None:
        if self.gt is None:
            return None
        m = self.mask
        return iou(m if m is not None else np.zeros_like(self.gt), self.gt)

    def render(self, show_gt: bool = True) -> np.ndarray:
        """The image with the mask overlay, clicks (green positive / red negative) and the ground-truth contour."""
        s = self._require_session()
        return display_overlay(self.image, s.mask, s.points.tolist(), s.labels.tolist(), s.box,
                               gt=self.gt if show_gt else None)

    def status(self) -> str:
        """A one-paragraph summary: image, prompts, mask area, IoU/Dice when the ground truth is known."""
        if self.loaded is None or self.session is None:
            return "No image loaded."
        h, w = self.image.shape[:2]
        s = self.session
        parts = [f"**{self.path.name if self.path else 'image'}** {w}x{h}"]
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
        return "\n".join(v.line() for v in self.views)

    def export(self, fmt: str = "png", out_dir: str | Path | None = None) -> Path:
        """Write the current mask: ``png`` (0/255) or ``nifti`` (``.nii.gz``; volume slices go back into a
        volume-shaped label map with the source affine). Returns the file path."""
        from ibisagent.io import save_mask

        s = self._require_session()
        mask = s.mask if s.mask is not None else np.zeros(self.image.shape[:2], bool)
        out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ibisagent-mask-"))
        stem = self.path.name.split(".")[0] if self.path else "image"
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
