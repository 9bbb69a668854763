"""Exports of synthesized trajectories: LLaMA-Factory ShareGPT JSON, verl parquet, Hugging Face datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ibisagent.exports.common import ExportError

__all__ = ["EXPORTERS", "ExportError", "export"]

EXPORTERS = ("llamafactory", "verl", "hf")


def export(fmt: str, synth_dir: str | Path, out: str | Path, *, variants: list[str] | None = None,
           prompts: str | None = None, name: str | None = None, include_error_steps: bool = False) -> dict[str, Any]:
    """Export ``synth_dir`` in format ``fmt`` (``llamafactory``, ``verl`` or ``hf``) into ``out``; returns counts."""
    if fmt == "llamafactory":
        from ibisagent.exports.llamafactory import export_llamafactory

        return export_llamafactory(synth_dir, out, name=name or "ibisagent_sft", variants=variants, prompts=prompts,
                                   include_error_steps=include_error_steps)
    if fmt == "verl":
        from ibisagent.exports.verl_parquet import export_verl

        return export_verl(synth_dir, out, name=name or "train", variants=variants, prompts=prompts)
    if fmt == "hf":
        from ibisagent.exports.hf_dataset import export_hf

        return export_hf(synth_dir, out, variants=variants, prompts=prompts, include_error_steps=include_error_steps)
    raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORTERS)}")
