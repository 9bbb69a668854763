"""The promptable-segmenter interface (SAM-predictor style) and the backend registry.

A segmenter caches one image (``set_image``), then answers ``predict`` calls that carry ALL prompts so far:
clicks in pixel coordinates (x = column, y = row) with labels 1 (positive) / 0 (negative), an optional box
(x1, y1, x2, y2 pixels, inclusive) and the previous call's low-resolution logits as mask feedback.

Two more calls serve batched training (lockstep rollouts over many images), like SAM's ``predict_torch`` twin:
:meth:`Segmenter.embedding` gives an image's embedding (through the backend's caches) for backends that have one
(``encoder_id`` set), and :meth:`Segmenter.predict_batch` decodes many prompt sets (:class:`PromptSet`) at once, each
on its own image or embedding. The base class answers ``predict_batch`` one item at a time through ``set_image`` +
``predict``; a backend overrides it to decode stacked embeddings in one pass.

One segmenter may serve several users (sessions, environments, the reward scorer, the app/server hub), each with its
own image. The segmenter holds ONE image at a time and knows which (``holds``: this very array object;
``image_key``: the :func:`image_key` of its content), so each user makes sure it is theirs before predicting:
``ensure_image(image)`` re-sets it only when the segmenter holds another one. Re-setting is cheap for the LiteMedSAM
backends, which keep an embedding cache keyed by image content.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.options import check_options, keyword_options

__all__ = [
    "CLICK_WEIGHTS",
    "PromptSet",
    "SegResult",
    "Segmenter",
    "SegmenterError",
    "SegmenterUnavailable",
    "Timings",
    "check_prompts",
    "create_segmenter",
    "default_segmenter",
    "image_key",
    "list_segmenters",
    "register_segmenter",
    "segmenter_options",
]


#: the shipped click-tuned LiteMedSAM weights (prompt encoder + mask decoder; ``ibisagent train-segmenter`` writes it)
CLICK_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "litemedsam_click.safetensors"


def default_segmenter() -> str:
    """The segmenter every entry point uses when none is named: ``litemedsam-click`` when its fine-tuned weights
    are installed, else the original box-trained ``litemedsam``."""
    return "litemedsam-click" if CLICK_WEIGHTS.is_file() else "litemedsam"


def image_key(image: np.ndarray) -> str:
    """Content key of an image array (sha1 of shape, dtype and bytes): which image a segmenter holds."""
    arr = np.ascontiguousarray(image)
    h = hashlib.sha1(f"{arr.shape}{arr.dtype}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


#: smallest image side a segmenter accepts (pixels)
MIN_IMAGE_SIDE = 2


class SegmenterError(ValueError):
    """Bad input to a segmenter (no image set, prompts off the image, wrong shapes)."""


class SegmenterUnavailable(RuntimeError):
    """A backend that cannot run here (missing package, checkpoint or weights). The message says what to install."""


@dataclass(frozen=True)
class SegResult:
    """One prediction. ``mask`` is boolean at the original image size; ``logits`` are the backend's low-res logits
    (feed them back as ``mask_input``); ``score`` is the backend's quality estimate (predicted IoU) or NaN."""

    mask: np.ndarray
    logits: np.ndarray
    score: float


@dataclass(frozen=True)
class PromptSet:
    """One item of :meth:`Segmenter.predict_batch`: all prompts so far on one image (as in ``predict``).

    ``image``: the HxWx3 uint8 image (the per-item fallback sets it); ``embedding``: its :meth:`Segmenter.embedding`
    (any array-like, e.g. a float16 bank row; backends that decode in batches use it instead of the image);
    ``shape``: (H, W) of the image, the size of the returned mask."""

    shape: tuple[int, int]
    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    image: np.ndarray | None = None
    embedding: Any = None


@dataclass
class Timings:
    """Seconds spent in ``set_image`` (image encoder) and in prompt decoding, and how many calls of each.

    ``encoder_calls`` counts ``set_image`` calls, embedding-cache hits included; backends with a cache count the hits
    in ``cache_hits`` (real encoder runs = ``encoder_calls - cache_hits``)."""

    encoder_s: float = 0.0
    decoder_s: float = 0.0
    encoder_calls: int = 0
    decoder_calls: int = 0
    cache_hits: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def check_prompts(
    shape: tuple[int, int],
    points: np.ndarray | None,
    labels: np.ndarray | None,
    box: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate and normalize prompts for an image of ``shape`` (H, W). Returns float32 (N, 2) points,
    int64 (N,) labels and a float32 (4,) box or None. Raises :class:`SegmenterError` on bad input."""
    h, w = shape
    pts = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, dtype=np.float32).reshape(-1, 2)
    raw_lab = np.zeros((0,), np.int64) if labels is None else np.asarray(labels).reshape(-1)
    if raw_lab.dtype.kind not in "biuf" or (len(raw_lab) and not np.isin(raw_lab, (0, 1)).all()):
        shown = sorted({str(v) for v in raw_lab.tolist()})[:10]
        raise SegmenterError(f"labels must be 1 (positive) or 0 (negative), got {', '.join(shown)}")
    lab = raw_lab.astype(np.int64)
    if len(pts) != len(lab):
        raise SegmenterError(f"{len(pts)} points but {len(lab)} labels")
    if len(pts) and not np.isfinite(pts).all():
        bad = pts[~np.isfinite(pts).all(axis=1)]
        raise SegmenterError(f"click coordinates must be finite numbers, got {bad.tolist()} (NaN or infinity)")
    if len(pts) and (
        (pts[:, 0] < 0).any() or (pts[:, 1] < 0).any() or (pts[:, 0] > w - 1).any() or (pts[:, 1] > h - 1).any()
    ):
        bad = pts[(pts[:, 0] < 0) | (pts[:, 1] < 0) | (pts[:, 0] > w - 1) | (pts[:, 1] > h - 1)]
        raise SegmenterError(f"click(s) {bad.tolist()} lie outside the {w}x{h} image (x in [0,{w-1}], y in [0,{h-1}])")
    bx = None
    if box is not None:
        bx = np.asarray(box, dtype=np.float32).reshape(-1)
        if bx.shape != (4,) or not np.isfinite(bx).all():
            raise SegmenterError(f"box must be 4 finite numbers (x1, y1, x2, y2), got {np.asarray(box).tolist()!r}")
        x1, y1, x2, y2 = bx.tolist()
        if not (0 <= x1 < x2 <= w - 1 + 1e-6 and 0 <= y1 < y2 <= h - 1 + 1e-6):
            raise SegmenterError(f"box {bx.tolist()} is not a valid box inside the {w}x{h} image")
    if not len(pts) and bx is None:
        raise SegmenterError("predict needs at least one click or a box")
    return pts, lab, bx


class Segmenter:
    """Base class for backends. Subclasses implement ``_encode`` and ``_decode``; this class does the caching
    contract, input checks and timings. Override ``name`` and ``capabilities``."""

    name: str = "base"
    #: prompt types the backend supports (data, like nnInteractive's ``supported_interactions``)
    capabilities: frozenset[str] = frozenset({"point", "box", "mask"})
    #: identity of the image encoder + preprocessing in embedding-cache keys; None = no reusable image embedding
    encoder_id: str | None = None

    def __init__(self) -> None:
        self._shape: tuple[int, int] | None = None
        self._features: Any = None
        self._held: np.ndarray | None = None  # the array object last passed to set_image
        self.timings = Timings()
        #: how many times the image encoder actually ran (cache hits not counted)
        self.encoder_runs = 0
        self._image_key: str | None = None

    # --- public API -------------------------------------------------------------------------------------------
    @property
    def is_image_set(self) -> bool:
        return self._shape is not None

    @property
    def image_shape(self) -> tuple[int, int]:
        if self._shape is None:
            raise SegmenterError("no image set: call set_image(image) first")
        return self._shape

    @property
    def image_key(self) -> str | None:
        """:func:`image_key` of the image set now (None without one)."""
        return self._image_key if self._shape is not None else None

    def holds(self, image: np.ndarray) -> bool:
        """True when the image set last is this very array object (and is still set)."""
        return self._shape is not None and self._held is image

    def set_image(self, image: np.ndarray) -> None:
        """Encode an HxWx3 uint8 RGB image (or HxW grayscale) once; later ``predict`` calls reuse it."""
        self._set_image(image, None)

    def ensure_image(self, image: np.ndarray, key: str | None = None) -> bool:
        """``set_image(image)`` unless this segmenter holds that image already: this very array object
        (:meth:`holds`, no hashing), or the same content (by :func:`image_key`, or ``key`` when the caller has
        computed it). Returns whether the image was set."""
        if self.holds(image):
            return False
        key = key or image_key(image)
        if self._shape is not None and self._image_key == key:
            return False
        self._set_image(image, key)
        return True

    def _set_image(self, image: np.ndarray, key: str | None) -> None:
        src = image
        img = np.asarray(image)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] not in (3, 4):
            raise SegmenterError(f"expected an HxWx3 (RGB) or HxW (gray) image, got an array of shape {img.shape}")
        if img.shape[0] < MIN_IMAGE_SIDE or img.shape[1] < MIN_IMAGE_SIDE:
            raise SegmenterError(f"the image is {img.shape[1]}x{img.shape[0]} pixels; the minimum size is "
                                 f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
        img = img[..., :3]
        if img.dtype != np.uint8:
            raise SegmenterError(f"expected uint8 RGB pixels, got {img.dtype}; use ibisagent.io to load/normalize")
        self.reset_image()  # a failed encode leaves no image set rather than the previous one
        t = time.perf_counter()
        self._features = self._encode(np.ascontiguousarray(img))
        self.timings.encoder_s += time.perf_counter() - t
        self.timings.encoder_calls += 1
        self._shape = (int(img.shape[0]), int(img.shape[1]))
        self._held = src
        self._image_key = key or image_key(np.asarray(image))

    def reset_image(self) -> None:
        self._shape = None
        self._features = None
        self._held = None
        self._image_key = None

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
    ) -> SegResult:
        """Predict a mask from all prompts so far. ``points`` (N, 2) pixel (x, y); ``labels`` (N,) 1/0;
        ``box`` (4,) pixel x1, y1, x2, y2; ``mask_input`` the ``logits`` of a previous result."""
        shape = self.image_shape
        pts, lab, bx = check_prompts(shape, points, labels, box)
        if bx is not None and "box" not in self.capabilities:
            raise SegmenterError(f"segmenter {self.name!r} does not support box prompts")
        t = time.perf_counter()
        result = self._decode(pts, lab, bx, mask_input)
        self.timings.decoder_s += time.perf_counter() - t
        self.timings.decoder_calls += 1
        if result.mask.shape != shape:
            raise RuntimeError(f"backend {self.name} returned a {result.mask.shape} mask for a {shape} image")
        return result

    # --- embeddings and batches (training) ---------------------------------------------------------------------
    def embedding_key(self, image: np.ndarray) -> str | None:
        """The cache key of ``image``'s embedding, or None for a backend without one (``encoder_id`` None)."""
        if self.encoder_id is None:
            return None
        from ibisagent.segmenters.embedding_cache import embedding_key

        return embedding_key(np.ascontiguousarray(image), self.encoder_id)

    def embedding(self, image: np.ndarray) -> np.ndarray | None:
        """``image``'s embedding as the decoder takes it, from the backend's caches or computed (and cached);
        None for a backend without a reusable embedding. Does not change the image set with ``set_image``."""
        return None

    def embedding_cached(self, image: np.ndarray) -> bool:
        """Whether :meth:`embedding` would answer without running the encoder (True without an embedding)."""
        return True

    def predict_batch(self, items: Sequence[PromptSet]) -> list[SegResult]:
        """One :class:`SegResult` per prompt set, in order. This default sets each item's image and calls
        ``predict`` (the image set before is replaced); backends override it to decode embeddings in one pass."""
        out = []
        for it in items:
            if it.image is None:
                raise SegmenterError(f"segmenter {self.name!r} decodes batch items from their image: pass image=")
            self.set_image(it.image)
            out.append(self.predict(it.points, it.labels, it.box, it.mask_input))
        return out

    # --- backend hooks ----------------------------------------------------------------------------------------
    def _encode(self, image: np.ndarray) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(
        self, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None, mask_input: np.ndarray | None
    ) -> SegResult:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# Registry (timm/SAM style): a name -> factory dict
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    factory: Callable[..., Segmenter]
    description: str
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, _Entry] = {}


def register_segmenter(name: str, description: str = "", tags: tuple[str, ...] = ()) -> Callable:
    """Decorator: register a factory ``(**cfg) -> Segmenter`` under ``name``."""

    def deco(factory: Callable[..., Segmenter]) -> Callable[..., Segmenter]:
        _REGISTRY[name] = _Entry(factory, description or (factory.__doc__ or "").strip().split("\n")[0], tags)
        return factory

    return deco


def list_segmenters() -> dict[str, str]:
    """Registered backend names -> one-line descriptions."""
    _load_builtin()
    return {k: v.description for k, v in sorted(_REGISTRY.items())}


def _factory(name: str) -> Callable[..., Any]:
    """The registered factory of ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown segmenter {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].factory


def create_segmenter(name: str, **cfg: Any) -> Segmenter:
    """Build a registered backend by name. Unknown names raise ``KeyError`` listing the known ones."""
    factory = _factory(name)
    check_options(f"segmenter {name!r}", factory, cfg)  # UnknownOptionError (a TypeError) listing the valid ones
    return factory(**cfg)


def segmenter_options(name: str) -> tuple[str, ...] | None:
    """The keyword options ``create_segmenter(name, ...)`` accepts (None when it takes any)."""
    return keyword_options(_factory(name))


#: modules that register the built-in backends when imported; loaded by name because they are the registry's
#: plug-ins (they import this module, this module does not import them). Heavy imports happen inside factories.
BUILTIN_BACKENDS = ("ibisagent.segmenters.fake", "ibisagent.segmenters.litemedsam", "ibisagent.segmenters.sam2")


def _load_builtin() -> None:
    for module in BUILTIN_BACKENDS:
        importlib.import_module(module)
