"""Caches for image-encoder embeddings: an in-memory LRU bounded by bytes and an on-disk directory of ``.npy``.

The key of an image is ``sha1(pixel bytes + shape + dtype + model name)``, so re-setting the same image in the same
process (or, with a disk cache, in a later one) skips the expensive encoder.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

__all__ = [
    "CACHE_DIR_ENV",
    "DiskEmbeddingCache",
    "MemoryEmbeddingCache",
    "default_memory_cache",
    "embedding_key",
    "resolve_cache_dir",
]

#: environment variable naming a directory for the on-disk embedding cache (inference)
CACHE_DIR_ENV = "IBISAGENT_CACHE_DIR"
#: environment variable with the in-memory cache budget in MiB (default 256)
MEMORY_MB_ENV = "IBISAGENT_EMBED_CACHE_MB"


def embedding_key(image: np.ndarray, model: str) -> str:
    """Hex sha1 of the image bytes, its shape/dtype and the model name."""
    arr = np.ascontiguousarray(image)
    h = hashlib.sha1()
    h.update(model.encode())
    h.update(str(arr.shape).encode())
    h.update(str(arr.dtype).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


class MemoryEmbeddingCache:
    """Thread-safe LRU of numpy arrays bounded by total bytes. Arrays larger than the budget are not stored."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._data

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            arr = self._data.get(key)
            if arr is not None:
                self._data.move_to_end(key)
            return arr

    def put(self, key: str, value: np.ndarray) -> None:
        size = int(value.nbytes)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= int(old.nbytes)
            if size > self.max_bytes:
                return
            value = value.copy() if not value.flags.owndata else value
            value.setflags(write=False)
            self._data[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and self._data:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= int(dropped.nbytes)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


class DiskEmbeddingCache:
    """A directory of ``<key>.npy`` files (stored as float16 to halve the size; read back as float32).

    Writes are atomic (temporary file + rename), so concurrent writers of the same key are harmless.
    """

    def __init__(self, directory: str | Path, dtype: str = "float16") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> np.ndarray | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return np.load(p).astype(np.float32)
        except (OSError, ValueError):  # truncated or corrupt file: treat as a miss
            return None

    def put(self, key: str, value: np.ndarray) -> Path:
        p = self.path(key)
        tmp = p.with_name(f"{p.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npy")
        np.save(tmp, np.asarray(value).astype(self.dtype))
        os.replace(tmp, p)
        return p


def resolve_cache_dir(cache_dir: str | Path | None) -> Path | None:
    """``cache_dir`` if given, else ``$IBISAGENT_CACHE_DIR`` if set, else None (no disk cache)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(env) if env else None


_DEFAULT: MemoryEmbeddingCache | None = None
_DEFAULT_LOCK = threading.Lock()


def default_memory_cache() -> MemoryEmbeddingCache:
    """The process-wide in-memory cache shared by all segmenter instances (budget from ``$IBISAGENT_EMBED_CACHE_MB``)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            mb = float(os.environ.get(MEMORY_MB_ENV, "256") or 256)
            _DEFAULT = MemoryEmbeddingCache(int(mb * 2**20))
        return _DEFAULT
