"""Run episodes: the loop observation -> policy -> reply -> environment, and the episode record (trace).

>>> from ibisagent import Agent
>>> agent = Agent(policy="oracle", segmenter="litemedsam-click")
>>> ep = agent.segment(image, "the polyp in this colonoscopy frame", gt=mask)
>>> ep.mask, ep.final_iou, ep.stop_reason
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ibisagent.env import EnvConfig, SegmentationEnv
from ibisagent.episode import Turn, drive
from ibisagent.masks import dice, rle_encode
from ibisagent.overlay import DISPLAY_MAX_SIDE, display_overlay
from ibisagent.policies.base import Policy, create_policy
from ibisagent.segmenters.base import Segmenter, create_segmenter

__all__ = ["LOW_CONFIDENCE", "SAVED_FILES", "STEP_FILE", "Agent", "BatchItem", "BatchResult", "Episode", "StepRecord",
           "VolumeEpisode", "clear_saved", "iter_episode", "run_episode", "segment_volume",
           "step_record"]

#: a predicted IoU below this is reported as low confidence ("check the mask")
LOW_CONFIDENCE = 0.5


@dataclass
class StepRecord:
    step: int
    raw: str
    action: str | None
    kind: str | None
    points: list[list[float]]
    labels: list[int]
    box: list[float] | None
    mask: np.ndarray | None
    iou: float | None
    score: float
    policy_s: float
    segmenter_s: float
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "raw": self.raw, "action": self.action, "kind": self.kind,
            "points": self.points, "labels": self.labels, "box": self.box,
            "mask_rle": rle_encode(self.mask) if self.mask is not None else None,
            "iou": self.iou, "score": None if self.score != self.score else self.score,
            "policy_s": round(self.policy_s, 4), "segmenter_s": round(self.segmenter_s, 4), "error": self.error,
        }


@dataclass
class Episode:
    """Everything about one episode: the steps, the final mask, why it stopped and the time split."""

    query: str
    image_shape: tuple[int, int]
    steps: list[StepRecord] = field(default_factory=list)
    stop_reason: str | None = None
    mask: np.ndarray | None = None
    gt: np.ndarray | None = None
    encoder_s: float = 0.0
    policy_s: float = 0.0
    segmenter_s: float = 0.0
    total_s: float = 0.0
    #: the policy's own estimate of the final mask's IoU (None for policies without one): no ground truth needed
    predicted_iou: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def low_confidence(self) -> bool:
        """Whether the policy's own quality estimate is below :data:`LOW_CONFIDENCE` (check the mask)."""
        return self.predicted_iou is not None and self.predicted_iou < LOW_CONFIDENCE

    @property
    def final_mask(self) -> np.ndarray:
        return self.mask if self.mask is not None else np.zeros(self.image_shape, bool)

    @property
    def n_interactions(self) -> int:
        """Clicks and boxes sent to the segmenter."""
        return sum(1 for s in self.steps if s.kind in ("positive", "negative", "box") and s.error is None)

    @property
    def n_clicks(self) -> int:
        return sum(1 for s in self.steps if s.kind in ("positive", "negative") and s.error is None)

    @property
    def final_iou(self) -> float | None:
        return self.steps[-1].iou if self.steps else None

    @property
    def final_dice(self) -> float | None:
        return None if self.gt is None else dice(self.final_mask, self.gt)

    def iou_curve(self) -> list[float]:
        """IoU after each interaction (clicks and boxes), in order."""
        return [s.iou for s in self.steps if s.kind in ("positive", "negative", "box") and s.iou is not None
                and s.error is None]

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query, "image_shape": list(self.image_shape), "stop_reason": self.stop_reason,
            "n_steps": len(self.steps), "n_interactions": self.n_interactions, "final_iou": self.final_iou,
            "final_dice": self.final_dice,
            "predicted_iou": None if self.predicted_iou is None else round(self.predicted_iou, 4),
            "low_confidence": self.low_confidence,
            "final_mask_rle": rle_encode(self.final_mask),
            "timings": {"encoder_s": round(self.encoder_s, 4), "policy_s": round(self.policy_s, 4),
                        "segmenter_s": round(self.segmenter_s, 4), "total_s": round(self.total_s, 4)},
            "meta": self.meta, "steps": [s.to_json() for s in self.steps],
        }

    def save(self, out_dir: str | Path, image: np.ndarray | None = None, overlays: bool = True) -> Path:
        """Write ``trace.json``, ``mask.png`` and (with ``image``) display overlays: ``step_XX.png`` for each step
        that changed the state (a step that changed nothing, e.g. Terminate, gets no file of its own: its trace
        entry's ``overlay`` names the file that shows its state) and ``final_overlay.png``. Images with a long side
        over :data:`~ibisagent.overlay.DISPLAY_MAX_SIDE` are rendered downscaled (the mask is full size)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        doc = self.to_json()
        if image is not None and overlays:
            last: StepRecord | None = None
            last_file: str | None = None
            for s, entry in zip(self.steps, doc["steps"]):
                if s.mask is None and s.kind != "terminate":
                    continue
                if last is None or not _same_state(s, last):
                    last_file = f"step_{s.step:02d}.png"
                    vis = display_overlay(image, s.mask, s.points, s.labels, s.box, gt=self.gt,
                                          max_side=DISPLAY_MAX_SIDE)
                    Image.fromarray(vis).save(out / last_file)
                    last = s
                entry["overlay"] = last_file
            final = out / "final_overlay.png"
            final.unlink(missing_ok=True)
            if last is not None and last_file is not None and _same_mask(last.mask, self.mask):
                _link_or_copy(out / last_file, final)
            else:
                vis = display_overlay(image, self.mask, self.steps[-1].points if self.steps else [],
                                      self.steps[-1].labels if self.steps else [],
                                      self.steps[-1].box if self.steps else None, gt=self.gt,
                                      max_side=DISPLAY_MAX_SIDE)
                Image.fromarray(vis).save(final)
            h, w = self.image_shape
            doc["overlay_scale"] = min(1.0, DISPLAY_MAX_SIDE / max(h, w))
        (out / "trace.json").write_text(json.dumps(doc, indent=1))
        Image.fromarray(self.final_mask.astype(np.uint8) * 255).save(out / "mask.png")
        return out


#: the fixed-name files :meth:`Episode.save` writes; step overlays match :data:`STEP_FILE`
SAVED_FILES = ("trace.json", "mask.png", "final_overlay.png")
STEP_FILE = re.compile(r"step_\d{2,}\.png")


def clear_saved(out_dir: str | Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Delete what an earlier :meth:`Episode.save` (plus the ``extra`` names) left in ``out_dir``, nothing else, so
    that no stale file (``step_03.png`` beside a 2-step result) can pass for the new result. Returns the names."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    names = set(SAVED_FILES) | set(extra)
    gone = []
    for f in sorted(out.iterdir()):
        if (f.name in names or STEP_FILE.fullmatch(f.name)) and (f.is_file() or f.is_symlink()):
            f.unlink()
            gone.append(f.name)
    return gone


def _same_mask(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _same_state(a: StepRecord, b: StepRecord) -> bool:
    return (a.points == b.points and a.labels == b.labels and a.box == b.box and _same_mask(a.mask, b.mask))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def step_record(turn: Turn, session: Any) -> StepRecord:
    """The trace record of one driver turn; ``session`` is the environment's session right after the turn."""
    info = turn.info
    action = info.get("action")
    return StepRecord(
        step=info["step"], raw=turn.reply, action=action.text() if action else None,
        kind=action.kind.value if action else None,
        points=session.points.tolist(), labels=session.labels.tolist(), box=list(session.box) if session.box else None,
        mask=info["mask"], iou=info["iou"], score=float(info["score"]), policy_s=turn.policy_s,
        segmenter_s=info["segmenter_s"], error=info.get("error"),
    )


def iter_episode(
    env: SegmentationEnv,
    policy: Policy,
    image: np.ndarray,
    query: str,
    gt: np.ndarray | None = None,
    *,
    prior: Sequence[str] = (),
    step_guard: Callable[[], Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Iterator[tuple[StepRecord, Episode]]:
    """Play one episode with :func:`ibisagent.episode.drive` and keep its trace: yields ``(record, episode)`` after
    every step; the episode is complete (``mask``, ``stop_reason``, timings) after the last yield. ``prior`` replies
    are replayed before the policy acts; ``step_guard`` is entered around the reset and every step."""
    t_start = time.perf_counter()
    seg = env.segmenter
    enc0, dec0 = seg.timings.encoder_s, seg.timings.decoder_s
    holder: list[Episode] = []

    def start(obs: Any) -> None:
        holder.append(Episode(query=query, image_shape=(obs.height, obs.width), gt=env.gt,
                              encoder_s=seg.timings.encoder_s - enc0, meta=dict(meta or {})))

    for turn in drive(env, policy, image, query, gt, prior=prior, guard=step_guard, on_start=start):
        ep = holder[0]
        rec = step_record(turn, env.session)
        ep.steps.append(rec)
        ep.policy_s += turn.policy_s
        if turn.done:
            ep.stop_reason = turn.stop_reason
            ep.mask = env.session.mask
            estimate = getattr(policy, "predicted_iou", None)
            ep.predicted_iou = estimate(ep.final_mask) if callable(estimate) else None
            ep.segmenter_s = seg.timings.decoder_s - dec0
            ep.total_s = time.perf_counter() - t_start
        yield rec, ep


def run_episode(
    env: SegmentationEnv,
    policy: Policy,
    image: np.ndarray,
    query: str,
    gt: np.ndarray | None = None,
    *,
    on_step: Any = None,
    prior: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
) -> Episode:
    """Play one episode (:func:`iter_episode` to the end). ``on_step(record)`` is called after each step."""
    episode: Episode | None = None
    for rec, ep in iter_episode(env, policy, image, query, gt, prior=prior, meta=meta):
        episode = ep
        if on_step is not None:
            on_step(rec)
    assert episode is not None
    return episode


class Agent:
    """Policy + segmenter + episode rules in one object: ``Agent(...).segment(image, query)``."""

    def __init__(
        self,
        policy: str | Policy = "oracle",
        segmenter: str | Segmenter = "litemedsam-click",
        config: EnvConfig | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        segmenter_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.policy = create_policy(policy, **(policy_kwargs or {})) if isinstance(policy, str) else policy
        self.segmenter = (create_segmenter(segmenter, **(segmenter_kwargs or {}))
                          if isinstance(segmenter, str) else segmenter)
        cfg = config or EnvConfig()
        if getattr(self.policy, "grammar", "reference") == "extended" and cfg.grammar == "reference":
            cfg = EnvConfig(**{**cfg.__dict__, "grammar": "extended",
                               "prompts": "extended" if cfg.prompts == "reference" else cfg.prompts})
        self.config = cfg
        self.env = SegmentationEnv(self.segmenter, cfg)

    def segment(self, image: np.ndarray, query: str, gt: np.ndarray | None = None, on_step: Any = None) -> Episode:
        return run_episode(self.env, self.policy, image, query, gt, on_step=on_step)

    def segment_volume(self, volume: Any, query: str, gt: np.ndarray | None = None, **kw: Any) -> VolumeEpisode:
        """Segment a 3D volume (a path, a :class:`~ibisagent.io.volumes.Volume` or a
        :class:`~ibisagent.volume.SliceStack`) with the 3D agent (``compact-3d``; an ``oracle`` / ``challenge``
        agent uses its volume version) through :class:`~ibisagent.volume.VolumeEnv` and the one driver. ``gt``:
        a mask in the volume's stored layout (or ``[z, y, x]``) for 3D IoU in the trace. Keywords: ``policy``,
        ``axis``, ``window``, ``volume_index``, ``propagation`` (``"slices"``, the default: the 2D segmenter slice by
        slice, or a PropagationConfig tuning it; ``"sam2-video"``: SAM2's own video predictor, for a SAM2 / MedSAM2
        segmenter), ``on_step(record)`` after each turn, ``on_slice(phase, z)`` as each slice is encoded
        (``"encode"``) or decoded (``"decode"``): per-slice progress for a long volume."""
        return segment_volume(self, volume, query, gt, **kw)

    def segment_many(
        self,
        items: Iterable[BatchItem],
        *,
        axis: int = 2,
        window: Any = None,
        volume_index: int | None = None,
        mask_label: int | None = None,
        mask_threshold: float | None = None,
    ) -> Iterator[BatchResult]:
        """Segment many images with the models loaded once: yields one :class:`BatchResult` per item, in order, as
        soon as it is done. An item that cannot be read or segmented (unreadable or too small image, bad or empty
        mask, a ground-truth policy without a mask) gives a result with ``error`` set (one line) instead of ending
        the run. ``axis`` / ``window`` / ``volume_index`` apply to every image, ``mask_label`` / ``mask_threshold``
        to every mask file."""
        from ibisagent.io import load_image, load_mask
        from ibisagent.segmenters.base import MIN_IMAGE_SIDE

        for item in items:
            t0 = time.perf_counter()
            try:
                loaded = load_image(item.image, slice_index=item.slice, axis=axis, window=window,
                                    volume_index=volume_index)
                h, w = loaded.shape
                if min(h, w) < MIN_IMAGE_SIDE:
                    raise ValueError(f"{Path(item.image).name} is {w}x{h} pixels; the minimum image size is "
                                     f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
                gt = None
                if item.mask is not None:
                    gt = load_mask(item.mask, shape=loaded.shape, slice_index=item.slice, axis=axis,
                                   label=mask_label, threshold=mask_threshold)
                    if not gt.any():
                        raise ValueError(f"the ground-truth mask {item.mask} is empty")
                elif self.policy.requires_gt:
                    raise ValueError(f"policy {self.policy.name!r} needs a ground-truth mask and this item has none")
                t1 = time.perf_counter()
                episode = self.segment(loaded.array, item.query, gt)
            except (ValueError, OSError) as exc:  # this item's input is bad: record it, go on with the next
                reason = " ".join(str(exc).split()) or type(exc).__name__
                yield BatchResult(item=item, error=reason, load_s=time.perf_counter() - t0)
                continue
            yield BatchResult(item=item, episode=episode, loaded=loaded, load_s=t1 - t0)


@dataclass
class BatchItem:
    """One job of :meth:`Agent.segment_many`: an image file, the query, and optionally a ground-truth mask file (for
    IoU, and required by oracle policies) and a slice index (volumes)."""

    image: str | Path
    query: str
    mask: str | Path | None = None
    slice: int | None = None


@dataclass
class BatchResult:
    """The outcome of one :class:`BatchItem`: the episode and the loaded image, or ``error`` (one line)."""

    item: BatchItem
    episode: Episode | None = None
    loaded: Any = None
    error: str | None = None
    load_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------------------------------------------
# Volumes: the 3D agent through the same driver (ibisagent.volume.VolumeEnv + ibisagent.episode.drive)
# ----------------------------------------------------------------------------------------------------------------

#: 2D policy name -> the volume policy an Agent built with it uses for segment_volume (others: the 3D agent)
VOLUME_POLICY_FOR = {"oracle": "oracle-3d", "challenge": "challenge-3d"}
#: the default 3D policy
DEFAULT_VOLUME_POLICY = "compact-3d"


@dataclass
class VolumeEpisode:
    """One volume episode: ``mask`` is the 3D boolean mask in the source volume's stored voxel order (what a NIfTI
    writer needs), ``stack_mask`` the same mask as ``[z, y, x]`` display slices; ``steps`` one dict per turn
    (action, slice, 3D IoU/Dice with a ground truth, score, times)."""

    query: str
    stack: Any  # ibisagent.volume.SliceStack
    steps: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    stack_mask: np.ndarray | None = None
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    policy_s: float = 0.0
    total_s: float = 0.0
    predicted_iou: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        m = self.stack_mask if self.stack_mask is not None else np.zeros(self.stack.shape, bool)
        return self.stack.to_stored(m).astype(bool)

    @property
    def n_interactions(self) -> int:
        return sum(1 for s in self.steps if s["kind"] in ("positive", "negative", "box") and s["error"] is None)

    @property
    def low_confidence(self) -> bool:
        """The policy's own estimate is below :data:`LOW_CONFIDENCE`: check the mask."""
        return self.predicted_iou is not None and self.predicted_iou < LOW_CONFIDENCE

    @property
    def final_iou(self) -> float | None:
        return self.steps[-1]["iou"] if self.steps else None

    def to_json(self) -> dict[str, Any]:
        m = self.stack_mask if self.stack_mask is not None else np.zeros(self.stack.shape, bool)
        vol = self.stack.volume
        return {
            "query": self.query, "source": str(vol.source) if vol is not None else None,
            "volume_shape": list(vol.shape) if vol is not None else list(self.stack.shape),
            "stack_shape": list(self.stack.shape), "axis": self.stack.axis, "spacing_mm": list(self.stack.spacing),
            "stop_reason": self.stop_reason, "n_steps": len(self.steps), "n_interactions": self.n_interactions,
            "final_iou": self.final_iou, "voxels": int(m.sum()),
            "slices_with_object": [int(z) for z in np.flatnonzero(m.any(axis=(1, 2)))],
            "predicted_iou": None if self.predicted_iou is None else round(self.predicted_iou, 4),
            "low_confidence": self.low_confidence,
            "timings": {"encoder_s": round(self.encoder_s, 4), "segmenter_s": round(self.decoder_s, 4),
                        "policy_s": round(self.policy_s, 4), "total_s": round(self.total_s, 4)},
            "meta": self.meta, "steps": self.steps,
        }

    def montage(self, n: int = 4) -> np.ndarray:
        """Overlays of up to ``n`` slices (evenly spread over the slices with the object, or the whole stack)."""
        m = self.stack_mask if self.stack_mask is not None else np.zeros(self.stack.shape, bool)
        zs = np.flatnonzero(m.any(axis=(1, 2)))
        if zs.size == 0:
            zs = np.arange(self.stack.depth)
        pick = sorted({int(zs[i]) for i in np.linspace(0, zs.size - 1, min(n, zs.size)).round().astype(int)})
        tiles = [display_overlay(self.stack.image(z), m[z]) for z in pick]
        h = min(t.shape[0] for t in tiles)
        tiles = [t[:h] for t in tiles]
        return np.concatenate(tiles, axis=1)

    def save(self, out_dir: str | Path, overlays: bool = True, seg: bool = True) -> Path:
        """Write ``trace.json``, ``mask.nii.gz`` (the source geometry), ``overlay_montage.png`` and, for a DICOM
        series source and ``seg``, ``mask.dcm`` (a DICOM SEG of that series; see :meth:`save_seg`)."""
        from ibisagent.io.volume_masks import save_volume_mask, volume_mask_suffix

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vol = self.stack.volume
        if vol is None:
            raise ValueError("this episode's stack has no source volume to take the mask geometry from")
        save_volume_mask(self.mask, vol, out / "mask.nii.gz")
        if seg and volume_mask_suffix(vol) == ".dcm":
            self.save_seg(out / "mask.dcm")
        if overlays:
            Image.fromarray(self.montage()).save(out / "overlay_montage.png")
        (out / "trace.json").write_text(json.dumps(self.to_json(), indent=2))
        return out

    def save_seg(self, path: str | Path) -> Path:
        """The mask as a DICOM SEG of the source series (ValueError when the source is not a DICOM series or lacks
        what a SEG needs, e.g. a Frame of Reference UID)."""
        from ibisagent.io.volume_masks import save_volume_mask

        if self.stack.volume is None:
            raise ValueError("this episode's stack has no source volume")
        return save_volume_mask(self.mask, self.stack.volume, path, label=self.query)


def _volume_policy(policy: Policy) -> Policy:
    if getattr(policy, "name", "").endswith("-3d"):
        return policy
    return create_policy(VOLUME_POLICY_FOR.get(getattr(policy, "name", ""), DEFAULT_VOLUME_POLICY))


def segment_volume(
    agent: Agent,
    volume: Any,
    query: str,
    gt: np.ndarray | None = None,
    *,
    policy: str | Policy | None = None,
    axis: int = 2,
    window: Any = None,
    volume_index: int | None = None,
    propagation: Any = None,
    on_step: Callable[[dict[str, Any]], Any] | None = None,
    on_slice: Callable[[str, int], Any] | None = None,
) -> VolumeEpisode:
    """See :meth:`Agent.segment_volume`."""
    from ibisagent.io.volumes import Volume, load_volume
    from ibisagent.volume import PropagationConfig, SliceStack, VolumeEnv, VolumeSession

    if isinstance(volume, (str, Path)):
        volume = load_volume(volume, volume_index=volume_index)
    if isinstance(volume, Volume):
        if volume.array.size == 0 or min(volume.shape) < 1:
            raise ValueError(f"{volume.source.name} is an empty volume {volume.shape}")
        stack = SliceStack.from_volume(volume, axis=axis, window=window)
    elif isinstance(volume, SliceStack):
        stack = volume
    else:
        raise ValueError("volume must be a path, an ibisagent.io.volumes.Volume or a SliceStack")
    pol = (create_policy(policy) if isinstance(policy, str) else policy) if policy is not None \
        else _volume_policy(agent.policy)
    gt_stack = None
    if gt is not None:
        g = np.asarray(gt)
        gt_stack = stack.from_stored(g) if stack.volume is not None and g.shape == stack.volume.shape \
            else np.asarray(g, bool)
    if pol.requires_gt and gt_stack is None:
        raise ValueError(f"policy {pol.name!r} needs a ground-truth mask")
    if propagation is None or isinstance(propagation, PropagationConfig):
        session = VolumeSession(agent.segmenter, propagation, on_slice=on_slice)
    else:
        session = VolumeSession(agent.segmenter, propagation=propagation, on_slice=on_slice)
    env = VolumeEnv(session)
    ep = VolumeEpisode(query=query, stack=stack, meta={"policy": pol.name})
    t0 = time.perf_counter()
    for turn in drive(env, pol, stack, query, gt_stack):
        info = turn.info
        action = info.get("action")
        rec = {"step": info["step"], "raw": turn.reply, "action": action.text() if action else None,
               "kind": action.kind.value if action else None, "slice": None if action is None else action.z,
               "iou": info.get("iou"), "dice": info.get("dice"), "score": round(float(info["score"]), 4),
               "policy_s": round(turn.policy_s, 4), "segmenter_s": round(info["segmenter_s"], 4),
               "error": info.get("error")}
        ep.steps.append(rec)
        ep.policy_s += turn.policy_s
        if on_step is not None:
            on_step(rec)
        if turn.done:
            ep.stop_reason = turn.stop_reason
    ep.stack_mask = env.session.mask
    ep.encoder_s, ep.decoder_s = env.session.timings.encoder_s, env.session.timings.decoder_s
    estimate = getattr(pol, "predicted_iou", None)
    if callable(estimate) and ep.stack_mask is not None:
        ep.predicted_iou = estimate(ep.stack_mask)
    ep.total_s = time.perf_counter() - t0
    return ep
