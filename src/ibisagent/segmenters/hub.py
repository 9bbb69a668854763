"""One segmenter per name per process: the cache the web app, the tool server and the rewards share.

``SegmenterHub.bound(name, image, key)`` locks the named segmenter and makes sure it holds ``image``
(:meth:`~ibisagent.segmenters.base.Segmenter.ensure_image`: ``set_image`` only when another image was set since, by
content key; the LiteMedSAM backends also keep an LRU of embeddings, so switching back is cheap).
:func:`shared_hub` is the process-wide hub for code without its own (rewards); the app and the server make theirs.

>>> hub = SegmenterHub()
>>> with hub.bound("fake", image) as seg:
...     seg.predict(points=[[10, 20]], labels=[1])
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ibisagent.segmenters.base import Segmenter, create_segmenter

__all__ = ["SegmenterHub", "shared_hub"]


@dataclass
class _Slot:
    segmenter: Segmenter
    lock: threading.Lock


class SegmenterHub:
    """Creates each named segmenter once and serializes its use. ``factory`` builds a segmenter from a name (tests
    pass their own)."""

    def __init__(self, factory: Callable[[str], Segmenter] | None = None) -> None:
        self._factory = factory or (lambda name: create_segmenter(name))
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self.set_image_calls = 0

    def get(self, name: str) -> Segmenter:
        """The segmenter called ``name`` (created on first use; KeyError for unknown names)."""
        return self._slot(name).segmenter

    def _slot(self, name: str) -> _Slot:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                slot = _Slot(self._factory(name), threading.Lock())
                self._slots[name] = slot
            return slot

    @contextmanager
    def bound(self, name: str, image: np.ndarray, key: str | None = None) -> Iterator[Segmenter]:
        """Lock segmenter ``name`` with ``image`` set on it for the duration of the block (``key``: the image's
        :func:`~ibisagent.segmenters.base.image_key` when the caller has it)."""
        slot = self._slot(name)
        with slot.lock:
            if slot.segmenter.ensure_image(image, key):
                self.set_image_calls += 1
            try:
                yield slot.segmenter
            except ValueError:  # bad input (SegmenterError, ...): checked before the backend touched its state
                raise
            except BaseException:
                slot.segmenter.reset_image()  # the block may have left the segmenter in an unknown state
                raise

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)


_SHARED: SegmenterHub | None = None
_SHARED_LOCK = threading.Lock()


def shared_hub() -> SegmenterHub:
    """The process-wide hub (created on first use)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = SegmenterHub()
        return _SHARED
