"""Run LiteMedSAM's prompt encoder + mask decoder from one exported ONNX graph: OpenVINO or ONNX Runtime.

The graph follows the interface of SAM's official ONNX export (one graph for prompt encoding and mask decoding, a
dynamic number of points), written here as :class:`PromptMaskDecoder` over the PyTorch sub-modules:

* inputs: ``image_embeddings`` (1, 256, 64, 64); ``point_coords`` (1, N, 2) float32 in the 256x256 model frame;
  ``point_labels`` (1, N) float32: 1 positive click, 0 negative click, -1 padding point, 2 / 3 box top-left /
  bottom-right corner; ``mask_input`` (1, 1, 256, 256) logits; ``has_mask_input`` (1,) 1.0 or 0.0;
* outputs: ``low_res_masks`` (1, M, 256, 256) logits and ``iou_predictions`` (1, M); M = 1 (single-mask token, the
  default) or 3 (multimask variant, a separate file).

:func:`sam_prompt_arrays` turns :func:`~ibisagent.segmenters.litemedsam.decode_batch`'s prompts into those points
the way SAM's prompt encoder orders them (clicks, then SAM's padding point when there is no box, else the two box
corners), so the exported graph reproduces ``decode_batch`` (max |logit diff| ~1e-4, see
``tests/test_onnx_decoder.py``).

Export: TorchScript exporter, opset 17, cached on disk (same directory as the encoder,
:func:`~ibisagent.segmenters.onnx_encoder.default_onnx_dir`) under
``decoder-v<graph>-<sha256 of prompt encoder + mask decoder weights[:16]>-op<opset>-torch<ver>[-mm].onnx``, written
atomically. The weights are hashed (not the path) because the click-tuned weights change when they are retrained;
a runner also notices in-place changes of the PyTorch weights (tensor version counters) and re-exports.

Decoder choice for :class:`~ibisagent.segmenters.litemedsam.LiteMedSAMSegmenter` (``decoder=`` option): ``"torch"``
(:func:`decode_batch`), ``"onnx"`` (ONNX Runtime), ``"openvino"`` or ``"auto"`` (ONNX Runtime, else OpenVINO,
else PyTorch with one warning). Speed: ``benchmarks/bench_decoder.py``.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ibisagent.segmenters.base import SegmenterError, SegmenterUnavailable
from ibisagent.segmenters.onnx_encoder import (
    DEFAULT_OPSET,
    OPENVINO_PIP_HINT,
    PIP_HINT,
    _atomic_target,
    announce_preparing,
    build_with_fallback,
    compile_openvino,
    default_onnx_dir,
    default_threads,
    make_ort_session,
    onnxruntime_available,
    openvino_available,
    weights_sha256,
)

__all__ = [
    "AUTO_ORDER",
    "DECODER_CHOICES",
    "GRAPH_VERSION",
    "OnnxDecoder",
    "OpenVinoDecoder",
    "PromptMaskDecoder",
    "decoder_model_path",
    "decoder_runner",
    "decoder_runner_from_file",
    "decoder_weights_sha256",
    "ensure_decoder_model",
    "export_decoder",
    "sam_prompt_arrays",
]

log = logging.getLogger(__name__)

DECODER_CHOICES = ("auto", "torch", "onnx", "openvino")
#: what ``decoder="auto"`` tries, in order: ONNX Runtime first (as fast as OpenVINO on this graph and with less CPU
#: time per call, see benchmarks/bench_decoder.py and docs/benchmarks.md), then OpenVINO
AUTO_ORDER = ("onnx", "openvino")
#: bump when :class:`PromptMaskDecoder` changes (it is part of the cache file name)
GRAPH_VERSION = 1
INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
OUTPUT_NAMES = ("low_res_masks", "iou_predictions")

_LOCK = threading.RLock()
#: (id(prompt_encoder), id(mask_decoder), kind, multimask) -> (prompt_encoder, mask_decoder, weight versions, runner)
_RUNNERS: dict[tuple[int, int, str, bool], tuple[nn.Module, nn.Module, tuple | None, _ExportedDecoder | None]] = {}
#: (resolved .onnx path, kind, threads) -> runner or None (runners of already exported files, no module)
_FILE_RUNNERS: dict[tuple[str, str, int], _ExportedDecoder | None] = {}
_WARNED: set[str] = set()


# ----------------------------------------------------------------------------------------------------------------
# The exported graph
# ----------------------------------------------------------------------------------------------------------------


class PromptMaskDecoder(nn.Module):
    """SAM prompt encoder + mask decoder as one batch-1 graph over explicit point arrays (see module docstring).

    Points are embedded like ``PromptEncoder._embed_points`` / ``_embed_boxes`` (random-Fourier positional encoding
    of ``coords + 0.5`` normalized by the 256x256 input size, plus ``point_embeddings[label]`` for labels 0..3; a
    label -1 point is ``not_a_point_embed`` alone), with masks-by-multiplication instead of boolean indexing so the
    number of points stays dynamic. The dense prompt is ``mask_downscaling(mask_input)`` when ``has_mask_input`` is 1,
    else ``no_mask_embed``. Only the mask token(s) that are returned go through the hypernetwork MLPs.
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, multimask: bool = False) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.multimask = bool(multimask)
        n_out = int(mask_decoder.num_mask_tokens)
        self.mask_indices = list(range(1, n_out)) if self.multimask else [0]
        h, w = prompt_encoder.input_image_size
        self.register_buffer("_coord_scale", torch.tensor([float(w), float(h)]), persistent=False)

    def embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = (point_coords + 0.5) / self._coord_scale
        emb = pe.pe_layer._pe_encoding(coords.float())  # (1, N, C)
        labels = point_labels.unsqueeze(-1)
        emb = emb * (labels != -1).to(emb.dtype)
        emb = emb + pe.not_a_point_embed.weight * (labels == -1).to(emb.dtype)
        for k in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[k].weight * (labels == k).to(emb.dtype)
        return emb

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        has = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has * pe.mask_downscaling(mask_input) + (1.0 - has) * no_mask

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        md = self.mask_decoder
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_mask(mask_input, has_mask_input)
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        src = image_embeddings + dense
        pos_src = self.prompt_encoder.get_dense_pe()
        b, c, h, w = src.shape
        hs, src = md.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        upscaled = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack([md.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in self.mask_indices], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou_pred = md.iou_prediction_head(iou_token_out)
        lo, hi = self.mask_indices[0], self.mask_indices[-1] + 1
        return masks, iou_pred[:, lo:hi]


def sam_prompt_arrays(
    coords: np.ndarray | torch.Tensor | None,
    labels: np.ndarray | torch.Tensor | None,
    box: np.ndarray | torch.Tensor | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``decode_batch``-style prompts of ONE image -> the graph's ``point_coords`` (1, N, 2) and ``point_labels``
    (1, N) float32: the clicks, then SAM's padding point (0, 0) label -1 when there is no box, else the box corners
    (x1, y1) label 2 and (x2, y2) label 3. ``coords`` (1, n, 2) or (n, 2) in the 256-frame, ``labels`` (1, n) or
    (n,) in {1, 0, -1}, ``box`` (1, 4) or (4,) in the 256-frame. Raises :class:`SegmenterError` when there is no point and no box
    (the graph needs N >= 1; ``decode_batch`` handles that case)."""
    pts = np.zeros((0, 2), np.float32)
    lab = np.zeros((0,), np.float32)
    if coords is not None:
        c = coords.detach().cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
        c = c.astype(np.float32).reshape(-1, 2)
        if len(c):
            if labels is None:
                raise SegmenterError("point coordinates without labels")
            lv = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
            lv = lv.astype(np.float32).reshape(-1)
            if len(lv) != len(c):
                raise SegmenterError(f"{len(c)} points but {len(lv)} labels")
            if not np.isin(lv, (-1.0, 0.0, 1.0)).all():  # decode_batch embeds only these for clicks
                raise SegmenterError(f"click labels must be 1, 0 or -1, got {sorted(set(lv.tolist()))}")
            pts, lab = c, lv
    if box is not None:
        bx = box.detach().cpu().numpy() if isinstance(box, torch.Tensor) else np.asarray(box)
        bx = bx.astype(np.float32).reshape(-1)
        if bx.shape != (4,):
            raise SegmenterError(f"one box (x1, y1, x2, y2) per image, got {bx.shape}")
        pts = np.concatenate([pts, bx.reshape(2, 2)], axis=0)
        lab = np.concatenate([lab, np.array([2.0, 3.0], np.float32)])
    elif len(pts):
        pts = np.concatenate([pts, np.zeros((1, 2), np.float32)], axis=0)
        lab = np.concatenate([lab, np.array([-1.0], np.float32)])
    else:
        raise SegmenterError("the exported decoder needs at least one point or a box")
    return np.ascontiguousarray(pts[None]), np.ascontiguousarray(lab[None])


# ----------------------------------------------------------------------------------------------------------------
# Export + cache
# ----------------------------------------------------------------------------------------------------------------


def decoder_weights_sha256(prompt_encoder: nn.Module, mask_decoder: nn.Module) -> str:
    """sha256 of the prompt encoder + mask decoder weights (``prompt_encoder.*`` / ``mask_decoder.*`` names, like
    the click weights file)."""
    return weights_sha256(nn.ModuleDict({"prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder}))


def decoder_model_path(
    digest: str, multimask: bool = False, opset: int = DEFAULT_OPSET, cache_dir: str | Path | None = None
) -> Path:
    """Cache file: ``decoder-v<graph>-<sha[:16]>-op<opset>-torch<ver>[-mm].onnx``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_onnx_dir()
    torch_ver = torch.__version__.split("+")[0]
    suffix = "-mm" if multimask else ""
    return root / f"decoder-v{GRAPH_VERSION}-{digest[:16]}-op{opset}-torch{torch_ver}{suffix}.onnx"


def _example_inputs(prompt_encoder: nn.Module, n_points: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    h, w = prompt_encoder.image_embedding_size
    mh, mw = prompt_encoder.mask_input_size
    size = float(prompt_encoder.input_image_size[0])
    return (
        torch.randn(1, prompt_encoder.embed_dim, h, w, generator=g),
        torch.rand(1, n_points, 2, generator=g) * size,
        torch.tensor([[1.0] * (n_points - 1) + [-1.0]]),
        torch.randn(1, 1, mh, mw, generator=g),
        torch.tensor([1.0]),
    )


def export_decoder(
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    path: str | Path,
    multimask: bool = False,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export :class:`PromptMaskDecoder` (dynamic number of points) to ``path`` atomically. Needs ``onnx``."""
    if importlib.util.find_spec("onnx") is None:
        raise SegmenterUnavailable(f"exporting the decoder to ONNX needs the 'onnx' package: {PIP_HINT}")
    path = Path(path)
    wrapper = PromptMaskDecoder(prompt_encoder, mask_decoder, multimask)
    modes = (prompt_encoder.training, mask_decoder.training)
    wrapper.eval()
    try:
        with _atomic_target(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                _example_inputs(prompt_encoder),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                do_constant_folding=True,
                dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
            )
    finally:
        prompt_encoder.train(modes[0])
        mask_decoder.train(modes[1])
    return path


def ensure_decoder_model(
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    multimask: bool = False,
    cache_dir: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """The cached ``.onnx`` file for these weights (exported on first use)."""
    path = decoder_model_path(decoder_weights_sha256(prompt_encoder, mask_decoder), multimask, opset, cache_dir)
    with _LOCK:
        if not path.is_file():
            announce_preparing()
            log.info("exporting the prompt encoder + mask decoder to %s (once)", path)
            export_decoder(prompt_encoder, mask_decoder, path, multimask, opset)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------------------------


class _ExportedDecoder:
    """Common part: find/export the file, build the graph's inputs from ``decode_batch``-style prompts."""

    runtime = "?"

    def __init__(
        self,
        prompt_encoder: nn.Module | None,
        mask_decoder: nn.Module | None,
        onnx_path: str | Path | None,
        multimask: bool,
        cache_dir: str | Path | None,
        threads: int,
        opset: int,
    ) -> None:
        if int(threads) < 1:
            raise SegmenterError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self.multimask = bool(multimask)
        if onnx_path is not None:
            path = Path(onnx_path)
            if not path.is_file():
                raise SegmenterUnavailable(f"ONNX model not found: {path}")
        elif prompt_encoder is None or mask_decoder is None:
            raise SegmenterError(f"{type(self).__name__} needs the prompt encoder and mask decoder or an onnx_path")
        else:
            path = ensure_decoder_model(prompt_encoder, mask_decoder, self.multimask, cache_dir, opset)
        self.path = path
        self.mask_size = (256, 256) if prompt_encoder is None else tuple(prompt_encoder.mask_input_size)
        self._no_mask = np.zeros((1, 1, *self.mask_size), np.float32)
        self._has = np.ones((1,), np.float32)
        self._has_not = np.zeros((1,), np.float32)

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_numpy(
        self,
        image_embeddings: np.ndarray,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One image: the graph's inputs as arrays (``mask_input`` None = no mask) -> (low-res logits, IoU)."""
        emb = np.ascontiguousarray(image_embeddings, dtype=np.float32)
        if emb.ndim != 4 or emb.shape[0] != 1:
            raise SegmenterError(f"image_embeddings must be (1, C, h, w), got {emb.shape}")
        feeds = {
            "image_embeddings": emb,
            "point_coords": np.ascontiguousarray(point_coords, dtype=np.float32),
            "point_labels": np.ascontiguousarray(point_labels, dtype=np.float32),
            "mask_input": self._no_mask if mask_input is None else np.ascontiguousarray(mask_input, dtype=np.float32),
            "has_mask_input": self._has_not if mask_input is None else self._has,
        }
        return self._run(feeds)

    def __call__(
        self,
        embeddings: torch.Tensor,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same arguments and results as :func:`~ibisagent.segmenters.litemedsam.decode_batch` (minus ``parts``;
        ``multimask`` is fixed by the exported file). Batches run image by image; every image needs a point or a box."""
        if mask_input is not None and tuple(mask_input.shape[-2:]) != self.mask_size:
            mask_input = F.interpolate(mask_input, size=self.mask_size, mode="bilinear", align_corners=False)
        emb = embeddings.detach().cpu().numpy()
        lows, ious = [], []
        for i in range(emb.shape[0]):
            pc, pl = sam_prompt_arrays(
                coords[i] if coords is not None and coords.shape[1] > 0 else None,
                labels[i] if labels is not None and coords is not None and coords.shape[1] > 0 else None,
                boxes[i] if boxes is not None else None,
            )
            mi = mask_input[i : i + 1].detach().cpu().numpy() if mask_input is not None else None
            low, iou = self.run_numpy(emb[i : i + 1], pc, pl, mi)
            lows.append(low)
            ious.append(iou)
        if len(lows) == 1:
            return torch.from_numpy(lows[0]), torch.from_numpy(ious[0])
        return torch.from_numpy(np.concatenate(lows)), torch.from_numpy(np.concatenate(ious))


class OnnxDecoder(_ExportedDecoder):
    """The exported prompt encoder + mask decoder in an ONNX Runtime CPU session (``threads`` intra-op threads)."""

    runtime = "onnxruntime"

    def __init__(
        self,
        prompt_encoder: nn.Module | None = None,
        mask_decoder: nn.Module | None = None,
        *,
        onnx_path: str | Path | None = None,
        multimask: bool = False,
        cache_dir: str | Path | None = None,
        threads: int = 2,
        opset: int = DEFAULT_OPSET,
    ) -> None:
        if not onnxruntime_available():
            raise SegmenterUnavailable(f"the ONNX decoder needs onnxruntime: {PIP_HINT}")
        super().__init__(prompt_encoder, mask_decoder, onnx_path, multimask, cache_dir, threads, opset)
        self.session = make_ort_session(self.path, self.threads)

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        low, iou = self.session.run(list(OUTPUT_NAMES), feeds)
        return low, iou


class OpenVinoDecoder(_ExportedDecoder):
    """The exported prompt encoder + mask decoder compiled by OpenVINO for the CPU (fp32, latency hint, one stream,
    ``threads`` threads; dynamic number of points)."""

    runtime = "openvino"

    def __init__(
        self,
        prompt_encoder: nn.Module | None = None,
        mask_decoder: nn.Module | None = None,
        *,
        onnx_path: str | Path | None = None,
        multimask: bool = False,
        cache_dir: str | Path | None = None,
        threads: int = 2,
        opset: int = DEFAULT_OPSET,
    ) -> None:
        if not openvino_available():
            raise SegmenterUnavailable(f"the OpenVINO decoder needs openvino: {OPENVINO_PIP_HINT}")
        super().__init__(prompt_encoder, mask_decoder, onnx_path, multimask, cache_dir, threads, opset)
        self.compiled = compile_openvino(self.path, self.threads)
        self._request = self.compiled.create_infer_request()
        self._req_lock = threading.Lock()  # an infer request is not thread-safe

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        with self._req_lock:
            out = self._request.infer(feeds)
            low = np.array(out[self.compiled.output(OUTPUT_NAMES[0])], dtype=np.float32, copy=True)
            iou = np.array(out[self.compiled.output(OUTPUT_NAMES[1])], dtype=np.float32, copy=True)
        return low, iou


def _weight_versions(*modules: nn.Module) -> tuple | None:
    """Identity + in-place version counter of every parameter/buffer: changes when the weights are trained or
    reloaded in place. None when unavailable (inference tensors have no version counter)."""
    try:
        return tuple((id(t), t._version) for m in modules for t in itertools.chain(m.parameters(), m.buffers()))
    except RuntimeError:
        return None


def _build_runner(kind: str, parts: Any, multimask: bool, threads: int) -> _ExportedDecoder:
    cls = OpenVinoDecoder if kind == "openvino" else OnnxDecoder
    return cls(parts.prompt_encoder, parts.mask_decoder, multimask=multimask, threads=threads)


def decoder_runner(
    parts: Any, kind: str = "auto", multimask: bool = False, threads: int | None = None
) -> _ExportedDecoder | None:
    """The exported prompt encoder + mask decoder runner for ``parts`` (a ``LiteMedSAMParts``) under the
    ``decoder=`` choice ``kind``, cached per (modules, kind, multimask) and rebuilt when the modules' weights change
    in place; ``None`` means "use PyTorch (decode_batch)". ``"auto"`` tries OpenVINO then ONNX Runtime and falls back
    to PyTorch (warning once); an explicit ``"onnx"`` / ``"openvino"`` raises :class:`SegmenterUnavailable`.
    ``threads`` defaults to :func:`~ibisagent.segmenters.onnx_encoder.default_threads`."""
    if kind not in DECODER_CHOICES:
        raise SegmenterError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODER_CHOICES)}")
    if kind == "torch":
        return None
    threads = default_threads() if threads is None else threads
    pe, md = parts.prompt_encoder, parts.mask_decoder
    key = (id(pe), id(md), kind, bool(multimask))
    versions = _weight_versions(pe, md)
    with _LOCK:
        hit = _RUNNERS.get(key)
        if hit is not None and hit[0] is pe and hit[1] is md and hit[2] == versions:
            return hit[3]
        runner = build_with_fallback(kind, AUTO_ORDER, lambda k: _build_runner(k, parts, multimask, threads),
                                     "decoder", _WARNED)
        _RUNNERS[key] = (pe, md, versions, runner)
        return runner


def decoder_runner_from_file(
    path: str | Path, kind: str = "auto", multimask: bool = False, threads: int | None = None
) -> _ExportedDecoder | None:
    """As :func:`decoder_runner`, for a graph already exported to ``path`` (the file :func:`ensure_decoder_model`
    names for the weights; ``multimask`` must be the variant that file holds): no PyTorch module is needed, so a
    warm start skips building LiteMedSAM. Cached per (file, kind, threads); ``None`` = "use PyTorch" (``"auto"``
    when no runtime can load the file, with the same one warning)."""
    if kind not in DECODER_CHOICES:
        raise SegmenterError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODER_CHOICES)}")
    if kind == "torch":
        return None
    threads = default_threads() if threads is None else threads
    path = Path(path)
    key = (str(path.resolve()), kind, int(threads))

    def build(k: str) -> _ExportedDecoder:
        cls = OpenVinoDecoder if k == "openvino" else OnnxDecoder
        return cls(onnx_path=path, multimask=multimask, threads=threads)

    with _LOCK:
        if key not in _FILE_RUNNERS:
            _FILE_RUNNERS[key] = build_with_fallback(kind, AUTO_ORDER, build, "decoder", _WARNED)
        return _FILE_RUNNERS[key]
