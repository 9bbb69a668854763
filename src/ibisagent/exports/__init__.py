"""Exports of synthesized trajectories: LLaMA-Factory ShareGPT JSON, verl parquet, Hugging Face datasets, and the
public release's own layouts (its verl parquet and trajectory JSON, :mod:`ibisagent.exports.release`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ibisagent.exports.common import ExportError

__all__ = ["EXPORTERS", "ExportError", "export"]

EXPORTERS = ("llamafactory", "verl", "hf", "release-verl", "release-trajectories")


def export(fmt: str, synth_dir: str | Path, out: str | Path, *, variants: list[str] | None = None,
           prompts: str | None = None, name: str | None = None, include_error_steps: bool = False,
           profile: str = "default") -> dict[str, Any]:
    """Export ``synth_dir`` in format ``fmt`` (one of :data:`EXPORTERS`) into ``out``; returns counts. ``profile``
    (release formats only): ``"default"`` our coordinate convention, ``"reference"`` the release's (``x / W``)."""
    if fmt.startswith("release-"):
        if profile not in ("default", "reference"):
            raise ExportError(f"profile must be 'default' or 'reference', got {profile!r}")
        from ibisagent.exports import release

        if fmt == "release-verl":
            return release.export_release_verl(synth_dir, out, name=name or "train", variants=variants,
                                               profile=profile)  # type: ignore[arg-type]
        if fmt == "release-trajectories":
            return release.export_release_trajectories(synth_dir, out, variants=variants,
                                                       profile=profile)  # type: ignore[arg-type]
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
