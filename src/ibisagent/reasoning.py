"""Reasoning text grounded in the actual state: where a region lies, how large it is, why a click goes there.

Used by the oracle, the trajectory synthesizer and the compact policy, so that every ``<think>`` block describes
the real mask and image rather than boilerplate. Wording varies with a seeded RNG: each text is assembled from an
observation, an optional detail sentence (how the region compares with the mask, how many separate parts there are,
its shape) and a decision, each drawn from several phrasings, so the same state rarely yields the same text twice
across cases while a fixed seed reproduces it exactly.

Reflective trajectories use :func:`describe_error_click` (the deliberately imperfect step, worded as the plausible
but mistaken judgement that produced it), :func:`describe_correction` (the step that notices the error and fixes
it) and :func:`describe_box_correction` (a loose or shifted box corrected by a tighter box or a click).
"""

from __future__ import annotations

import random

import numpy as np
from scipy import ndimage

__all__ = [
    "describe_box",
    "describe_box_correction",
    "describe_click",
    "describe_correction",
    "describe_error_click",
    "describe_stop",
    "location_phrase",
    "region_phrase",
    "shape_phrase",
    "size_phrase",
]


def location_phrase(x: float, y: float, width: int, height: int) -> str:
    """'upper left', 'center', 'lower right', ... for a pixel position."""
    col = "left" if x < width / 3 else ("right" if x > 2 * width / 3 else "")
    row = "upper" if y < height / 3 else ("lower" if y > 2 * height / 3 else "")
    if not col and not row:
        return "center"
    if not row:
        return f"middle {col}"
    if not col:
        return f"{row} middle"
    return f"{row} {col}"


def size_phrase(area_px: int, width: int, height: int) -> str:
    frac = area_px / max(1, width * height)
    pct = 100.0 * frac
    if frac < 0.002:
        return f"a tiny area (about {area_px} px)"
    if frac < 0.02:
        return f"a small area (about {pct:.1f}% of the image)"
    if frac < 0.10:
        return f"a moderate area (about {pct:.0f}% of the image)"
    return f"a large area (about {pct:.0f}% of the image)"


def region_phrase(region: np.ndarray) -> str:
    """Location and size of a boolean region, e.g. 'a small area (about 1.2% of the image) in the upper left'."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return "no area"
    return f"{size_phrase(len(ys), w, h)} in the {location_phrase(xs.mean(), ys.mean(), w, h)} of the image"


def shape_phrase(region: np.ndarray) -> str:
    """'a thin sliver', 'an elongated strip', 'a compact blob' from the region's extent and fill."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return "nothing"
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / float(bh * bw)
    aspect = max(bh, bw) / max(1, min(bh, bw))
    if fill < 0.25:
        return "a thin, scattered sliver"
    if aspect > 3:
        return "an elongated strip"
    if fill > 0.6:
        return "a compact blob"
    return "an irregular patch"


def _relation_to_mask(x: int, y: int, mask: np.ndarray | None) -> str:
    if mask is None or not mask.any():
        return ""
    if mask[y, x]:
        return "inside the current green mask"
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    dx, dy = x - cx, y - cy
    if abs(dx) > abs(dy):
        side = "right" if dx > 0 else "left"
    else:
        side = "below" if dy > 0 else "above"
    return f"outside the green mask, to its {side}" if side in ("left", "right") else f"outside the green mask, {side} it"


def _side_of(x: float, y: float, ref: np.ndarray | None) -> str:
    """'above', 'below', 'to the left of', 'to the right of' a reference region, or '' without one."""
    if ref is None or not ref.any():
        return ""
    ys, xs = np.nonzero(ref)
    dx, dy = x - xs.mean(), y - ys.mean()
    if abs(dx) > abs(dy):
        return "to the right of" if dx > 0 else "to the left of"
    return "below" if dy > 0 else "above"


def _detail(region: np.ndarray, mask: np.ndarray | None, rng: random.Random, positive: bool) -> str:
    """An optional sentence comparing the region with the mask, counting its parts or describing its shape."""
    if not region.any():
        return ""
    options: list[str] = []
    area = int(region.sum())
    if mask is not None and mask.any():
        ratio = area / float(mask.sum())
        if ratio >= 0.75:
            rel = "about as large as the mask itself" if ratio < 1.5 else "larger than the whole mask"
        elif ratio >= 0.3:
            rel = f"roughly {'a third' if ratio < 0.45 else 'half'} the size of the mask"
        elif ratio >= 0.08:
            rel = "a noticeable fraction of the mask"
        else:
            rel = "small compared with the mask"
        options.append(f"That error is {rel}.")
    _, n = ndimage.label(region)
    if n > 1:
        word = "missed" if positive else "wrongly included"
        options.append(f"There are {n} separate {word} parts; I deal with the largest first.")
    options.append(f"It looks like {shape_phrase(region)}.")
    options.append("")  # sometimes no detail sentence at all
    return rng.choice(options)


def describe_click(
    *,
    positive: bool,
    x: int,
    y: int,
    width: int,
    height: int,
    target: str,
    region: np.ndarray,
    mask: np.ndarray | None,
    rng: random.Random | None = None,
) -> str:
    """Reasoning for a click at pixel (x, y) placed in ``region`` (the missed region for a positive click, the wrongly
    included region for a negative one)."""
    rng = rng or random.Random(0)
    where = location_phrase(x, y, width, height)
    reg = region_phrase(region)
    rel = _relation_to_mask(x, y, mask)
    target = target.strip() or "the target"
    cap = target[0].upper() + target[1:]
    if mask is None or not mask.any():
        opening = rng.choice([
            f"No mask yet, so this is the initialization step. {cap} appears to occupy {reg}.",
            f"There is no segmentation yet. I locate {target} first: it covers {reg}.",
            f"Initialization: nothing is segmented. {cap} spans {reg}.",
            f"The image has no green overlay, so I start from scratch. I can see {target} as {reg}.",
            f"First step. Looking for {target}, I find it as {reg}.",
        ])
        detail = rng.choice(["", f"It looks like {shape_phrase(region)}.", ""])
        close = rng.choice([
            f"I place a positive point well inside it, in the {where} part of the image, away from its edges.",
            f"A positive point near the middle of the structure ({where}) should give the segmenter a reliable seed.",
            f"I click inside it at a representative spot in the {where} of the image.",
            f"Clicking its thickest part ({where}) keeps the seed clear of the boundary, so I put a positive point "
            "there.",
            f"My first positive point goes to the {where}, deep inside {target}.",
        ])
        return " ".join(p for p in (opening, detail, close) if p)
    if positive:
        opening = rng.choice([
            f"The green mask misses part of {target}: {reg} is not covered.",
            f"Part of {target} is still outside the mask, {reg}.",
            f"The current mask under-segments {target}; the largest missed part is {reg}.",
            f"Comparing the overlay with {target}, {reg} of it is left uncovered.",
            f"The mask stops short of {target}'s boundary; {reg} remains unsegmented.",
        ])
        close = rng.choice([
            f"I add a positive point in the middle of that missed part ({where}, {rel}).",
            f"A positive point at its centre, in the {where}, should extend the mask there.",
            f"I place a positive point deep inside the missed region, {rel}.",
            f"To pull the mask over it I click positive at its widest point, {rel}.",
            f"A positive point far from its edges ({where}) is the most reliable way to add it.",
        ])
    else:
        opening = rng.choice([
            f"The green mask spills beyond {target}: {reg} is wrongly included.",
            f"The mask covers tissue that is not {target}, {reg}.",
            f"There is a false-positive region of {reg} in the mask.",
            f"The overlay leaks past the boundary of {target}; {reg} does not belong to it.",
            f"Too much is segmented: {reg} lies outside {target} but is green.",
        ])
        close = rng.choice([
            f"I add a negative point in the middle of that region ({where}, {rel}).",
            f"A negative point there ({where}) should remove it from the mask.",
            f"I place a negative point deep inside the wrongly included part, {rel}.",
            f"A negative point at the centre of the leak, in the {where}, should cut it away.",
            f"I mark it as background with a negative point where it is widest, {rel}.",
        ])
    detail = _detail(region, mask, rng, positive)
    return " ".join(p for p in (opening, detail, close) if p)


def describe_box(*, box: tuple[int, int, int, int], width: int, height: int, target: str,
                 rng: random.Random | None = None, replacing: bool = False) -> str:
    rng = rng or random.Random(0)
    x1, y1, x2, y2 = box
    where = location_phrase((x1 + x2) / 2, (y1 + y2) / 2, width, height)
    frac = 100.0 * (x2 - x1 + 1) * (y2 - y1 + 1) / max(1, width * height)
    target = target.strip() or "the target"
    cap = target[0].upper() + target[1:]
    if replacing:
        return rng.choice([
            f"The mask's extent does not match {target}. I redraw the box tightly around it ({where}, "
            f"about {frac:.0f}% of the image).",
            f"The previous box was off. A tighter box around {target} in the {where} should fix the extent.",
            f"The box I drew does not hug {target}; I replace it with one that follows its edges ({where}, "
            f"about {frac:.0f}% of the image).",
        ])
    return rng.choice([
        f"No mask yet. {cap} lies in the {where} of the image; I draw a box tightly around it "
        f"(about {frac:.0f}% of the image).",
        f"Initialization: I enclose {target} ({where}) in a tight bounding box so the segmenter knows its extent.",
        f"Nothing is segmented yet. {cap} sits in the {where}; a bounding box around it, covering about "
        f"{frac:.0f}% of the image, gives the segmenter its full extent at once.",
        f"First step: I frame {target} in the {where} with a box that touches its outermost edges.",
    ])


def describe_stop(*, mask: np.ndarray | None, target: str, rng: random.Random | None = None) -> tuple[str, str]:
    """(reasoning, answer) for Terminate."""
    rng = rng or random.Random(0)
    target = target.strip() or "the target"
    cap = target[0].upper() + target[1:]
    if mask is None or not mask.any():
        return (f"I cannot find {target} in this image, so I stop without a mask.",
                f"No {target} was segmented.")
    reg = region_phrase(mask)
    think = rng.choice([
        f"The green mask now follows the boundary of {target}, covering {reg}; no clear missed or extra region remains.",
        f"The mask matches {target} well ({reg}). Further points would not improve it, so I stop.",
        f"The segmentation of {target} looks complete: {reg}, with the boundary in place.",
        f"Checking the edges of the overlay against {target}: nothing sizeable is missing or spilling over. "
        "I terminate.",
        f"The green region ({reg}) coincides with {target}; another click would only risk making it worse.",
    ])
    answer = rng.choice([
        f"{cap} is segmented; it covers {reg}.",
        f"Segmentation of {target} finished: {reg}.",
        f"The mask of {target} is complete ({reg}).",
    ])
    return think, answer


# ------------------------------------------------------------------------------------------------------------------
# Reflective trajectories
# ------------------------------------------------------------------------------------------------------------------

#: kinds of deliberate errors in reflective trajectories
ERROR_KINDS = ("off_target", "boundary", "wrong_label")


def describe_error_click(
    kind: str,
    *,
    positive: bool,
    x: int,
    y: int,
    width: int,
    height: int,
    target: str,
    gt_hint: np.ndarray | None,
    mask: np.ndarray | None,
    rng: random.Random | None = None,
) -> str:
    """Reasoning of the deliberately imperfect step: the plausible but mistaken judgement behind the click.

    ``kind``: ``off_target`` (a point beside the object), ``boundary`` (a point on its edge), ``wrong_label`` (a
    point of the wrong sign). ``gt_hint`` locates the target only for relative wording ("to the left of").
    """
    rng = rng or random.Random(0)
    where = location_phrase(x, y, width, height)
    target = target.strip() or "the target"
    side = _side_of(x, y, gt_hint)
    sign = "positive" if positive else "negative"
    if kind == "off_target":
        return rng.choice([
            f"The area in the {where}, {side} the structure I take to be {target}, has a similar appearance; I "
            f"think it belongs to {target} and place a {sign} point there.",
            f"Something in the {where} looks like part of {target}. I add a {sign} point on it.",
            f"I judge the region in the {where} to be {target} and mark it with a {sign} point.",
        ])
    if kind == "boundary":
        return rng.choice([
            f"The edge of {target} in the {where} seems not yet covered; I put a {sign} point right on that edge.",
            f"To extend the mask I click on the outline of {target} in the {where}.",
            f"I place a {sign} point where {target} meets the surrounding tissue, in the {where}.",
        ])
    return rng.choice([
        f"The region in the {where} looks like it should not be part of the mask, so I add a {sign} point there.",
        f"I mark the area in the {where} with a {sign} point; it does not look like {target} to me.",
        f"That part in the {where} seems to be background; a {sign} point should settle it.",
    ])


def describe_correction(
    kind: str,
    *,
    positive: bool,
    x: int,
    y: int,
    width: int,
    height: int,
    target: str,
    region: np.ndarray,
    mask: np.ndarray | None,
    prev_xy: tuple[int, int],
    prev_positive: bool,
    rng: random.Random | None = None,
    caused: bool = True,
) -> str:
    """Reasoning of the step that notices the previous (erroneous) click and corrects it with a click at (x, y)
    in ``region``: the error the previous click caused (``caused``) or, when it caused none of its own, the largest
    error that remains."""
    rng = rng or random.Random(0)
    where = location_phrase(x, y, width, height)
    prev_where = location_phrase(prev_xy[0], prev_xy[1], width, height)
    reg = region_phrase(region)
    target = target.strip() or "the target"
    prev_sign = "positive" if prev_positive else "negative"
    sign = "positive" if positive else "negative"
    if kind == "off_target":
        notice = rng.choice([
            f"My previous {prev_sign} point in the {prev_where} was a mistake: it lies outside {target}.",
            f"Looking at the new mask, the last point ({prev_where}) missed {target}; it was placed on "
            "neighbouring tissue.",
            f"The {prev_sign} point I added in the {prev_where} was off target.",
        ])
    elif kind == "boundary":
        notice = rng.choice([
            f"The last point sat on the very edge of {target} ({prev_where}), just outside it, which the "
            "segmenter cannot interpret reliably.",
            f"My previous click landed on the boundary in the {prev_where} rather than inside {target}; that was "
            "ambiguous.",
            f"Clicking the outline in the {prev_where} was a poor choice: the point is not clearly inside "
            f"{target}.",
        ])
    else:
        notice = rng.choice([
            f"I used the wrong label last time: the {prev_sign} point in the {prev_where} is on {target} itself.",
            f"The previous point in the {prev_where} should have been {'negative' if prev_positive else 'positive'};"
            f" that area is part of {target}.",
            f"That last {prev_sign} point was wrong: the region in the {prev_where} belongs to {target}.",
        ])
    if caused:
        effect = rng.choice([
            f"As a result {reg} is now {'missing from' if positive else 'wrongly inside'} the mask.",
            f"The mask {'lost' if positive else 'gained'} {reg} because of it.",
            f"Now {reg} is {'uncovered' if positive else 'segmented by mistake'}.",
        ])
    else:
        state = "still missing from the mask" if positive else "still wrongly included"
        effect = rng.choice([
            f"It did not help: {reg} is {state}.",
            f"That point gained nothing, and {reg} is {state}.",
            f"So the real problem remains: {reg} is {state}.",
        ])
    fix = rng.choice([
        f"I correct it with a {sign} point in the {where}, deep inside that region.",
        f"A {sign} point at the centre of that region, in the {where}, should undo the damage.",
        f"To fix it I add a {sign} point there, in the {where}.",
    ])
    return f"{notice} {effect} {fix}"


def describe_box_correction(
    kind: str,
    *,
    width: int,
    height: int,
    target: str,
    prev_box: tuple[int, int, int, int],
    box: tuple[int, int, int, int] | None = None,
    click: tuple[bool, int, int] | None = None,
    region: np.ndarray | None = None,
    rng: random.Random | None = None,
) -> str:
    """Reasoning that notices a loose or shifted box (``prev_box``) and corrects it, either with a tighter ``box``
    (``kind="tighter_box"``) or with a ``click`` (positive, x, y) on ``region`` (``kind="click"``)."""
    rng = rng or random.Random(0)
    target = target.strip() or "the target"
    px1, py1, px2, py2 = prev_box
    prev_where = location_phrase((px1 + px2) / 2, (py1 + py2) / 2, width, height)
    notice = rng.choice([
        f"The box I drew around the {prev_where} does not fit {target}: it is too loose or shifted.",
        f"Looking at the result, my box was off; it does not follow the extent of {target}.",
        f"The previous box ({prev_where}) misjudged where {target} ends.",
    ])
    if kind == "tighter_box" and box is not None:
        x1, y1, x2, y2 = box
        where = location_phrase((x1 + x2) / 2, (y1 + y2) / 2, width, height)
        frac = 100.0 * (x2 - x1 + 1) * (y2 - y1 + 1) / max(1, width * height)
        fix = rng.choice([
            f"I replace it with a tighter box that touches the edges of {target} ({where}, about {frac:.0f}% of "
            "the image).",
            f"A new box hugging {target} in the {where} should fix the extent.",
        ])
        return f"{notice} {fix}"
    assert click is not None
    positive, x, y = click
    where = location_phrase(x, y, width, height)
    reg = region_phrase(region) if region is not None else "part of the image"
    if positive:
        fix = rng.choice([
            f"Because of it the mask misses {reg}; a positive point in the {where} recovers that part.",
            f"{reg[0].upper() + reg[1:]} of {target} was cut off; I add a positive point in the {where}.",
        ])
    else:
        fix = rng.choice([
            f"Because of it the mask includes {reg} that is not {target}; a negative point in the {where} "
            "removes it.",
            f"The loose box let the mask spill into {reg}; I add a negative point in the {where}.",
        ])
    return f"{notice} {fix}"
