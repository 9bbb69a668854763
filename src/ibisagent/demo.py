"""The bundled demo data: a few small real cases shipped inside the package (see demo_data/LICENSES.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["demo_data_dir"]


def demo_data_dir() -> Path:
    """Folder of the bundled demo cases (a manifest folder with index.jsonl)."""
    return Path(str(resources.files("ibisagent").joinpath("demo_data")))
