"""LLaMA-Factory export: multimodal ShareGPT JSON plus its ``dataset_info.json`` entry.

Each sample: ``{"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", "content": reply}],
"system": ..., "images": ["overlays/ab/....png"]}``. Image paths are relative to the export folder, which is the
``dataset_dir`` to give LLaMA-Factory (``--dataset_dir DIR --dataset NAME``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ibisagent.chat import to_text_messages
from ibisagent.exports.common import ImageStore, iter_samples, load_trajectories

__all__ = ["dataset_info_entry", "export_llamafactory"]


def dataset_info_entry(file_name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry for a multimodal ShareGPT file with a system column."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "system": "system", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }


def export_llamafactory(synth_dir: str | Path, out: str | Path, *, name: str = "ibisagent_sft",
                        variants: Iterable[str] | None = None, prompts: str | None = None,
                        include_error_steps: bool = False) -> dict[str, Any]:
    """Write ``OUT/<name>.json`` and add/replace ``<name>`` in ``OUT/dataset_info.json``. Returns counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = ImageStore(out)
    rows = []
    for s in iter_samples(load_trajectories(synth_dir, variants), store, prompts=prompts,
                          include_error_steps=include_error_steps):
        rows.append({
            "messages": [*to_text_messages(s.chat[1:]), {"role": "assistant", "content": s.reply}],
            "system": s.system,
            "images": [s.image],
            "case_id": s.case_id, "variant": s.variant, "step": s.step, "role": s.role,
        })
    file_name = f"{name}.json"
    (out / file_name).write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    info_path = out / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info[name] = dataset_info_entry(file_name)
    info_path.write_text(json.dumps(info, indent=1))
    return {"format": "llamafactory", "file": str(out / file_name), "samples": len(rows), **store.counts}
