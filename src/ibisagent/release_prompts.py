"""Extract the released checkpoint's prompt wording from a user's clone of the release, without shipping it.

The release's wording is its authors' text, so the project does not carry it; ``ibisagent prompts --from-release
CLONE --out reference_release.json`` reads it from the user's own clone and writes a template that ``--prompts``
loads (see :mod:`ibisagent.prompts`). The Python source is parsed with :mod:`ast` and never executed.

Where the release keeps its prompts (our reading of its inference scripts at the stored commit):

* system prompt: the module-level string ``SYSTEM_PROMPT`` (``infer/multi_turn.py``), implicit concatenation
  and ``+`` of string literals allowed;
* first turn: ``current_prompt = f"...{query}..." if is_first_turn else ...`` (``infer/multi_turn.py``): the f-string of
  the first-turn branch; its one placeholder is the user's question;
* refinement turns: ``refinement_prompt = f"...{query}..."`` (``infer/mllm_engine.py``): its one placeholder is the
  user's question (passed on unchanged on later turns).

Each placeholder becomes ``{query}``; any literal text (the release's ``<image>`` prefix included) is kept as is, and
the template sets ``verbatim_query`` so the question goes in as typed, as the release passes it.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ibisagent.prompts import PromptTemplate

__all__ = ["RELEASE_NAMES", "ReleasePromptError", "ReleasePrompts", "extract_release_prompts", "write_template"]

#: template field -> the variable the release assigns it to
RELEASE_NAMES = {"system": "SYSTEM_PROMPT", "first_turn": "current_prompt", "refine_turn": "refinement_prompt"}
#: where the release keeps them; searched first, then every other ``*.py`` under the clone
_PREFERRED_FILES = ("infer/multi_turn.py", "infer/mllm_engine.py")
_FIRST_TURN_FLAG = "is_first_turn"


class ReleasePromptError(ValueError):
    """The clone is missing, unreadable, or does not hold the prompts where the release keeps them."""


@dataclass(frozen=True)
class ReleasePrompts:
    system: str
    first_turn: str
    refine_turn: str
    sources: dict[str, str]  # field -> "relative/path.py:line"
    digests: dict[str, str]  # relative path -> sha256 of the file read

    def template(self, name: str = "reference_release") -> PromptTemplate:
        return PromptTemplate(name, self.system, self.first_turn, self.refine_turn, "reference", verbatim_query=True)


def _literal_str(node: ast.expr) -> str | None:
    """A plain string literal (implicit concatenation is one Constant already; ``+`` of literals is folded)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal_str(node.left), _literal_str(node.right)
        if left is not None and right is not None:
            return left + right
    return None


def _fstring_template(node: ast.expr, where: str) -> str | None:
    """An f-string with exactly one plain placeholder -> its text with ``{query}`` for the placeholder."""
    if not isinstance(node, ast.JoinedStr):
        return None
    parts: list[str] = []
    holes = 0
    for value in node.values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            parts.append(value.value)
        elif isinstance(value, ast.FormattedValue):
            if value.conversion != -1 or value.format_spec is not None:
                raise ReleasePromptError(f"{where}: the placeholder has a conversion or format spec; cannot map it")
            holes += 1
            parts.append("{query}")
        else:  # pragma: no cover - JoinedStr holds only these two node types
            return None
    if holes != 1:
        raise ReleasePromptError(f"{where}: expected one placeholder (the user's question), found {holes}")
    return "".join(parts)


def _first_turn_branch(node: ast.expr) -> ast.expr | None:
    """``A if is_first_turn else B`` -> A; ``B if not is_first_turn else A`` -> A; anything else -> the node."""
    if not isinstance(node, ast.IfExp):
        return node
    test = node.test
    if isinstance(test, ast.Name) and test.id == _FIRST_TURN_FLAG:
        return node.body
    if (isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and isinstance(test.operand, ast.Name)
            and test.operand.id == _FIRST_TURN_FLAG):
        return node.orelse
    return None


def _assignments(tree: ast.Module) -> list[tuple[str, ast.expr, int]]:
    out: list[tuple[str, ast.expr, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out.append((target.id, node.value, node.lineno))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            out.append((node.target.id, node.value, node.lineno))
    return out


def _value_for(field: str, node: ast.expr, where: str) -> str | None:
    if field == "system":
        return _literal_str(node)
    if field == "first_turn":
        branch = _first_turn_branch(node)
        return None if branch is None else _fstring_template(branch, where)
    return _fstring_template(node, where)


def _python_files(root: Path) -> list[Path]:
    preferred = [root / rel for rel in _PREFERRED_FILES if (root / rel).is_file()]
    rest = sorted(p for p in root.rglob("*.py") if p not in preferred and ".git" not in p.parts)
    return preferred + rest


def extract_release_prompts(clone: str | Path) -> ReleasePrompts:
    """Read the system, first-turn and refinement prompts from a clone of the release (see the module docstring).

    The first file (preferred files first) that assigns a field's variable a usable value gives that field. Raises
    :class:`ReleasePromptError` when the folder is missing or a prompt is not found.
    """
    root = Path(clone)
    if not root.is_dir():
        raise ReleasePromptError(f"release clone {root} is not a folder")
    found: dict[str, tuple[str, str]] = {}
    digests: dict[str, str] = {}
    for path in _python_files(root):
        if len(found) == len(RELEASE_NAMES):
            break
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
            tree = ast.parse(data, filename=rel)
        except (OSError, SyntaxError, ValueError):
            continue  # a file we cannot read or parse cannot hold the prompts we look for
        for name, value, line in _assignments(tree):
            for field, var in RELEASE_NAMES.items():
                if var != name or field in found:
                    continue
                text = _value_for(field, value, f"{rel}:{line} ({var})")
                if text is not None:
                    found[field] = (text, f"{rel}:{line}")
                    digests[rel] = hashlib.sha256(data).hexdigest()
    missing = [f"{RELEASE_NAMES[f]} ({f})" for f in RELEASE_NAMES if f not in found]
    if missing:
        raise ReleasePromptError(
            f"release clone {root}: did not find {', '.join(missing)} in its Python files "
            f"(looked in {', '.join(_PREFERRED_FILES)} first); is this a clone of the IBISAgent release?"
        )
    return ReleasePrompts(
        system=found["system"][0], first_turn=found["first_turn"][0], refine_turn=found["refine_turn"][0],
        sources={f: found[f][1] for f in RELEASE_NAMES}, digests=digests,
    )


def write_template(prompts: ReleasePrompts, out: str | Path, name: str = "reference_release") -> Path:
    """Write the template JSON that ``--prompts out`` loads; returns the path."""
    out = Path(out)
    if out.suffix != ".json":
        raise ReleasePromptError(f"--out must end in .json (that is how --prompts tells a file from a name): {out}")
    if not out.parent.is_dir():
        raise ReleasePromptError(f"folder {out.parent} does not exist")
    t = prompts.template(name)
    data = {
        "name": t.name,
        "grammar": t.grammar,
        "verbatim_query": t.verbatim_query,
        "description": "Prompts read from a clone of the IBISAgent release by `ibisagent prompts --from-release`; "
                       "the wording is the release authors'.",
        "source": {"fields": prompts.sources, "sha256": prompts.digests},
        "system": t.system,
        "first_turn": t.first_turn,
        "refine_turn": t.refine_turn,
    }
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
