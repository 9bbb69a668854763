"""Hugging Face ``datasets`` export for TRL: conversational prompt/completion + images, saved with
``save_to_disk`` (load back with ``datasets.load_from_disk``).

Columns: ``prompt`` (system + user messages, the user content ``[{"type": "image"}, {"type": "text", ...}]``),
``completion`` (the assistant reply), ``images`` (a list with the absolute path of one image file, written once under
the export folder; :func:`load_hf_export` loads the dataset with the column cast to ``Sequence(Image())`` so TRL
gets PIL images decoded on access — ``save_to_disk`` would otherwise embed a copy of the bytes in every row), and the state columns the TRL rewards of
:mod:`ibisagent.rewards.trl` read: ``image_path``, ``ground_truth`` (mask path), ``points``, ``labels``, ``box``,
``step``, ``prev_mask_rle`` (JSON string), ``segmenter``, ``grammar``; plus ``case_id``, ``variant``, ``role``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ibisagent.chat import to_dataset_messages
from ibisagent.exports.common import ExportError, ImageStore, iter_samples, load_trajectories

__all__ = ["export_hf", "load_hf_export"]


def export_hf(synth_dir: str | Path, out: str | Path, *, variants: Iterable[str] | None = None,
              prompts: str | None = None, include_error_steps: bool = False) -> dict[str, Any]:
    """Write a ``datasets`` dataset to ``OUT/dataset`` (images under ``OUT/images`` and ``OUT/overlays``)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is in the train extra
        raise ExportError("the Hugging Face export needs `datasets`: pip install 'ibisagent[train]'") from exc
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = ImageStore(out)
    rows: list[dict[str, Any]] = []
    for s in iter_samples(load_trajectories(synth_dir, variants), store, prompts=prompts,
                          include_error_steps=include_error_steps):
        rows.append({
            "prompt": to_dataset_messages(s.chat),
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": s.reply}]}],
            "images": [str((out / s.image).resolve())],
            "image_path": s.image_path, "ground_truth": s.mask_path,
            "points": [[float(x), float(y)] for x, y in s.points], "labels": [int(v) for v in s.labels],
            "box": s.box, "step": s.step,
            "prev_mask_rle": json.dumps(s.prev_mask_rle) if s.prev_mask_rle else "",
            "segmenter": s.segmenter, "grammar": s.grammar, "case_id": s.case_id, "variant": s.variant,
            "role": s.role,
        })
    ds = datasets.Dataset.from_list(rows)
    target = out / "dataset"
    ds.save_to_disk(str(target))  # image paths as strings: save_to_disk would embed the bytes of every row's image
    return {"format": "hf", "path": str(target), "rows": len(rows), **store.counts}


def load_hf_export(path: str | Path) -> Any:
    """``datasets.load_from_disk`` of an export (the export folder or its ``dataset`` subfolder) with the ``images``
    column cast to ``Sequence(Image())``, so rows give PIL images, decoded lazily from the files written once."""
    import datasets

    p = Path(path)
    if (p / "dataset").is_dir():
        p = p / "dataset"
    ds = datasets.load_from_disk(str(p))
    return ds.cast_column("images", datasets.Sequence(datasets.Image()))
