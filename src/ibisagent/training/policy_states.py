"""Segmenter-free SFT states for the compact policy: imperfect masks synthesized from the ground truth, with oracle
labels.

Running the promptable segmenter for every training state is the expensive part of imitation learning on a small
CPU, so most SFT states are synthesized on the fly at a 128 x 128 working resolution (the image's full extent, aspect
not kept, like the embedding grid; distance transforms use the true pixel aspect): the kinds of mistakes an
interactive segmenter makes (under- and over-segmentation, a partial blob around a click, a leak to one side, a
shifted mask, the wrong object, a nearly right mask), a click history consistent with the mask, logits from the
mask's signed distance, and the same oracle labels as real states (soft distance-transform click target, stop at
IoU >= ``stop_iou``). Real rollouts through the segmenter (oracle, reflective, DAgger) and GRPO then adapt the
policy to the segmenter's actual behaviour.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ibisagent.policies.compact import GRID, N_PLANES

__all__ = ["RES", "SynthCase", "synth_batch", "synth_case", "synth_state", "target_from_masks"]

#: working resolution of synthetic states
RES = 128
_KINDS = ("start", "erode", "dilate", "partial", "leak", "shift", "other", "near", "combo")
_PROBS = (0.12, 0.12, 0.12, 0.16, 0.12, 0.08, 0.10, 0.10, 0.08)


class SynthCase:
    """One case at the working resolution: its object, the other objects of the same image, pixel aspect."""

    def __init__(self, gt: np.ndarray, others: list[np.ndarray] | None = None) -> None:
        h, w = gt.shape
        self.gt = _resize(gt)
        self.others = [_resize(o) for o in (others or []) if o.shape == gt.shape]
        self.sampling = (h / RES, w / RES)
        self.radius = max(1.0, float(np.sqrt(self.gt.sum() / np.pi)))


def synth_case(gt: np.ndarray, others: list[np.ndarray] | None = None) -> SynthCase:
    return SynthCase(np.asarray(gt, bool), others)


def _resize(mask: np.ndarray) -> np.ndarray:
    im = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((RES, RES), Image.BILINEAR)
    return np.asarray(im) >= 128


def _pool(a: np.ndarray) -> np.ndarray:
    k = RES // GRID
    return np.asarray(a, np.float32).reshape(GRID, k, GRID, k).mean((1, 3))


def _dt(region: np.ndarray, sampling: tuple[float, float]) -> np.ndarray:
    if not region.any():
        return np.zeros(region.shape, np.float32)
    return ndimage.distance_transform_edt(np.pad(region, 1), sampling=sampling)[1:-1, 1:-1].astype(np.float32)


def target_from_masks(mask: np.ndarray | None, gt: np.ndarray, sampling: tuple[float, float],
                      depth: float = 0.6) -> np.ndarray | None:
    """The oracle's soft click target on the 64x64 grid (as :func:`ibisagent.training.policy.click_target`)."""
    m = np.zeros_like(gt) if mask is None else mask
    fn_dt, fp_dt = _dt(gt & ~m, sampling), _dt(m & ~gt, sampling)
    top = max(float(fn_dt.max()), float(fp_dt.max()))
    if top <= 0:
        return None
    out = np.zeros((2, GRID, GRID), np.float32)
    for k, dt in enumerate((fn_dt, fp_dt)):
        wts = np.where(dt >= depth * top, dt ** 2, 0.0)
        if wts.any():
            out[k] = _pool(wts)
    s = out.sum()
    return out / s if s > 0 else None


def _disk(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[:RES, :RES]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _pick(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return None
    k = int(rng.integers(len(ys)))
    return int(ys[k]), int(xs[k])


def _make_mask(c: SynthCase, kind: str, rng: np.random.Generator) -> np.ndarray:
    g = c.gt
    r = c.radius
    it = max(1, int(rng.uniform(0.08, 0.35) * r))
    if kind == "erode":
        m = ndimage.binary_erosion(g, iterations=it)
        return m if m.any() else g & _disk(*_pick(g, rng), r * 0.5)  # type: ignore[misc]
    if kind == "dilate":
        return ndimage.binary_dilation(g, iterations=it)
    if kind == "partial":
        p = _pick(g, rng)
        return g & _disk(p[0], p[1], rng.uniform(0.3, 1.0) * r) if p else g  # type: ignore[index]
    if kind == "leak":
        big = ndimage.binary_dilation(g, iterations=max(2, int(rng.uniform(0.2, 0.8) * r)))
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[:RES, :RES]
        cy, cx = np.argwhere(g).mean(0)
        half = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang) > rng.uniform(0, 0.5) * r
        return g | (big & half)
    if kind == "shift":
        dy, dx = (rng.uniform(-0.5, 0.5, 2) * r).astype(int)
        return np.roll(np.roll(g, dy, 0), dx, 1)
    if kind == "other":
        if c.others:
            return c.others[int(rng.integers(len(c.others)))].copy()
        p = _pick(~ndimage.binary_dilation(g, iterations=3), rng)
        return _disk(p[0], p[1], rng.uniform(0.4, 1.2) * r) if p else ndimage.binary_dilation(g, iterations=it)
    if kind == "near":
        noise = ndimage.gaussian_filter(rng.normal(size=g.shape), 3) * 6
        sd = _dt(g, c.sampling) / max(c.sampling) - _dt(~g, c.sampling) / max(c.sampling)
        return (sd + noise * rng.uniform(0.3, 1.0)) > 0
    a = _make_mask(c, str(rng.choice(["partial", "erode", "shift"])), rng)
    b = _make_mask(c, str(rng.choice(["leak", "dilate", "other"])), rng)
    return a | (b & ~g) if rng.random() < 0.5 else a | b


def synth_state(c: SynthCase, rng: np.random.Generator, stop_iou: float = 0.85
                ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(planes (6, 64, 64), oracle target (2, 64, 64) or None, stop target) of one synthetic state."""
    planes = np.zeros((N_PLANES, GRID, GRID), np.float32)
    kind = str(rng.choice(_KINDS, p=_PROBS))
    g = c.gt
    if kind == "start":
        return planes, target_from_masks(None, g, c.sampling), 0.0
    m = _make_mask(c, kind, rng)
    if not m.any():
        m = g & _disk(*np.argwhere(g)[len(np.argwhere(g)) // 2], c.radius * 0.5)  # type: ignore[misc]
    # a click history consistent with the mask: positives inside it (on the object when possible), negatives in
    # background the mask avoided
    n = int(rng.integers(1, 5))
    pos, neg = [], []
    first = _pick(m & g, rng) or _pick(m, rng)
    if first:
        pos.append(first)
    for _ in range(n - 1):
        if rng.random() < 0.6:
            p = _pick(m & g, rng) or _pick(m, rng)
            if p:
                pos.append(p)
        else:
            ring = ndimage.binary_dilation(m, iterations=3) & ~m & ~g
            p = _pick(ring, rng)
            if p:
                neg.append(p)
    planes[0] = _pool(m.astype(np.float32))
    sd = _dt(m, c.sampling) - _dt(~m, c.sampling)
    logits = np.clip(sd * rng.uniform(1.0, 4.0), -25, 25)
    planes[1] = np.tanh(_pool(logits) / 8.0)
    for (y, x) in pos:
        planes[2, y * GRID // RES, x * GRID // RES] = 1.0
    for (y, x) in neg:
        planes[3, y * GRID // RES, x * GRID // RES] = 1.0
    planes[4] = 1.0
    planes[5] = min(len(pos) + len(neg), 20) / 10.0
    inter, union = (m & g).sum(), (m | g).sum()
    iou = float(inter / union) if union else 1.0
    tgt = target_from_masks(m, g, c.sampling)
    return planes, tgt, float(iou >= stop_iou or tgt is None)


def synth_batch(cases: list[SynthCase], rows: list[int], rng: np.random.Generator, stop_iou: float = 0.85
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic states for the given case rows: planes (B,6,64,64), targets (B,2,64,64) (zeros = none), stop (B,)."""
    planes, tgts, stops = [], [], []
    for r in rows:
        p, t, s = synth_state(cases[r], rng, stop_iou)
        planes.append(p)
        tgts.append(t if t is not None else np.zeros((2, GRID, GRID), np.float32))
        stops.append(s)
    return torch.from_numpy(np.stack(planes)), torch.from_numpy(np.stack(tgts)), torch.tensor(stops)
