"""2D training cases cut from 3D label volumes (multi-organ CT/MR label maps, binary 3D masks).

A folder's 3D rows (``is_3d: true`` in ``index.jsonl``: an image volume and a label volume) hold far more named
objects than its few 2D slices: every slice of a TotalSegmentator label map shows a dozen organs. This module turns
them into 2D cases for policy training, one per (slice, structure), with the query naming the structure, so that a
policy can learn to find *the named* organ among many.

Rules, so that validation stays clean:

* A volume whose row falls in the validation split (:attr:`ibisagent.io.manifest.Case.split`: by its group, the
  patient, which its 2D sibling folder shares; by its image key with ``split_by="image"``) gives no training slices.
* The dataset folder's 2D **validation** images are located in its volumes (a slice whose windowed pixels equal the
  2D image, in any of the 8 flips/transposes); that slice and ``guard`` slices on each side are never used. When a
  validation image cannot be located (a resampled or cropped export), the folder's volumes are not used at all.
* Slices are rendered the way the folder's own 2D slices of the same volume are (the flip/transpose that makes a
  volume slice equal one of them; radiological orientation when there is none), with the volume's display window
  (:func:`ibisagent.io.volumes.volume_window`: CT abdomen for CT, a percentile window otherwise), so training and
  validation images look alike.

Classes come from the row's ``classes`` field (a JSON file beside the label volume, mapping label value -> name), or
from the sibling file named like the label volume with ``_labels`` replaced by ``_classes`` and a ``.json`` suffix;
a label volume with values {0, 1} only is a binary mask of the row's ``object``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ibisagent.io.images import Window, apply_window
from ibisagent.io.manifest import Case, iter_manifest_dirs, load_manifest
from ibisagent.io.volumes import Volume, display_transform, load_volume, to_display, volume_window
from ibisagent.queries import mirror_safe

__all__ = ["VolumeSlice", "class_names", "mirror_safe", "volume_slice_cases"]

#: slices of a 2D image whose mean absolute pixel difference to a volume slice is below this are the same slice
_SAME_SLICE = 3.0


@dataclass
class VolumeSlice:
    """One 2D case cut from a volume: an RGB uint8 image, a boolean mask and the query naming the structure."""

    id: str
    source: str  # dataset folder name
    query: str
    object: str
    image_key: str  # "<folder>/<volume file>#z<k>": cases of one slice share it
    image: np.ndarray
    gt: np.ndarray
    modality: str = ""  # "CT", "MRI", ... (the word the query uses)


def class_names(case: Case) -> dict[int, str]:
    """Label value -> structure name for a 3D row (empty: a binary mask of ``case.object``)."""
    assert case.mask is not None
    path: Path | None = None
    if case.extra.get("classes"):
        path = case.mask.parent / str(case.extra["classes"])
    else:
        name = case.mask.name
        for suffix in (".nii.gz", ".nii", ".nrrd"):
            if name.endswith(suffix):
                stem = name[: -len(suffix)]
                cand = case.mask.parent / (stem.replace("_labels", "_classes") + ".json")
                if "_labels" in stem and cand.is_file():
                    path = cand
                break
    if path is None:
        return {}
    return {int(k): str(v) for k, v in json.loads(path.read_text()).items() if int(k) != 0}


def _modality_word(case: Case) -> str:
    m = case.modality.upper()
    return "CT" if m.startswith("CT") else ("MRI" if m.startswith("MR") else (case.modality or "medical"))


_TRANSFORMS = [(t, r, c) for t in (True, False) for r in (False, True) for c in (False, True)]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) < _SAME_SLICE


def _render(vol: Volume, window: Window, transform: tuple[bool, bool, bool]) -> list[np.ndarray]:
    """Every axial slice (last voxel axis) as a windowed uint8 gray image in the display ``transform``."""
    return [apply_window(to_display(vol.array[:, :, k], transform), window) for k in range(vol.shape[2])]


def _locate(stack: list[np.ndarray], images: list[np.ndarray]) -> dict[int, list[int]]:
    """For each of ``images`` (by position) the slices of ``stack`` equal to it."""
    return {i: [k for k, s in enumerate(stack) if _same(s, im)] for i, im in enumerate(images)}


def volume_slice_cases(
    root: str | Path,
    *,
    stride: int = 2,
    min_area: int = 40,
    guard: int = 3,
    datasets: list[str] | None = None,
    exclude_objects: frozenset[str] = frozenset(),
    split_by: str = "group",
) -> list[VolumeSlice]:
    """Training cases from the train-split 3D rows under ``root`` (see the module docstring).

    ``stride``: every ``stride``-th axial slice (last voxel axis); ``min_area``: structures with fewer pixels in a
    slice are skipped; ``guard``: slices kept away from each validation 2D slice of the same volume.
    """
    from ibisagent.io.loader import load_image

    if stride < 1:
        raise ValueError("stride must be >= 1")
    out: list[VolumeSlice] = []
    for folder in iter_manifest_dirs(root):
        if datasets and folder.name not in datasets:
            continue
        rows = [c for c in load_manifest(folder, include_3d=True, split_by=split_by) if c.is_3d and c.mask is not None]
        if not rows:
            continue
        flat = {}
        for c in load_manifest(folder, split_by=split_by):
            im = load_image(c.image).array[..., 0]
            flat.setdefault(im.tobytes(), (im, c.split))
        images_2d = [im for im, _ in flat.values()]
        is_val = [split == "val" for _, split in flat.values()]
        vols = [(row, load_volume(row.image), load_volume(row.mask)) for row in rows]  # type: ignore[arg-type]
        # each 2D image of the folder located in each volume, in each display transform; every validation image
        # must be found somewhere: a volume could otherwise hold a validation slice we cannot see (resampled or
        # cropped exports), so the folder is left out
        blocked: dict[int, set[int]] = {i: set() for i in range(len(vols))}
        located: set[int] = set()
        stacks: dict[tuple[int, tuple[bool, bool, bool]], list[np.ndarray]] = {}
        matching: dict[int, list[tuple[bool, bool, bool]]] = {i: [] for i in range(len(vols))}
        for i, (row, vol, lab) in enumerate(vols):
            if vol.shape != lab.shape:
                raise ValueError(f"{row.id}: image volume {vol.shape} and label volume {lab.shape} differ")
            win = volume_window(vol)[0]
            for t in _TRANSFORMS:
                stacks[i, t] = _render(vol, win, t)
                hits = _locate(stacks[i, t], images_2d)
                if any(hits.values()):
                    matching[i].append(t)
                for j, ks in hits.items():
                    if is_val[j] and ks:
                        located.add(j)
                        for k in ks:
                            blocked[i].update(range(k - guard, k + guard + 1))
        if len(located) < sum(is_val):
            continue
        for i, (row, vol, lab) in enumerate(vols):
            if row.split == "val":
                continue
            # render like the folder's own 2D slices of this volume when there are any, else radiological
            transform = matching[i][0] if matching[i] else display_transform(vol.affine, 2, "radiological")
            names = class_names(row)
            binary = not names
            if binary:
                names = {1: row.object}
            word = _modality_word(row)
            images = stacks[i, transform]
            for k in range(0, vol.shape[2], stride):
                if k in blocked[i]:
                    continue
                lab_k = np.rint(to_display(lab.array[:, :, k], transform)).astype(np.int64)
                rgb = np.repeat(images[k][:, :, None], 3, axis=2)
                for value, name in names.items():
                    gt = (lab_k > 0) if binary else (lab_k == value)
                    text = name.replace("_", " ")
                    if int(gt.sum()) < min_area or text in exclude_objects:
                        continue
                    out.append(VolumeSlice(
                        id=f"{row.id}_z{k:03d}__{name}", source=folder.name, object=text,
                        query=f"the {text} in this axial {word} slice",
                        image_key=f"{folder.name}/{row.image.name}#z{k}", image=rgb, gt=gt, modality=word,
                    ))
    return out
