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
* ``GET /health`` — liveness and versions (segmenter, load and cache counters, limits and config only with
  ``--health-details``).

Safety: paths must lie under ``--data-root`` (no ``..``, no absolute paths elsewhere, no symlinks leading out:
400/403); request bodies over ``--max-body-mb`` get 413; uploads are type-sniffed (PNG/JPEG/DICOM) and images are
pixel-capped from their declared size before decoding (415/413); every field is type- and range-checked (422 with
a one-line reason); at most 64 clicks per request. Requests run in two lanes: normal ones (one segmenter pass) on
``--max-concurrency`` workers, heavy ones (episodes, ``mask_feedback`` replays) on ``--max-heavy`` workers; each
lane lets ``--max-queue`` wait, more get 503. Segmenter passes are handed out first come first served, so a heavy
request gives way to a normal one after every pass, and a request that passes ``--timeout`` gets 504 and stops at
its next pass. A request must arrive (headers and body) within ``--read-timeout`` seconds and at most
``--max-connections`` connections are open at once. An optional bearer token (``--token`` / ``$IBISAGENT_TOKEN``)
guards every route but ``/health``. The server binds to 127.0.0.1 unless ``--host`` says otherwise.
"""


import asyncio
import hmac
import io
import json
import math
import os
import platform
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from ibisagent.masks import as_bool, rle_encode
from ibisagent.runtime import (
    DECLARED_HUGE,
    MAX_VOLUME_VOXELS,
    ImageCache,
    SegmenterHub,
    continue_episode,
    declared_size,
    default_segmenter,
    env_for,
    image_key,
)
from ibisagent.segmenters.base import Segmenter, SegmenterError, SegmenterUnavailable

__all__ = [
    "DATA_ROOT_ENV",
    "TOKEN_ENV",
    "DEFAULT_POLICIES",
    "Deadline",
    "FairLock",
    "PathRejected",
    "RequestRejected",
    "ServerConfig",
    "Limiter",
    "create_app",
    "guarded_protocol",
    "resolve_data_path",
    "sniff_upload",
    "uvicorn_config",
]

#: environment variable with the default data root of ``ibisagent serve``
DATA_ROOT_ENV = "IBISAGENT_DATA_ROOT"
#: environment variable with the bearer token of ``ibisagent serve`` (``--token`` overrides it)
TOKEN_ENV = "IBISAGENT_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: policies ``/v1/episode`` may run unless ``--policies`` says otherwise: the ones that need no server-side setup
#: (``hf`` needs a checkpoint, ``openai`` an endpoint: enable them explicitly)
DEFAULT_POLICIES = ("oracle", "oracle-box", "gt-box", "center-click", "compact", "compact-box")

class RequestRejected(ValueError):
    """A request the server refuses; ``status`` is the HTTP status code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class PathRejected(RequestRejected):
    """An ``image_path`` outside the data root, with ``..``, or that does not exist."""


class RequestTimedOut(RequestRejected):
    """The request passed its deadline (504); raised between segmenter passes so its worker stops."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"request took longer than {seconds:g} s", 504)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server process."""

    data_root: Path
    segmenter: str = field(default_factory=default_segmenter)
    max_concurrency: int = 2
    max_heavy: int = 1
    max_queue: int = 16
    max_body_bytes: int = 16 * 2**20
    max_upload_bytes: int = 12 * 2**20
    max_pixels: int = 4096 * 4096
    max_voxels: int = MAX_VOLUME_VOXELS
    max_clicks: int = 64
    max_query_chars: int = 1000
    timeout_s: float = 60.0
    read_timeout_s: float = 15.0
    keep_alive_s: float = 5.0
    max_connections: int = 64
    default_policy: str = "oracle"
    policies: tuple[str, ...] = DEFAULT_POLICIES
    max_episode_steps: int = 20
    token: str | None = field(default=None, repr=False)
    health_details: bool = False

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_heavy", "max_body_bytes", "max_upload_bytes", "max_pixels",
                     "max_voxels", "max_clicks", "max_query_chars", "max_connections", "max_episode_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        for name in ("timeout_s", "read_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.token is not None and not self.token.strip():
            raise ValueError("the token must not be empty")
        if self.default_policy not in self.policies:  # the default policy is always enabled
            object.__setattr__(self, "policies", (*self.policies, self.default_policy))


# ----------------------------------------------------------------------------------------------------------------
# Request fields: every value is type- and range-checked here (422 with a one-line reason), nothing is coerced
# ----------------------------------------------------------------------------------------------------------------

_INT_MAX = 2**31 - 1
_EXACT_FLOAT_INT = 2**53


def _show(value: Any, limit: int = 40) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return "a number with more digits than allowed"
    text = json.dumps(value) if isinstance(value, (list, dict, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any, what: str, limit: float = 2.0**24) -> float:
    """``value`` as a finite float of magnitude at most ``limit`` (pixel coordinates: exact in float32); 422 for
    booleans, strings, huge numbers, NaN and infinities."""
    if not _is_number(value):
        raise RequestRejected(f"{what} must be a number, got {_show(value)}", 422)
    if isinstance(value, int) and abs(value) > _EXACT_FLOAT_INT:
        raise RequestRejected(f"{what} is out of range: {_show(value)}", 422)
    f = float(value)
    if not math.isfinite(f):
        raise RequestRejected(f"{what} must be a finite number, got {f}", 422)
    if abs(f) > limit:
        raise RequestRejected(f"{what} is out of range: {f:g} (limit +-{limit:g})", 422)
    return f


def _int_field(value: Any, what: str, lo: int, hi: int, hint: str = "", form: bool = False) -> int:
    """An integer in ``lo..hi`` (a JSON integer; with ``form`` also a decimal string, as multipart fields are);
    422 otherwise."""
    if form and isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value.strip()) <= 12:
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestRejected(f"{what} must be an integer from {lo} to {hi}{hint}, got {_show(value)}", 422)
    return value


def _bool_field(value: Any, what: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestRejected(f"{what} must be true or false, got {_show(value)}", 422)
    return value


def _str_field(value: Any, what: str, max_chars: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestRejected(f"{what} must be a string, got {_show(value)}", 422)
    if len(value) > max_chars:
        raise RequestRejected(f"{what} is {len(value)} characters; the limit is {max_chars}", 422)
    return value


def _window_field(value: Any) -> str | tuple[float, float] | None:
    """``window``: a preset name or a ``[center, width]`` pair of numbers (the image loader checks the values)."""
    if value is None or isinstance(value, str):
        return _str_field(value, "window", 64)
    if isinstance(value, list) and len(value) == 2:
        return _finite(value[0], "window center", 1e12), _finite(value[1], "window width", 1e12)
    raise RequestRejected(f"window must be a preset name (e.g. 'ct-soft-tissue') or [center, width], got "
                          f"{_show(value)}", 422)


def _slice_field(value: Any, form: bool = False) -> int | None:
    if value is None or (form and value == ""):
        return None
    return _int_field(value, "slice_index", 0, _INT_MAX, " (0 = the first slice of a volume)", form=form)


def _prompt_fields(req: dict[str, Any], max_clicks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(points (N, 2) float32, labels (N,) int64, box (4,) or None) from ``clicklist``/``points``, ``labels``,
    ``box``; every click an ``[x, y]`` pair of finite numbers, every label exactly 1 or 0."""
    if "clicklist" in req and "points" in req:
        raise RequestRejected("give the clicks as 'clicklist' or as 'points', not both", 422)
    clicks = req.get("clicklist", req.get("points"))
    labels = req.get("labels")
    clicks = [] if clicks is None else clicks
    labels = [] if labels is None else labels
    if not isinstance(clicks, list) or not isinstance(labels, list):
        raise RequestRejected("clicklist and labels must be JSON lists", 422)
    if len(clicks) > max_clicks or len(labels) > max_clicks:
        raise RequestRejected(f"{max(len(clicks), len(labels))} clicks; the limit is {max_clicks} per request", 413)
    if len(clicks) != len(labels):
        raise RequestRejected(f"{len(clicks)} clicks but {len(labels)} labels", 422)
    pts = np.zeros((len(clicks), 2), np.float32)
    for i, c in enumerate(clicks):
        if not isinstance(c, list) or len(c) != 2:
            raise RequestRejected(f"click {i} must be an [x, y] pair of pixel coordinates, got {_show(c)}", 422)
        pts[i] = (_finite(c[0], f"click {i} x"), _finite(c[1], f"click {i} y"))
    labs = np.zeros(len(labels), np.int64)
    for i, v in enumerate(labels):
        if not _is_number(v) or v not in (0, 1):
            raise RequestRejected(f"label {i} must be 1 (positive click) or 0 (negative click), got {_show(v)}", 422)
        labs[i] = int(v)
    box = req.get("box")
    bx = None
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise RequestRejected(f"box must be [x1, y1, x2, y2] pixel numbers, got {_show(box)}", 422)
        bx = np.array([_finite(v, "box coordinate") for v in box], np.float32)
    return pts, labs, bx


@dataclass(frozen=True)
class SegmentRequest:
    """A checked /segment or /v1/segment request."""

    image_path: Any
    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None
    slice_index: int | None
    window: str | tuple[float, float] | None
    mask_feedback: bool
    dtype: str = "uint8"

    @property
    def passes(self) -> int:
        """Segmenter passes the request costs (a mask_feedback replay runs one per click)."""
        return len(self.points) if self.mask_feedback and len(self.points) > 1 else 1


# ----------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------

def resolve_data_path(root: Path, user_path: Any, what: str = "image_path") -> Path:
    """Resolve a client-given path against ``root`` and refuse anything that does not stay inside it.

    Relative paths are taken relative to ``root``; absolute paths must already point inside it. ``..`` components
    are refused outright (400), paths that end up outside the root — directly or through a symlink — get 403, a
    missing file 404.
    """
    if not isinstance(user_path, str) or not user_path.strip():
        raise PathRejected(f"{what} must be a non-empty string", 400)
    if "\x00" in user_path:
        raise PathRejected(f"{what} contains a NUL byte", 400)
    if len(user_path) > 4096:
        raise PathRejected(f"{what} is longer than 4096 characters", 400)
    parts = set(PurePosixPath(user_path).parts) | set(PureWindowsPath(user_path).parts)
    if ".." in parts:
        raise PathRejected(f"{what} must not contain '..' components", 400)
    root_real = root.resolve()
    given = Path(user_path)
    candidate = given if given.is_absolute() else root_real / given
    if given.is_absolute() and not (_inside(Path(os.path.normpath(given)), root_real)
                                    or _inside(Path(os.path.normpath(given)), Path(os.path.abspath(root)))):
        raise PathRejected(f"{what} is outside the server's data root", 403)
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise PathRejected(f"{what} not found under the data root: {_show(user_path, 200)}", 404) from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permission problems, names too long
        raise PathRejected(f"{what} cannot be resolved: {exc.strerror or exc}", 400) from None
    if not _inside(real, root_real):
        raise PathRejected(f"{what} resolves outside the server's data root (symlink?)", 403)
    if not (real.is_file() or real.is_dir()):
        raise PathRejected(f"{what} is not a regular file", 400)
    return real


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


# ----------------------------------------------------------------------------------------------------------------
# Uploads and declared image sizes
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


def _check_declared(path: Path, cfg: ServerConfig, what: str = "image") -> None:
    """413 when the file's header declares more pixels (or volume voxels) than the server's limits."""
    size = declared_size(path)
    if size is None:
        return
    h, w, total = size
    if h >= DECLARED_HUGE:
        raise RequestRejected(f"{what} declares a size far above the limit of {cfg.max_pixels} pixels", 413)
    if h * w > cfg.max_pixels:
        raise RequestRejected(f"{what} is {w}x{h} pixels; the limit is {cfg.max_pixels} pixels", 413)
    if total > cfg.max_voxels:
        raise RequestRejected(f"{what} holds {total} pixels or voxels in all; the limit is {cfg.max_voxels}", 413)


# ----------------------------------------------------------------------------------------------------------------
# Bounded work: lanes with a queue limit, deadlines checked between segmenter passes, fair turns
# ----------------------------------------------------------------------------------------------------------------

class Busy(RequestRejected):
    def __init__(self, message: str = "server busy: the request queue is full, retry later") -> None:
        super().__init__(message, 503)


class Deadline:
    """The time a request must finish by; :meth:`check` raises :class:`RequestTimedOut` once it has passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def check(self) -> None:
        if self.expired():
            raise RequestTimedOut(self.seconds)


class FairLock:
    """A lock handed out in the order it was asked for (``threading.Lock`` lets a thread that just released it take
    it again at once, so a long replay would starve the others)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @contextmanager
    def hold(self) -> Iterator[None]:
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._queue[0] is not me:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return max(0, len(self._queue) - 1)


class Limiter:
    """At most ``concurrency`` jobs run (in a thread pool), at most ``max_queue`` wait; more are refused (503).

    ``run(fn, timeout)`` raises :class:`Busy` when the queue is full and ``TimeoutError`` when waiting plus running
    takes longer than ``timeout``; a job that timed out keeps its slot until its thread finishes, so the number of
    running threads never exceeds ``concurrency`` (the service's jobs check their :class:`Deadline` between segmenter
    passes, so they end soon after).
    """

    def __init__(self, concurrency: int, max_queue: int, name: str = "serve") -> None:
        self.concurrency = int(concurrency)
        self.max_queue = int(max_queue)
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"ibisagent-{name}")
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

        def _release(f: Any) -> None:
            self.running -= 1
            self.completed += 1
            sem.release()
            if not f.cancelled():
                f.exception()  # retrieved: a job that ended after its 504 must not log "never retrieved"

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


# ----------------------------------------------------------------------------------------------------------------
# ASGI middleware: body size limit, bearer token
# ----------------------------------------------------------------------------------------------------------------

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


def _bearer(scope: dict) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (None when there is none)."""
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return None


def token_ok(scope: dict, token: str | None) -> bool:
    """Whether the request carries ``token`` (always True when the server has none)."""
    if token is None:
        return True
    given = _bearer(scope)
    return bool(given) and hmac.compare_digest(given, token.encode())


class TokenMiddleware:
    """ASGI middleware: every path but ``open_paths`` needs ``Authorization: Bearer <token>`` (401 without one,
    403 with a wrong one), checked before the body is read."""

    def __init__(self, app: Any, token: str, open_paths: tuple[str, ...] = ("/health",)) -> None:
        self.app = app
        self.token = token
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths or token_ok(scope, self.token):
            await self.app(scope, receive, send)
            return
        if _bearer(scope) is None:
            await _send_json(send, 401, {"error": "this server needs a token: send 'Authorization: Bearer <token>'"},
                             [(b"www-authenticate", b"Bearer")])
        else:
            await _send_json(send, 403, {"error": "invalid token"})


async def _send_json(send: Callable, status: int, payload: dict,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------------------------
# The service (framework-free: the HTTP layer below only parses and serializes)
# ----------------------------------------------------------------------------------------------------------------

class SegmentService:
    """Loads images under the data root and runs the shared segmenter / agent on them.

    Every segmenter pass (one ``predict``, one episode step) takes a turn of a :class:`FairLock` and checks the
    request's :class:`Deadline` first, so heavy requests give way to normal ones after each pass and stop once they
    have timed out.
    """

    def __init__(self, config: ServerConfig, hub: SegmenterHub | None = None) -> None:
        self.config = config
        self.root = Path(config.data_root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"data root {config.data_root} is not a folder")
        self.hub = hub or SegmenterHub()
        self.images = ImageCache()
        self.turns = FairLock()
        self.passes = 0

    def segmenter(self) -> Segmenter:
        return self.hub.get(self.config.segmenter)

    @contextmanager
    def turn(self, image: np.ndarray, key: str, deadline: Deadline | None) -> Iterator[Segmenter]:
        """One segmenter pass on ``image``: wait for this request's turn, check its deadline, bind the image."""
        if deadline is not None:
            deadline.check()
        with self.turns.hold():
            if deadline is not None:
                deadline.check()
            with self.hub.bound(self.config.segmenter, image, key) as seg:
                self.passes += 1
                yield seg

    def load(self, image_path: Any, slice_index: int | None = None, window: Any = None) -> tuple[np.ndarray, str]:
        """(HxWx3 uint8 image, content key) of a path under the data root (its declared size checked first)."""
        path = resolve_data_path(self.root, image_path)
        _check_declared(path, self.config)
        try:
            loaded, key = self.images.load(path, slice_index, window)
        except ValueError as exc:  # ImageLoadError / WindowError: bad file or options
            raise RequestRejected(str(exc), 422) from exc
        _check_pixels(loaded.array.shape, self.config.max_pixels)
        return loaded.array, key

    def load_mask(self, mask_path: Any, shape: tuple[int, int], slice_index: int | None = None) -> np.ndarray:
        """A ground-truth mask under the data root (binary PNG/TIFF/NPY or a NIfTI label map slice)."""
        from ibisagent.io import load_mask

        path = resolve_data_path(self.root, mask_path, "mask_path")
        _check_declared(path, self.config, "mask")
        kwargs = {"slice_index": slice_index} if slice_index is not None else {}
        try:
            return load_mask(path, shape=shape, **kwargs)
        except ValueError as exc:
            raise RequestRejected(f"mask_path: {exc}", 422) from exc

    def parse_segment(self, req: dict[str, Any]) -> SegmentRequest:
        """Check a /segment request body (already JSON-decoded); 4xx with the reason for anything malformed."""
        pts, labels, box = _prompt_fields(req, self.config.max_clicks)
        dtype = req.get("dtype", "uint8")
        if dtype not in ("uint8", "bool", "float32"):
            raise RequestRejected("dtype must be one of uint8, bool, float32", 422)
        return SegmentRequest(image_path=req.get("image_path"), points=pts, labels=labels, box=box,
                              slice_index=_slice_field(req.get("slice_index")), window=_window_field(req.get("window")),
                              mask_feedback=_bool_field(req.get("mask_feedback"), "mask_feedback"), dtype=str(dtype))

    def segment(self, req: SegmentRequest | dict[str, Any],
                deadline: Deadline | None = None) -> tuple[np.ndarray, float, dict[str, float]]:
        """Mask, score and timings for a /segment request."""
        if isinstance(req, dict):
            req = self.parse_segment(req)
        t0 = time.perf_counter()
        image, key = self.load(req.image_path, req.slice_index, req.window)
        t1 = time.perf_counter()
        h, w = image.shape[:2]
        pts, labels, box = req.points, req.labels, req.box
        if not len(pts) and box is None:
            return np.zeros((h, w), bool), float("nan"), {"load_s": t1 - t0, "segment_s": 0.0}
        waited = 0.0
        try:
            if req.passes > 1:  # replay clicks one by one with the previous logits, as a session does
                logits = None
                for k in range(1, len(pts) + 1):
                    tw = time.perf_counter()
                    with self.turn(image, key, deadline) as seg:
                        waited += time.perf_counter() - tw
                        res = seg.predict(pts[:k], labels[:k], box, logits)
                    logits = res.logits
            else:
                tw = time.perf_counter()
                with self.turn(image, key, deadline) as seg:
                    waited += time.perf_counter() - tw
                    res = seg.predict(pts if len(pts) else None, labels if len(labels) else None, box)
        except RequestTimedOut:
            raise
        except SegmenterError as exc:
            raise RequestRejected(str(exc), 422) from exc
        t3 = time.perf_counter()
        score = float(res.score)
        return res.mask, score, {"load_s": t1 - t0, "wait_s": waited, "segment_s": t3 - t1 - waited}

    def make_policy(self, policy_name: str) -> Any:
        """A fresh instance of an enabled policy; 422 with the reason when it is not enabled or cannot start."""
        from ibisagent.policies.base import PolicyError, create_policy, list_policies

        if policy_name not in self.config.policies:
            known = "not enabled on this server" if policy_name in list_policies() else "unknown"
            raise RequestRejected(f"policy {policy_name!r} is {known}; this server runs: "
                                  f"{', '.join(self.config.policies)}", 422)
        try:
            return create_policy(policy_name)
        except KeyError as exc:
            raise RequestRejected(str(exc.args[0]), 422) from None
        except (PolicyError, SegmenterUnavailable, ImportError, OSError) as exc:
            raise RequestRejected(f"policy {policy_name!r} is not available on this server: {exc}", 422) from None

    def episode(self, image: np.ndarray, query: str, gt: np.ndarray | None, policy_name: str,
                max_steps: int, deadline: Deadline | None = None) -> dict[str, Any]:
        """Run the agent on ``image`` and return the episode trace as JSON-ready data (one turn per step)."""
        from ibisagent.policies.base import PolicyError

        if gt is not None and gt.shape != image.shape[:2]:
            raise RequestRejected(f"mask is {gt.shape[1]}x{gt.shape[0]} but the image is "
                                  f"{image.shape[1]}x{image.shape[0]}", 422)
        policy = self.make_policy(policy_name)
        if getattr(policy, "requires_gt", False) and gt is None:
            raise RequestRejected(f"policy {policy_name!r} needs a ground-truth mask: send one as 'mask'", 422)
        key = image_key(image)
        env = env_for(self.segmenter(), policy, max_steps=max_steps)
        try:
            ep = continue_episode(env, policy, image, query, gt, step_guard=lambda: self.turn(image, key, deadline))
        except RequestTimedOut:
            raise
        except (PolicyError, SegmenterError) as exc:
            raise RequestRejected(str(exc), 422) from exc
        out = ep.to_json()
        out["segmenter"] = self.config.segmenter
        out["policy"] = policy_name
        return out

    def health(self, details: bool = False) -> dict[str, Any]:
        """Liveness and versions; with ``details`` also the segmenter, data root and counters."""
        from ibisagent import __version__

        out: dict[str, Any] = {"status": "ok", "versions": {"ibisagent": __version__,
                                                            "python": platform.python_version()}}
        if details:
            out.update({"segmenter": self.config.segmenter, "data_root": str(self.root),
                        "segmenters_loaded": self.hub.loaded(), "set_image_calls": self.hub.set_image_calls,
                        "segmenter_passes": self.passes,
                        "image_cache": {"items": len(self.images), "hits": self.images.hits,
                                        "misses": self.images.misses}})
        return out


# ----------------------------------------------------------------------------------------------------------------
# HTTP layer
# ----------------------------------------------------------------------------------------------------------------

def _npy_bytes(mask: np.ndarray, dtype: str) -> bytes:
    if dtype not in ("uint8", "bool", "float32"):
        raise RequestRejected("dtype must be one of uint8, bool, float32", 422)
    buf = io.BytesIO()
    np.save(buf, as_bool(mask).astype(dtype), allow_pickle=False)
    return buf.getvalue()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; 400 with a one-line reason for anything else (bad syntax or encoding,
    NaN/Infinity, numbers over 4300 digits, nesting deeper than the parser allows)."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestRejected("request body is not valid JSON: it is nested too deeply", 400) from None
    except json.JSONDecodeError as exc:
        raise RequestRejected(f"request body is not valid JSON: {exc}", 400) from None
    except ValueError as exc:  # undecodable bytes, NaN/Infinity, integers over the int-string digit limit
        reason = "a number has too many digits" if "digits" in str(exc) else str(exc).split("\n")[0]
        raise RequestRejected(f"request body is not valid JSON: {reason}", 400) from None
    if not isinstance(body, dict):
        raise RequestRejected("request body must be a JSON object", 400)
    return body


def create_app(config: ServerConfig, hub: SegmenterHub | None = None, warm: bool = False) -> Any:
    """The FastAPI application. ``warm=True`` builds the segmenter now instead of on the first request."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    service = SegmentService(config, hub)
    normal = Limiter(config.max_concurrency, config.max_queue, "serve")
    heavy = Limiter(config.max_heavy, config.max_queue, "heavy")
    if warm:
        service.segmenter()
    app = FastAPI(title="ibisagent tool server", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.limiter = normal
    app.state.heavy_limiter = heavy
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.token is not None:  # outermost: refuse before the body is read
        app.add_middleware(TokenMiddleware, token=config.token)

    @app.exception_handler(RequestRejected)
    async def _rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"error": str(exc).split("\n")[0]}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405: same body shape
        return JSONResponse({"error": f"{exc.detail} (routes: POST /segment, POST /v1/segment, POST /v1/episode, "
                                      "GET /health)"}, status_code=exc.status_code, headers=exc.headers)

    async def _json_body(request: Request) -> dict[str, Any]:
        return parse_json_body(await request.body())

    async def _limited(job: Callable[[Deadline], Any], passes: int = 1) -> Any:
        """Run ``job(deadline)`` in the normal lane (one pass) or the heavy lane (more)."""
        lane = heavy if passes > 1 else normal
        deadline = Deadline(config.timeout_s)
        try:
            return await lane.run(lambda: job(deadline), config.timeout_s)
        except TimeoutError:
            raise RequestTimedOut(config.timeout_s) from None
        except SegmenterUnavailable as exc:
            raise RequestRejected(f"segmenter unavailable: {exc}", 503) from exc
        except KeyError as exc:  # unknown segmenter name at first use
            raise RequestRejected(str(exc.args[0]) if exc.args else "unknown name", 500) from exc

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        details = config.health_details and token_ok(request.scope, config.token)
        out = service.health(details)
        if details:
            out["limits"] = {**normal.stats(), "heavy": heavy.stats(), "waiting_for_segmenter": service.turns.waiting()}
            out["config"] = _config_json(config)
        return JSONResponse(out)

    @app.post("/segment")
    async def segment(request: Request) -> Response:
        req = service.parse_segment(await _json_body(request))
        mask, _, _ = await _limited(lambda d: service.segment(req, d), req.passes)
        return Response(_npy_bytes(mask, req.dtype), media_type="application/octet-stream")

    @app.post("/v1/segment")
    async def segment_json(request: Request) -> JSONResponse:
        req = service.parse_segment(await _json_body(request))
        t = time.perf_counter()
        mask, score, timings = await _limited(lambda d: service.segment(req, d), req.passes)
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
        query = _str_field(fields.get("query"), "query", config.max_query_chars)
        if query is None or not query.strip():
            raise RequestRejected("query (the text instruction, e.g. 'segment the tumor') is required", 422)
        policy = _str_field(fields.get("policy"), "policy", 64) or config.default_policy
        raw_steps = fields.get("max_steps")
        max_steps = config.max_episode_steps if raw_steps is None else _int_field(
            raw_steps, "max_steps", 1, config.max_episode_steps, form=image is not None)
        slice_index = _slice_field(fields.get("slice_index"), form=image is not None)
        window = _window_field(fields.get("window") or None if image is not None else fields.get("window"))
        mask_path = fields.get("mask_path")

        def job(deadline: Deadline) -> dict[str, Any]:
            img, mask = image, gt
            if img is None:  # JSON request: image (and mask) from under the data root
                img, _ = service.load(fields.get("image_path"), slice_index, window)
                if mask_path is not None:
                    mask = service.load_mask(mask_path, img.shape[:2], slice_index)
            return service.episode(img, query.strip(), mask, policy, max_steps, deadline)

        return JSONResponse(await _limited(job, passes=max_steps + 1))

    return app


async def _read_upload(request: Any, service: SegmentService) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Image (and optional mask) from a multipart upload, size/type checked, plus the other form fields."""
    from starlette.datastructures import UploadFile

    cfg = service.config
    try:
        form = await request.form(max_files=2, max_fields=16, max_part_size=cfg.max_upload_bytes)
    except Exception as exc:  # malformed multipart or a part over the limit
        raise RequestRejected(f"bad multipart upload: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                              400) from None
    fields = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
    up = form.get("image")
    if not isinstance(up, UploadFile):
        raise RequestRejected("multipart upload needs an 'image' file field", 422)
    slice_index = _slice_field(fields.get("slice_index"), form=True)  # a multi-frame DICOM upload needs one
    window = _window_field(fields.get("window") or None)
    image = _decode_upload(await up.read(), cfg, rgb=True, slice_index=slice_index, window=window)
    gt = None
    mup = form.get("mask")
    if isinstance(mup, UploadFile):
        gt = _decode_upload(await mup.read(), cfg, rgb=False, slice_index=slice_index)
    return image, gt, fields


def _decode_upload(data: bytes, cfg: ServerConfig, rgb: bool, slice_index: int | None = None,
                   window: Any = None) -> np.ndarray:
    what = "image" if rgb else "mask"
    suffix = sniff_upload(data, cfg.max_upload_bytes)
    from ibisagent.io import load_image, load_mask

    with tempfile.TemporaryDirectory(prefix="ibisagent-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        _check_declared(path, cfg, f"the {what} upload")
        try:
            if rgb:
                arr = load_image(path, slice_index=slice_index, window=window).array
            else:
                arr = load_mask(path, **({"slice_index": slice_index} if slice_index is not None else {}))
        except ValueError as exc:
            raise RequestRejected(f"cannot read the {what} upload: {exc}", 415) from None
    _check_pixels(arr.shape, cfg.max_pixels)
    return arr


def _config_json(config: ServerConfig) -> dict[str, Any]:
    d = asdict(config)
    d["data_root"] = str(config.data_root)
    d["token"] = "set" if config.token is not None else None
    return d


# ----------------------------------------------------------------------------------------------------------------
# Connection guards (uvicorn's h11 protocol has no request-read timeout and no connection cap)
# ----------------------------------------------------------------------------------------------------------------

def guarded_protocol(read_timeout_s: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with two guards: a request (headers and body) must arrive within ``read_timeout_s``
    of its first byte (or of the connection's opening), else the connection is closed (408 when the headers were
    in); and a connection beyond ``max_connections`` open ones is answered 503 and closed at once."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy_body = json.dumps({"error": f"too many open connections (limit {max_connections}), retry later"}).encode()
    busy = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(busy_body)).encode() + b"\r\n\r\n" + busy_body)
    late_body = json.dumps({"error": f"request not received within {read_timeout_s:g} s"}).encode()

    class GuardedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                self._arm()  # a request is on its way: it must be complete in time
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                return
            if self.conn.our_state is h11.SEND_RESPONSE and self.cycle is not None and not self.cycle.response_started:
                try:
                    out = self.conn.send(h11.Response(status_code=408, headers=[
                        (b"content-type", b"application/json"), (b"content-length", str(len(late_body)).encode()),
                        (b"connection", b"close")]))
                    out = (out or b"") + (self.conn.send(h11.Data(data=late_body)) or b"")
                    out += self.conn.send(h11.EndOfMessage()) or b""
                    self.transport.write(out)
                except h11.LocalProtocolError:
                    pass
            self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app: Any, config: ServerConfig, host: str = "127.0.0.1", port: int = 8765,
                   log_level: str = "warning") -> Any:
    """The ``uvicorn.Config`` that ``ibisagent serve`` runs: the guarded protocol, the keep-alive timeout."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          http=guarded_protocol(config.read_timeout_s, config.max_connections),
                          timeout_keep_alive=config.keep_alive_s)
