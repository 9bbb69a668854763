"""Helpers shared by the command modules: ``KEY=VALUE`` options, the one-line user error, and the one
dataclass -> argparse generator (a config dataclass's fields become the options of a subcommand).

Field rules of :func:`add_dataclass_args`: ``--field-name`` (underscores become dashes), help from
``field(metadata={"help": ...})`` plus ``(default: X)``; ``bool`` -> ``--x/--no-x``; ``list``/``tuple`` -> one or
more values, each of which may hold several separated by commas (``--datasets a b`` == ``--datasets a,b``);
``dict`` -> a JSON object; ``int``/``float``/``str`` (optionally ``| None``) -> typed. :func:`dataclass_from_args`
builds the dataclass back, with ``--config FILE.yaml`` values (when the parser has that option) under the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["UserError", "add_dataclass_args", "dataclass_from_args", "flag", "parse_kv"]


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


def parse_kv(items: list[str] | None, what: str = "option") -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values are JSON when they parse (numbers, true/false, null, lists), else strings.
    Dashes in keys become underscores. ``what`` names the option in the error message."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"{what} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def flag(name: str) -> str:
    """``field_name`` -> ``--field-name``."""
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """The annotation without ``| None`` (``int | None`` -> ``int``; other unions -> ``str``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _is_sequence(tp: Any) -> bool:
    return tp in (list, tuple) or typing.get_origin(tp) in (list, tuple)


def _is_mapping(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(default: Any) -> bool:
    """Whether a default says something (not missing, None, an empty string or an empty container)."""
    if default is dataclasses.MISSING or default is None:
        return False
    return not (isinstance(default, str | list | tuple | dict) and len(default) == 0)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, from_file: bool = False,
                       required: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass ``cls``.

    ``from_file``: the options carry no argparse default (only given flags reach the namespace), so that
    :func:`dataclass_from_args` can layer them over a ``--config`` file; the help still shows the field's default.
    ``required``: fields the user must give (on the command line, or in the file) — noted in their help.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        default = _field_default(f)
        help_text = f.metadata.get("help", "")
        if _shown(default):
            help_text += f" (default: {default})"
        if f.name in required:
            help_text += " [required, here or in --config]" if from_file else " [required]"
        kw: dict[str, Any] = {"dest": f.name, "help": help_text.replace("%", "%%"),
                              "default": argparse.SUPPRESS if from_file or default is dataclasses.MISSING
                              else default}
        if tp is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif _is_sequence(tp):
            parser.add_argument(flag(f.name), nargs="+", metavar=f.metadata.get("metavar"), **kw)
        elif _is_mapping(tp):
            parser.add_argument(flag(f.name), type=json.loads, metavar="JSON", **kw)
        elif tp in (int, float, str):
            parser.add_argument(flag(f.name), type=tp, **kw)
        else:
            parser.add_argument(flag(f.name), **kw)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _split_items(values: Any) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (a plain string is one item list too; empty parts are dropped)."""
    items = [values] if isinstance(values, str) else list(values)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` from the parsed options: ``args.config`` (a YAML file, when the parser has
    ``--config``) first, then every option that reached the namespace. List fields given on the command line are
    split on commas; tuple fields become tuples. Missing required fields raise ValueError naming their flags."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    if config_file and "config" not in fields:
        values.update(_load_yaml(config_file))
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown option(s) in {config_file}: {unknown}; known: {sorted(fields)}")
    for name, value in vars(args).items():
        if name not in fields:
            continue
        if value is not None and _is_sequence(_base_type(hints[name])):
            value = _split_items(value)
        values[name] = value
    for name, value in values.items():
        tp = _base_type(hints[name])
        if isinstance(value, list) and (tp is tuple or typing.get_origin(tp) is tuple):
            values[name] = tuple(value)
    missing = [flag(n) for n, f in fields.items() if _field_default(f) is dataclasses.MISSING and n not in values]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join(missing)}")
    return cls(**values)
