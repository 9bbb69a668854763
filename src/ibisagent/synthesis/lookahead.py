"""Efficient trajectories (beyond the reference): a lookahead oracle that tries candidate clicks through the
segmenter and keeps the one with the largest IoU gain, to teach shorter episodes.

Candidates per step: the deepest pixel (distance-transform maximum) of each of the largest connected parts of the
false-negative and false-positive regions, plus random pixels from the deep core (DT >= half its maximum) of the
two largest regions. The reference oracle's own click is always among them, so lookahead never does worse than
the distance-transform oracle on a single step.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ibisagent.masks import error_regions
from ibisagent.oracle_click import next_click
from ibisagent.protocol import format_reply
from ibisagent.reasoning import describe_click
from ibisagent.synthesis.trajectories import Rollout, UnreachableError, click_action

__all__ = ["candidate_clicks", "lookahead_reply", "rollout_lookahead"]


def candidate_clicks(pred: np.ndarray | None, gt: np.ndarray, k: int, rng: np.random.Generator,
                     exclude: set[tuple[int, int]] | None = None) -> list[tuple[bool, int, int]]:
    """Up to ``k`` distinct (positive, x, y) candidates, the reference oracle's click first."""
    gt = np.asarray(gt).astype(bool)
    p = np.zeros_like(gt) if pred is None else np.asarray(pred).astype(bool)
    exclude = exclude or set()
    out: list[tuple[bool, int, int]] = []
    seen: set[tuple[int, int]] = set(exclude)

    def add(positive: bool, x: int, y: int) -> None:
        if (x, y) not in seen and len(out) < k:
            seen.add((x, y))
            out.append((positive, x, y))

    first = next_click(p, gt, exclude)
    if first is None:
        return out
    add(first.positive, first.x, first.y)
    er = error_regions(p, gt)
    parts: list[tuple[float, bool, int, int]] = []
    cores: list[tuple[float, bool, np.ndarray]] = []
    for positive, region, dt in ((True, er.fn, er.fn_dt), (False, er.fp, er.fp_dt)):
        if not region.any():
            continue
        lab, n = ndimage.label(region)
        if n:
            idx = ndimage.maximum_position(dt, lab, index=np.arange(1, n + 1))
            vals = ndimage.maximum(dt, lab, index=np.arange(1, n + 1))
            for (y, x), v in zip(idx, np.atleast_1d(vals)):
                parts.append((float(v), positive, int(x), int(y)))
        cores.append((float(dt.max()), positive, dt >= 0.5 * dt.max()))
    for _, positive, x, y in sorted(parts, reverse=True)[: max(1, k // 2)]:
        add(positive, x, y)
    cores.sort(key=lambda c: c[0], reverse=True)
    tries = 0
    while len(out) < k and cores and tries < 4 * k:
        tries += 1
        _, positive, core = cores[tries % len(cores)]
        ys, xs = np.nonzero(core)
        j = int(rng.integers(len(ys)))
        add(positive, int(xs[j]), int(ys[j]))
    return out


def lookahead_reply(ro: Rollout) -> str:
    """Try each candidate through the segmenter; the reply of the one with the largest IoU (ties: the earlier
    candidate, i.e. the reference click)."""
    cands = candidate_clicks(ro.mask, ro.gt, ro.config.lookahead_candidates, ro.np_rng, ro.clicked)
    if not cands:
        raise UnreachableError("no candidate click left")
    h, w = ro.shape
    best: tuple[float, int] = (-1.0, 0)
    for i, (positive, x, y) in enumerate(cands):
        score = ro.probe(click_action(positive, x, y, h, w))
        if score > best[0]:
            best = (score, i)
    positive, x, y = cands[best[1]]
    er = error_regions(ro.current_mask, ro.gt)
    region = er.fn if positive else er.fp
    lab, _ = ndimage.label(region)
    part = lab == lab[y, x] if lab[y, x] else region
    think = describe_click(positive=positive, x=x, y=y, width=w, height=h, target=ro.target, region=part,
                           mask=ro.mask, rng=ro.rng)
    return format_reply(click_action(positive, x, y, h, w), think)


def rollout_lookahead(ro: Rollout) -> None:
    """Lookahead clicks until the threshold, then Terminate (the episode driver plays them)."""
    ro.finish(lambda obs: lookahead_reply(ro))
