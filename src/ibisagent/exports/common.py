"""What every export shares: reading trajectories, turning steps into single-turn samples, and writing images once.

Samples follow the reference's per-step, history-off layout: each step becomes one sample made of the system
prompt, ONE user turn (the first-turn text with the plain image, or the refinement text with the policy overlay of
the step's previous mask) and the assistant reply, rendered by :func:`ibisagent.chat.render_chat` (the environment's
renderer) and written in each format's layout by :mod:`ibisagent.chat`. Error steps of reflective trajectories (the deliberate mistakes)
are left out as targets by default; their correction steps are kept.

Images are written once: the case image once per case (``images/``), each distinct overlay once (``overlays/``,
named by a hash of image and mask, so states shared between variants are not duplicated), each ground-truth mask
once (``masks/``). Samples refer to them by path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ibisagent.chat import ChatTurn, render_chat
from ibisagent.io import load_mask, load_rgb
from ibisagent.masks import rle_decode
from ibisagent.overlay import policy_overlay
from ibisagent.prompts import PromptTemplate, load_prompts
from ibisagent.synthesis.runner import iter_trajectories

__all__ = ["ExportError", "ImageStore", "Sample", "iter_samples", "load_trajectories"]


class ExportError(ValueError):
    """An export that cannot be made (no synthesis folder, no trajectories, unknown variant)."""


@dataclass
class Sample:
    """One single-turn training sample (a trajectory step) with its state."""

    system: str
    user: str
    reply: str
    image: str  # path of the observation image, relative to the export folder
    case_id: str
    variant: str
    role: str
    step: int
    grammar: str
    segmenter: str
    source: str
    width: int
    height: int
    image_path: str  # absolute path of the case image (written once)
    mask_path: str  # absolute path of the ground-truth mask (written once)
    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: list[float] | None = None
    prev_mask_rle: dict | None = None
    action: str = ""
    iou_before: float = 0.0
    iou_after: float = 0.0
    chat: tuple[ChatTurn, ...] = ()  # the rendered prompt (system, user turn with ``image``)

    def state_key(self) -> str:
        """Identity of the state (case, prompts so far): RL prompts are deduplicated on it."""
        return json.dumps([self.case_id, self.grammar, self.points, self.labels, self.box])


def load_trajectories(synth_dir: str | Path, variants: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Kept trajectory records of a synthesis folder, optionally only some variants, sorted by id."""
    d = Path(synth_dir)
    if not (d / "shards").is_dir():
        raise ExportError(f"{d} is not a synthesis folder (no shards/); run `ibisagent synthesize` first")
    wanted = set(variants) if variants else None
    rows = [r for r in iter_trajectories(d) if wanted is None or r["variant"] in wanted]
    if not rows:
        raise ExportError(f"no trajectories in {d}" + (f" for variants {sorted(wanted)}" if wanted else ""))
    return sorted(rows, key=lambda r: r["id"])


def _digest(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:16]


class ImageStore:
    """Writes each case image, overlay and mask once under an export folder and returns their relative paths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._images: dict[str, str] = {}
        self._masks: dict[str, str] = {}
        self._overlays: dict[str, str] = {}
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, src: str) -> np.ndarray:
        if src not in self._arrays:
            if len(self._arrays) > 8:
                self._arrays.pop(next(iter(self._arrays)))
            self._arrays[src] = load_rgb(src)
        return self._arrays[src]

    def image(self, src: str, source: str) -> str:
        if src not in self._images:
            rel = f"images/{source or 'data'}/{Path(src).stem}_{_digest(src)[:6]}.png"
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                Image.fromarray(self._array(src)).save(path)
            self._images[src] = rel
        return self._images[src]

    def mask(self, src: str, source: str) -> str:
        if src not in self._masks:
            rel = f"masks/{source or 'data'}/{Path(src).stem}_{_digest(src)[:6]}.png"
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                Image.fromarray(load_mask(src).astype(np.uint8) * 255).save(path)
            self._masks[src] = rel
        return self._masks[src]

    def overlay(self, src: str, rle: dict) -> str:
        key = _digest(src, rle["counts"])
        if key not in self._overlays:
            rel = f"overlays/{key[:2]}/{key}.png"
            path = self.root / rel
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(policy_overlay(self._array(src), rle_decode(rle))).save(path)
            self._overlays[key] = rel
        return self._overlays[key]

    @property
    def counts(self) -> dict[str, int]:
        return {"images": len(self._images), "overlays": len(self._overlays), "masks": len(self._masks)}


def iter_samples(records: Iterable[dict[str, Any]], store: ImageStore, *, prompts: str | None = None,
                 include_error_steps: bool = False) -> Iterator[Sample]:
    """Single-turn samples of every step of every record (error steps only with ``include_error_steps``)."""
    templates: dict[str, PromptTemplate] = {}
    for rec in records:
        grammar = rec.get("grammar", "reference")
        name = prompts or grammar
        if name not in templates:
            templates[name] = load_prompts(name)
        tpl = templates[name]
        src, source = rec["image"], rec.get("source", "")
        base = store.image(src, source)
        mask_rel = store.mask(rec["mask"], source)
        for st in rec["steps"]:
            if st["role"] == "error" and not include_error_steps:
                continue
            state = st["state"]
            prev = state.get("prev_mask_rle")
            chat = render_chat(tpl, rec["query"], base if prev is None else store.overlay(src, prev),
                               first_turn=prev is None)
            yield Sample(
                system=chat[0].text,
                user=chat[-1].text,
                reply=st["reply"],
                image=str(chat[-1].image),
                chat=chat,
                case_id=rec["case_id"], variant=rec["variant"], role=st["role"], step=int(st["step"]),
                grammar=grammar, segmenter=rec.get("segmenter", ""), source=source,
                width=int(rec["width"]), height=int(rec["height"]),
                image_path=str((store.root / base).resolve()), mask_path=str((store.root / mask_rel).resolve()),
                points=state["clicks"], labels=state["labels"], box=state.get("box"), prev_mask_rle=prev,
                action=st["action"], iou_before=float(state["iou_before"]), iou_after=float(st["iou_after"]),
            )
