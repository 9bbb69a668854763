"""Run an image encoder (LiteMedSAM's TinyViT) from an exported ONNX model: ONNX Runtime or OpenVINO.

The PyTorch module is exported once to ONNX (TorchScript exporter, static 1x3xSxS input, opset 17) and the file is
cached on disk, keyed by the sha256 of the module's weights + the opset + the torch version, and written atomically
(temp file + rename), so concurrent processes never see a half-written model. Two runtimes read that file:

* ONNX Runtime (:class:`OnnxEncoder`): ``intra_op_num_threads`` (default 2), all graph optimizations, no thread
  spinning; optionally int8 dynamic quantization (``quantize=True``; fails parity, see
  ``docs/benchmarks.md``).
* OpenVINO (:class:`OpenVinoEncoder`): fp32, latency hint, one stream, 2 threads; the fastest here. With
  ``int8=True`` it runs the int8 model that NNCF's post-training quantization made from the same ONNX file
  (:func:`ibisagent.training.quantize.build_int8_model`, calibrated on dataset images; see "int8" below).

Both match PyTorch to ~4e-6 (max abs embedding difference; mask IoU 1.0 on real cases).

Cache directory: ``$IBISAGENT_CACHE_DIR/onnx``, else ``$IBISAGENT_ONNX_DIR`` (older name), else the per-user cache
directory of platformdirs (``~/.cache/ibisagent/onnx`` on Linux). The first build on a machine prints one line,
``preparing models (first run only)``, on stderr.

Encoder choice for segmenters (``encoder=`` option):

* ``"torch"`` — plain PyTorch;
* ``"onnx"`` — ONNX Runtime; :class:`SegmenterUnavailable` if ``onnxruntime`` (or, for the first export,
  ``onnx``) is missing;
* ``"onnx-int8"`` — ONNX Runtime with int8 dynamic quantization (experiments only);
* ``"openvino"`` — OpenVINO; :class:`SegmenterUnavailable` if ``openvino`` (or ``onnx``) is missing;
* ``"openvino-int8"`` — OpenVINO running the NNCF int8 model; :class:`SegmenterUnavailable` until that model has
  been built once with ``ibisagent export-encoder --int8 --calibration-data DIR`` (needs ``nncf``: the ``int8``
  extra); never tried by ``"auto"`` (accuracy per modality: ``docs/benchmarks.md``);
* ``"auto"`` — OpenVINO, else ONNX Runtime, else PyTorch (with one warning).

int8: :func:`ibisagent.training.quantize.build_int8_model` quantizes the exported model with NNCF (static post-training quantization:
weights and activations int8, ``preset=mixed``, ``model_type=transformer``, fast bias correction), calibrated on
``N`` 2D images of the *train* split of a dataset root (:func:`ibisagent.training.quantize.calibration_cases`: a stable sample, round robin over
the dataset folders, one image per patient/volume before a second), each preprocessed exactly as the encoder input.
The OpenVINO IR (``.xml`` + ``.bin``, plus a ``.json`` listing the calibration images and settings) is cached next to
the ONNX file as ``<onnx name>-ovint8-<tag>.xml``, ``tag`` = hash of the calibration image keys, the settings and
the nncf/openvino versions: the same weights + data + settings reuse the file, anything else builds a new one.
Without calibration data there is no int8 model (no images ship for it: three demo images are too few to calibrate):
``encoder="openvino-int8"`` then raises :class:`SegmenterUnavailable` naming the command to run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ibisagent.segmenters.base import SegmenterError, SegmenterUnavailable
from ibisagent.segmenters.embedding_cache import CACHE_DIR_ENV

__all__ = [
    "build_with_fallback",
    "DEFAULT_CALIBRATION_IMAGES",
    "find_int8_model",
    "INT8_SETTINGS",
    "int8_model_path",
    "nncf_available",
    "DEFAULT_OPSET",
    "ENCODER_CHOICES",
    "ONNX_DIR_ENV",
    "THREADS_ENV",
    "AUTO_ORDER",
    "OnnxEncoder",
    "OpenVinoEncoder",
    "announce_preparing",
    "default_onnx_dir",
    "default_threads",
    "compile_openvino",
    "ensure_onnx_model",
    "export_and_check",
    "encoder_runner",
    "encoder_runner_from_file",
    "export_onnx",
    "make_ort_session",
    "onnx_model_path",
    "onnxruntime_available",
    "openvino_available",
    "quantize_int8",
    "require_int8_model",
    "weights_sha256",
]

log = logging.getLogger(__name__)

ONNX_DIR_ENV = "IBISAGENT_ONNX_DIR"
PREPARING_MESSAGE = "preparing models (first run only)"
THREADS_ENV = "IBISAGENT_ONNX_THREADS"
DEFAULT_OPSET = 17
ENCODER_CHOICES = ("auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8")
#: what ``encoder="auto"`` tries, fastest first (see docs/benchmarks.md)
AUTO_ORDER = ("openvino", "onnx")
PIP_HINT = "pip install onnxruntime onnx"
OPENVINO_PIP_HINT = "pip install openvino onnx"
INT8_PIP_HINT = "pip install 'ibisagent[int8]' (nncf)"
#: how to build the int8 model (named in the error when it is missing)
INT8_BUILD_HINT = "ibisagent export-encoder --int8 --calibration-data DIR"
#: calibration images used by default (docs/benchmarks.md: how many were measured)
DEFAULT_CALIBRATION_IMAGES = 128
#: NNCF settings of the int8 model (part of its cache key)
INT8_SETTINGS: dict[str, Any] = {"preset": "mixed", "model_type": "transformer", "fast_bias_correction": True}

_LOCK = threading.RLock()
#: id(module), kind -> (module, runner or None); the module reference keeps the id valid
_RUNNERS: dict[tuple[int, str], tuple[nn.Module, _ExportedEncoder | None]] = {}
#: (resolved .onnx path, kind, threads) -> runner or None (runners of already exported files, no module)
_FILE_RUNNERS: dict[tuple[str, str, int], _ExportedEncoder | None] = {}
_WARNED: set[str] = set()


def onnxruntime_available() -> bool:
    """True if ``onnxruntime`` can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    """True if ``openvino`` can be imported."""
    return importlib.util.find_spec("openvino") is not None


def default_onnx_dir() -> Path:
    """Where exported ONNX models are cached (see module docstring)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser() / "onnx"
    env = os.environ.get(ONNX_DIR_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("ibisagent", appauthor=False)) / "onnx"


_announced = False


def announce_preparing() -> None:
    """Print :data:`PREPARING_MESSAGE` on stderr, once per process (called before the first export/compile)."""
    global _announced
    if not _announced:
        _announced = True
        print(PREPARING_MESSAGE, file=sys.stderr, flush=True)


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``module.state_dict()`` (sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        arr = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(arr.shape)).encode())
        h.update(str(arr.dtype).encode())
        h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes() if arr.numel() else b"")
    return h.hexdigest()


def onnx_model_path(digest: str, input_size: int, opset: int = DEFAULT_OPSET, cache_dir: str | Path | None = None,
                    quantized: bool = False) -> Path:
    """The cache file name for a module with weights ``digest``: encoder-<sha[:16]>-s<size>-op<opset>-torch<ver>."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_onnx_dir()
    torch_ver = torch.__version__.split("+")[0]
    suffix = "-int8" if quantized else ""
    return root / f"encoder-{digest[:16]}-s{input_size}-op{opset}-torch{torch_ver}{suffix}.onnx"


@contextlib.contextmanager
def _atomic_target(path: Path):
    """Yield a temp path next to ``path``; on success rename it onto ``path`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is meant to be shared
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def export_onnx(module: nn.Module, path: str | Path, input_size: int = 256, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``module`` (input 1x3xSxS float32) to ``path`` atomically. Needs the ``onnx`` package."""
    if importlib.util.find_spec("onnx") is None:
        raise SegmenterUnavailable(f"exporting the encoder to ONNX needs the 'onnx' package: {PIP_HINT}")
    path = Path(path)
    was_training = module.training
    module.eval()
    x = torch.rand(1, 3, input_size, input_size)
    try:
        with _atomic_target(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=["embedding"], do_constant_folding=True)
    finally:
        module.train(was_training)
    return path


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """ONNX Runtime dynamic quantization (int8 weights of MatMul/Gemm; activations quantized at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a warning per tensor it cannot quantize
    try:
        with _atomic_target(dst) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return dst


def ensure_onnx_model(module: nn.Module, input_size: int = 256, cache_dir: str | Path | None = None,
                      opset: int = DEFAULT_OPSET, quantize: bool = False) -> Path:
    """The cached ``.onnx`` file of ``module`` (exported, and int8-quantized if asked, on first use)."""
    digest = weights_sha256(module)
    fp32 = onnx_model_path(digest, input_size, opset, cache_dir)
    path = onnx_model_path(digest, input_size, opset, cache_dir, quantized=quantize)
    with _LOCK:
        if not fp32.is_file():
            announce_preparing()
            log.info("exporting the image encoder to %s (once)", fp32)
            export_onnx(module, fp32, input_size, opset)
        if quantize and not path.is_file():
            quantize_int8(fp32, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# int8: NNCF post-training quantization for OpenVINO (see the module docstring)
# ----------------------------------------------------------------------------------------------------------------

def nncf_available() -> bool:
    """True if ``nncf`` can be imported."""
    return importlib.util.find_spec("nncf") is not None


def _int8_prefix(digest: str, input_size: int, opset: int, cache_dir: str | Path | None) -> Path:
    return onnx_model_path(digest, input_size, opset, cache_dir).with_suffix("")


def int8_model_path(digest: str, input_size: int, tag: str, opset: int = DEFAULT_OPSET,
                    cache_dir: str | Path | None = None) -> Path:
    """The cached int8 OpenVINO IR for weights ``digest`` and calibration ``tag``: ``<onnx stem>-ovint8-<tag>.xml``."""
    prefix = _int8_prefix(digest, input_size, opset, cache_dir)
    return prefix.with_name(f"{prefix.name}-ovint8-{tag}.xml")


def find_int8_model(module: nn.Module, input_size: int = 256, cache_dir: str | Path | None = None,
                    opset: int = DEFAULT_OPSET) -> Path | None:
    """The newest cached int8 model of ``module``'s weights (any calibration), or None."""
    prefix = _int8_prefix(weights_sha256(module), input_size, opset, cache_dir)
    found = [p for p in prefix.parent.glob(f"{prefix.name}-ovint8-*.xml") if p.with_suffix(".bin").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def require_int8_model(module: nn.Module, input_size: int = 256, cache_dir: str | Path | None = None,
                       opset: int = DEFAULT_OPSET) -> Path:
    """:func:`find_int8_model`, or :class:`SegmenterUnavailable` naming the command that builds it."""
    path = find_int8_model(module, input_size, cache_dir, opset)
    if path is None:
        where = Path(cache_dir).expanduser() if cache_dir is not None else default_onnx_dir()
        raise SegmenterUnavailable(f"no int8 encoder model in {where}: build it once with `{INT8_BUILD_HINT}` "
                                   f"(a dataset root with index.jsonl; needs {INT8_PIP_HINT})")
    return path


def make_ort_session(path: str | Path, threads: int, spin: bool = False) -> Any:
    """An ONNX Runtime CPU session for ``path``: ``threads`` intra-op threads, sequential, all graph optimizations,
    no thread spinning unless ``spin``. Raises :class:`SegmenterUnavailable` when the file cannot be loaded."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise SegmenterUnavailable(f"ONNX Runtime cannot load {path} ({exc}); delete the file to re-export") from exc


def compile_openvino(path: str | Path, threads: int) -> Any:
    """``path`` compiled by OpenVINO for the CPU: fp32, latency hint, one stream, ``threads`` inference threads;
    compiled blobs cached in ``openvino/`` next to the file when writable. Raises :class:`SegmenterUnavailable`."""
    import openvino as ov

    path = Path(path)
    config: dict[str, Any] = {
        "INFERENCE_NUM_THREADS": int(threads),
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "f32",
    }
    blob_dir = path.parent / "openvino"
    with contextlib.suppress(OSError):
        blob_dir.mkdir(parents=True, exist_ok=True)
        if os.access(blob_dir, os.W_OK):
            config["CACHE_DIR"] = str(blob_dir)
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # openvino raises RuntimeError subclasses of its own
        raise SegmenterUnavailable(f"OpenVINO cannot compile {path} ({exc})") from exc


class _ExportedEncoder:
    """Common part of the runtime encoders: find/export the ONNX file, check inputs, run image by image."""

    runtime = "?"

    def __init__(self, module: nn.Module | None, onnx_path: str | Path | None, input_size: int,
                 cache_dir: str | Path | None, threads: int, opset: int, quantize: bool = False) -> None:
        if int(threads) < 1:
            raise SegmenterError(f"threads must be >= 1, got {threads}")
        self.input_size = int(input_size)
        self.threads = int(threads)
        self.quantized = bool(quantize)
        if onnx_path is not None:
            path = Path(onnx_path)
            if not path.is_file():
                raise SegmenterUnavailable(f"ONNX model not found: {path}")
        elif module is None:
            raise SegmenterError(f"{type(self).__name__} needs a module to export or an onnx_path")
        else:
            path = ensure_onnx_model(module, self.input_size, cache_dir, opset, quantize)
        self.path = path

    def _run_one(self, arr: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, C, h, w) float32; batches are run one image at a time (static export)."""
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1:] != (3, self.input_size, self.input_size):
            raise SegmenterError(f"encoder input must be (B, 3, {self.input_size}, {self.input_size}), got {arr.shape}")
        outs = [self._run_one(arr[i : i + 1]) for i in range(arr.shape[0])]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_numpy(x.detach().cpu().numpy()))


class OnnxEncoder(_ExportedEncoder):
    """A callable ``1x3xSxS tensor -> embedding tensor`` backed by an ONNX Runtime session.

    Args:
        module: the PyTorch encoder to export (or ``None`` with ``onnx_path``).
        onnx_path: use this ``.onnx`` file instead of the cache.
        input_size: S (LiteMedSAM: 256).
        cache_dir: where exported models are kept (default :func:`default_onnx_dir`).
        threads: ONNX Runtime intra-op threads (default 2).
        quantize: use the int8 dynamically quantized model.
        opset: ONNX opset of the export.
        spin: let ONNX Runtime's worker threads busy-wait between ops. Off by default: on a shared CPU spinning
            threads steal time from other jobs and were slower here (median 4.3 s vs 5.6 s at load ~12 on 2 cores).
    """

    runtime = "onnxruntime"

    def __init__(
        self,
        module: nn.Module | None = None,
        *,
        onnx_path: str | Path | None = None,
        input_size: int = 256,
        cache_dir: str | Path | None = None,
        threads: int = 2,
        quantize: bool = False,
        opset: int = DEFAULT_OPSET,
        spin: bool = False,
    ) -> None:
        if not onnxruntime_available():
            raise SegmenterUnavailable(f"the ONNX encoder needs onnxruntime: {PIP_HINT}")
        self.spin = bool(spin)
        super().__init__(module, onnx_path, input_size, cache_dir, threads, opset, quantize)
        self.session = self._make_session(self.path)
        self._input = self.session.get_inputs()[0].name

    def _make_session(self, path: Path) -> Any:
        return make_ort_session(path, self.threads, self.spin)

    def _run_one(self, arr: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: arr})[0]


class OpenVinoEncoder(_ExportedEncoder):
    """The same exported ONNX model compiled by OpenVINO for the CPU: fp32 (``INFERENCE_PRECISION_HINT=f32``; bf16
    is far slower on this machine), latency hint, one stream, ``threads`` inference threads. Compiled blobs are
    cached next to the ONNX files (``<cache>/openvino``). Parity and speed: ``docs/benchmarks.md``.

    ``int8=True`` runs the cached NNCF int8 model of ``module`` instead (:func:`ibisagent.training.quantize.build_int8_model`; the newest one
    when several calibrations are cached); :class:`SegmenterUnavailable` when none has been built. ``onnx_path``
    may also name an OpenVINO IR ``.xml``."""

    runtime = "openvino"

    def __init__(
        self,
        module: nn.Module | None = None,
        *,
        onnx_path: str | Path | None = None,
        input_size: int = 256,
        cache_dir: str | Path | None = None,
        threads: int = 2,
        opset: int = DEFAULT_OPSET,
        int8: bool = False,
    ) -> None:
        if not openvino_available():
            raise SegmenterUnavailable(f"the OpenVINO encoder needs openvino: {OPENVINO_PIP_HINT}")
        if int8 and onnx_path is None:
            if module is None:
                raise SegmenterError("OpenVinoEncoder(int8=True) needs a module or an onnx_path")
            onnx_path = require_int8_model(module, input_size, cache_dir, opset)
        super().__init__(module, onnx_path, input_size, cache_dir, threads, opset)
        self.quantized = bool(int8)
        self.compiled = compile_openvino(self.path, self.threads)
        self._request = self.compiled.create_infer_request()
        self._req_lock = threading.Lock()  # an infer request is not thread-safe

    def _run_one(self, arr: np.ndarray) -> np.ndarray:
        with self._req_lock:
            out = self._request.infer({0: arr})
            return np.array(out[0], dtype=np.float32, copy=True)


def default_threads() -> int:
    """ONNX Runtime intra-op threads: ``$IBISAGENT_ONNX_THREADS``, else torch's thread count (2 on this machine)."""
    env = os.environ.get(THREADS_ENV)
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise SegmenterError(f"{THREADS_ENV} must be an integer, got {env!r}") from None
    return max(1, torch.get_num_threads())


def build_with_fallback(kind: str, order: tuple[str, ...], build: Any, what: str, warned: set[str]) -> Any | None:
    """Build the runner for an ``encoder=`` / ``decoder=`` choice: ``"auto"`` tries the runtimes of ``order`` in
    turn and returns ``None`` (= use PyTorch, with one warning per distinct failure, remembered in ``warned``) when
    none works; an explicit runtime raises :class:`SegmenterUnavailable` when it cannot be built."""
    if kind == "auto":
        errors = []
        for candidate in order:
            try:
                return build(candidate)
            except Exception as exc:  # any export/runtime failure: try the next runtime
                errors.append(f"{candidate}: {exc}")
        msg = "; ".join(errors)
        if msg not in warned:
            warned.add(msg)
            warnings.warn(f"ONNX {what} unavailable, using PyTorch ({msg})", RuntimeWarning, stacklevel=3)
        return None
    try:
        return build(kind)
    except (SegmenterUnavailable, SegmenterError):
        raise
    except Exception as exc:
        raise SegmenterUnavailable(f"{kind} {what} failed: {exc}") from exc


def _build_runner(kind: str, module: nn.Module, input_size: int, threads: int) -> _ExportedEncoder:
    if kind in ("openvino", "openvino-int8"):
        return OpenVinoEncoder(module, input_size=input_size, threads=threads, int8=kind == "openvino-int8")
    return OnnxEncoder(module, input_size=input_size, threads=threads, quantize=kind == "onnx-int8")


def encoder_runner(module: nn.Module, kind: str = "auto", input_size: int = 256,
                   threads: int | None = None) -> _ExportedEncoder | None:
    """The exported-model runner to use for ``module`` under the ``encoder=`` choice ``kind``, cached per module;
    ``None`` means "use PyTorch". ``"auto"`` tries OpenVINO, then ONNX Runtime, and falls back to PyTorch (warning
    once) when neither works; an explicit ``"onnx"`` / ``"onnx-int8"`` / ``"openvino"`` / ``"openvino-int8"`` raises
    :class:`SegmenterUnavailable` instead. ``threads`` defaults to :func:`default_threads`."""
    threads = default_threads() if threads is None else threads
    if kind not in ENCODER_CHOICES:
        raise SegmenterError(f"unknown encoder {kind!r}; choose one of {', '.join(ENCODER_CHOICES)}")
    if kind == "torch":
        return None
    key = (id(module), kind)
    with _LOCK:
        hit = _RUNNERS.get(key)
        if hit is not None and hit[0] is module:
            return hit[1]
        runner = build_with_fallback(kind, AUTO_ORDER, lambda k: _build_runner(k, module, input_size, threads),
                                     "encoder", _WARNED)
        _RUNNERS[key] = (module, runner)
        return runner


def encoder_runner_from_file(path: str | Path, kind: str = "auto", input_size: int = 256,
                             threads: int | None = None) -> _ExportedEncoder | None:
    """As :func:`encoder_runner`, for an encoder already exported to ``path`` (the file that
    :func:`ensure_onnx_model` names for the module's weights; ``"onnx-int8"``: the quantized one): no PyTorch module
    is needed, so a warm start skips building it. Cached per (file, kind, threads); ``None`` = "use PyTorch"
    (``"auto"`` when no runtime can load the file, with the same one warning)."""
    threads = default_threads() if threads is None else threads
    if kind not in ENCODER_CHOICES:
        raise SegmenterError(f"unknown encoder {kind!r}; choose one of {', '.join(ENCODER_CHOICES)}")
    if kind == "torch":
        return None
    path = Path(path)
    key = (str(path.resolve()), kind, int(threads))

    def build(k: str) -> _ExportedEncoder:
        if k == "openvino":
            return OpenVinoEncoder(onnx_path=path, input_size=input_size, threads=threads)
        return OnnxEncoder(onnx_path=path, input_size=input_size, threads=threads, quantize=k == "onnx-int8")

    with _LOCK:
        if key not in _FILE_RUNNERS:
            _FILE_RUNNERS[key] = build_with_fallback(kind, AUTO_ORDER, build, "encoder", _WARNED)
        return _FILE_RUNNERS[key]


# ----------------------------------------------------------------------------------------------------------------
# Pre-building the cache (``ibisagent export-encoder``)
# ----------------------------------------------------------------------------------------------------------------

def export_and_check(module: nn.Module, *, runtime: str = "onnx", input_size: int = 256,
                     cache_dir: str | Path | None = None, threads: int = 2,
                     int8: bool = False) -> tuple[_ExportedEncoder, float, float]:
    """Export ``module`` (cached) for ``runtime`` (``"onnx"`` = ONNX Runtime, ``"openvino"``) and compare it with
    PyTorch on a seeded random input. ``int8``: ONNX Runtime's dynamic int8 model, or for ``"openvino"`` the cached
    NNCF int8 model (built beforehand by :func:`ibisagent.training.quantize.build_int8_model`). Returns (encoder, setup seconds, max abs difference)."""
    t0 = time.perf_counter()
    if runtime == "openvino" and int8:
        path = require_int8_model(module, input_size, cache_dir)
        enc: _ExportedEncoder = OpenVinoEncoder(module, onnx_path=path, input_size=input_size, threads=threads,
                                                int8=True)
    elif runtime == "openvino":
        enc = OpenVinoEncoder(module, input_size=input_size, cache_dir=cache_dir, threads=threads)
    else:
        enc = OnnxEncoder(module, input_size=input_size, cache_dir=cache_dir, threads=threads, quantize=int8)
    setup_s = time.perf_counter() - t0
    x = torch.rand(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = module(x)
    out = enc(x)
    return enc, setup_s, float((out - ref).abs().max())
