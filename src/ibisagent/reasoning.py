"""Reasoning text grounded in the actual state: where a region lies, how large it is, why a click goes there.

Used by the oracle, the trajectory synthesizer and the compact policy, so that every ``<think>`` block describes
the real mask and image rather than boilerplate. Wording varies with a seeded RNG.
"""

from __future__ import annotations

import random

import numpy as np

__all__ = ["region_phrase", "location_phrase", "size_phrase", "describe_click", "describe_box", "describe_stop"]


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
    if mask is None or not mask.any():
        opening = rng.choice([
            f"No mask yet, so this is the initialization step. {target.capitalize()} appears to occupy {reg}.",
            f"There is no segmentation yet. I locate {target} first: it covers {reg}.",
            f"Initialization: nothing is segmented. {target.capitalize()} spans {reg}.",
        ])
        close = rng.choice([
            f"I place a positive point well inside it, in the {where} part of the image, away from its edges.",
            f"A positive point near the middle of the structure ({where}) should give the segmenter a reliable seed.",
            f"I click inside it at a representative spot in the {where} of the image.",
        ])
        return f"{opening} {close}"
    if positive:
        opening = rng.choice([
            f"The green mask misses part of {target}: {reg} is not covered.",
            f"Part of {target} is still outside the mask, {reg}.",
            f"The current mask under-segments {target}; the largest missed part is {reg}.",
        ])
        close = rng.choice([
            f"I add a positive point in the middle of that missed part ({where}, {rel}).",
            f"A positive point at its centre ({where}) should extend the mask there.",
            f"I place a positive point deep inside the missed region, {rel}.",
        ])
    else:
        opening = rng.choice([
            f"The green mask spills beyond {target}: {reg} is wrongly included.",
            f"The mask covers tissue that is not {target}, {reg}.",
            f"There is a false-positive region of {reg} in the mask.",
        ])
        close = rng.choice([
            f"I add a negative point in the middle of that region ({where}, {rel}).",
            f"A negative point there ({where}) should remove it from the mask.",
            f"I place a negative point deep inside the wrongly included part, {rel}.",
        ])
    return f"{opening} {close}"


def describe_box(*, box: tuple[int, int, int, int], width: int, height: int, target: str,
                 rng: random.Random | None = None, replacing: bool = False) -> str:
    rng = rng or random.Random(0)
    x1, y1, x2, y2 = box
    where = location_phrase((x1 + x2) / 2, (y1 + y2) / 2, width, height)
    frac = 100.0 * (x2 - x1 + 1) * (y2 - y1 + 1) / max(1, width * height)
    target = target.strip() or "the target"
    if replacing:
        return rng.choice([
            f"The mask's extent does not match {target}. I redraw the box tightly around it ({where}, "
            f"about {frac:.0f}% of the image).",
            f"The previous box was off. A tighter box around {target} in the {where} should fix the extent.",
        ])
    return rng.choice([
        f"No mask yet. {target.capitalize()} lies in the {where} of the image; I draw a box tightly around it "
        f"(about {frac:.0f}% of the image).",
        f"Initialization: I enclose {target} ({where}) in a tight bounding box so the segmenter knows its extent.",
    ])


def describe_stop(*, mask: np.ndarray | None, target: str, rng: random.Random | None = None) -> tuple[str, str]:
    """(reasoning, answer) for Terminate."""
    rng = rng or random.Random(0)
    target = target.strip() or "the target"
    if mask is None or not mask.any():
        return (f"I cannot find {target} in this image, so I stop without a mask.",
                f"No {target} was segmented.")
    h, w = mask.shape
    reg = region_phrase(mask)
    think = rng.choice([
        f"The green mask now follows the boundary of {target}, covering {reg}; no clear missed or extra region remains.",
        f"The mask matches {target} well ({reg}). Further points would not improve it, so I stop.",
        f"The segmentation of {target} looks complete: {reg}, with the boundary in place.",
    ])
    return think, f"{target.capitalize()} is segmented; it covers {reg}."
