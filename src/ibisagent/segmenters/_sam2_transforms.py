"""Torchvision-free versions of the few image/prompt transforms SAM2 needs.

``sam2.utils.transforms.SAM2Transforms`` (used by ``SAM2ImagePredictor``) imports ``torchvision`` only for
``ToTensor``, ``Resize`` and ``Normalize``; ``torchvision`` cannot be imported on this stack. This module provides the
same operations with plain torch:

* :func:`to_tensor` — HxWx3 uint8 -> 3xHxW float32 in [0, 1] (``ToTensor``);
* :func:`resize_square` — bilinear resize to RxR, ``antialias=True`` (what ``Resize`` does on tensors);
* :func:`normalize` — ImageNet mean/std (``Normalize``);
* :class:`SAM2Transforms` — a drop-in class with the same methods as SAM2's (``__call__``, ``forward_batch``,
  ``transform_coords``, ``transform_boxes``, ``postprocess_masks`` without the CUDA hole-filling step);
* :func:`patched_sam2_transforms` — a context manager that exposes :class:`SAM2Transforms` as
  ``sam2.utils.transforms`` while it is active, so SAM2's own ``SAM2ImagePredictor`` can be imported for reference
  checks (tests). ``sys.modules`` is restored on exit.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAM2Transforms",
    "normalize",
    "patched_sam2_transforms",
    "preprocess",
    "resize_square",
    "to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 (or HxW) uint8 -> 3xHxW (1xHxW) float32 in [0, 1], like ``torchvision.transforms.ToTensor``."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an HxWxC image, got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a CxHxW (or BxCxHxW) float tensor to ``size`` x ``size``: bilinear, antialiased, like torchvision's
    ``Resize((size, size))`` on tensors."""
    batched = x.ndim == 4
    y = F.interpolate(x if batched else x[None], size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)
    return y if batched else y[0]


def normalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Channel-wise ``(x - mean) / std`` on a CxHxW or BxCxHxW tensor."""
    shape = (-1, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


def preprocess(image: np.ndarray, resolution: int) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 1x3xRxR normalized model input (ToTensor -> Resize -> Normalize)."""
    return normalize(resize_square(to_tensor(image), resolution))[None]


class SAM2Transforms(torch.nn.Module):
    """Same interface as ``sam2.utils.transforms.SAM2Transforms``, without torchvision.

    ``max_hole_area`` / ``max_sprinkle_area`` are accepted for compatibility; post-processing of holes and sprinkles
    needs SAM2's CUDA extension and is skipped here (SAM2 skips it as well when the extension is missing).
    """

    def __init__(self, resolution: int, mask_threshold: float, max_hole_area: float = 0.0,
                 max_sprinkle_area: float = 0.0) -> None:
        super().__init__()
        self.resolution = int(resolution)
        self.mask_threshold = mask_threshold
        self.max_hole_area = max_hole_area
        self.max_sprinkle_area = max_sprinkle_area
        self.mean = list(IMAGENET_MEAN)
        self.std = list(IMAGENET_STD)

    def __call__(self, x: np.ndarray) -> torch.Tensor:  # type: ignore[override]
        return normalize(resize_square(to_tensor(x), self.resolution), self.mean, self.std)

    def forward_batch(self, img_list: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.stack([self(img) for img in img_list], dim=0)

    def transform_coords(self, coords: torch.Tensor, normalize: bool = False,
                         orig_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Coordinates (..., 2) in pixels (``normalize=True``, needs ``orig_hw``) or in [0, 1] -> model frame."""
        if normalize:
            if orig_hw is None:
                raise ValueError("orig_hw is required when normalize=True")
            h, w = orig_hw
            coords = coords.clone()
            coords[..., 0] = coords[..., 0] / w
            coords[..., 1] = coords[..., 1] / h
        return coords * self.resolution

    def transform_boxes(self, boxes: torch.Tensor, normalize: bool = False,
                        orig_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Bx4 boxes -> Bx2x2 corner points in the model frame."""
        return self.transform_coords(boxes.reshape(-1, 2, 2), normalize, orig_hw)

    def postprocess_masks(self, masks: torch.Tensor, orig_hw: tuple[int, int]) -> torch.Tensor:
        """Low-res logits BxCxhxw -> BxCxHxW logits at the original size (bilinear)."""
        return F.interpolate(masks.float(), tuple(orig_hw), mode="bilinear", align_corners=False)


@contextlib.contextmanager
def patched_sam2_transforms() -> Iterator[None]:
    """While active, ``import sam2.utils.transforms`` (and so ``sam2.sam2_image_predictor``) resolves to a module
    holding :class:`SAM2Transforms` from here instead of importing torchvision. Modules imported inside the block
    that depend on it are removed again on exit, so nothing outside the block keeps the substitute."""
    names = ("sam2.utils.transforms", "sam2.sam2_image_predictor")
    saved = {n: sys.modules.get(n) for n in names}
    fake = types.ModuleType("sam2.utils.transforms")
    fake.SAM2Transforms = SAM2Transforms  # type: ignore[attr-defined]
    fake.__dict__["__ibisagent_fake__"] = True
    sys.modules["sam2.utils.transforms"] = fake
    try:
        yield
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
                parent_name, _, child = n.rpartition(".")
                parent = sys.modules.get(parent_name)
                if parent is not None and getattr(parent, child, None) is not None:
                    with contextlib.suppress(AttributeError):
                        delattr(parent, child)
            else:
                sys.modules[n] = old
