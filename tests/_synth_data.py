"""Synthetic manifest folders for the synthesis and export tests (not a test module)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_blobs(root: Path, n: int, seed: int = 0, bad: bool = False) -> Path:
    """A manifest folder of n 64x80 images with a bright ellipse (and a brighter lobe) on a noisy background; with
    ``bad`` also an empty mask, a size mismatch, an unreadable image, a missing mask and an unreachable case."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    h, w = 64, 80
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        cy, cx = rng.uniform(20, 44), rng.uniform(25, 55)
        a, b = rng.uniform(8, 16), rng.uniform(8, 16)
        gt = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1
        lobe = ((yy - cy - a * 0.6) / 5) ** 2 + ((xx - cx - b * 0.6) / 5) ** 2 <= 1
        img = rng.normal(40, 6, (h, w))
        img[gt] = 170
        img[lobe & gt] = 215
        _save(root, f"c{i:03d}", np.clip(img, 0, 255).astype(np.uint8), gt)
        rows.append(f"c{i:03d}")
    if bad:
        flat = np.full((h, w), 90, np.uint8)
        _save(root, "bad_empty", flat, np.zeros((h, w), bool))
        _save(root, "bad_size", flat, np.ones((h + 2, w), bool))
        square = np.zeros((h, w), bool)
        square[30:36, 30:36] = True
        _save(root, "bad_unreachable", flat, square)  # no contrast: the fake segmenter cannot isolate it
        _save(root, "bad_image", flat, square)
        (root / "images" / "bad_image.png").write_bytes(b"not a png at all")
        _save(root, "bad_nomask", flat, square)
        (root / "masks" / "bad_nomask.png").unlink()
        rows += ["bad_empty", "bad_size", "bad_unreachable", "bad_image", "bad_nomask"]
    with (root / "index.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps({"id": r, "image": f"images/{r}.png", "mask": f"masks/{r}.png", "object": "blob",
                                 "query": "the bright blob in this image"}) + "\n")
    return root


def _save(root: Path, name: str, img: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(np.stack([img] * 3, -1)).save(root / "images" / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
