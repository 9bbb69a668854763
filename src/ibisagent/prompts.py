"""Prompt templates (system prompt, first turn, refinement turn) as replaceable JSON data files.

A template file is a JSON object with ``system``, ``first_turn`` and ``refine_turn`` strings; ``{query}`` is filled
with the user's request (stripped of surrounding white space, or as typed when ``verbatim_query`` is true, as the
release passes it). ``grammar`` ("reference" or "extended") says which actions the wording allows.
Users running the released checkpoint point ``--prompts`` at a file with its exact wording.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ibisagent.protocol import GrammarMode

__all__ = ["PromptTemplate", "PromptTemplateError", "load_prompts", "builtin_prompt_names"]


class PromptTemplateError(ValueError):
    """A prompt file that is missing, not JSON, or lacks a field."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    first_turn: str
    refine_turn: str
    grammar: GrammarMode = "reference"
    verbatim_query: bool = False

    def _q(self, query: str) -> str:
        return query if self.verbatim_query else query.strip()

    def first(self, query: str) -> str:
        return self.first_turn.replace("{query}", self._q(query))

    def refine(self, query: str) -> str:
        return self.refine_turn.replace("{query}", self._q(query))


def builtin_prompt_names() -> list[str]:
    return sorted(p.stem for p in resources.files("ibisagent.prompt_templates").iterdir() if p.name.endswith(".json"))


def load_prompts(name_or_path: str | Path = "reference") -> PromptTemplate:
    """Load a built-in template by name (``reference``, ``extended``) or a JSON file by path."""
    text: str
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise PromptTemplateError(f"prompt file {p} does not exist")
        text, name = p.read_text(encoding="utf-8"), p.stem
    else:
        res = resources.files("ibisagent.prompt_templates").joinpath(f"{name_or_path}.json")
        if not res.is_file():
            raise PromptTemplateError(
                f"unknown prompt template {name_or_path!r}; built-in: {', '.join(builtin_prompt_names())}, "
                "or give a path to a .json file"
            )
        text, name = res.read_text(encoding="utf-8"), str(name_or_path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptTemplateError(f"prompt file {name_or_path} is not valid JSON: {exc.msg}") from exc
    missing = [k for k in ("system", "first_turn", "refine_turn") if not isinstance(data.get(k), str)]
    if missing:
        raise PromptTemplateError(f"prompt file {name_or_path} lacks string field(s) {missing}")
    grammar = data.get("grammar", "reference")
    if grammar not in ("reference", "extended"):
        raise PromptTemplateError(f"grammar must be 'reference' or 'extended', got {grammar!r}")
    verbatim = data.get("verbatim_query", False)
    if not isinstance(verbatim, bool):
        raise PromptTemplateError(f"verbatim_query must be true or false, got {verbatim!r}")
    return PromptTemplate(data.get("name", name), data["system"], data["first_turn"], data["refine_turn"], grammar,
                          verbatim)
