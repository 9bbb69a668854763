"""Shared fixtures: real cases from ../shared/data (or the bundled demo data when that is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IBISAGENT_DEV_DATA", REPO.parent / "shared" / "data"))
BUNDLED = REPO / "src" / "ibisagent" / "demo_data"


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 0


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"dev data not found at {SHARED_DATA} (set IBISAGENT_DEV_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dermoscopy_case(shared_data: Path) -> tuple[np.ndarray, np.ndarray, str]:
    d = shared_data / "ph2_dermoscopy"
    return (_read_rgb(d / "images/ph2_IMD002.png"), _read_mask(d / "masks/ph2_IMD002__skin_lesion.png"),
            "the pigmented skin lesion (atypical nevus) in this dermoscopy image")


@pytest.fixture()
def square_image() -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 64x80 image with a bright 20x24 rectangle, and its mask."""
    img = np.full((64, 80, 3), 30, np.uint8)
    gt = np.zeros((64, 80), bool)
    gt[20:40, 30:54] = True
    img[gt] = 200
    return img, gt
