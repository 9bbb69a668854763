"""``ibisagent app``: the annotation web app (:mod:`ibisagent.ui.app`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ibisagent.segmenters.base import list_segmenters
from ibisagent.ui.app import AppConfig, build_app, bundled_examples

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    """Add ``ibisagent app``."""
    p = subparsers.add_parser(
        "app",
        help="start the annotation web app (Gradio) on 127.0.0.1",
        description="Web app: open an image or volume, type a query, watch the agent segment step by step, correct "
                    "it with your own clicks, download the mask. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--segmenter", default=None,
                   help="default segmenter (default litemedsam-click when its weights exist, else litemedsam)")
    p.add_argument("--policy", default=None,
                   help="default policy (default: the learned `compact` policy when its weights are installed; "
                        "`oracle` needs a ground-truth mask)")
    p.add_argument("--examples", default=None, help="manifest folder of examples (default: the bundled cases)")
    p.add_argument("--max-steps", type=int, default=20, help="agent turns per episode (default 20)")
    p.set_defaults(func=_app_main)


def _app_main(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.max_steps < 1:
        print(f"error: --max-steps must be >= 1, got {args.max_steps}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"error: --port must be 1..65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        cfg = AppConfig(segmenter=args.segmenter, policy=args.policy, examples=bundled_examples(args.examples),
                        max_steps=args.max_steps)
        if cfg.segmenter not in list_segmenters():
            raise ValueError(f"unknown segmenter {cfg.segmenter!r}; known: {', '.join(list_segmenters())}")
        demo = build_app(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {args.host}: the app is reachable from other machines", file=sys.stderr)
    demo.queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port,
                                                   share=False, show_error=True)
    return 0
