"""Train the compact CPU policy (:mod:`ibisagent.policies.compact`) with the paper's two-stage recipe.

Stage 1, SFT (imitation of synthesized trajectories, states generated online with the reference oracle):

* oracle rollouts: the distance-transform oracle (:func:`ibisagent.policies.oracle.next_click`) clicks through the
  real segmenter (efficient trajectories);
* reflective rollouts: with probability ``mistake_prob`` a step is a deliberate mistake (a positive click in the
  background ring around the object, or a negative click inside it near the border); the oracle then corrects it,
  so the policy sees imperfect masks and learns to repair them;
* DAgger rounds: the policy's own sampled rollouts, every state relabelled by the oracle.

Targets per state: a soft click distribution over the 2 x 64 x 64 action cells (the oracle's error regions, pixels
at >= 0.6 x the larger distance-transform maximum, weighted by distance^2, positive in FN and negative in FP), a stop
target (IoU >= ``stop_iou``, or the oracle's next click would not raise IoU) and the object map (auxiliary).

Stage 2, GRPO on whole episodes: for each case, ``group_size`` full multi-turn episodes sampled from the policy
(temperature 1) through the real segmenter; each step is scored by the five reference rewards
(:func:`ibisagent.rewards.score_transition`, total = their mean). Advantages follow GRPO with process supervision
(Shao et al. 2024): every step reward is normalized by the mean and std of all step rewards of the case's group, and
a step's advantage is the sum of the normalized rewards from that step to the end of its episode. Loss: the clipped
ratio objective plus ``kl_coef`` x the k3 estimate of KL(policy || frozen SFT policy). Every reward component of every
step is logged to ``grpo_steps.csv``; per-iteration means go to ``grpo_iters.csv`` and ``grpo_curves.png``.

All rollouts run in lockstep batches (every active episode of a batch has the same number of clicks), so the
segmenter's mask decoder runs batched; with LiteMedSAM the image embeddings come from the on-disk cache of
``ibisagent train-segmenter`` (``runs/embeddings``), so no image is re-encoded.

``ibisagent train-policy --data ../shared/data`` reproduces the shipped weights (seeded, resumable with
``--resume``, progress lines, curves saved as PNG).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ibisagent.episode import LockstepResult, StopRules, drive_lockstep
from ibisagent.io.manifest import load_manifest
from ibisagent.masks import error_regions, iou
from ibisagent.policies.compact import (
    DEFAULT_MAX_CLICKS,
    GRID,
    POLICY_WEIGHTS,
    ActionChoice,
    CompactNetConfig,
    CompactPolicy,
    CompactPolicyNet,
    action_log_prob,
    allowed_actions,
    cell_to_pixel,
    fake_embedding,
    load_policy_net,
    masked_logits,
    pool_to_grid,
    save_policy_net,
    select_actions,
    state_planes,
)
from ibisagent.policies.oracle import next_click
from ibisagent.protocol import Action, ActionKind, parse_reply, to_normalized
from ibisagent.queries import UNCLICKABLE_OBJECTS, is_unclickable, query_variants

__all__ = [
    "PolicyTrainConfig",
    "PolicyTrainError",
    "click_target",
    "grpo_advantages",
    "train_policy",
]

#: objects clicks cannot outline (left out of training; reported separately by the evaluation)
THIN_OBJECTS = UNCLICKABLE_OBJECTS  # thin / scattered structures clicks cannot outline (ibisagent.queries)


#: image-key marker of augmented variants (``<image>#aug<k>``)
AUG_TAG = "#aug"


class PolicyTrainError(ValueError):
    """Bad training input (no usable cases, unknown segmenter, wrong stage)."""


@dataclass
class PolicyTrainConfig:
    """Settings of ``ibisagent train-policy`` (field metadata = CLI help)."""

    data: str = field(default="", metadata={"help": "dataset folder (or folder of folders with index.jsonl)"})
    out: str = field(default="", metadata={"help": "output .safetensors (default: the package's "
                                                   "weights/compact_policy.safetensors)"})
    run_dir: str = field(default="runs/policy", metadata={"help": "checkpoints, CSV logs, PNG curves"})
    stage: str = field(default="all", metadata={"help": "sft, grpo (starts from run_dir/sft.safetensors) or all"})
    segmenter: str = field(default="litemedsam-click", metadata={"help": "segmenter the episodes run through"})
    segmenter_weights: str = field(default="", metadata={"help": "click weights .safetensors for litemedsam-click "
                                                                 "(default: the shipped file)"})
    cache_dir: str = field(default="runs/embeddings", metadata={"help": "on-disk embedding cache (comma-separated: "
                                                                      "the first is written, the others only read)"})
    datasets: list[str] | None = field(default=None, metadata={"help": "only these dataset folders"})
    split_by: str = field(default="group", metadata={"help": "train/val split by group (patient / volume / video) "
                                                           "or image (the split of the weights before 0.2)"})
    max_cases: int = field(default=0, metadata={"help": "use at most this many train masks (0 = all; for tests)"})
    flip: bool = field(default=True, metadata={"help": "SFT augmentation: mirrored image embeddings with mirrored "
                                                       "states and targets"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1 is fastest on a busy 2-core machine)"})
    batch_rollouts: int = field(default=16, metadata={"help": "episodes per lockstep batch"})
    cached_only: bool = field(default=False, metadata={"help": "skip images whose embedding is not cached yet"})
    volume_stride: int = field(default=0, metadata={"help": "also train on 2D cases cut from the train-split 3D label "
                                                            "volumes, every N-th slice (0 = none; "
                                                            "ibisagent.training.volume_slices)"})
    volume_datasets: list[str] | None = field(default=None, metadata={"help": "dataset folders whose volumes are "
                                                                             "cut into slices (default: all)"})
    volume_guard: int = field(default=3, metadata={"help": "slices kept away from each validation slice of a volume"})
    volume_min_area: int = field(default=40, metadata={"help": "smallest structure (pixels) of a volume slice case"})
    augment: int = field(default=0, metadata={"help": "SFT augmentation: this many random variants (zoom, rotation, "
                                                      "shift, contrast, gamma) of each 2D train image, each encoded "
                                                      "once (on-disk cache); GRPO keeps to the originals "
                                                      "(ibisagent.training.augment)"})
    init: str = field(default="", metadata={"help": "start SFT from these policy weights (.safetensors)"})
    net_width: int = field(default=48, metadata={"help": "channels of the network's body (a multiple of 8; ignored "
                                                          "with --init, whose file sets the architecture)"})
    query_maps: int = field(default=0, metadata={"help": "query maps: text-keyed dot products with the full image "
                                                          "embedding as extra input maps (0 = off; "
                                                          "ibisagent.policies.compact.CompactNetConfig)"})
    sample_temperature: float = field(default=1.0, metadata={"help": "SFT sampling balance over datasets and objects: "
                                                                     "P(dataset) ~ n^T, P(object | dataset) ~ n^T, "
                                                                     "uniform within (1 = every mask alike, as "
                                                                     "before; 0.5 = large sets down-weighted; 0 = "
                                                                     "every dataset and object alike)"})
    query_variants: bool = field(default=False, metadata={"help": "SFT on varied wordings of each query (the "
                                                                  "object's name alone and in short templates, "
                                                                  "ibisagent.queries.query_variants) half the time"})
    # --- SFT
    sft_steps: int = field(default=500, metadata={"help": "SFT optimizer steps"})
    sft_batch: int = field(default=16, metadata={"help": "states per SFT batch"})
    sft_lr: float = field(default=2e-3, metadata={"help": "SFT peak learning rate (AdamW, warm-up, cosine)"})
    rollout_clicks: int = field(default=3, metadata={"help": "clicks per oracle/reflective/DAgger trajectory"})
    rollout_cases: int = field(default=0, metadata={"help": "cases rolled out per trajectory kind (0 = all)"})
    synth_frac: float = field(default=0.6, metadata={"help": "fraction of each SFT batch drawn from segmenter-free "
                                                             "synthetic states (ibisagent.training.policy_states)"})
    mistake_prob: float = field(default=0.3, metadata={"help": "probability of a deliberate mistake per step "
                                                               "in reflective rollouts"})
    dagger_rounds: int = field(default=1, metadata={"help": "rounds of policy rollouts relabelled by the oracle"})
    stop_iou: float = field(default=0.85, metadata={"help": "stop target: IoU at or above this"})
    obj_weight: float = field(default=0.5, metadata={"help": "weight of the auxiliary object-map loss"})
    val_cases: int = field(default=24, metadata={"help": "val-split masks for greedy validation episodes (0 = none)"})
    sft_minutes: float = field(default=0.0, metadata={"help": "stop SFT after this many minutes (0 = none)"})
    # --- GRPO
    grpo_iters: int = field(default=30, metadata={"help": "GRPO iterations"})
    group_size: int = field(default=4, metadata={"help": "episodes per case (G >= 4 in the recipe)"})
    grpo_cases: int = field(default=4, metadata={"help": "cases per GRPO iteration"})
    grpo_lr: float = field(default=2e-4, metadata={"help": "GRPO learning rate (Adam)"})
    grpo_epochs: int = field(default=2, metadata={"help": "optimization passes over each iteration's rollouts"})
    clip: float = field(default=0.2, metadata={"help": "PPO/GRPO ratio clip"})
    kl_coef: float = field(default=0.04, metadata={"help": "KL-to-SFT coefficient (k3 estimator)"})
    max_turns: int = field(default=5, metadata={"help": "turns per GRPO episode (Terminate counts)"})
    grpo_stop_only: bool = field(default=False, metadata={"help": "GRPO trains only the stop head (when to stop); "
                                                                   "the rollouts click the best cell, as deployed, "
                                                                   "and only stop-or-click is sampled"})
    grpo_holdout: float = field(default=0.0, metadata={"help": "fraction of the train images (whole volumes for "
                                                                 "volume slices) kept out of SFT and used only by "
                                                                 "GRPO, so that GRPO learns on images the SFT policy "
                                                                 "never saw (0 = both stages use all; give the same "
                                                                 "value to the sft and grpo commands)"})
    grpo_absorbing: bool = field(default=False, metadata={"help": "score a stopped episode's remaining turns (up to "
                                                                   "--max-turns) with its Terminate step's reward, "
                                                                   "as an absorbing stop state: early and late stops "
                                                                   "are then compared over the same number of turns "
                                                                   "(plain sums of per-step rewards favour longer "
                                                                   "episodes)"})
    grpo_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the GRPO rollouts; the "
                                                                  "policy optimized is the one at this temperature "
                                                                  "(below 1: episodes closer to the greedy policy "
                                                                  "that is deployed)"})
    grpo_minutes: float = field(default=0.0, metadata={"help": "stop GRPO after this many minutes (0 = none)"})
    grpo_stop: bool = field(default=True, metadata={"help": "let GRPO train the stop decision too; with "
                                                            "--no-grpo-stop it optimizes where to click (the click "
                                                            "distribution given that the policy clicks) and the stop "
                                                            "head keeps its SFT weights"})
    # --- bookkeeping
    ckpt_every: int = field(default=50, metadata={"help": "checkpoint every N SFT steps (GRPO: every 5 iterations)"})
    resume: bool = field(default=False, metadata={"help": "continue from run_dir checkpoints"})
    progress: bool = field(default=True, metadata={"help": "print progress lines"})


# ----------------------------------------------------------------------------------------------------------------
# Cases and the segmenter backend
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Case:
    id: str
    source: str
    query: str
    text: int  # row of the text bank
    emb: int  # row of the embedding bank
    gt: np.ndarray  # HxW bool (already mirrored for mirrored cases)
    obj: np.ndarray  # 64x64 float32 object fraction
    image: np.ndarray | None = None  # kept only for generic segmenters (not LiteMedSAM)
    emb_flip: int = -1  # row of the mirrored image's embedding (SFT augmentation), -1 if none
    image_key: str = ""  # cases with the same key share an image (other objects for synthetic states)
    alt_texts: tuple[int, ...] = ()  # rows of the text bank with other wordings of the query (--query-variants)
    object: str = ""  # what the mask marks (sampling balance over objects)

    @property
    def shape(self) -> tuple[int, int]:
        return self.gt.shape  # type: ignore[return-value]


class _Backend:
    """Batched mask decoding for lockstep rollouts, through the segmenter interface only: backends with an image
    embedding (``encoder_id``) bank it and decode whole batches from the bank (:meth:`Segmenter.predict_batch`);
    any other segmenter is called one episode at a time on its image (the interface's per-item fallback) and the
    policy sees :func:`fake_embedding` features."""

    def __init__(self, name: str, weights: str, cache_dir: str) -> None:
        from ibisagent.segmenters.base import SegmenterUnavailable, create_segmenter
        from ibisagent.segmenters.embedding_cache import DiskEmbeddingCache

        dirs = [d.strip() for d in (cache_dir or "").split(",") if d.strip()]
        self.extra = [DiskEmbeddingCache(d) for d in dirs[1:] if Path(d).is_dir()]
        kwargs: dict[str, Any] = {}
        if name.startswith("litemedsam"):
            kwargs["cache_dir"] = dirs[0] if dirs else None
            if name == "litemedsam-click" and weights:
                kwargs["weights"] = weights
        try:
            self.seg = create_segmenter(name, **kwargs)
        except (KeyError, SegmenterUnavailable) as exc:
            raise PolicyTrainError(f"segmenter {name!r} is not usable: {exc}") from exc
        self.name = name
        self.lite = self.seg.encoder_id is not None  # decodes from banked embeddings
        self.embs: list[torch.Tensor] = []  # (256, 64, 64) float16
        self.calls = 0
        self.encoded = 0  # images run through the encoder (not found in a cache)
        self.on_encode: Any = None  # called with the running count after each encoder pass (progress)

    def cached(self, image: np.ndarray) -> bool:
        """Whether the image's embedding is in the segmenter's caches or an extra cache folder (always True for
        segmenters without an embedding)."""
        if not self.lite:
            return True
        im = np.ascontiguousarray(image)
        return self.seg.embedding_cached(im) or any(self.seg.embedding_key(im) in c for c in self.extra)

    def embed(self, image: np.ndarray) -> int:
        """Add the embedding of ``image`` to the bank; returns its row."""
        if self.lite:
            im = np.ascontiguousarray(image)
            e = None
            if not self.seg.embedding_cached(im):
                key = self.seg.embedding_key(im)
                for extra in self.extra:
                    e = extra.get(key)
                    if e is not None:
                        break
            if e is None:
                runs = self.seg.encoder_runs
                e = self.seg.embedding(im)
                if self.seg.encoder_runs > runs:
                    self.encoded += 1
                    if self.on_encode is not None:
                        self.on_encode(self.encoded)
        else:
            e = fake_embedding(image)
        self.embs.append(torch.from_numpy(np.array(e, np.float32).reshape(-1, GRID, GRID)).half())
        return len(self.embs) - 1

    def decode(self, cases: list[_Case], points: list[np.ndarray], labels: list[np.ndarray],
               logits: list[np.ndarray | None]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(mask HxW bool, low-res logits) for each episode, from all its clicks and its previous logits."""
        from ibisagent.segmenters.base import PromptSet

        self.calls += len(cases)
        items = [PromptSet(shape=c.shape, points=p, labels=lab, mask_input=lg,
                           embedding=self.embs[c.emb] if self.lite else None,
                           image=None if self.lite else c.image)
                 for c, p, lab, lg in zip(cases, points, labels, logits)]
        return [(r.mask, r.logits) for r in self.seg.predict_batch(items)]


def _load_cases(cfg: PolicyTrainConfig, split: str, backend: _Backend, texts: dict[str, int],
                flip: bool, limit: int = 0, cached_only: bool = False) -> list[_Case]:
    """The split's usable masks (not thin structures, >= 16 px) as episodes, with their embeddings banked. With
    ``limit`` a deterministic mix of datasets is kept (order by a hash of the case id). For the train split,
    ``cfg.volume_stride`` adds cases cut from the 3D label volumes. Images are mirrored (``flip``) only when the
    query names no side (a mirrored "left kidney" would be the right one)."""
    import hashlib

    from ibisagent.io import load_mask, load_rgb
    from ibisagent.training.volume_slices import mirror_safe, volume_slice_cases

    rows = [c for c in load_manifest(cfg.data, split=split, datasets=cfg.datasets,  # type: ignore[arg-type]
                                     split_by=cfg.split_by)
            if c.mask is not None and not is_unclickable(c.object)]
    if limit:
        rows = sorted(rows, key=lambda c: hashlib.sha1(c.id.encode()).hexdigest())[:limit]
    last: list[Any] = [None, None]

    def image(path: Path) -> np.ndarray:
        if last[0] != path:
            last[0], last[1] = path, load_rgb(path)
        return last[1]

    # object and modality of each case id, for query variants
    named: dict[str, tuple[str, str]] = {c.id: (c.object, c.modality) for c in rows}
    # (id, source, query, image key, image getter, mask getter)
    items: list[tuple[str, str, str, str, Any, Any]] = [
        (c.id, c.source, c.query, str(c.image), lambda p=c.image: image(p), lambda p=c.mask: load_mask(p))
        for c in rows]
    if split == "train" and cfg.augment > 0:
        # variants of the held-out images would never be used (GRPO keeps to the originals): not encoded
        items += _augmented_items([c for c in rows if not held_out(str(c.image), cfg.grpo_holdout)], cfg.augment,
                                  image)
    if split == "train" and cfg.volume_stride > 0:
        vols = volume_slice_cases(cfg.data, stride=cfg.volume_stride, min_area=cfg.volume_min_area,
                                  guard=cfg.volume_guard, datasets=cfg.volume_datasets or cfg.datasets,
                                  exclude_objects=THIN_OBJECTS, split_by=cfg.split_by)
        items += [(v.id, v.source, v.query, v.image_key, lambda v=v: v.image, lambda v=v: v.gt) for v in vols]
        named.update({v.id: (v.object, v.modality) for v in vols})
    out: list[_Case] = []
    emb_rows: dict[tuple[str, bool], int] = {}
    kept: dict[tuple[str, bool], np.ndarray] = {}  # images, for segmenters other than LiteMedSAM
    for cid, source, query, key_img, get_image, get_mask in items:
        gt = get_mask()
        if gt is None or gt.sum() < 16:
            continue
        if cached_only and not backend.cached(get_image()):
            continue
        texts.setdefault(query, len(texts))
        alt: tuple[int, ...] = ()
        if cfg.query_variants:
            obj_name, modality = named.get(cid.split(AUG_TAG, 1)[0], ("", ""))
            alt = tuple(texts.setdefault(q, len(texts)) for q in query_variants(query, obj_name, modality)[1:])
        rows_e = []
        for mirrored in (False, True) if flip and mirror_safe(query) and AUG_TAG not in key_img else (False,):
            key = (key_img, mirrored)
            if mirrored and cached_only and key not in emb_rows and not backend.cached(
                    np.ascontiguousarray(get_image()[:, ::-1])):
                continue
            if key not in emb_rows:
                img = get_image()
                if img.shape[:2] != gt.shape:
                    raise PolicyTrainError(f"{cid}: mask {gt.shape} and image {img.shape[:2]} differ in size")
                im = np.ascontiguousarray(img[:, ::-1]) if mirrored else img
                emb_rows[key] = backend.embed(im)
                if not backend.lite:
                    kept[key] = im
            rows_e.append(emb_rows[key])
        out.append(_Case(cid, source, query, texts[query], rows_e[0], gt, pool_to_grid(gt.astype(np.float32)),
                         kept.get((key_img, False)), rows_e[1] if len(rows_e) > 1 else -1, key_img, alt,
                         named.get(cid.split(AUG_TAG, 1)[0], ("", ""))[0]))
    return out


def case_weights(cases: list[_Case], temperature: float = 1.0, objects: list[str] | None = None) -> np.ndarray | None:
    """SFT sampling probability of each case.

    Balance (``temperature`` T, ``--sample-temperature``): P(dataset folder) ~ n_d^T with n_d its masks,
    P(object | folder) ~ n_o^T with n_o the folder's masks of that object, uniform within; T = 1 gives every mask the
    same weight (the default, as before), T = 0.5 down-weights the large folders and objects (square-root sampling),
    T = 0 gives every folder, then every object, the same weight. ``objects`` names each case's object (default:
    every case of a folder is one object). With ``--augment`` variants an original and its variants share one
    original's weight, so augmentation adds variety without changing the mix (variants exist only for 2D images,
    not for volume slices). None when sampling is uniform (T = 1, no variants)."""
    from collections import Counter

    has_aug = any(AUG_TAG in c.id for c in cases)
    if temperature == 1.0 and not has_aug:
        return None
    if temperature < 0:
        raise PolicyTrainError(f"--sample-temperature must be >= 0, got {temperature}")
    origin = [c.id.split(AUG_TAG, 1)[0] for c in cases]
    per_origin = Counter(origin)
    srcs = [getattr(c, "source", "") for c in cases]
    objs = objects if objects is not None else [""] * len(cases)
    # counts over originals only (a variant does not make its dataset larger)
    n_src: Counter[str] = Counter()
    n_obj: Counter[tuple[str, str]] = Counter()
    for src, o, ob in zip(srcs, origin, objs):
        n_src[src] += 1 / per_origin[o]
        n_obj[src, ob] += 1 / per_origin[o]
    src_mass = {s: n ** temperature for s, n in n_src.items()}
    total = sum(src_mass.values())
    obj_mass: dict[tuple[str, str], float] = {k: n ** temperature for k, n in n_obj.items()}
    obj_total: Counter[str] = Counter()
    for (src, _), m in obj_mass.items():
        obj_total[src] += m
    w = np.array([src_mass[src] / total * obj_mass[src, ob] / obj_total[src] / n_obj[src, ob] / per_origin[o]
                  for src, o, ob in zip(srcs, origin, objs)])
    return w / w.sum()


def _augmented_items(rows: list[Any], variants: int, image: Any) -> list[tuple[str, str, str, str, Any, Any]]:
    """Case items for ``variants`` warped copies of each 2D row's image (same layout as the originals' items). Image
    keys get ``#aug<k>``, so the held-out split keeps a variant with its original; a mask pushed partly off the
    image by the warp (less than 80 % kept) is dropped for that variant."""
    from ibisagent.io import load_mask
    from ibisagent.training.augment import augment_image, augment_mask, augment_params, kept_fraction

    last: list[Any] = [None, None]

    def aug_image(path: Path, k: int) -> np.ndarray:
        if last[0] != (path, k):
            last[0], last[1] = (path, k), augment_image(image(path), augment_params(str(path), k))
        return last[1]

    def aug_mask(path: Path, mask_path: Path, k: int) -> np.ndarray | None:
        p = augment_params(str(path), k)
        gt = load_mask(mask_path)
        warped = augment_mask(gt, p)
        return warped if kept_fraction(gt, warped, p) >= 0.8 else None

    return [(f"{c.id}{AUG_TAG}{k}", c.source, c.query, f"{c.image}{AUG_TAG}{k}",
             lambda p=c.image, k=k: aug_image(p, k), lambda p=c.image, m=c.mask, k=k: aug_mask(p, m, k))
            for k in range(1, variants + 1) for c in rows]


# ----------------------------------------------------------------------------------------------------------------
# Oracle labels
# ----------------------------------------------------------------------------------------------------------------

def click_target(mask: np.ndarray | None, gt: np.ndarray, depth: float = 0.6) -> np.ndarray | None:
    """Soft oracle target over the 2 x 64 x 64 cells (positive, negative), summing to 1, or None when the mask has no
    error. Pixels of FN (positive) and FP (negative) at >= ``depth`` x the larger distance-transform maximum, weighted
    by distance^2 (the reference oracle clicks at the maximum)."""
    er = error_regions(np.zeros_like(gt) if mask is None else mask, gt)
    top = max(er.fn_max, er.fp_max)
    if top <= 0:
        return None
    out = np.zeros((2, GRID, GRID), np.float32)
    for k, dt in enumerate((er.fn_dt, er.fp_dt)):
        w = np.where(dt >= depth * top, dt.astype(np.float32) ** 2, 0.0)
        if w.any():
            out[k] = pool_to_grid(w)
    s = out.sum()
    return out / s if s > 0 else None


def _mistake_click(gt: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> tuple[bool, int, int]:
    """A deliberate error: a positive click in the background ring around the object, or (with a mask) a negative
    click inside the object near its border."""
    h, w = gt.shape
    r = max(2, int(0.06 * math.sqrt(gt.sum())) + 2)
    if mask is not None and rng.random() < 0.5:
        inner = gt & ~ndimage.binary_erosion(gt, iterations=r)
        region, positive = inner & mask, False
    else:
        ring = ndimage.binary_dilation(gt, iterations=r) & ~gt
        region, positive = ring, True
        if mask is not None:
            region = ring & ~mask
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        ys, xs = np.nonzero(~gt if positive else gt)
        if len(ys) == 0:
            return True, w // 2, h // 2
    k = int(rng.integers(len(ys)))
    return positive, int(xs[k]), int(ys[k])


# ----------------------------------------------------------------------------------------------------------------
# Lockstep rollouts
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Ep:
    case: _Case
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    mask: np.ndarray | None = None
    logits: np.ndarray | None = None
    done: bool = False
    ious: list[float] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    policy: CompactPolicy | None = None  # reply writer (GRPO)
    stop_reason: str | None = None  # why the episode ended (ibisagent.episode.StopReason)

    def planes(self, step: int) -> np.ndarray:
        return state_planes(self.mask, self.logits, np.asarray(self.points, np.float32).reshape(-1, 2),
                            np.asarray(self.labels), self.case.shape, step)

    @property
    def iou(self) -> float:
        return iou(self.mask, self.case.gt) if self.mask is not None else 0.0


def _net_forward(net: CompactPolicyNet, backend: _Backend, text_bank: torch.Tensor, eps: list[_Ep],
                 planes: np.ndarray, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    emb = torch.stack([backend.embs[e.case.emb] for e in eps]).float()
    txt = text_bank[[e.case.text for e in eps]]
    with torch.set_grad_enabled(grad):
        return net(emb, torch.from_numpy(planes), txt)


def _apply_clicks(backend: _Backend, eps: list[_Ep], clicks: list[tuple[bool, int, int]]) -> None:
    pts, labs, lgs = [], [], []
    for e, (pos, x, y) in zip(eps, clicks):
        e.points.append((float(x), float(y)))
        e.labels.append(int(pos))
        pts.append(np.asarray(e.points, np.float32))
        labs.append(np.asarray(e.labels, np.int64))
        lgs.append(e.logits)
    for e, (m, lg) in zip(eps, backend.decode([e.case for e in eps], pts, labs, lgs)):
        e.mask, e.logits = m, lg
        e.ious.append(iou(m, e.case.gt))


def _collect_states(net: CompactPolicyNet | None, backend: _Backend, text_bank: torch.Tensor, cases: list[_Case],
                    mode: str, cfg: PolicyTrainConfig, rng: np.random.Generator, gen: torch.Generator,
                    log: Any = None) -> list[dict[str, Any]]:
    """Roll out ``mode`` in {"oracle", "reflective", "policy"} on every case; return oracle-labelled states."""
    states: list[dict[str, Any]] = []
    bs = cfg.batch_rollouts
    rules = StopRules(max_steps=cfg.rollout_clicks + 1)  # rollout_clicks clicks, then Terminate
    for b0 in range(0, len(cases), bs):
        eps = [_Ep(c) for c in cases[b0 : b0 + bs]]

        def act(idx: list[int], step: int, eps: list[_Ep] = eps) -> list[str]:
            """Record each live episode's state (labelled by the oracle), then its next action: the oracle's click,
            a deliberate mistake (reflective) or the policy's sampled click; Terminate after the last click or
            when the oracle has nothing left to click."""
            live = [eps[i] for i in idx]
            planes = np.stack([e.planes(step) for e in live])
            pol_clicks = None
            if mode == "policy" and net is not None:
                maps, stop, _ = _net_forward(net, backend, text_bank, live, planes)
                acts, _, _ = select_actions(maps, stop, torch.from_numpy(planes), temperature=1.0, generator=gen,
                                            stop_threshold=2.0)
                acts = torch.where(acts < 0, torch.argmax(maps.flatten(1), 1), acts)
                pol_clicks = [cell_to_pixel(int(a), maps[i].numpy(), live[i].mask, live[i].case.shape)
                              for i, a in enumerate(acts.tolist())]
            replies = []
            for i, e in enumerate(live):
                tgt = click_target(e.mask, e.case.gt)
                states.append({"case": e.case, "planes": planes[i], "target": tgt, "iou": e.iou, "step": step,
                               "ep": e, "t": len(e.ious)})
                oc = next_click(e.mask, e.case.gt)
                if step == cfg.rollout_clicks or oc is None:
                    replies.append(Action.terminate().text())
                    continue
                if pol_clicks is not None:
                    click = pol_clicks[i]
                elif mode == "reflective" and rng.random() < cfg.mistake_prob:
                    click = _mistake_click(e.case.gt, e.mask, rng)
                else:
                    click = (oc.positive, oc.x, oc.y)
                replies.append(_click_text(click, e.case.shape))
            return replies

        for e, reason in zip(eps, _drive_batch(backend, eps, act, rules).stop_reasons):
            e.done, e.stop_reason = True, reason
        if log:
            log(f"  {mode}: {min(b0 + bs, len(cases))}/{len(cases)} cases, {len(states)} states")
    # stop labels: IoU high enough, or the next oracle step (when the next action was the oracle's) did not help
    for s in states:
        e, t = s["ep"], s["t"]
        nxt = e.ious[t] if t < len(e.ious) else None
        no_gain = (mode == "oracle" and nxt is not None and nxt <= s["iou"] + 0.005 and s["step"] > 0)
        s["stop"] = float(s["step"] > 0 and (s["iou"] >= cfg.stop_iou or no_gain or s["target"] is None))
        del s["ep"]
    return states


# ----------------------------------------------------------------------------------------------------------------
# The SFT bank
# ----------------------------------------------------------------------------------------------------------------

class _Bank:
    """States stored compactly (uint8 planes/targets) with their case rows."""

    def __init__(self) -> None:
        self.frac: list[torch.Tensor] = []
        self.logit: list[torch.Tensor] = []
        self.clicks: list[torch.Tensor] = []
        self.meta: list[tuple[int, int, float, float]] = []  # (case row, step, stop, iou)
        self.target: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.meta)

    def add(self, states: list[dict[str, Any]], case_row: dict[str, int]) -> None:
        for s in states:
            p = s["planes"]
            self.frac.append(torch.from_numpy(np.round(p[0] * 255).astype(np.uint8)))
            self.logit.append(torch.from_numpy(np.round((p[1] + 1) * 127.5).astype(np.uint8)))
            self.clicks.append(torch.from_numpy((p[2] > 0.5).astype(np.uint8) + 2 * (p[3] > 0.5).astype(np.uint8)))
            tgt = s["target"]
            if tgt is None:
                self.target.append(torch.zeros(2, GRID, GRID, dtype=torch.uint8))
            else:
                self.target.append(torch.from_numpy(np.round(tgt / tgt.max() * 255).astype(np.uint8)))
            self.meta.append((case_row[s["case"].id], int(s["step"]), float(s["stop"]), float(s["iou"])))

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(planes (B,6,64,64), targets (B,2,64,64) unnormalized, stop (B,), case rows (B,))."""
        b = len(idx)
        planes = torch.zeros(b, 6, GRID, GRID)
        for j, i in enumerate(idx):
            planes[j, 0] = self.frac[i].float() / 255
            planes[j, 1] = self.logit[i].float() / 127.5 - 1
            c = self.clicks[i]
            planes[j, 2] = (c == 1).float()
            planes[j, 3] = (c == 2).float()
            step = self.meta[i][1]
            planes[j, 4] = float(step > 0)
            planes[j, 5] = min(step, 20) / 10.0
        tgt = torch.stack([self.target[i] for i in idx]).float()
        stop = torch.tensor([self.meta[i][2] for i in idx])
        rows = torch.tensor([self.meta[i][0] for i in idx])
        return planes, tgt, stop, rows

    def state_dict(self) -> dict[str, Any]:
        return {"frac": self.frac, "logit": self.logit, "clicks": self.clicks, "meta": self.meta,
                "target": self.target}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.frac, self.logit, self.clicks = d["frac"], d["logit"], d["clicks"]
        self.meta, self.target = d["meta"], d["target"]


def split_holdout(cases: list[_Case], frac: float) -> tuple[list[_Case], list[_Case]]:
    """(SFT cases, GRPO cases): a stable ``frac`` of the images goes to GRPO only. Images are grouped by their source
    (the volume for slices cut from one volume, ``<folder>/<file>#z<k>`` keys), so no volume is split between stages.
    The hash uses the last three parts of the path (``<dataset>/images/<file>``), so the split does not depend on
    where the data folder lives. With ``frac`` 0 both stages get every case. Augmented variants (``--augment``) are
    SFT data only."""
    if frac <= 0:
        return cases, [c for c in cases if AUG_TAG not in c.image_key]

    grpo = [c for c in cases if held_out(c.image_key, frac) and AUG_TAG not in c.image_key]
    sft = [c for c in cases if not held_out(c.image_key, frac)]
    return sft, grpo


def held_out(image_key: str, frac: float) -> bool:
    """Whether the image (or volume) behind ``image_key`` is in the held-out ``frac`` of :func:`split_holdout`."""
    import hashlib

    from ibisagent.training.augment import portable_key

    if frac <= 0:
        return False
    group = portable_key(image_key.split("#", 1)[0])
    return int(hashlib.sha1(group.encode()).hexdigest()[:8], 16) / 2**32 < frac


def _subset(cases: list[_Case], n: int, rng: np.random.Generator) -> list[_Case]:
    if not n or n >= len(cases):
        return cases
    return [cases[i] for i in sorted(rng.choice(len(cases), size=n, replace=False).tolist())]


def sft_loss(net: CompactPolicyNet, emb: torch.Tensor, planes: torch.Tensor, text: torch.Tensor,
             target: torch.Tensor, stop: torch.Tensor, obj: torch.Tensor, obj_weight: float = 0.5
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the click maps against the (allowed part of the) oracle target, BCE of the stop head (states
    with a mask), BCE of the object map against the object fraction per cell."""
    maps, stop_logit, obj_logit = net(emb, planes, text)
    allowed, stop_ok = allowed_actions(planes)
    tgt = (target * allowed).flatten(1)
    mass = tgt.sum(1)
    valid = mass > 1e-6
    tgt = tgt / mass.clamp_min(1e-6)[:, None]
    logp = torch.log_softmax(maps.masked_fill(~allowed, -1e9).flatten(1), 1)
    ce = -(tgt * logp).sum(1)
    w = valid.float() * (1.0 - 0.7 * stop)
    click_loss = (ce * w).sum() / w.sum().clamp_min(1.0)
    sm = stop_ok.float()
    stop_loss = (F.binary_cross_entropy_with_logits(stop_logit, stop, reduction="none") * sm).sum() / sm.sum().clamp_min(
        1.0)
    obj_loss = F.binary_cross_entropy_with_logits(obj_logit, obj)
    loss = click_loss + stop_loss + obj_weight * obj_loss
    click_loss, stop_loss, obj_loss = click_loss.detach(), stop_loss.detach(), obj_loss.detach()
    with torch.no_grad():
        hit = (tgt.gather(1, logp.argmax(1, keepdim=True))[:, 0] > 0).float()
        acc = float((hit * valid).sum() / valid.sum().clamp_min(1))
        stop_acc = float((((stop_logit > 0).float() == stop).float() * sm).sum() / sm.sum().clamp_min(1))
    return loss, {"loss": float(loss.detach()), "click_ce": float(click_loss), "stop_bce": float(stop_loss),
                  "obj_bce": float(obj_loss), "click_hit": acc, "stop_acc": stop_acc}


# ----------------------------------------------------------------------------------------------------------------
# Episodes with the policy (validation and GRPO)
# ----------------------------------------------------------------------------------------------------------------

def _play(net: CompactPolicyNet, backend: _Backend, text_bank: torch.Tensor, cases: list[_Case],
          cfg: PolicyTrainConfig, temperature: float, gen: torch.Generator, score: bool,
          max_turns: int, max_clicks: int = DEFAULT_MAX_CLICKS, greedy_clicks: bool = False) -> list[_Ep]:
    """Full episodes of the policy (lockstep): replies written by :class:`CompactPolicy`, rewards per step when
    ``score``. Greedy when ``temperature`` is 0."""
    from ibisagent.rewards import score_transition

    eps = []
    for c in cases:
        pol = CompactPolicy(weights=net, embedder="fake", seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
        pol.query = c.query
        eps.append(_Ep(c, policy=pol))
    budget = min(max_turns - 1, max_clicks)  # clicks before Terminate is forced (the last turn is kept for it)

    def act(idx: list[int], step: int) -> list[str]:
        live = [eps[i] for i in idx]
        planes = np.stack([e.planes(step) for e in live])
        maps, stop, obj = _net_forward(net, backend, text_bank, live, planes)
        force = torch.tensor([len(e.points) >= budget for e in live])
        acts, lps, p_stop = select_actions(maps, stop, torch.from_numpy(planes), temperature=temperature,
                                           force_stop=force, generator=gen, greedy_clicks=greedy_clicks)
        replies = []
        for i, e in enumerate(live):
            ch = ActionChoice(int(acts[i]), float(lps[i]), float(p_stop[i]), planes[i], maps[i].numpy(),
                              obj[i].numpy())
            assert e.policy is not None
            reply = e.policy.reply_text(ch, e.mask, e.case.shape)
            e.steps.append({"step": step, "index": ch.index, "logp": ch.log_prob, "planes": planes[i],
                            "reply": reply, "before": e.mask, "forced": bool(force[i]) and ch.index < 0})
            replies.append(reply)
        return replies

    for e, reason in zip(eps, _drive_batch(backend, eps, act, StopRules(max_steps=max_turns)).stop_reasons):
        e.done, e.stop_reason = True, reason
    if score:
        for e in eps:
            for k, rec in enumerate(e.steps):
                after = _mask_after(e, k)
                rb = score_transition(rec["reply"], gt=e.case.gt, mask_before=rec["before"], mask_after=after,
                                      step=k + 1)
                rec["reward"] = rb
    return eps


def _click_text(click: tuple[bool, int, int], shape: tuple[int, int]) -> str:
    """The action text of a pixel click (round-trips exactly through the 4-decimal normalized coordinates)."""
    positive, x, y = click
    h, w = shape
    return (Action.positive if positive else Action.negative)(to_normalized(x, w), to_normalized(y, h)).text()


def _drive_batch(backend: _Backend, eps: list[_Ep], act: Any, rules: StopRules) -> LockstepResult:
    """:func:`ibisagent.episode.drive_lockstep` on the episodes ``eps``: ``act`` writes the replies, the clicks go
    through the backend's batched decoder, the environment's stop rules end each episode."""

    def apply(idx: list[int], actions: list[Action]) -> list[str | None]:
        sel = [eps[i] for i in idx]
        clicks = []
        for e, a in zip(sel, actions):
            if not a.is_click:
                raise PolicyTrainError(f"lockstep rollouts take clicks only, got {a.text()!r}")
            clicks.append((a.kind is ActionKind.POSITIVE, *a.pixel(e.case.shape[1], e.case.shape[0])))
        _apply_clicks(backend, sel, clicks)
        return [None] * len(sel)

    return drive_lockstep(len(eps), act, apply, _parse_reference, rules)


def _parse_reference(reply: str) -> Action:
    return parse_reply(reply, "reference").action


def _mask_after(e: _Ep, k: int) -> np.ndarray | None:
    # the mask after step k is the "before" of step k + 1, or the final mask for the last step
    if k + 1 < len(e.steps):
        return e.steps[k + 1]["before"]
    return e.mask


def _validate(net: CompactPolicyNet, backend: _Backend, text_bank: torch.Tensor, cases: list[_Case],
              cfg: PolicyTrainConfig) -> dict[str, float]:
    if not cases:
        return {}
    gen = torch.Generator().manual_seed(0)
    net.eval()
    eps = []
    for b0 in range(0, len(cases), cfg.batch_rollouts):
        eps += _play(net, backend, text_bank, cases[b0 : b0 + cfg.batch_rollouts], cfg, 0.0, gen, False, 20)
    ious = [e.iou for e in eps]
    clicks = [len(e.points) for e in eps]
    return {"val_iou": float(np.mean(ious)), "val_clicks": float(np.mean(clicks)), "val_cases": len(eps)}


def grpo_advantages(rewards: list[list[float]]) -> list[list[float]]:
    """Process-supervision GRPO advantages for one group: normalize every step reward by the mean/std of all step
    rewards in the group, then each step's advantage is the sum of normalized rewards from it to the episode end."""
    flat = np.array([r for ep in rewards for r in ep], np.float64)
    if flat.size == 0:
        return [[] for _ in rewards]
    mu, sd = flat.mean(), flat.std()
    out = []
    for ep in rewards:
        z = (np.asarray(ep, np.float64) - mu) / (sd + 1e-6)
        out.append(np.cumsum(z[::-1])[::-1].tolist())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training driver
# ----------------------------------------------------------------------------------------------------------------

class _Log:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        if self.enabled:
            print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _text_bank(texts: dict[str, int]) -> torch.Tensor:
    from ibisagent.text_encoder import get_text_encoder

    enc = get_text_encoder()
    bank = torch.zeros(len(texts) + 1, 384)
    for q, i in texts.items():
        bank[i] = torch.from_numpy(enc.encode(q))
    return bank


def _plot(path: Path, series: dict[str, list[float]], xs: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (k, v) in zip(axes.flat, series.items()):
        ax.plot(xs[: len(v)], v, lw=1)
        ax.set_title(k, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


@dataclass
class _SftState:
    """Everything an SFT run carries from step to step (and what its checkpoint holds)."""

    net: CompactPolicyNet
    opt: torch.optim.Optimizer
    bank: _Bank
    rng: np.random.Generator
    step: int = 0
    dagger_done: int = 0
    elapsed_before: float = 0.0  # seconds trained before this process (a resumed run)

    def save(self, path: Path, gen: torch.Generator, elapsed: float) -> None:
        """Write the resumable checkpoint (weights, optimizer, state bank, step, both RNGs, wall time)."""
        torch.save({"net": self.net.state_dict(), "opt": self.opt.state_dict(), "bank": self.bank.state_dict(),
                    "step": self.step, "dagger_done": self.dagger_done, "rng": self.rng, "gen": gen.get_state(),
                    "elapsed": elapsed}, path)


def _sft_setup(cfg: PolicyTrainConfig, ckpt: Path, backend: _Backend, text_bank: torch.Tensor, train: list[_Case],
               case_row: dict[str, int], log: _Log, gen: torch.Generator) -> _SftState:
    """A fresh (or ``--init``) network and optimizer, resumed from ``ckpt`` with ``--resume``; a new run whose recipe
    uses real states (``synth_frac < 1``) first fills the state bank with oracle and reflective rollouts."""
    net = load_policy_net(cfg.init)[0].train() if cfg.init else CompactPolicyNet(
        CompactNetConfig(width=cfg.net_width, query_maps=cfg.query_maps))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.sft_lr, weight_decay=1e-4)
    s = _SftState(net, opt, _Bank(), np.random.default_rng(cfg.seed))
    if cfg.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        s.bank.load_state_dict(st["bank"])
        s.step, s.dagger_done, s.elapsed_before = st["step"], st["dagger_done"], st.get("elapsed", 0.0)
        s.rng = st["rng"]
        gen.set_state(st["gen"])
        log(f"resumed SFT at step {s.step} ({len(s.bank)} states)")
    if len(s.bank) == 0 and cfg.synth_frac < 1.0:
        for mode in ("oracle", "reflective"):
            s.bank.add(_collect_states(None, backend, text_bank, _subset(train, cfg.rollout_cases, s.rng), mode, cfg,
                                       s.rng, gen, log), case_row)
        log(f"rolled out {len(s.bank)} states (oracle + reflective) through {cfg.segmenter}")
    return s


class _SftSampler:
    """Draws one SFT batch: synthetic states of the train cases mixed with real states of the bank (``synth_frac``),
    sampled with the case weights of ``--sample-temperature``, half of them mirrored, with another wording of the
    query half the time under ``--query-variants``."""

    def __init__(self, cfg: PolicyTrainConfig, backend: _Backend, text_bank: torch.Tensor, train: list[_Case],
                 has_bank: bool) -> None:
        from ibisagent.training.policy_states import synth_case

        self.cfg, self.backend, self.text_bank, self.train = cfg, backend, text_bank, train
        by_image: dict[str, list[int]] = {}
        for i, c in enumerate(train):
            by_image.setdefault(c.image_key, []).append(i)
        self.synth_cases = [synth_case(c.gt, [train[j].gt for j in by_image[c.image_key] if j != i])
                            for i, c in enumerate(train)]
        self.obj_bank = torch.from_numpy(np.stack([c.obj for c in train]))
        self.n_syn = int(round(cfg.sft_batch * cfg.synth_frac)) if has_bank else cfg.sft_batch
        self.case_p = case_weights(train, cfg.sample_temperature, [c.object for c in train])
        self.state_p: np.ndarray | None = None  # case_p over the bank's states, recomputed when the bank grows

    def batch(self, bank: _Bank, rng: np.random.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(emb, planes, text, click targets, stop targets, object targets)`` of one batch."""
        from ibisagent.training.policy_states import synth_batch

        cfg, train, case_p = self.cfg, self.train, self.case_p
        n_syn = self.n_syn
        n_real = cfg.sft_batch - n_syn if len(bank) else 0
        if case_p is None:
            syn_rows = rng.integers(0, len(train), n_syn).tolist()
        else:
            syn_rows = rng.choice(len(train), n_syn, p=case_p).tolist()
        sp, st_, ss = synth_batch(self.synth_cases, syn_rows, rng, cfg.stop_iou)
        if n_real:
            if case_p is None:
                real_rows = rng.integers(0, len(bank), n_real).tolist()
            else:
                if self.state_p is None or len(self.state_p) != len(bank):
                    state_p = case_p[[m[0] for m in bank.meta]]
                    self.state_p = state_p / state_p.sum()
                real_rows = rng.choice(len(bank), n_real, p=self.state_p).tolist()
            planes, tgt, stop, rows = bank.batch(real_rows)
            planes, tgt, stop = torch.cat([planes, sp]), torch.cat([tgt, st_]), torch.cat([stop, ss])
            rows = torch.cat([rows, torch.tensor(syn_rows, dtype=torch.long)])
        else:
            planes, tgt, stop, rows = sp, st_, ss, torch.tensor(syn_rows, dtype=torch.long)
        obj = self.obj_bank[rows]
        # mirror augmentation: the mirrored image's embedding with the mirrored state and targets
        mirror = torch.from_numpy(rng.random(len(rows)) < 0.5) & torch.tensor([train[r].emb_flip >= 0
                                                                                for r in rows.tolist()])
        emb = torch.stack([self.backend.embs[train[r].emb_flip if m else train[r].emb]
                           for r, m in zip(rows.tolist(), mirror.tolist())]).float()
        if mirror.any():
            planes[mirror] = planes[mirror].flip(-1)
            tgt[mirror] = tgt[mirror].flip(-1)
            obj[mirror] = obj[mirror].flip(-1)
        txt_rows = [train[r].text for r in rows.tolist()]
        if cfg.query_variants:  # half the time another wording of the query
            txt_rows = [int(rng.choice(train[r].alt_texts)) if train[r].alt_texts and rng.random() < 0.5 else t
                        for r, t in zip(rows.tolist(), txt_rows)]
        return emb, planes, self.text_bank[txt_rows], tgt, stop, obj


def _sft_lr(cfg: PolicyTrainConfig, step: int) -> float:
    """The SFT learning rate at ``step``: linear warm-up over the first 5 % of the steps, then a cosine decay."""
    warm = max(1, cfg.sft_steps // 20)
    return cfg.sft_lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / cfg.sft_steps))


def _sft_step(cfg: PolicyTrainConfig, s: _SftState, sampler: _SftSampler) -> tuple[float, dict[str, float]]:
    """One optimizer step on one sampled batch; returns the learning rate used and the loss parts."""
    s.net.train()
    lr = _sft_lr(cfg, s.step)
    for g in s.opt.param_groups:
        g["lr"] = lr
    emb, planes, txt, tgt, stop, obj = sampler.batch(s.bank, s.rng)
    loss, parts = sft_loss(s.net, emb, planes, txt, tgt, stop, obj, cfg.obj_weight)
    s.opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.net.parameters(), 2.0)
    s.opt.step()
    s.step += 1
    return lr, parts


def _sft_finish(cfg: PolicyTrainConfig, run: Path, backend: _Backend, text_bank: torch.Tensor, val: list[_Case],
                s: _SftState, minutes: float, log: _Log) -> dict[str, Any]:
    """Plot the SFT curves, validate, write ``sft.safetensors`` and return the SFT part of the run summary."""
    s.net.eval()
    rows_csv = _read_csv(run / "sft_log.csv")
    if rows_csv:
        keys = ["loss", "click_ce", "stop_bce", "obj_bce", "click_hit", "stop_acc"]
        _plot(run / "sft_curves.png", {k: [float(r[k]) for r in rows_csv] for k in keys},
              [float(r["step"]) for r in rows_csv], "SFT")
    summary = {"sft_steps": s.step, "sft_states": len(s.bank), "sft_minutes": round(minutes, 1),
               "sft_holdout": cfg.grpo_holdout}
    summary.update({f"sft_{k}": v for k, v in _validate(s.net, backend, text_bank, val, cfg).items()})
    save_policy_net(s.net, run / "sft.safetensors", {"stage": "sft", **summary})
    log(f"SFT done: {summary}")
    return summary


def _run_sft(cfg: PolicyTrainConfig, run: Path, backend: _Backend, text_bank: torch.Tensor, train: list[_Case],
             val: list[_Case], log: _Log, gen: torch.Generator) -> tuple[CompactPolicyNet, dict[str, Any]]:
    """The SFT stage: set up (or resume), then step until ``sft_steps`` or ``--sft-minutes``, adding DAgger states of
    the current policy at ``dagger_rounds`` evenly spaced steps, logging every step to ``sft_log.csv`` and
    checkpointing every ``ckpt_every`` steps; returns the network and the SFT summary."""
    ckpt, csv_path = run / "sft_last.pt", run / "sft_log.csv"
    case_row = {c.id: i for i, c in enumerate(train)}
    t_start = time.perf_counter()
    s = _sft_setup(cfg, ckpt, backend, text_bank, train, case_row, log, gen)
    real = cfg.synth_frac < 1.0
    sampler = _SftSampler(cfg, backend, text_bank, train, len(s.bank) > 0)
    dagger_at = [int(cfg.sft_steps * (k + 1) / (cfg.dagger_rounds + 1)) for k in range(cfg.dagger_rounds if real else 0)]
    while s.step < cfg.sft_steps:
        if s.dagger_done < len(dagger_at) and s.step >= dagger_at[s.dagger_done]:
            s.net.eval()
            new = _collect_states(s.net, backend, text_bank, _subset(train, cfg.rollout_cases, s.rng), "policy", cfg,
                                  s.rng, gen, log)
            s.bank.add(new, case_row)
            s.dagger_done += 1
            log(f"DAgger round {s.dagger_done}: +{len(new)} states (bank {len(s.bank)})")
        lr, parts = _sft_step(cfg, s, sampler)
        step = s.step
        elapsed = s.elapsed_before + time.perf_counter() - t_start
        row = {"step": step, "lr": round(lr, 6), **{k: round(v, 5) for k, v in parts.items()},
               "elapsed_s": round(elapsed, 1)}
        if step % max(1, cfg.ckpt_every) == 0 or step == cfg.sft_steps:
            if val:
                row.update(_validate(s.net, backend, text_bank, val, cfg))
            s.save(ckpt, gen, elapsed)
            log("SFT " + " ".join(f"{k}={v}" for k, v in row.items()))
        elif step % 10 == 0:
            log(f"SFT step {step}/{cfg.sft_steps} loss={parts['loss']:.3f} click_hit={parts['click_hit']:.2f} "
                f"stop_acc={parts['stop_acc']:.2f}")
        _append_csv(csv_path, row)
        if cfg.sft_minutes and elapsed > cfg.sft_minutes * 60:
            log(f"SFT time limit reached at step {step}")
            s.save(ckpt, gen, elapsed)
            break
    summary = _sft_finish(cfg, run, backend, text_bank, val, s,
                          (s.elapsed_before + time.perf_counter() - t_start) / 60, log)
    return s.net, summary


@dataclass
class _GrpoState:
    """Everything a GRPO run carries from iteration to iteration (and what its checkpoint holds)."""

    net: CompactPolicyNet
    ref: CompactPolicyNet  # the frozen SFT policy of the KL term
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    it: int = 0
    elapsed_before: float = 0.0  # seconds trained before this process (a resumed run)

    def save(self, path: Path, gen: torch.Generator, elapsed: float) -> None:
        """Write the resumable checkpoint (policy, reference, optimizer, iteration, both RNGs, wall time)."""
        torch.save({"net": self.net.state_dict(), "ref": self.ref.state_dict(), "opt": self.opt.state_dict(),
                    "it": self.it, "rng": self.rng, "gen": gen.get_state(), "elapsed": elapsed}, path)


def _grpo_setup(cfg: PolicyTrainConfig, ckpt: Path, net: CompactPolicyNet, log: _Log,
                gen: torch.Generator) -> _GrpoState:
    """The reference copy of ``net``, the optimizer, the state resumed from ``ckpt`` with ``--resume``, and the
    parameters frozen by ``--no-grpo-stop`` (the stop head) or ``--grpo-stop-only`` (all but the stop head)."""
    ref = copy.deepcopy(net).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    s = _GrpoState(net, ref, torch.optim.Adam(net.parameters(), lr=cfg.grpo_lr), np.random.default_rng(cfg.seed + 1))
    if cfg.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        net.load_state_dict(st["net"])
        ref.load_state_dict(st["ref"])
        s.opt.load_state_dict(st["opt"])
        s.it, s.elapsed_before, s.rng = st["it"], st.get("elapsed", 0.0), st["rng"]
        gen.set_state(st["gen"])
        log(f"resumed GRPO at iteration {s.it}")
    if not cfg.grpo_stop:  # the stop head keeps its SFT weights
        for p in net.stop.parameters():
            p.requires_grad_(False)
    if cfg.grpo_stop_only:  # everything but the stop head keeps its SFT weights
        stop_params = {id(p) for p in net.stop.parameters()}
        for p in net.parameters():
            p.requires_grad_(id(p) in stop_params)
    return s


def _grpo_log_prob(cfg: PolicyTrainConfig, maps: torch.Tensor, stop: torch.Tensor, planes: torch.Tensor,
                   actions: torch.Tensor) -> torch.Tensor:
    """log-prob of the rollout actions under the policy at the rollout temperature (clicks only without
    --grpo-stop, stop-or-click only with --grpo-stop-only)"""
    t = cfg.grpo_temperature
    if cfg.grpo_stop_only:
        return _stop_log_prob(stop / t, planes, actions)
    if cfg.grpo_stop:
        return action_log_prob(maps, stop, planes, actions, temperature=t)
    return _click_log_prob(maps / t, stop, planes, actions)


def _grpo_rollouts(cfg: PolicyTrainConfig, backend: _Backend, text_bank: torch.Tensor, train: list[_Case],
                   s: _GrpoState, gen: torch.Generator) -> list[_Ep]:
    """One iteration's episodes: ``grpo_cases`` cases drawn without replacement, ``group_size`` sampled episodes
    each, played in batches of about ``batch_rollouts`` episodes; a group's episodes are consecutive."""
    pick = s.rng.choice(len(train), size=min(cfg.grpo_cases, len(train)), replace=False).tolist()
    cases = [train[i] for i in pick]
    per_batch = max(1, cfg.batch_rollouts // cfg.group_size)
    eps: list[_Ep] = []
    s.net.eval()
    for b0 in range(0, len(cases), per_batch):
        group = [c for c in cases[b0 : b0 + per_batch] for _ in range(cfg.group_size)]
        eps += _play(s.net, backend, text_bank, group, cfg, cfg.grpo_temperature, gen, True, cfg.max_turns,
                     greedy_clicks=cfg.grpo_stop_only)
    return eps


def _grpo_records(cfg: PolicyTrainConfig, eps: list[_Ep], it: int, steps_csv: Path) -> list[dict[str, Any]]:
    """Set each step's advantage within its case group, log every step's reward components to ``steps_csv``, and
    return the steps the loss scores (``{"ep": episode, "s": step}``): not a stop the click budget forced, and only
    clicks without ``--grpo-stop``."""
    from ibisagent.rewards import COMPONENTS

    recs: list[dict[str, Any]] = []
    for g0 in range(0, len(eps), cfg.group_size):
        grp = eps[g0 : g0 + cfg.group_size]
        adv = grpo_advantages([_episode_rewards(e, cfg.max_turns if cfg.grpo_absorbing else 0) for e in grp])
        for gi, (e, a) in enumerate(zip(grp, adv)):
            for s, av in zip(e.steps, a):
                s["adv"] = av
                if not s["forced"]:  # a stop forced by the click budget is not the policy's choice
                    recs.append({"ep": e, "s": s})
                rb = s["reward"]
                _append_csv(steps_csv, {"iter": it, "case": e.case.id, "episode": g0 + gi, "step": s["step"] + 1,
                                        "action": rb.action, **{k: getattr(rb, k) for k in COMPONENTS},
                                        "total": round(rb.total, 4), "iou_after": round(rb.iou_after, 4),
                                        "advantage": round(av, 4)})
    if not cfg.grpo_stop:  # only the clicks are optimized: the stop head's choices are not scored
        recs = [r for r in recs if r["s"]["index"] >= 0]
    return recs


def _grpo_update(cfg: PolicyTrainConfig, backend: _Backend, text_bank: torch.Tensor, s: _GrpoState,
                 recs: list[dict[str, Any]]) -> dict[str, float]:
    """``grpo_epochs`` clipped-ratio policy-gradient steps with the KL penalty to the reference on the scored
    steps; returns the last epoch's loss, KL and clipped fraction."""
    net = s.net
    net.train()
    recompute_old = not cfg.grpo_stop or cfg.grpo_stop_only  # the rollout log-probs were of the full action
    planes = torch.from_numpy(np.stack([r["s"]["planes"] for r in recs]))
    acts = torch.tensor([r["s"]["index"] for r in recs])
    old = torch.tensor([r["s"]["logp"] for r in recs])
    adv = torch.tensor([r["s"]["adv"] for r in recs], dtype=torch.float32)
    emb = torch.stack([backend.embs[r["ep"].case.emb] for r in recs]).float()
    txt = text_bank[[r["ep"].case.text for r in recs]]
    with torch.no_grad():
        rm, rs, _ = s.ref(emb, planes, txt)
        ref_lp = _grpo_log_prob(cfg, rm, rs, planes, acts)
        if recompute_old:  # the sampling policy's log-probs of the part trained (unchanged since the rollouts)
            om, os_, _ = net(emb, planes, txt)
            old = _grpo_log_prob(cfg, om, os_, planes, acts)
    stats: dict[str, float] = {}
    for _ in range(cfg.grpo_epochs):
        maps, stop, _ = net(emb, planes, txt)
        lp = _grpo_log_prob(cfg, maps, stop, planes, acts)
        ratio = torch.exp(lp - old)
        surr = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
        d = ref_lp - lp
        kl = torch.exp(d) - d - 1
        loss = -(surr - cfg.kl_coef * kl).mean()
        s.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        s.opt.step()
        stats = {"loss": float(loss.detach()), "kl": float(kl.detach().mean()), "clip_frac": float(
            ((ratio - 1).abs() > cfg.clip).float().mean())}
    return stats


def _grpo_iter_row(it: int, recs: list[dict[str, Any]], eps: list[_Ep], stats: dict[str, float],
                   elapsed: float) -> dict[str, Any]:
    """The ``grpo_iters.csv`` row of one iteration: mean reward components of the scored steps, final IoU, turns and
    clicks per episode, the update's statistics and the wall time."""
    from ibisagent.rewards import COMPONENTS

    row: dict[str, Any] = {"iter": it}
    for k in (*COMPONENTS, "total"):
        row[k] = round(float(np.mean([getattr(r["s"]["reward"], k) for r in recs])), 4)
    row["final_iou"] = round(float(np.mean([e.iou for e in eps])), 4)
    row["turns"] = round(float(np.mean([len(e.steps) for e in eps])), 3)
    row["clicks"] = round(float(np.mean([len(e.points) for e in eps])), 3)
    row.update({k: round(v, 5) for k, v in stats.items()})
    row["elapsed_s"] = round(elapsed, 1)
    return row


def _run_grpo(cfg: PolicyTrainConfig, run: Path, backend: _Backend, text_bank: torch.Tensor, train: list[_Case],
              val: list[_Case], net: CompactPolicyNet, log: _Log, gen: torch.Generator) -> dict[str, Any]:
    """The GRPO stage on ``net`` (trained in place): set up (or resume), then per iteration roll out groups, score
    and log every step, update, log the iteration (``grpo_iters.csv``) and checkpoint every 5 iterations, until
    ``grpo_iters`` or ``--grpo-minutes``; returns the GRPO summary."""
    ckpt = run / "grpo_last.pt"
    s = _grpo_setup(cfg, ckpt, net, log, gen)
    t_start = time.perf_counter()
    steps_csv, iters_csv = run / "grpo_steps.csv", run / "grpo_iters.csv"
    while s.it < cfg.grpo_iters:
        eps = _grpo_rollouts(cfg, backend, text_bank, train, s, gen)
        recs = _grpo_records(cfg, eps, s.it, steps_csv)
        if not recs:
            s.it += 1
            continue
        stats = _grpo_update(cfg, backend, text_bank, s, recs)
        s.it += 1
        it = s.it
        elapsed = s.elapsed_before + time.perf_counter() - t_start
        row = _grpo_iter_row(it, recs, eps, stats, elapsed)
        save = it % 5 == 0 or it == cfg.grpo_iters or (cfg.grpo_minutes and elapsed > cfg.grpo_minutes * 60)
        if save:
            if val:
                row.update(_validate(net, backend, text_bank, val, cfg))
            s.save(ckpt, gen, elapsed)
        _append_csv(iters_csv, row)
        log("GRPO " + " ".join(f"{k}={v}" for k, v in row.items()))
        if cfg.grpo_minutes and elapsed > cfg.grpo_minutes * 60:
            log(f"GRPO time limit reached at iteration {it}")
            break
    net.eval()
    _plot_grpo(run)
    summary = {"grpo_iters": s.it, "grpo_minutes": round((s.elapsed_before + time.perf_counter() - t_start) / 60, 1)}
    summary.update({f"grpo_{k}": v for k, v in _validate(net, backend, text_bank, val, cfg).items()})
    return summary


def _episode_rewards(e: _Ep, pad_to: int = 0) -> list[float]:
    """The per-step total rewards of an episode; with ``pad_to``, an episode that ended with Terminate is extended to
    ``pad_to`` turns by repeating the Terminate step's reward (the stop state is absorbing). The advantages of the
    padded turns are computed but belong to no action."""
    r = [s["reward"].total for s in e.steps]
    if pad_to and e.steps and e.steps[-1]["index"] < 0 and len(r) < pad_to:
        r += [r[-1]] * (pad_to - len(r))
    return r


def _stop_log_prob(stop_logit: torch.Tensor, planes: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log P(stop) for stop actions (-1), log P(click) for clicks; 0 where stopping is not allowed (no mask yet)."""
    _, stop_ok = allowed_actions(planes)
    lp = torch.where(actions < 0, F.logsigmoid(stop_logit), F.logsigmoid(-stop_logit))
    return torch.where(stop_ok, lp, torch.zeros_like(lp))


def _click_log_prob(maps: torch.Tensor, stop_logit: torch.Tensor, planes: torch.Tensor,
                    actions: torch.Tensor) -> torch.Tensor:
    """log P(click cell | the policy clicks): the click part of :func:`action_log_prob` (``actions`` >= 0)."""
    logits, _ = masked_logits(maps, planes)
    return torch.log_softmax(logits, 1).gather(1, actions.clamp_min(0)[:, None])[:, 0]


def _plot_grpo(run: Path) -> None:
    rows = _read_csv(run / "grpo_iters.csv")
    if not rows:
        return
    keys = ["format", "answer", "placement", "progress", "length", "total", "final_iou", "clicks", "kl"]
    _plot(run / "grpo_curves.png", {k: [float(r[k]) for r in rows] for k in keys},
          [float(r["iter"]) for r in rows], "GRPO: mean reward per step, final IoU, clicks, KL to SFT")


def train_policy(config: PolicyTrainConfig | dict[str, Any]) -> Path:
    """Train the compact policy (stage ``sft``, ``grpo`` or ``all``) and write the weights; returns their path."""
    cfg = config if isinstance(config, PolicyTrainConfig) else PolicyTrainConfig(**config)
    if cfg.stage not in ("sft", "grpo", "all"):
        raise PolicyTrainError(f"stage must be sft, grpo or all, got {cfg.stage!r}")
    if not cfg.data:
        raise PolicyTrainError("--data is required (a folder with index.jsonl or a folder of such folders)")
    if cfg.group_size < 2:
        raise PolicyTrainError("group_size must be >= 2 (the recipe uses >= 4)")
    if cfg.grpo_stop_only and not cfg.grpo_stop:
        raise PolicyTrainError("--grpo-stop-only trains the stop head, --no-grpo-stop freezes it: choose one")
    if not 0 <= cfg.grpo_holdout < 1:
        raise PolicyTrainError(f"grpo_holdout must be in [0, 1), got {cfg.grpo_holdout}")
    if cfg.augment < 0:
        raise PolicyTrainError(f"augment must be >= 0 (variants per image), got {cfg.augment}")
    if not cfg.grpo_temperature > 0:
        raise PolicyTrainError(f"grpo_temperature must be > 0, got {cfg.grpo_temperature}")
    if cfg.net_width < 8 or cfg.net_width % 8:
        raise PolicyTrainError(f"--net-width must be a positive multiple of 8, got {cfg.net_width}")
    if cfg.query_maps < 0:
        raise PolicyTrainError(f"--query-maps must be >= 0, got {cfg.query_maps}")
    if not Path(cfg.data).exists():
        raise PolicyTrainError(f"data folder {cfg.data} does not exist")
    torch.set_num_threads(max(1, cfg.threads))
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    log = _Log(run / "train.log", cfg.progress)
    gen = _seed_all(cfg.seed)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    t0 = time.perf_counter()
    backend = _Backend(cfg.segmenter, cfg.segmenter_weights, cfg.cache_dir)
    backend.on_encode = lambda n: log(f"encoding images: {n} done ({time.perf_counter() - t0:.0f}s)") \
        if n == 1 or n % 50 == 0 else None
    texts: dict[str, int] = {}
    train = _load_cases(cfg, "train", backend, texts, cfg.flip, cfg.max_cases, cfg.cached_only)
    val = _load_cases(cfg, "val", backend, texts, False, cfg.val_cases, cfg.cached_only) if cfg.val_cases > 0 else []
    if not train:
        raise PolicyTrainError(f"no usable train cases under {cfg.data}")
    text_bank = _text_bank(texts)
    sft_train, grpo_train = split_holdout(train, cfg.grpo_holdout)
    if not sft_train or not grpo_train:
        raise PolicyTrainError(f"--grpo-holdout {cfg.grpo_holdout} leaves {len(sft_train)} SFT and {len(grpo_train)} "
                               "GRPO cases; both stages need some")
    log(f"{len(train)} train masks ({'with' if cfg.flip else 'no'} mirrored embeddings), {len(val)} val; segmenter "
        f"{cfg.segmenter}; {len(backend.embs)} embeddings loaded in {time.perf_counter() - t0:.0f}s")
    summary: dict[str, Any] = {"segmenter": cfg.segmenter, "segmenter_weights": cfg.segmenter_weights or "shipped",
                               "train_cases": len(train), "val_cases": len(val), "seed": cfg.seed}
    if cfg.grpo_holdout > 0:
        summary.update({"sft_masks": len(sft_train), "grpo_masks": len(grpo_train)})
        log(f"--grpo-holdout {cfg.grpo_holdout}: SFT on {len(sft_train)} masks, GRPO on the other {len(grpo_train)}")
    if cfg.stage in ("sft", "all"):
        net, s = _run_sft(cfg, run, backend, text_bank, sft_train, val, log, gen)
        summary.update(s)
    else:
        sft_path = run / "sft.safetensors"
        if not sft_path.exists():
            raise PolicyTrainError(f"stage grpo needs {sft_path} (run --stage sft first)")
        net, meta = load_policy_net(sft_path)
        if "sft_holdout" in meta and float(meta["sft_holdout"]) != cfg.grpo_holdout:
            raise PolicyTrainError(f"{sft_path} was trained with --grpo-holdout {meta['sft_holdout']}: give the same "
                                   f"value to the grpo stage (got {cfg.grpo_holdout}), or GRPO would not get the images "
                                   "SFT left out")
        summary.update({k: _maybe_json(v) for k, v in meta.items() if k.startswith("sft")})
    if cfg.stage in ("grpo", "all") and cfg.grpo_iters > 0:
        summary.update(_run_grpo(cfg, run, backend, text_bank, grpo_train, val, net, log, gen))
    summary["total_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    summary["decoder_calls"] = backend.calls
    out = Path(cfg.out) if cfg.out else POLICY_WEIGHTS
    save_policy_net(net, out, {"stage": cfg.stage, **summary})
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"wrote {out}: {summary}")
    return out


def _maybe_json(v: str) -> Any:
    try:
        return json.loads(v)
    except (ValueError, TypeError):
        return v
