"""Keyword options of registry factories (policies, segmenters): which names a factory accepts, and a clear error
for a name it does not (instead of Python's ``TypeError: unexpected keyword argument``).

A factory that forwards ``**cfg`` to the class it returns (``def _make(**cfg) -> FakeSegmenter``) accepts what
that class's ``__init__`` accepts; the return annotation names the class.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["UnknownOptionError", "check_options", "keyword_options"]

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class UnknownOptionError(TypeError, ValueError):
    """An option name the factory does not take. A TypeError (what Python raises for it) and a ValueError (bad
    user input: the CLI reports it as one line, exit 2)."""

    def __init__(self, message: str, unknown: list[str], valid: tuple[str, ...]) -> None:
        super().__init__(message)
        self.unknown = unknown
        self.valid = valid


def _named(fn: Callable[..., Any], skip_self: bool = False) -> tuple[list[str], bool]:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[1 if skip_self else 0:]
    names = [p.name for p in params if p.kind in _NAMED]
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def keyword_options(factory: Callable[..., Any]) -> tuple[str, ...] | None:
    """The keyword names ``factory`` accepts, sorted; None when it takes any (or they cannot be told)."""
    try:
        names, var_kw = _named(factory)
    except (TypeError, ValueError):
        return None
    if not var_kw:
        return tuple(sorted(names))
    try:
        ret = typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001 - an unresolvable annotation: options unknown
        return None
    if not isinstance(ret, type):
        return None
    try:
        cls_names, cls_var_kw = _named(ret.__init__, skip_self=True)  # type: ignore[misc]
    except (TypeError, ValueError):
        return None
    if cls_var_kw:
        return None
    return tuple(sorted(set(names) | set(cls_names)))


def check_options(what: str, factory: Callable[..., Any], given: Mapping[str, Any]) -> None:
    """Raise :class:`UnknownOptionError` naming the valid options when ``given`` holds a name ``factory`` does not
    accept. ``what`` names the thing built, e.g. ``"segmenter 'fake'"``."""
    valid = keyword_options(factory)
    if valid is None:
        return
    unknown = sorted(k for k in given if k not in valid)
    if unknown:
        shown = ", ".join(valid) if valid else "(none)"
        raise UnknownOptionError(
            f"{what} has no option {', '.join(repr(k) for k in unknown)}; its options: {shown}", unknown, valid)
