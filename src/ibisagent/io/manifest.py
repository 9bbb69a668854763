"""Dataset manifests: a folder with ``index.jsonl`` (one row per image/mask pair), or a folder of such folders.

Row fields (the ../shared/data layout): ``id``, ``image``, ``mask`` (relative to the dataset folder), ``object``,
``query``, ``modality``, ``dataset``, ``label_type``; optional ``is_3d`` and any extras (kept in ``extra``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Case", "ManifestError", "load_manifest", "iter_manifest_dirs", "parse_jsonl", "split_of", "SPLIT_BY", "VAL_FRACTION"]

#: fraction of groups (patients, volumes, videos; images for rows without a group) that go to the validation split
VAL_FRACTION = 0.2
#: what the train/val split hashes: ``group`` (default: the row's patient / volume / video, so one patient's slices
#: never land on both sides; rows without a group fall back to their image) or ``image`` (the split of releases
#: before 0.2, kept to reproduce their figures)
SPLIT_BY = ("group", "image")


class ManifestError(ValueError):
    """A manifest that cannot be read (missing file, bad JSON line, missing field)."""


@dataclass(frozen=True)
class Case:
    """One (image, mask, query) case. Paths are absolute."""

    id: str
    image: Path
    mask: Path | None
    query: str
    object: str = ""
    modality: str = ""
    dataset: str = ""
    source: str = ""  # the dataset folder name, e.g. "ph2_dermoscopy"
    is_3d: bool = False
    label_type: str = ""
    group: str = ""  # the patient / volume / video the image comes from ("" when the row has none)
    split_by: str = field(default="group", compare=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def image_key(self) -> str:
        """Identity of the image (several masks can share one image): folder name + relative image path."""
        return f"{self.source}/{self.image.name}"

    @property
    def split_key(self) -> str:
        """What the split hashes: ``<folder>/group:<group>`` (a ``_3d`` folder shares its 2D sibling's key, so a
        patient's slices and volume fall on one side), or the image key with ``split_by="image"`` or no group."""
        if self.split_by == "group" and self.group:
            return f"{self.source.removesuffix('_3d')}/group:{self.group}"
        return self.image_key

    @property
    def split(self) -> Literal["train", "val"]:
        return split_of(self.split_key)


def split_of(key: str, val_fraction: float = VAL_FRACTION) -> Literal["train", "val"]:
    """Deterministic train/val split: a hash of the key (:attr:`Case.split_key`, a group or an image), independent
    of where the data lives."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


_REQUIRED = ("id", "image", "query")


def parse_jsonl(text: str, where: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for each non-blank line of a JSON-lines text; a line that is not a JSON object raises
    :class:`ManifestError` naming ``where:line``."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ManifestError(f"{where}:{lineno}: each line must be a JSON object")
        yield lineno, row


def _read_rows(index: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = index.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {index}: {exc}") from exc
    for lineno, row in parse_jsonl(text, index):
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise ManifestError(f"{index}:{lineno}: missing field(s) {missing}")
        yield lineno, row


def iter_manifest_dirs(root: str | Path) -> list[Path]:
    """The dataset folders under ``root``: ``root`` itself if it has ``index.jsonl``, else its subfolders that do."""
    root = Path(root)
    if not root.exists():
        raise ManifestError(f"data folder {root} does not exist")
    if (root / "index.jsonl").is_file():
        return [root]
    dirs = sorted(p for p in root.iterdir() if (p / "index.jsonl").is_file())
    if not dirs:
        raise ManifestError(f"{root} has no index.jsonl and no subfolder with one")
    return dirs


def load_manifest(
    root: str | Path,
    *,
    split: Literal["train", "val", "all"] = "all",
    include_3d: bool = False,
    datasets: list[str] | None = None,
    split_by: str = "group",
) -> list[Case]:
    """All cases under ``root`` (a dataset folder or a folder of them), optionally one split, 2D only by default.

    ``datasets`` filters by folder name (e.g. ``["ph2_dermoscopy"]``); ``split_by`` is ``"group"`` (default) or
    ``"image"`` (see :data:`SPLIT_BY`).
    """
    if split_by not in SPLIT_BY:
        raise ManifestError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
    cases: list[Case] = []
    for folder in iter_manifest_dirs(root):
        if datasets and folder.name not in datasets:
            continue
        for _, row in _read_rows(folder / "index.jsonl"):
            is_3d = bool(row.get("is_3d", False))
            if is_3d and not include_3d:
                continue
            known = {"id", "image", "mask", "query", "object", "modality", "dataset", "is_3d", "label_type", "group"}
            case = Case(
                id=str(row["id"]),
                image=(folder / row["image"]).resolve(),
                mask=(folder / row["mask"]).resolve() if row.get("mask") else None,
                query=str(row["query"]),
                object=str(row.get("object", "")),
                modality=str(row.get("modality", "")),
                dataset=str(row.get("dataset", folder.name)),
                source=folder.name,
                is_3d=is_3d,
                label_type=str(row.get("label_type", "")),
                group=str(row.get("group") or ""),
                split_by=split_by,
                extra={k: v for k, v in row.items() if k not in known},
            )
            if split != "all" and case.split != split:
                continue
            cases.append(case)
    return cases
