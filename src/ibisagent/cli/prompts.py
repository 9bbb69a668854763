"""``ibisagent prompts --from-release CLONE --out reference_release.json``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "main"]

_DESCRIPTION = """\
Write a prompt template from a clone of the IBISAgent release (its system, first-turn and refinement prompts,
read from its Python source with ast; nothing of the clone is executed). The project does not ship that wording.
Then run the released checkpoint with `--prompts reference_release.json` (and the reference parsing profile)."""


def add_parser(subparsers: Any) -> None:
    """Add the ``prompts`` subcommand."""
    p = subparsers.add_parser("prompts", help="write a prompt template from a clone of the release",
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-release", required=True, metavar="CLONE", help="folder of a clone of the release")
    p.add_argument("--out", required=True, help="template file to write (.json)")
    p.add_argument("--name", default="reference_release", help="template name (default: reference_release)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ibisagent.prompts import PromptTemplateError, load_prompts
    from ibisagent.release_prompts import ReleasePromptError, extract_release_prompts, write_template

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"ibisagent prompts: {out} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    try:
        found = extract_release_prompts(args.from_release)
        path = write_template(found, out, args.name)
        load_prompts(path)  # what --prompts will do with it
    except (ReleasePromptError, PromptTemplateError, OSError) as exc:
        print(f"ibisagent prompts: {exc}", file=sys.stderr)
        return 2
    where = ", ".join(f"{k} from {v}" for k, v in found.sources.items())
    print(f"wrote {path} ({where}); use it with --prompts {path}")
    return 0
