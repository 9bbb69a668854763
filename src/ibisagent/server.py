"""The segmenter (and agent) as an HTTP tool server: ``ibisagent serve``.

Endpoints:

* ``POST /segment`` — the reference release's request: JSON ``{"image_path", "clicklist": [[x, y], ...] (pixels),
  "labels": [1/0, ...]}``; the body of the reply is the H x W mask as ``np.save`` writes it (``uint8`` 0/1 unless
  ``"dtype"`` asks for ``bool``/``float32``), so ``np.load(io.BytesIO(resp.content))`` reads it.
* ``POST /v1/segment`` — same input (plus optional ``box``, ``slice_index``, ``window``, ``mask_feedback``), JSON
  reply ``{"mask_rle", "score", "shape", "area", "timings"}`` with the reference RLE codec (:func:`ibisagent.masks.rle_encode`).
* ``POST /v1/episode`` — run the agent: a multipart upload (``image`` file, optional ``mask`` file, form fields
  ``query``, ``policy``, ``max_steps``) or JSON with ``image_path``/``mask_path`` under the data root; replies with the
  episode trace (:meth:`ibisagent.agent.Episode.to_json`).
* ``GET /health`` — status, segmenter, load and cache counters.

Safety: paths must lie under ``--data-root`` (no ``..``, no absolute paths elsewhere, no symlinks leading out:
400/403); request bodies over ``--max-body-mb`` get 413; uploads are type-sniffed (PNG/JPEG/DICOM) and pixel-capped
(415/413); at most ``--max-concurrency`` requests run at once and ``--max-queue`` wait, more get 503; a request that
takes longer than ``--timeout`` gets 504. The server binds to 127.0.0.1 unless ``--host`` says otherwise.
"""


import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from ibisagent.masks import as_bool, rle_encode
from ibisagent.runtime import ImageCache, SegmenterHub, default_segmenter_name, env_for, image_key, iter_episode
from ibisagent.segmenters.base import Segmenter, SegmenterError, SegmenterUnavailable

__all__ = [
    "DATA_ROOT_ENV",
    "PathRejected",
    "RequestRejected",
    "ServerConfig",
    "Limiter",
    "add_parser",
    "create_app",
    "resolve_data_path",
    "sniff_upload",
]

#: environment variable with the default data root of ``ibisagent serve``
DATA_ROOT_ENV = "IBISAGENT_DATA_ROOT"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RequestRejected(ValueError):
    """A request the server refuses; ``status`` is the HTTP status code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class PathRejected(RequestRejected):
    """An ``image_path`` outside the data root, with ``..``, or that does not exist."""


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server process."""

    data_root: Path
    segmenter: str = field(default_factory=default_segmenter_name)
    max_concurrency: int = 2
    max_queue: int = 16
    max_body_bytes: int = 16 * 2**20
    max_upload_bytes: int = 12 * 2**20
    max_pixels: int = 4096 * 4096
    max_clicks: int = 256
    timeout_s: float = 60.0
    default_policy: str = "oracle"
    max_episode_steps: int = 20

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_body_bytes", "max_upload_bytes", "max_pixels", "max_clicks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be positive")


# ----------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------

def resolve_data_path(root: Path, user_path: Any) -> Path:
    """Resolve a client-given path against ``root`` and refuse anything that does not stay inside it.

    Relative paths are taken relative to ``root``; absolute paths must already point inside it. ``..`` components
    are refused outright (400), paths that end up outside the root — directly or through a symlink — get 403, a
    missing file 404.
    """
    if not isinstance(user_path, str) or not user_path.strip():
        raise PathRejected("image_path must be a non-empty string", 400)
    if "\x00" in user_path:
        raise PathRejected("image_path contains a NUL byte", 400)
    parts = set(PurePosixPath(user_path).parts) | set(PureWindowsPath(user_path).parts)
    if ".." in parts:
        raise PathRejected("image_path must not contain '..' components", 400)
    root_real = root.resolve()
    given = Path(user_path)
    candidate = given if given.is_absolute() else root_real / given
    if given.is_absolute() and not (_inside(Path(os.path.normpath(given)), root_real)
                                    or _inside(Path(os.path.normpath(given)), Path(os.path.abspath(root)))):
        raise PathRejected("image_path is outside the server's data root", 403)
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise PathRejected(f"image_path not found under the data root: {user_path}", 404) from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permission problems
        raise PathRejected(f"image_path cannot be resolved: {exc}", 400) from None
    if not _inside(real, root_real):
        raise PathRejected("image_path resolves outside the server's data root (symlink?)", 403)
    if not (real.is_file() or real.is_dir()):
        raise PathRejected("image_path is not a regular file", 400)
    return real


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


# ----------------------------------------------------------------------------------------------------------------
# Uploads
# ----------------------------------------------------------------------------------------------------------------

_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"))


def sniff_upload(data: bytes, max_bytes: int) -> str:
    """The file suffix for an uploaded image after size and type checks (PNG, JPEG, DICOM): 413/415 otherwise."""
    if len(data) > max_bytes:
        raise RequestRejected(f"upload is {len(data)} bytes; the limit is {max_bytes}", 413)
    if not data:
        raise RequestRejected("upload is empty", 400)
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if len(data) > 132 and data[128:132] == b"DICM":
        return ".dcm"
    raise RequestRejected("unsupported upload type: send a PNG, JPEG or DICOM (.dcm) file", 415)


def _check_pixels(shape: tuple[int, ...], max_pixels: int) -> None:
    if int(shape[0]) * int(shape[1]) > max_pixels:
        raise RequestRejected(f"image is {shape[1]}x{shape[0]} pixels; the limit is {max_pixels} pixels", 413)


# ----------------------------------------------------------------------------------------------------------------
# Bounded concurrency with a queue limit and per-request timeouts
# ----------------------------------------------------------------------------------------------------------------

class Busy(RequestRejected):
    def __init__(self, message: str = "server busy: the request queue is full, retry later") -> None:
        super().__init__(message, 503)


class Limiter:
    """At most ``concurrency`` jobs run (in a thread pool), at most ``max_queue`` wait; more are refused (503).

    ``run(fn, timeout)`` raises :class:`Busy` when the queue is full and ``TimeoutError`` when waiting plus running
    takes longer than ``timeout``; a job that timed out keeps its slot until its thread finishes, so the number of
    running threads never exceeds ``concurrency``.
    """

    def __init__(self, concurrency: int, max_queue: int) -> None:
        self.concurrency = int(concurrency)
        self.max_queue = int(max_queue)
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="ibisagent-serve")
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.waiting = 0
        self.running = 0
        self.completed = 0
        self.rejected = 0
        self.timed_out = 0

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._loop is not loop:
            self._sem, self._loop = asyncio.Semaphore(self.concurrency), loop
        return self._sem

    async def run(self, fn: Callable[[], Any], timeout: float) -> Any:
        sem = self._semaphore()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if sem.locked() and self.waiting >= self.max_queue:
            self.rejected += 1
            raise Busy()
        self.waiting += 1
        try:
            await asyncio.wait_for(sem.acquire(), timeout)
        except TimeoutError:
            self.timed_out += 1
            raise
        finally:
            self.waiting -= 1
        self.running += 1
        fut = loop.run_in_executor(self.pool, fn)

        def _release(_: Any) -> None:
            self.running -= 1
            self.completed += 1
            sem.release()

        fut.add_done_callback(_release)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - loop.time()))
        except TimeoutError:
            self.timed_out += 1
            raise

    def stats(self) -> dict[str, int]:
        return {"concurrency": self.concurrency, "max_queue": self.max_queue, "running": self.running,
                "waiting": self.waiting, "completed": self.completed, "rejected": self.rejected,
                "timed_out": self.timed_out}


class BodyLimitMiddleware:
    """ASGI middleware: refuse bodies larger than ``max_bytes`` with 413 (by Content-Length, or while reading)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await _send_json(send, 400, {"error": "invalid Content-Length header"})
                return
            if n > self.max_bytes:
                await _send_json(send, 413, {"error": f"request body is {n} bytes; the limit is {self.max_bytes}"})
                return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await _send_json(send, 413, {"error": f"request body exceeds the limit of {self.max_bytes} bytes"})
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        data = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send: Callable, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------------------------
# The service (framework-free: the HTTP layer below only parses and serializes)
# ----------------------------------------------------------------------------------------------------------------

class SegmentService:
    """Loads images under the data root and runs the shared segmenter / agent on them."""

    def __init__(self, config: ServerConfig, hub: SegmenterHub | None = None) -> None:
        self.config = config
        self.root = Path(config.data_root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"data root {config.data_root} is not a folder")
        self.hub = hub or SegmenterHub()
        self.images = ImageCache()

    def segmenter(self) -> Segmenter:
        return self.hub.get(self.config.segmenter)

    def load(self, image_path: Any, slice_index: int | None = None, window: Any = None) -> tuple[np.ndarray, str]:
        """(HxWx3 uint8 image, content key) of a path under the data root."""
        path = resolve_data_path(self.root, image_path)
        try:
            loaded, key = self.images.load(path, slice_index, window)
        except ValueError as exc:  # ImageLoadError / WindowError: bad file or options
            raise RequestRejected(str(exc), 422) from exc
        _check_pixels(loaded.array.shape, self.config.max_pixels)
        return loaded.array, key

    def load_mask(self, mask_path: Any, shape: tuple[int, int], slice_index: int | None = None) -> np.ndarray:
        """A ground-truth mask under the data root (binary PNG/TIFF/NPY or a NIfTI label map slice)."""
        from ibisagent.io import load_mask

        path = resolve_data_path(self.root, mask_path)
        kwargs = {"slice_index": slice_index} if slice_index is not None else {}
        try:
            return load_mask(path, shape=shape, **kwargs)
        except ValueError as exc:
            raise RequestRejected(f"mask_path: {exc}", 422) from exc

    def segment(self, req: dict[str, Any]) -> tuple[np.ndarray, float, dict[str, float]]:
        """Mask, score and timings for a /segment request body (already JSON-decoded)."""
        t0 = time.perf_counter()
        pts, labels, box = self._prompts(req)
        slice_index = req.get("slice_index")
        if slice_index is not None and not isinstance(slice_index, int):
            raise RequestRejected("slice_index must be an integer", 422)
        image, key = self.load(req.get("image_path"), slice_index, req.get("window"))
        t1 = time.perf_counter()
        h, w = image.shape[:2]
        if not len(pts) and box is None:
            return np.zeros((h, w), bool), float("nan"), {"load_s": t1 - t0, "segment_s": 0.0}
        feedback = bool(req.get("mask_feedback", False))
        with self.hub.bound(self.config.segmenter, image, key) as seg:
            t2 = time.perf_counter()
            try:
                if feedback and len(pts) > 1:  # replay clicks one by one with the previous logits, as a session does
                    logits = None
                    for k in range(1, len(pts) + 1):
                        res = seg.predict(pts[:k], labels[:k], box, logits)
                        logits = res.logits
                else:
                    res = seg.predict(pts if len(pts) else None, labels if len(labels) else None, box)
            except SegmenterError as exc:
                raise RequestRejected(str(exc), 422) from exc
        t3 = time.perf_counter()
        score = float(res.score)
        return res.mask, score, {"load_s": t1 - t0, "wait_s": t2 - t1, "segment_s": t3 - t2}

    def _prompts(self, req: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        clicks = req.get("clicklist", req.get("points", []))
        labels = req.get("labels", [])
        if clicks is None:
            clicks = []
        if labels is None:
            labels = []
        if not isinstance(clicks, list) or not isinstance(labels, list):
            raise RequestRejected("clicklist and labels must be JSON lists", 422)
        if len(clicks) > self.config.max_clicks:
            raise RequestRejected(f"{len(clicks)} clicks; the limit is {self.config.max_clicks}", 413)
        try:
            pts = np.asarray(clicks, dtype=np.float32).reshape(-1, 2) if clicks else np.zeros((0, 2), np.float32)
            labs = np.asarray(labels, dtype=np.int64).reshape(-1) if labels else np.zeros((0,), np.int64)
        except (TypeError, ValueError) as exc:
            raise RequestRejected(f"clicklist must be [[x, y], ...] numbers and labels 1/0 numbers ({exc})",
                                  422) from None
        if pts.shape[0] != len(clicks):
            raise RequestRejected("each click must be an [x, y] pair of pixel coordinates", 422)
        if len(pts) != len(labs):
            raise RequestRejected(f"{len(pts)} clicks but {len(labs)} labels", 422)
        box = req.get("box")
        bx = None
        if box is not None:
            try:
                bx = np.asarray(box, dtype=np.float32).reshape(4)
            except (TypeError, ValueError):
                raise RequestRejected("box must be [x1, y1, x2, y2] pixel numbers", 422) from None
        return pts, labs, bx

    def episode(self, image: np.ndarray, query: str, gt: np.ndarray | None, policy_name: str,
                max_steps: int) -> dict[str, Any]:
        """Run the agent on ``image`` and return the episode trace as JSON-ready data."""
        from ibisagent.policies.base import PolicyError, create_policy

        try:
            policy = create_policy(policy_name)
        except KeyError as exc:
            raise RequestRejected(str(exc.args[0]), 422) from None
        if getattr(policy, "requires_gt", False) and gt is None:
            raise RequestRejected(f"policy {policy_name!r} needs a ground-truth mask: send one as 'mask'", 422)
        if gt is not None and gt.shape != image.shape[:2]:
            raise RequestRejected(f"mask is {gt.shape[1]}x{gt.shape[0]} but the image is "
                                  f"{image.shape[1]}x{image.shape[0]}", 422)
        key = image_key(image)
        with self.hub.bound(self.config.segmenter, image, key) as seg:
            env = env_for(seg, policy, max_steps=max_steps)
            ep = None
            try:
                for _, step_ep in iter_episode(env, policy, image, query, gt):
                    ep = step_ep
            except (PolicyError, SegmenterError) as exc:
                raise RequestRejected(str(exc), 422) from exc
        assert ep is not None
        out = ep.to_json()
        out["segmenter"] = self.config.segmenter
        out["policy"] = policy_name
        return out

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "segmenter": self.config.segmenter, "data_root": str(self.root),
                "segmenters_loaded": self.hub.loaded(), "set_image_calls": self.hub.set_image_calls,
                "image_cache": {"items": len(self.images), "hits": self.images.hits, "misses": self.images.misses}}


# ----------------------------------------------------------------------------------------------------------------
# HTTP layer
# ----------------------------------------------------------------------------------------------------------------

def _npy_bytes(mask: np.ndarray, dtype: str) -> bytes:
    if dtype not in ("uint8", "bool", "float32"):
        raise RequestRejected("dtype must be one of uint8, bool, float32", 422)
    buf = io.BytesIO()
    np.save(buf, as_bool(mask).astype(dtype), allow_pickle=False)
    return buf.getvalue()


def create_app(config: ServerConfig, hub: SegmenterHub | None = None, warm: bool = False) -> Any:
    """The FastAPI application. ``warm=True`` builds the segmenter now instead of on the first request."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    service = SegmentService(config, hub)
    limiter = Limiter(config.max_concurrency, config.max_queue)
    if warm:
        service.segmenter()
    app = FastAPI(title="ibisagent tool server", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.limiter = limiter
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)

    @app.exception_handler(RequestRejected)
    async def _rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def _json_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestRejected(f"request body is not valid JSON: {exc}", 400) from None
        if not isinstance(body, dict):
            raise RequestRejected("request body must be a JSON object", 400)
        return body

    async def _limited(fn: Callable[[], Any]) -> Any:
        try:
            return await limiter.run(fn, config.timeout_s)
        except TimeoutError:
            raise RequestRejected(f"request took longer than {config.timeout_s:g} s", 504) from None
        except SegmenterUnavailable as exc:
            raise RequestRejected(f"segmenter unavailable: {exc}", 503) from exc
        except KeyError as exc:  # unknown segmenter name at first use
            raise RequestRejected(str(exc.args[0]) if exc.args else "unknown name", 500) from exc

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({**service.health(), "limits": limiter.stats(), "config": _config_json(config)})

    @app.post("/segment")
    async def segment(request: Request) -> Response:
        body = await _json_body(request)
        dtype = str(body.get("dtype", "uint8"))
        mask, _, _ = await _limited(lambda: service.segment(body))
        return Response(_npy_bytes(mask, dtype), media_type="application/octet-stream")

    @app.post("/v1/segment")
    async def segment_json(request: Request) -> JSONResponse:
        body = await _json_body(request)
        t = time.perf_counter()
        mask, score, timings = await _limited(lambda: service.segment(body))
        timings = {k: round(v, 5) for k, v in timings.items()}
        timings["total_s"] = round(time.perf_counter() - t, 5)
        return JSONResponse({"mask_rle": rle_encode(mask), "score": None if score != score else score,
                             "shape": list(mask.shape), "area": int(mask.sum()), "timings": timings})

    @app.post("/v1/episode")
    async def episode(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        image: np.ndarray | None = None
        gt: np.ndarray | None = None
        if ctype.startswith("multipart/form-data"):
            image, gt, fields = await _read_upload(request, service)
        else:
            fields = await _json_body(request)
        query = fields.get("query")
        if not isinstance(query, str) or not query.strip():
            raise RequestRejected("query (the text instruction, e.g. 'segment the tumor') is required", 422)
        policy = str(fields.get("policy") or config.default_policy)
        try:
            max_steps = int(fields.get("max_steps") or config.max_episode_steps)
        except (TypeError, ValueError):
            raise RequestRejected("max_steps must be an integer", 422) from None
        max_steps = max(1, min(max_steps, config.max_episode_steps))

        def job() -> dict[str, Any]:
            img, mask = image, gt
            if img is None:  # JSON request: image (and mask) from under the data root
                img, _ = service.load(fields.get("image_path"), fields.get("slice_index"), fields.get("window"))
                if fields.get("mask_path"):
                    mask = service.load_mask(fields["mask_path"], img.shape[:2], fields.get("slice_index"))
            return service.episode(img, query.strip(), mask, policy, max_steps)

        return JSONResponse(await _limited(job))

    return app


async def _read_upload(request: Any, service: SegmentService) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Image (and optional mask) from a multipart upload, size/type checked, plus the other form fields."""
    from starlette.datastructures import UploadFile

    cfg = service.config
    try:
        form = await request.form(max_files=2, max_fields=16, max_part_size=cfg.max_upload_bytes)
    except Exception as exc:  # malformed multipart or a part over the limit
        raise RequestRejected(f"bad multipart upload: {exc}", 400) from None
    fields = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
    up = form.get("image")
    if not isinstance(up, UploadFile):
        raise RequestRejected("multipart upload needs an 'image' file field", 422)
    image = _decode_upload(await up.read(), cfg, rgb=True)
    gt = None
    mup = form.get("mask")
    if isinstance(mup, UploadFile):
        gt = _decode_upload(await mup.read(), cfg, rgb=False)
    return image, gt, fields


def _decode_upload(data: bytes, cfg: ServerConfig, rgb: bool) -> np.ndarray:
    suffix = sniff_upload(data, cfg.max_upload_bytes)
    if suffix in (".png", ".jpg"):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                _check_pixels((im.height, im.width), cfg.max_pixels)
        except RequestRejected:
            raise
        except Exception as exc:
            raise RequestRejected(f"upload is not a readable image: {exc}", 415) from None
    from ibisagent.io import load_image, load_mask

    with tempfile.TemporaryDirectory(prefix="ibisagent-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            arr = load_image(path).array if rgb else load_mask(path)
        except ValueError as exc:
            raise RequestRejected(f"cannot read the {'image' if rgb else 'mask'} upload: {exc}", 415) from None
    _check_pixels(arr.shape, cfg.max_pixels)
    return arr


def _config_json(config: ServerConfig) -> dict[str, Any]:
    d = asdict(config)
    d["data_root"] = str(config.data_root)
    return d


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def add_parser(subparsers: Any) -> None:
    """Add ``ibisagent serve``."""
    p = subparsers.add_parser(
        "serve",
        help="run the segmenter/agent HTTP tool server (POST /segment as in the reference release)",
        description="HTTP tool server: POST /segment (reference request, .npy mask reply), POST /v1/segment "
                    "(JSON + RLE mask), POST /v1/episode (run the agent on an uploaded image), GET /health. "
                    "Images are read only from under --data-root. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--data-root", default=os.environ.get(DATA_ROOT_ENV),
                   help=f"folder the image_path of requests must lie in (default ${DATA_ROOT_ENV})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--segmenter", default=None,
                   help="segmenter backend (default litemedsam-click when its weights exist, else litemedsam)")
    p.add_argument("--policy", default="oracle", help="default policy of /v1/episode (default oracle)")
    p.add_argument("--max-concurrency", type=int, default=2, help="requests processed at once (default 2)")
    p.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait; more get 503 (default 16)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB; more gets 413")
    p.add_argument("--max-upload-mb", type=float, default=12.0, help="largest uploaded image in MiB")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before 504 (default 60)")
    p.add_argument("--warm", action="store_true", help="load the segmenter at start instead of on first request")
    p.set_defaults(func=_serve_main)


def _serve_main(args: argparse.Namespace) -> int:
    if not args.data_root:
        print(f"error: give --data-root (or set ${DATA_ROOT_ENV}): the folder requests may read images from",
              file=sys.stderr)
        return 2
    try:
        from ibisagent.segmenters.base import list_segmenters

        seg = args.segmenter or default_segmenter_name()
        if seg not in list_segmenters():
            raise ValueError(f"unknown segmenter {seg!r}; known: {', '.join(list_segmenters())}")
        cfg = ServerConfig(
            data_root=Path(args.data_root), segmenter=seg, default_policy=args.policy,
            max_concurrency=args.max_concurrency, max_queue=args.max_queue,
            max_body_bytes=int(args.max_body_mb * 2**20), max_upload_bytes=int(args.max_upload_mb * 2**20),
            timeout_s=args.timeout,
        )
        app = create_app(cfg, warm=args.warm)
    except (ValueError, SegmenterUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK:
        print(f"warning: binding to {args.host}: the server is reachable from other machines", file=sys.stderr)
    import uvicorn

    print(f"ibisagent serve: http://{args.host}:{args.port} (segmenter {cfg.segmenter}, data root "
          f"{Path(cfg.data_root).resolve()})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
