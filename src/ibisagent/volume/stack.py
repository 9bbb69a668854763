"""A volume as the stack of 2D slices the segmenter and the policy see, and the way back to the stored voxel grid.

A :class:`SliceStack` holds the display-oriented slices of one volume along one voxel axis (axial by default): an
array ``images[z]`` of HxWx3 uint8 pictures, made by :func:`ibisagent.io.volumes.slice_image` (the same windowing
and orientation as a single-slice case: CT through the ``ct-abdomen`` window, MR and rescaled data through the
percentile window of the whole volume, so every slice has the same contrast). 3D masks in the volume package are
indexed like the stack, ``mask[z, y, x]`` (z = slice, y = image row, x = image column); :meth:`SliceStack.to_stored`
turns one back into the volume's stored layout (what :func:`ibisagent.io.masks_io.load_mask` reads and a NIfTI
writer needs), :meth:`SliceStack.from_stored` the other way. ``spacing`` is in mm along (slice, row, column), what
the surface metrics take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ibisagent.io.volumes import (
    DisplayTransform,
    Volume,
    display_transform,
    from_display,
    slice_image,
    to_display,
    volume_window,
)

__all__ = ["SliceStack"]


@dataclass(frozen=True, eq=False)
class SliceStack:
    """Display slices of a volume: ``images`` (Z, H, W, 3) uint8; ``spacing`` mm along (z, row, column);
    ``axis`` the voxel axis sliced; ``transform`` the display transform of every slice; ``volume`` the source
    (None for a stack built from arrays)."""

    images: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    axis: int = 2
    transform: DisplayTransform = (False, False, False)
    volume: Volume | None = None
    meta: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        img = self.images
        if img.ndim != 4 or img.shape[3] != 3 or img.dtype != np.uint8:
            raise ValueError(f"a slice stack is (Z, H, W, 3) uint8, got {img.shape} {img.dtype}")
        if img.shape[0] < 1:
            raise ValueError("a slice stack needs at least one slice")

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_volume(cls, volume: Volume, *, axis: int = 2, window: Any = None,
                    orientation: str = "radiological") -> SliceStack:
        """Every slice of ``volume`` along ``axis``, windowed once for the whole volume."""
        resolved = volume_window(volume, window)
        n = volume.n_slices(axis)
        first = slice_image(volume, 0, axis=axis, orientation=orientation, resolved_window=resolved)
        images = np.empty((n, *first.array.shape), np.uint8)
        images[0] = first.array
        for k in range(1, n):
            images[k] = slice_image(volume, k, axis=axis, orientation=orientation, resolved_window=resolved).array
        row, col = first.meta["spacing"]
        meta = {"window": first.meta["window"], "modality": first.meta["modality"], "orientation": orientation}
        return cls(images, (float(volume.spacing[axis]), float(row), float(col)), axis,
                   display_transform(volume.affine, axis, orientation), volume, meta)

    @classmethod
    def from_array(cls, images: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> SliceStack:
        """A stack from (Z, H, W) gray or (Z, H, W, 3) RGB uint8 slices (tests, synthetic volumes)."""
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = np.repeat(arr[..., None], 3, axis=3)
        return cls(np.ascontiguousarray(arr), tuple(float(s) for s in spacing))  # type: ignore[arg-type]

    # --- geometry ----------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, H, W): the shape of a 3D mask of this stack."""
        return int(self.images.shape[0]), int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def slice_shape(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def image(self, z: int) -> np.ndarray:
        """Slice ``z`` (HxWx3 uint8)."""
        if not 0 <= int(z) < self.depth:
            raise IndexError(f"slice {z} is outside the stack (0..{self.depth - 1})")
        return self.images[int(z)]

    def from_stored(self, mask: np.ndarray) -> np.ndarray:
        """A 3D mask in the volume's stored layout -> ``[z, y, x]`` of this stack."""
        m = np.asarray(mask)
        if self.volume is None:
            if m.shape != self.shape:
                raise ValueError(f"mask is {m.shape} but the stack is {self.shape}")
            return m.astype(bool, copy=False)
        if m.shape != self.volume.shape:
            raise ValueError(f"mask is {m.shape} but the volume is {self.volume.shape}")
        return np.stack([to_display(np.take(m, k, axis=self.axis), self.transform)
                         for k in range(self.depth)]).astype(bool, copy=False)

    def to_stored(self, mask: np.ndarray) -> np.ndarray:
        """A ``[z, y, x]`` mask of this stack -> the volume's stored layout (the inverse of :meth:`from_stored`)."""
        m = np.asarray(mask)
        if m.shape != self.shape:
            raise ValueError(f"mask is {m.shape} but the stack is {self.shape}")
        if self.volume is None:
            return m.copy()
        return np.stack([from_display(m[k], self.transform) for k in range(self.depth)], axis=self.axis)
