"""SAM2's own video predictor over a stack of slices held in memory: how SAM2 / MedSAM2 users segment a volume.

MedSAM2 treats the slices of a volume as the frames of a video: prompts on a few slices, then
``SAM2VideoPredictor.propagate_in_video`` carries the object through the other slices with its memory attention
(each new slice attends to the encoded masks of the prompted slices and of the slices tracked just before it).
:class:`SAM2VideoPropagator` wraps that predictor in numpy terms for :class:`ibisagent.volume.VolumeSession`
(``propagation="sam2-video"``); it is built from a :class:`~ibisagent.segmenters.sam2.SAM2Segmenter` and uses the
same weights (the video model's tensors are the image model's, shared, not copied). This module does not import
:mod:`ibisagent.segmenters.sam2` (that one imports it, lazily).

* **Frames in memory, no files.** ``SAM2VideoPredictor.init_state`` (sam2 1.1.0) reads frames only from a folder of
  JPEG files or an MP4 file. Here the stack's slices are preprocessed in memory exactly as the image backend does
  (``_sam2_transforms.preprocess``: antialiased resize to the model size, ImageNet normalization) and handed to
  ``init_state`` by standing in for its frame loader (``sam2.sam2_video_predictor.load_video_frames``) for the
  duration of that one call, under a lock; any other argument goes to SAM2's loader unchanged. No JPEG round trip
  (which would be lossy) and nothing written to disk.
* **Model switches** (what ``build_sam2_video_predictor`` sets, less the CUDA-only part):
  ``binarize_mask_from_pts_for_mem_enc=True``; ``fill_hole_area=0`` (hole filling needs SAM2's CUDA extension);
  ``add_all_frames_to_correct_as_cond=True``, so that every prompted slice, a correction on a tracked slice too, is
  a conditioning frame (an anchor) that later propagations keep, as SAM2's interactive demo does.
* **Features kept for the session.** SAM2's predictor keeps the backbone features of the last frame only, so every
  propagation re-encodes every slice; :class:`CachingVideoPredictor` keeps them for all slices of the stack (encode
  once per volume; memory: about 2 x the image embedding per slice).
* **Per-slice score**: the video predictor reports no predicted IoU while tracking; a slice's ``score`` is the
  sigmoid of SAM2's object-score logit (the model's probability that the object is on that slice).

Needs the ``sam2`` package (see :mod:`ibisagent.segmenters.sam2`); imported only when a video propagator is made.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor

from ibisagent.segmenters._sam2_transforms import preprocess
from ibisagent.segmenters.base import SegmenterError, SegmenterUnavailable

__all__ = ["VIDEO_OVERRIDES", "CachingVideoPredictor", "FrameResult", "SAM2VideoPropagator", "video_predictor"]

#: switches of the video model (see the module docstring)
VIDEO_OVERRIDES = {
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 0,
    "add_all_frames_to_correct_as_cond": True,
}
_OBJ_ID = 1  # one object per session
_LOCK = threading.RLock()
_PREDICTORS: dict[int, tuple[Any, CachingVideoPredictor]] = {}


class CachingVideoPredictor(SAM2VideoPredictor):
    """SAM2's video predictor that keeps every frame's backbone features for the session (in the inference state,
    under ``"ibisagent_features"``) and counts encoder runs and seconds (``"ibisagent_encoder"``)."""

    def _get_image_feature(self, inference_state: dict[str, Any], frame_idx: int, batch_size: int) -> Any:
        store = inference_state.setdefault("ibisagent_features", {})
        hit = store.get(frame_idx)
        if hit is not None:  # SAM2's own one-frame cache then answers without running the backbone
            inference_state["cached_features"] = {frame_idx: hit}
            return super()._get_image_feature(inference_state, frame_idx, batch_size)
        t = time.perf_counter()
        out = super()._get_image_feature(inference_state, frame_idx, batch_size)
        store[frame_idx] = inference_state["cached_features"][frame_idx]
        stats = inference_state.setdefault("ibisagent_encoder", {"runs": 0, "seconds": 0.0})
        stats["runs"] += 1
        stats["seconds"] += time.perf_counter() - t
        return out


def video_predictor(model: Any, model_config: Any, device: str = "cpu") -> CachingVideoPredictor:
    """The video predictor of an image model (``SAM2Base``) built from ``model_config`` (the OmegaConf ``model``
    node it was built from, :func:`ibisagent.segmenters.sam2.load_sam2_config`): once per image model, target
    :class:`CachingVideoPredictor`, :data:`VIDEO_OVERRIDES`, its tensors the image model's (shared, not copied)."""
    from hydra.utils import instantiate

    with _LOCK:
        hit = _PREDICTORS.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        cfg = model_config.copy()
        cfg._target_ = f"{CachingVideoPredictor.__module__}.{CachingVideoPredictor.__qualname__}"
        for k, v in VIDEO_OVERRIDES.items():
            cfg[k] = v
        try:
            pred = instantiate(cfg, _recursive_=True)
        except Exception as exc:  # hydra wraps constructor errors
            raise SegmenterUnavailable(f"cannot build SAM2's video predictor: {exc}") from exc
        pred.load_state_dict(model.state_dict(), strict=True, assign=True)  # share the image model's tensors
        for p in pred.parameters():
            p.requires_grad_(False)
        pred = pred.to(device).eval()
        _PREDICTORS[id(model)] = (model, pred)
        return pred


@dataclass(frozen=True)
class _Frames:
    """Preprocessed frames (Z, 3, S, S) and the original slice size: what ``init_state`` gets instead of a path."""

    images: torch.Tensor
    height: int
    width: int


@contextlib.contextmanager
def _frames_in_memory() -> Iterator[None]:
    """While active, SAM2's frame loader returns a :class:`_Frames` as it is; any other input goes to SAM2's."""
    import sam2.sam2_video_predictor as vp

    with _LOCK:
        original = vp.load_video_frames

        def load(video_path: Any, **kw: Any) -> tuple[torch.Tensor, int, int]:
            if isinstance(video_path, _Frames):
                device = kw.get("compute_device")
                imgs = video_path.images if kw.get("offload_video_to_cpu") or device is None \
                    else video_path.images.to(device)
                return imgs, video_path.height, video_path.width
            return original(video_path=video_path, **kw)

        vp.load_video_frames = load
        try:
            yield
        finally:
            vp.load_video_frames = original


@dataclass(frozen=True)
class FrameResult:
    """One slice after a propagation: its mask (H, W) bool, low-res logits (1, S/4, S/4) float32 and the object
    probability."""

    mask: np.ndarray
    logits: np.ndarray
    score: float


class SAM2VideoPropagator:
    """SAM2's video predictor on one stack of slices: prompts per slice, propagation both ways.

    >>> vp = seg.video_propagator(); vp.set_frames(stack.images)       # a SAM2Segmenter; (Z, H, W, 3) uint8
    >>> vp.add_prompts(12, box=(40, 30, 90, 70)); out = vp.propagate()  # {slice: FrameResult}

    Args: the image model and its config node (see :func:`video_predictor`), the torch device, the logit threshold
    of the binary masks.
    """

    name = "sam2-video"

    def __init__(self, model: Any, model_config: Any, device: str = "cpu", mask_threshold: float = 0.0) -> None:
        self.predictor = video_predictor(model, model_config, device)
        self.mask_threshold = float(mask_threshold)
        self.state: dict[str, Any] | None = None
        self._shape: tuple[int, int, int] = (0, 0, 0)
        self._prompted: set[int] = set()
        #: (slice, reverse) in the order the last :meth:`propagate` visited them
        self.visits: list[tuple[int, bool]] = []

    # --- frames ------------------------------------------------------------------------------------------------
    def set_frames(self, frames: np.ndarray) -> None:
        """Start a session on ``frames`` (Z, H, W, 3) uint8: ``init_state`` on the frames in memory."""
        arr = np.asarray(frames)
        if arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype != np.uint8 or arr.shape[0] < 1:
            raise SegmenterError(f"frames must be (Z, H, W, 3) uint8, got {arr.shape} {arr.dtype}")
        size = int(self.predictor.image_size)
        images = torch.cat([preprocess(f, size) for f in arr])
        with _frames_in_memory():
            self.state = self.predictor.init_state(_Frames(images, int(arr.shape[1]), int(arr.shape[2])))
        self._shape = (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]))
        self._prompted = set()
        self.visits = []

    def _state(self) -> dict[str, Any]:
        if self.state is None:
            raise SegmenterError("no frames set: call set_frames(frames) first")
        return self.state

    @property
    def encoder_runs(self) -> int:
        """Slices encoded in this session (0 before :meth:`set_frames`)."""
        return int((self.state or {}).get("ibisagent_encoder", {}).get("runs", 0))

    @property
    def encoder_s(self) -> float:
        return float((self.state or {}).get("ibisagent_encoder", {}).get("seconds", 0.0))

    @property
    def prompted(self) -> frozenset[int]:
        return frozenset(self._prompted)

    def reset(self) -> None:
        """Forget every prompt and result (the frames and their features stay)."""
        self.predictor.reset_state(self._state())
        self._prompted = set()
        self.visits = []

    # --- prompts and propagation -------------------------------------------------------------------------------
    def add_prompts(self, z: int, points: np.ndarray | None = None, labels: np.ndarray | None = None,
                    box: tuple[float, float, float, float] | np.ndarray | None = None) -> FrameResult:
        """Set slice ``z``'s prompts (all of them: they replace the slice's earlier ones; pixels of the slice; the
        box first, as SAM2 is trained) with ``add_new_points_or_box``. On a slice a propagation reached, SAM2 feeds
        the slice's tracked mask back with the new prompts. Returns the slice's new mask."""
        state = self._state()
        n = self._shape[0]
        if not 0 <= int(z) < n:
            raise SegmenterError(f"slice {z} is outside the stack (0..{n - 1})")
        pts = None if points is None or len(points) == 0 else np.asarray(points, np.float32).reshape(-1, 2)
        labs = None if pts is None else np.asarray(labels, np.int32).reshape(-1)
        if pts is None and box is None:
            raise SegmenterError("a slice needs at least one click or a box")
        if pts is not None and len(labs) != len(pts):
            raise SegmenterError(f"{len(pts)} points but {len(labs)} labels")
        b = None if box is None else np.asarray(box, np.float32).reshape(4)
        _, _, masks = self.predictor.add_new_points_or_box(
            state, frame_idx=int(z), obj_id=_OBJ_ID, points=pts, labels=labs, box=b, clear_old_points=True,
            normalize_coords=True)
        self._prompted.add(int(z))
        return self._result(int(z), masks)

    def propagate(self, z_range: tuple[int, int] | None = None) -> dict[int, FrameResult]:
        """``propagate_in_video`` from the first prompted slice towards the last slice, then ``reverse=True``
        towards slice 0, within ``z_range`` (first, last) when given. Returns every visited slice's result (the
        reverse pass's for the start slice); slices not visited are not in it."""
        state = self._state()
        if not self._prompted:
            raise SegmenterError("no prompts yet: add_prompts on a slice first")
        n = self._shape[0]
        lo, hi = (0, n - 1) if z_range is None else (int(z_range[0]), int(z_range[1]))
        start = min(self._prompted)
        if not lo <= start <= hi:
            raise SegmenterError(f"the first prompted slice {start} lies outside the z-range {lo}..{hi}")
        self.visits = []
        out: dict[int, FrameResult] = {}
        for reverse, count in ((False, hi - start), (True, start - lo)):
            for k, _, masks in self.predictor.propagate_in_video(state, start_frame_idx=start,
                                                                  max_frame_num_to_track=count, reverse=reverse):
                self.visits.append((int(k), reverse))
                out[int(k)] = self._result(int(k), masks)
        return out

    def _result(self, z: int, video_res_masks: torch.Tensor) -> FrameResult:
        """The mask at the slice's size, and the low-res logits and object score SAM2 stored for slice ``z``."""
        state = self._state()
        mask = (video_res_masks[0, 0] > self.mask_threshold).cpu().numpy()
        out = None
        for d in (state["temp_output_dict_per_obj"][0], state["output_dict_per_obj"][0]):
            for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
                out = out or d[key].get(z)
        if out is None:  # add_new_points_or_box / propagate_in_video always store the slice's output
            raise SegmenterError(f"SAM2 stored no output for slice {z}")
        logits = torch.clamp(out["pred_masks"][0].float(), -32.0, 32.0).cpu().numpy().astype(np.float32)
        score = float(torch.sigmoid(out["object_score_logits"].float()).reshape(-1)[0])
        return FrameResult(mask=mask, logits=logits, score=score)
