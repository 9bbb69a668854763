"""Reflective trajectories (paper): a deliberately imperfect action followed by the step that notices and corrects
it, with reasoning that says so.

Click errors (``reflective``), injected at a random early turn:

* ``off_target`` — a positive point on tissue beside the object (outside the ground truth);
* ``boundary`` — a positive point on the object's outline, just outside it;
* ``wrong_label`` — the oracle's point with the wrong sign (negative on a missed part, positive on a leak).

Box errors (``box-reflective``): a loose or shifted first box, corrected by a tighter box or by a click.

Every injected error is checked through the segmenter before it is kept: the error step must score a placement
miss (the reward's own rule) and must not raise IoU (a box error must leave IoU below the threshold), and the
correction step must raise IoU above the error's. Candidates that fail are undone and the next one is tried; a case
where none works raises :class:`~ibisagent.synthesis.trajectories.UnreachableError` (recorded as skipped).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ibisagent.masks import bbox, error_regions
from ibisagent.oracle_click import next_click
from ibisagent.policies.oracle import jittered_box
from ibisagent.reasoning import (
    ERROR_KINDS,
    describe_box,
    describe_box_correction,
    describe_correction,
    describe_error_click,
)
from ibisagent.rewards.core import DEFAULT_CONFIG, box_placement_reward, click_placement_reward
from ibisagent.synthesis.trajectories import Rollout, UnreachableError

__all__ = ["error_candidates", "inject_click_error", "rollout_box_reflective", "rollout_reflective"]

_CANDIDATES_PER_KIND = 3


def error_candidates(kind: str, mask: np.ndarray | None, gt: np.ndarray, rng: np.random.Generator,
                     exclude: set[tuple[int, int]]) -> list[tuple[bool, int, int]]:
    """Up to a few (positive, x, y) erroneous clicks of one kind on the current state."""
    m = np.zeros_like(gt) if mask is None else mask
    out: list[tuple[bool, int, int]] = []
    if kind in ("off_target", "boundary"):
        dist_out = ndimage.distance_transform_edt(~gt)
        if kind == "off_target":
            scale = np.sqrt(gt.sum())
            lo, hi = max(3.0, 0.15 * scale), max(6.0, 0.45 * scale)
        else:
            lo, hi = 1.0, 2.5
        ys, xs = np.nonzero((dist_out >= lo) & (dist_out <= hi) & ~m)
        if len(ys):
            for j in rng.choice(len(ys), size=min(_CANDIDATES_PER_KIND, len(ys)), replace=False):
                out.append((True, int(xs[j]), int(ys[j])))
    else:  # wrong_label: the oracle's own click with the opposite sign
        pick = next_click(m if mask is not None else None, gt, exclude)
        if pick is not None:
            out.append((not pick.positive, pick.x, pick.y))
    return [c for c in out if (c[1], c[2]) not in exclude]


def _correction_click(ro: Rollout, err_xy: tuple[int, int], err_positive: bool
                      ) -> tuple[bool, int, int, np.ndarray] | None:
    """The click that undoes the error: negative in the leak a wrong positive point caused, positive in the part a
    wrong negative point removed; None when the error left no region of its own to fix."""
    er = error_regions(ro.current_mask, ro.gt)
    positive = not err_positive
    region = er.fn if positive else er.fp
    if not region.any():
        return None
    lab, _ = ndimage.label(region)
    x0, y0 = err_xy
    comp_id = lab[y0, x0]
    if not comp_id:  # the error pixel itself is not in the region: take the part nearest to it
        dist = ndimage.distance_transform_edt(lab == 0, return_distances=False, return_indices=True)
        comp_id = lab[dist[0][y0, x0], dist[1][y0, x0]]
    comp = lab == comp_id
    dt = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
    for x, y in ro.clicked:
        dt[y, x] = 0
    if dt.max() <= 0:
        return None
    y, x = np.unravel_index(int(np.argmax(dt)), dt.shape)
    return positive, int(x), int(y), comp


def inject_click_error(ro: Rollout) -> bool:
    """Apply an error click and its correction (both verified); False when no candidate works."""
    h, w = ro.shape
    kinds = list(ERROR_KINDS)
    ro.rng.shuffle(kinds)
    for kind in kinds:
        for positive, x, y in error_candidates(kind, ro.mask, ro.gt, ro.np_rng, ro.clicked):
            before = ro.current_mask
            if click_placement_reward(positive, x, y, ro.gt, before, DEFAULT_CONFIG) > 0:
                continue  # not an error by the reward's own rule
            think = describe_error_click(kind, positive=positive, x=x, y=y, width=w, height=h, target=ro.target,
                                         gt_hint=ro.gt, mask=ro.mask, rng=ro.rng)
            err = ro.click(positive, x, y, think, role="error", note=kind)
            if err.iou_after > err.state.iou_before:
                ro.undo()
                continue
            if _correct(ro, kind, (x, y), positive):
                return True
            ro.undo()
    return False


def _correct(ro: Rollout, kind: str, err_xy: tuple[int, int], err_positive: bool) -> bool:
    """Try the targeted correction, then the plain oracle click; keep the first that raises IoU."""
    h, w = ro.shape
    err_iou = ro.iou
    options = []
    fix = _correction_click(ro, err_xy, err_positive)
    if fix is not None:
        options.append(fix)  # the first option (when present) fixes what the error itself caused
    pick = next_click(ro.mask, ro.gt, ro.clicked)
    if pick is not None:
        options.append((pick.positive, pick.x, pick.y, pick.region))
    er = error_regions(ro.current_mask, ro.gt)
    for positive, region, dt in ((True, er.fn, er.fn_dt), (False, er.fp, er.fp_dt)):
        if region.any():  # the deepest point of each error region, whatever its sign
            d = dt.copy()
            for cx, cy in ro.clicked:
                d[cy, cx] = 0
            if d.max() > 0:
                y, x = np.unravel_index(int(np.argmax(d)), d.shape)
                lab, _ = ndimage.label(region)
                options.append((positive, int(x), int(y), lab == lab[y, x]))
    tried: set[tuple[bool, int, int]] = set()
    for k, (positive, x, y, region) in enumerate(options):
        if (positive, x, y) in tried:
            continue
        tried.add((positive, x, y))
        caused = fix is not None and k == 0
        think = describe_correction(kind, positive=positive, x=x, y=y, width=w, height=h, target=ro.target,
                                    region=region, mask=ro.mask, prev_xy=err_xy, prev_positive=err_positive,
                                    rng=ro.rng, caused=caused)
        step = ro.click(positive, x, y, think, role="correction", note=kind)
        if step.iou_after > err_iou:
            return True
        ro.undo()
    return False


def rollout_reflective(ro: Rollout) -> None:
    """Oracle clicks with one verified error + correction at a random early turn, then oracle clicks to the end."""
    n_before = ro.rng.randint(0, ro.config.reflective_max_error_step)
    for _ in range(n_before):
        if ro.turns_left <= 3:
            break
        try:
            ro.oracle_step()
        except UnreachableError:
            break
        if ro.reached:  # the error must come while the mask is still incomplete
            ro.undo()
            break
    if ro.turns_left < 3 or not inject_click_error(ro):
        raise UnreachableError("no erroneous click could be injected and corrected on this case")
    ro.finish()


def _bad_box(gt: np.ndarray, rng: np.random.Generator) -> tuple[str, tuple[int, int, int, int]]:
    """A loose (grown) or shifted version of the ground truth's box, clipped to the image."""
    h, w = gt.shape
    x1, y1, x2, y2 = bbox(gt)  # type: ignore[misc]
    bw, bh = x2 - x1 + 1, y2 - y1 + 1
    if rng.random() < 0.5:
        kind = "loose"
        g = rng.uniform(0.25, 0.6, size=4) * np.array([bw, bh, bw, bh])
        nx1, ny1, nx2, ny2 = x1 - g[0], y1 - g[1], x2 + g[2], y2 + g[3]
    else:
        kind = "shifted"
        dx = rng.choice([-1, 1]) * rng.uniform(0.3, 0.5) * bw
        dy = rng.choice([-1, 1]) * rng.uniform(0.0, 0.5) * bh
        nx1, ny1, nx2, ny2 = x1 + dx, y1 + dy, x2 + dx, y2 + dy
    bx = (int(np.clip(round(nx1), 0, w - 2)), int(np.clip(round(ny1), 0, h - 2)))
    box = (bx[0], bx[1], int(np.clip(round(nx2), bx[0] + 1, w - 1)), int(np.clip(round(ny2), bx[1] + 1, h - 1)))
    return kind, box


def rollout_box_reflective(ro: Rollout) -> None:
    """A loose or shifted first box (a verified placement miss below the threshold), corrected by a tighter box or
    a click (whichever raises IoU first, in random order), then oracle clicks to the end."""
    h, w = ro.shape
    for _ in range(4):
        kind, box = _bad_box(ro.gt, ro.np_rng)
        if box_placement_reward(box, ro.gt, DEFAULT_CONFIG) > 0:
            continue
        think = describe_box(box=box, width=w, height=h, target=ro.target, rng=ro.rng)
        err = ro.box(box, think, role="error", note=f"{kind}_box")
        if err.iou_after >= ro.config.iou_threshold:
            ro.undo()
            continue
        fixes = ["tighter_box", "click"]
        ro.rng.shuffle(fixes)
        for fix in fixes:
            if fix == "tighter_box":
                tight = jittered_box(ro.gt, min(ro.config.box_jitter, 0.05), ro.np_rng)
                text = describe_box_correction("tighter_box", width=w, height=h, target=ro.target, prev_box=box,
                                               box=tight, rng=ro.rng)
                step = ro.box(tight, text, role="correction", note=f"{kind}_box")
            else:
                pick = next_click(ro.mask, ro.gt, ro.clicked)
                if pick is None:
                    continue
                positive, x, y, region = pick.positive, pick.x, pick.y, pick.region
                text = describe_box_correction("click", width=w, height=h, target=ro.target, prev_box=box,
                                               click=(positive, x, y), region=region, rng=ro.rng)
                step = ro.click(positive, x, y, text, role="correction", note=f"{kind}_box")
            if step.iou_after > err.iou_after:
                n_kept = len(ro.steps)
                ro.finish()
                if ro.steps[-1].kind == "terminate":
                    return
                while len(ro.steps) > n_kept:  # this fix led nowhere (e.g. clicks cannot leave a shifted box)
                    ro.undo()
            ro.undo()
        ro.undo()
    raise UnreachableError("no loose or shifted box could be corrected on this case")
