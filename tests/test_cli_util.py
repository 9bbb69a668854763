"""The CLI layer: the one dataclass -> argparse generator, and every subcommand keeps the options it had before the
parsers moved into ``ibisagent.cli`` (``cli_options_before_issue18.json``, taken from ``ibisagent <cmd> --help`` at
commit 93cfc26)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ibisagent.cli import build_parser
from ibisagent.cli.util import add_dataclass_args, dataclass_from_args


@dataclass
class Toy:
    data: str = field(metadata={"help": "input folder"})
    steps: int = field(default=3, metadata={"help": "how many"})
    lr: float = field(default=0.5, metadata={"help": "rate, in %"})
    limit: int | None = field(default=None, metadata={"help": "at most"})
    flip: bool = field(default=True, metadata={"help": "mirror"})
    names: list[str] | None = field(default=None, metadata={"help": "folders"})
    targets: tuple[str, ...] = field(default=("q", "k"), metadata={"help": "modules"})
    extra: dict = field(default_factory=dict, metadata={"help": "overrides"})


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    p.add_argument("--config")
    add_dataclass_args(p, Toy, **kw)
    return p


def test_fields_become_typed_options() -> None:
    p = _parser()
    args = p.parse_args(["--data", "d", "--steps", "7", "--no-flip", "--names", "a,b", "c", "--targets", "v",
                         "--extra", '{"x": 1}', "--limit", "4"])
    cfg = dataclass_from_args(Toy, args)
    assert cfg == Toy(data="d", steps=7, lr=0.5, limit=4, flip=False, names=["a", "b", "c"], targets=("v",),
                      extra={"x": 1})
    assert dataclass_from_args(Toy, p.parse_args(["--data", "d"])) == Toy(data="d")
    helptext = p.format_help()
    assert "--flip, --no-flip" in helptext and "how many (default: 3)" in helptext and "rate, in %" in helptext
    assert "(default: None)" not in helptext and "overrides (default" not in helptext  # nothing to show
    with pytest.raises(SystemExit):
        p.parse_args(["--data", "d", "--steps", "x"])


def test_options_layer_over_a_config_file(tmp_path: Path) -> None:
    p = _parser(from_file=True, required=("data",))
    assert "[required, here or in --config]" in p.format_help()
    f = tmp_path / "run.yaml"
    f.write_text("data: from_file\nsteps: 9\ntargets: [a, b]\n")
    cfg = dataclass_from_args(Toy, p.parse_args(["--config", str(f), "--steps", "2"]))
    assert (cfg.data, cfg.steps, cfg.targets) == ("from_file", 2, ("a", "b"))
    with pytest.raises(ValueError, match="missing required option.*--data"):
        dataclass_from_args(Toy, p.parse_args([]))
    f.write_text("nope: 1\n")
    with pytest.raises(ValueError, match="unknown option"):
        dataclass_from_args(Toy, p.parse_args(["--config", str(f)]))


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_keeps_its_options() -> None:
    before = json.loads((Path(__file__).parent / "cli_options_before_issue18.json").read_text())
    now = {name: sorted(o for a in p._actions for o in (a.option_strings or [a.dest]))
           for name, p in _subcommands().items()}
    assert set(before) <= set(now)
    for name, opts in before.items():  # options may be added, never lost
        missing = sorted(set(opts) - set(now[name]))
        assert not missing, f"{name} lost {missing}"


@pytest.mark.parametrize("command,module,cls", [
    ("train-policy", "ibisagent.training.policy", "PolicyTrainConfig"),
    ("train-segmenter", "ibisagent.training.segmenter", "SegmenterTrainConfig"),
    ("train-llm-sft", "ibisagent.training.trl_sft", "SFTRunConfig"),
    ("train-llm-grpo", "ibisagent.training.trl_grpo", "GRPORunConfig"),
])
def test_generated_commands_cover_every_config_field(command: str, module: str, cls: str) -> None:
    import importlib

    config = getattr(importlib.import_module(module), cls)
    dests = {a.dest for a in _subcommands()[command]._actions}
    assert {f.name for f in dataclasses.fields(config)} <= dests


def test_train_policy_lists_accept_commas_and_spaces(monkeypatch) -> None:
    import ibisagent.training.policy as tp

    seen = {}
    monkeypatch.setattr(tp, "train_policy", lambda cfg: seen.setdefault("cfg", cfg))
    p = _subcommands()["train-policy"]
    args = p.parse_args(["--data", "d", "--datasets", "a,b", "c"])
    assert args.func(args) == 0
    assert seen["cfg"].datasets == ["a", "b", "c"]


def test_area_command_table_matches_the_modules() -> None:
    """``AREA_COMMANDS`` (what ``ibisagent --help`` lists without importing the area modules) names exactly the
    commands the modules add, each with the module's own help line."""
    import importlib

    from ibisagent.cli import AREA_COMMANDS

    for name, (module, help_) in AREA_COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        mod = importlib.import_module(module)
        for add in (getattr(mod, "add_parser", None), *getattr(mod, "ADD_PARSERS", ())):
            if add is not None:
                add(sub)
        assert name in sub.choices, f"{module} does not add {name}"
        assert {a.dest: a.help for a in sub._choices_actions}[name] == help_
    full = set(_subcommands())
    assert full - {"segment", "demo", "list"} <= set(AREA_COMMANDS)
    lazy = next(a for a in build_parser([])._actions if isinstance(a, argparse._SubParsersAction))
    assert set(lazy.choices) == full


@pytest.mark.parametrize("code", [
    "import ibisagent.cli",
    "import ibisagent, ibisagent.cli; from ibisagent.cli import main\n"
    "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n",
    "from ibisagent.cli import main\ntry:\n    main(['segment'])\nexcept SystemExit as e:\n    assert e.code == 2\n",
    "from ibisagent.cli import main\nassert main(['segment', 'x.png', '-q', ' ']) == 2\n",
])
def test_cli_start_imports_no_torch(code: str) -> None:
    """``ibisagent --help`` and argument errors answer without importing torch (or numpy / scipy)."""
    import os
    import subprocess
    import sys

    probe = code + "\nimport sys\nprint(sorted(m for m in ('torch', 'numpy', 'scipy') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
