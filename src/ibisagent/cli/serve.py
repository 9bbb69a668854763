"""``ibisagent serve``: the HTTP tool server (:mod:`ibisagent.server`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ibisagent.policies.base import list_policies
from ibisagent.segmenters.base import SegmenterUnavailable, default_segmenter, list_segmenters
from ibisagent.server import (
    DATA_ROOT_ENV,
    DEFAULT_POLICIES,
    LOOPBACK,
    TOKEN_ENV,
    ServerConfig,
    create_app,
    uvicorn_config,
)

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    """Add ``ibisagent serve``."""
    p = subparsers.add_parser(
        "serve",
        help="run the segmenter/agent HTTP tool server (POST /segment as in the reference release)",
        description="HTTP tool server: POST /segment (reference request, .npy mask reply), POST /v1/segment "
                    "(JSON + RLE mask), POST /v1/episode (run the agent on an uploaded image), GET /health. "
                    "Images are read only from under --data-root. Binds to 127.0.0.1 unless --host says otherwise; "
                    "to serve other machines put it behind a reverse proxy that terminates TLS, and set a token.",
    )
    p.add_argument("--data-root", default=os.environ.get(DATA_ROOT_ENV),
                   help=f"folder the image_path of requests must lie in (default ${DATA_ROOT_ENV})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--segmenter", default=None,
                   help="segmenter backend (default litemedsam-click when its weights exist, else litemedsam)")
    p.add_argument("--policy", default="oracle", help="default policy of /v1/episode (default oracle)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help=f"comma-separated policies /v1/episode may run (default {','.join(DEFAULT_POLICIES)}; "
                        "hf and openai need server-side setup and are off unless named here)")
    p.add_argument("--token", default=None,
                   help=f"bearer token every route but /health requires (default ${TOKEN_ENV}; prefer the "
                        "environment variable: a command line is visible to other users)")
    p.add_argument("--health-details", action="store_true",
                   help="/health also reports the segmenter, data root, counters, limits and config (to token "
                        "holders when a token is set); default: liveness and versions only")
    p.add_argument("--max-concurrency", type=int, default=2, help="normal requests processed at once (default 2)")
    p.add_argument("--max-heavy", type=int, default=1,
                   help="heavy requests (episodes, mask_feedback replays) processed at once, in their own lane "
                        "(default 1)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests allowed to wait per lane; more get 503 (default 16)")
    p.add_argument("--max-clicks", type=int, default=64, help="clicks per request; more get 413 (default 64)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB; more gets 413")
    p.add_argument("--max-upload-mb", type=float, default=12.0, help="largest uploaded image in MiB")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096,
                   help="largest image (width x height) accepted, checked from the file header (default 16 Mpixel)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per request (queueing included) before 504; the work stops at its next "
                        "segmenter pass (default 60)")
    p.add_argument("--read-timeout", type=float, default=15.0,
                   help="seconds a request (headers and body) may take to arrive; slower connections are closed "
                        "(default 15)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="open connections at once; more are answered 503 and closed (default 64)")
    p.add_argument("--warm", action="store_true", help="load the segmenter at start instead of on first request")
    p.set_defaults(func=_serve_main)


def _serve_main(args: argparse.Namespace) -> int:
    if not args.data_root:
        print(f"error: give --data-root (or set ${DATA_ROOT_ENV}): the folder requests may read images from",
              file=sys.stderr)
        return 2
    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    try:
        seg = args.segmenter or default_segmenter()
        if seg not in list_segmenters():
            raise ValueError(f"unknown segmenter {seg!r}; known: {', '.join(list_segmenters())}")
        policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
        unknown = [p for p in (*policies, args.policy) if p not in list_policies()]
        if unknown:
            raise ValueError(f"unknown policy {unknown[0]!r}; known: {', '.join(list_policies())}")
        cfg = ServerConfig(
            data_root=Path(args.data_root), segmenter=seg, default_policy=args.policy, policies=policies,
            max_concurrency=args.max_concurrency, max_heavy=args.max_heavy, max_queue=args.max_queue,
            max_clicks=args.max_clicks, max_body_bytes=int(args.max_body_mb * 2**20),
            max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels, timeout_s=args.timeout,
            read_timeout_s=args.read_timeout, max_connections=args.max_connections, token=token,
            health_details=args.health_details,
        )
        app = create_app(cfg, warm=args.warm)
    except (ValueError, SegmenterUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK:
        print(f"warning: binding to {args.host}: the server is reachable from other machines"
              + ("" if token else f" without a token (set ${TOKEN_ENV})") + "; it speaks plain HTTP: terminate TLS "
              "in a reverse proxy", file=sys.stderr)
    import uvicorn

    print(f"ibisagent serve: http://{args.host}:{args.port} (segmenter {cfg.segmenter}, data root "
          f"{Path(cfg.data_root).resolve()}{', token required' if token else ''})", file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, cfg, args.host, args.port)).run()
    return 0
