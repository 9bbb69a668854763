"""The package's import graph has no cycles: not between top-level units (``ibisagent.<x>``: a subpackage folder or a
top-level module), and not between the modules inside one subpackage.

Imports are read with ``ast`` from the source, wherever they sit (module level, inside functions, under
``TYPE_CHECKING``), so a lazy import does not hide a layering cycle. The one exception is loading a registry's
plug-ins by name (``importlib.import_module("ibisagent...")``): only the modules in :data:`PLUGIN_LOADERS` may do that,
and those loads are not edges (a registry does not depend on its plug-ins; the plug-ins depend on it).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import ibisagent

PKG = Path(ibisagent.__file__).parent

#: modules that load plug-ins by name (registries and the CLI's command areas); every other dynamic import is a bug
PLUGIN_LOADERS = {
    "ibisagent",  # lazy top-level names (``ibisagent.Agent``)
    "ibisagent.cli",  # command areas
    "ibisagent.policies.base",  # policy registry: built-in policies
    "ibisagent.segmenters.base",  # segmenter registry: built-in backends
}


#: the layer order of docs/design.md ("Layout after issue 18"): a unit may import units of LOWER layers only
LAYERS = (
    ("options",),
    ("protocol", "masks", "overlay", "io", "segmenters", "queries", "reasoning", "text_encoder", "demo",
     "prompt_templates"),
    ("prompts", "session", "rewards", "oracle_click", "episode"),
    ("chat", "release_prompts", "volume"),
    ("env",),
    ("policies",),
    ("agent", "synthesis", "training"),
    ("evaluation", "exports", "runtime", "testing"),
    ("server", "ui"),
    ("cli",),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` (a module or ``module.attribute``) starts with."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in known:
            return cand
    return None


def _dynamic_target(node: ast.Call) -> str | None:
    """The (prefix of the) module name an ``importlib.import_module(...)`` / ``__import__(...)`` call loads."""
    func = node.func
    fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if fname not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value)
    return "<computed>"


def _imports(name: str, source: str, is_pkg: bool, known: set[str]) -> tuple[set[str], list[str]]:
    """(imported ibisagent modules, dynamic ibisagent loads) of one module's source."""
    tree = ast.parse(source)
    targets: set[str] = set()
    dynamic: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # ``from pkg import submodule`` depends on the submodule, not on the package
                targets.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
        elif isinstance(node, ast.Call):
            target = _dynamic_target(node)
            if target is not None and target.startswith("ibisagent"):
                dynamic.append(target)
    resolved = {r for t in targets if t.startswith("ibisagent") and (r := _resolve(t, known)) is not None}
    resolved.discard(name)
    return resolved, dynamic


def _graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    mods = _modules()
    known = set(mods)
    edges: dict[str, set[str]] = {}
    dynamic: dict[str, list[str]] = {}
    for name, path in mods.items():
        edges[name], dyn = _imports(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", known)
        if dyn:
            dynamic[name] = dyn
    return edges, dynamic


def _unit(module: str) -> str:
    """``ibisagent.x.y.z`` -> ``ibisagent.x`` (the package root stays itself)."""
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a node list whose last node imports the first, or None."""
    color: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        color[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if color[w] == 1:
                return stack[stack.index(w):]
            if color[w] == 0 and (found := visit(w)) is not None:
                return found
        stack.pop()
        color[v] = 2
        return None

    for v in sorted(graph):
        if color[v] == 0 and (found := visit(v)) is not None:
            return found
    return None


def _why(cycle: list[str], edges: dict[str, set[str]], unit_of) -> str:
    """Each hop of a cycle with the module-level imports that make it."""
    lines = []
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
        via = sorted(f"{m} -> {t}" for m, ts in edges.items() if unit_of(m) == a for t in ts if unit_of(t) == b)
        lines.append(f"  {a} -> {b}   ({'; '.join(via[:4])})")
    return " -> ".join([*cycle, cycle[0]]) + "\n" + "\n".join(lines)


def unit_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between top-level units; the package root (``ibisagent/__init__.py``) is left out: it only re-exports."""
    g: dict[str, set[str]] = defaultdict(set)
    for m, ts in edges.items():
        for t in ts:
            a, b = _unit(m), _unit(t)
            if a != b and "ibisagent" not in (a, b):
                g[a].add(b)
    return g


def package_graph(edges: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """Edges between the modules of one subpackage (its ``__init__`` included)."""
    inside = [m for m in edges if m == package or m.startswith(package + ".")]
    return {m: {t for t in edges[m] if t == package or t.startswith(package + ".")} for m in inside}


EDGES, DYNAMIC = _graph()
SUBPACKAGES = sorted(m for m, p in _modules().items() if p.name == "__init__.py" and m != "ibisagent")


def test_no_cycle_between_top_level_units() -> None:
    cycle = find_cycle(unit_graph(EDGES))
    assert cycle is None, "import cycle between top-level units:\n" + _why(cycle, EDGES, _unit)


def test_units_import_only_lower_layers() -> None:
    layer = {f"ibisagent.{u}": i for i, units in enumerate(LAYERS) for u in units}
    units = {_unit(m) for m in EDGES if m != "ibisagent"}
    unknown = sorted(units - set(layer))
    assert not unknown, f"units without a layer (add them to LAYERS here and in docs/design.md): {unknown}"
    upward = [f"{a} (layer {layer[a]}) -> {b} (layer {layer[b]}): "
              + "; ".join(sorted(f"{m} -> {t}" for m, ts in EDGES.items() if _unit(m) == a
                                 for t in ts if _unit(t) == b))
              for a, bs in sorted(unit_graph(EDGES).items()) for b in sorted(bs) if layer[b] >= layer[a]]
    assert not upward, "imports that do not go down the layer order:\n  " + "\n  ".join(upward)


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_no_cycle_inside_a_subpackage(package: str) -> None:
    cycle = find_cycle(package_graph(EDGES, package))
    assert cycle is None, f"import cycle inside {package}:\n" + _why(cycle, EDGES, lambda m: m)


def test_dynamic_imports_only_in_plugin_loaders() -> None:
    stray = {m: d for m, d in DYNAMIC.items() if m not in PLUGIN_LOADERS}
    assert not stray, f"importlib/__import__ of ibisagent modules outside the plug-in loaders: {stray}"


def test_command_line_parsing_lives_in_the_cli_layer() -> None:
    """Domain modules export config dataclasses and functions; only ``ibisagent.cli`` builds argparse parsers."""
    outside = sorted(m for m, p in _modules().items()
                     if m != "ibisagent.cli" and not m.startswith("ibisagent.cli.")
                     and any(isinstance(n, ast.Import | ast.ImportFrom)
                             and ("argparse" in [a.name for a in getattr(n, "names", [])] or
                                  getattr(n, "module", None) == "argparse")
                             for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))))
    assert not outside, f"argparse used outside ibisagent.cli: {outside}"


def test_the_checker_finds_cycles() -> None:
    """The checker itself: a cycle made by a function-level import is found, between units and inside a package."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c"]
    known = {"ibisagent.low", "ibisagent.low.base", "ibisagent.low.plug", "ibisagent.high"}
    sources = {
        "ibisagent.low.base": ("from __future__ import annotations\n\ndef f():\n"
                               "    from ibisagent.high import thing\n    from .plug import x\n", False),
        "ibisagent.low.plug": ("from ibisagent.low.base import f\n", False),
        "ibisagent.high": ("import ibisagent.low.base\n", False),
        "ibisagent.low": ("from . import base\n", True),
    }
    edges = {m: _imports(m, src, pkg, known)[0] for m, (src, pkg) in sources.items()}
    assert edges["ibisagent.low.base"] == {"ibisagent.high", "ibisagent.low.plug"}
    assert edges["ibisagent.low"] == {"ibisagent.low.base"}
    assert find_cycle(unit_graph(edges)) == ["ibisagent.high", "ibisagent.low"]
    assert find_cycle(package_graph(edges, "ibisagent.low")) == ["ibisagent.low.base", "ibisagent.low.plug"]
