"""verl export: a parquet file in the reference's per-step RL layout (every oracle state becomes one prompt).

Columns (verl ``RLHFDataset`` + our reward's ``extra_info``):

* ``data_source``: ``"ibisagent/<dataset folder>"`` (reference grammar) or ``"ibisagent-box/<dataset folder>"``
  (extended grammar, boxes allowed); :func:`ibisagent.rewards.verl.compute_score` dispatches on the part before
  ``/``.
* ``prompt``: chat messages (system, then the user turn with an ``<image>`` placeholder).
* ``images``: ``[{"image": <absolute path>}]`` — the plain image on the first turn, else the state's overlay.
* ``ability``: ``"medical_segmentation"``.
* ``reward_model``: ``{"style": "rule", "ground_truth": <absolute path of the ground-truth mask>}``.
* ``extra_info``: ``index``, ``case_id``, ``variant``, ``image_path`` (the plain image), ``points`` (pixels),
  ``labels``, ``box`` (pixels or null), ``step`` (1-based turn the reply will be), ``prev_mask_rle`` (JSON string),
  ``width``, ``height``, ``grammar``, ``segmenter``, ``oracle_action`` (what the oracle did here).

States are deduplicated across variants (same case and same prompts so far = one row). Error steps' states are
kept (the state before a deliberate mistake is an ordinary state; the state after it teaches recovery).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ibisagent.chat import to_text_messages
from ibisagent.exports.common import ExportError, ImageStore, iter_samples, load_trajectories

__all__ = ["export_verl"]


def export_verl(synth_dir: str | Path, out: str | Path, *, name: str = "train",
                variants: Iterable[str] | None = None, prompts: str | None = None) -> dict[str, Any]:
    """Write ``OUT/<name>.parquet``. Returns counts."""
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - pandas is in the train extra
        raise ExportError("the verl export needs pandas and pyarrow: pip install 'ibisagent[train]'") from exc
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = ImageStore(out)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for s in iter_samples(load_trajectories(synth_dir, variants), store, prompts=prompts, include_error_steps=True):
        key = s.state_key()
        if key in seen:
            continue
        seen.add(key)
        family = "ibisagent-box" if s.grammar == "extended" else "ibisagent"
        rows.append({
            "data_source": f"{family}/{s.source or 'data'}",
            "prompt": to_text_messages(s.chat),
            "images": [{"image": str((out / s.image).resolve())}],
            "ability": "medical_segmentation",
            "reward_model": {"style": "rule", "ground_truth": s.mask_path},
            "extra_info": {
                "index": len(rows), "case_id": s.case_id, "variant": s.variant, "image_path": s.image_path,
                "points": [[float(x), float(y)] for x, y in s.points], "labels": [int(v) for v in s.labels],
                "box": s.box, "step": s.step,
                "prev_mask_rle": json.dumps(s.prev_mask_rle) if s.prev_mask_rle else "",
                "width": s.width, "height": s.height, "grammar": s.grammar, "segmenter": s.segmenter,
                "oracle_action": s.action,
            },
        })
    path = out / f"{name}.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return {"format": "verl", "file": str(path), "rows": len(rows), **store.counts}
