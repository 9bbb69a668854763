"""The runtime the web app and the tool server share: one segmenter per name per process
(:class:`~ibisagent.segmenters.hub.SegmenterHub`, behind a lock, bound to the image it currently holds), cached image
loading, bundled examples, and an episode loop that can start from interactions a person already made ("let the
agent continue from my clicks")."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.agent import Episode, StepRecord
from ibisagent.agent import iter_episode as _agent_iter_episode
from ibisagent.env import EnvConfig, SegmentationEnv
from ibisagent.policies.base import Policy
from ibisagent.protocol import Action, format_reply, to_normalized
from ibisagent.segmenters.base import Segmenter, default_segmenter, image_key
from ibisagent.segmenters.hub import SegmenterHub
from ibisagent.session import Interaction

__all__ = [
    "BUNDLED_ENV",
    "SegmenterHub",
    "ImageCache",
    "image_key",
    "default_segmenter",
    "find_bundled_dir",
    "interaction_reply",
    "iter_episode",
    "continue_episode",
    "USER_REASONING",
    "DECLARED_HUGE",
    "MAX_VOLUME_VOXELS",
    "declared_size",
]

#: environment variable naming the bundled-examples manifest folder
BUNDLED_ENV = "IBISAGENT_BUNDLED"
#: reasoning text recorded for replayed user interactions (so traces show who made each step)
USER_REASONING = "Annotator prompt (placed by the user)."


# ----------------------------------------------------------------------------------------------------------------
# Image loading with a small LRU keyed by (resolved path, mtime, size, slice, window)
# ----------------------------------------------------------------------------------------------------------------

class ImageCache:
    """LRU of loaded images (``ibisagent.io.load_image`` results, with their content key) keyed by file identity
    (resolved path, mtime, size) and load options."""

    def __init__(self, max_items: int = 32) -> None:
        self.max_items = int(max_items)
        self._items: OrderedDict[tuple, tuple[Any, str]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def load(self, path: Path, slice_index: int | None = None, window: Any = None) -> tuple[Any, str]:
        """``(LoadedImage, image_key(array))`` of ``path``, from the cache when the file has not changed."""
        st = path.stat()
        win = tuple(window) if isinstance(window, list) else window
        k = (str(path), st.st_mtime_ns, st.st_size, slice_index, win)
        with self._lock:
            hit = self._items.get(k)
            if hit is not None:
                self._items.move_to_end(k)
                self.hits += 1
                return hit
        from ibisagent.io.loader import load_image

        loaded = load_image(path, slice_index=slice_index, window=window)
        entry = (loaded, image_key(loaded.array))
        with self._lock:
            self.misses += 1
            self._items[k] = entry
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._items)


def find_bundled_dir(explicit: str | Path | None = None) -> Path | None:
    """The bundled-examples manifest folder: ``explicit``, ``$IBISAGENT_BUNDLED``, the package's ``demo_data`` or
    ``data/bundled``, or the source checkout's ``data/bundled`` (the first with an ``index.jsonl``), else None."""
    import os

    here = Path(__file__).resolve().parent
    if explicit:  # an explicit folder is used alone
        p = Path(explicit)
        ok = (p / "index.jsonl").is_file() or (p.is_dir() and any(p.glob("*/index.jsonl")))
        return p if ok else None
    candidates = [ os.environ.get(BUNDLED_ENV), here / "demo_data", here / "data" / "bundled",
                  here.parent.parent / "data" / "bundled"]
    for c in candidates:
        if not c:
            continue
        p = Path(c)
        if (p / "index.jsonl").is_file() or (p.is_dir() and any(p.glob("*/index.jsonl"))):
            return p
    return None


# ----------------------------------------------------------------------------------------------------------------
# Upload limits decided from a file's header (the app and the server refuse what is too large before decoding it)
# ----------------------------------------------------------------------------------------------------------------

#: voxels of the largest volume the app and the server open (a 512 x 512 x 1024 CT)
MAX_VOLUME_VOXELS = 512 * 512 * 1024
#: what :func:`declared_size` reports for a header that claims an absurd size (PIL's decompression-bomb check)
DECLARED_HUGE = 2**31 - 1


def declared_size(path: Path) -> tuple[int, int, int] | None:
    """(height, width, elements the loader reads) of an image file or DICOM folder from its header alone, without
    decoding pixels; None when the header cannot be read (the loader then reports the problem). For a 4D NIfTI /
    NRRD / MetaImage file the elements are those of all its volumes."""
    import os

    from ibisagent.io.images import image_format, read_dicom

    try:
        fmt = image_format(path)
        name = path.name.lower()
        if fmt == "raster" and name.endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tuple(int(s) for s in tif.series[0].shape)
                page = tif.pages[0].shape
            return int(page[0]), int(page[1]), int(np.prod(shape, dtype=np.float64))
        if fmt == "raster":
            from PIL import Image

            with Image.open(path) as im:  # reads the header only
                w, h = im.size
            return h, w, h * w
        if fmt == "nifti":
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(str(path)).shape)  # header only: the data is read lazily
            h, w = (shape + (1, 1))[:2]
            return h, w, int(np.prod(shape, dtype=np.float64))
        if fmt == "itk":
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()  # header only
            size = tuple(int(s) for s in reader.GetSize())
            h, w = (size + (1, 1))[:2]
            return h, w, int(np.prod(size, dtype=np.float64)) * int(reader.GetNumberOfComponents())
        if fmt == "dicom":
            ds = read_dicom(path, stop_before_pixels=True)
            h, w = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            return h, w, h * w * frames
        if fmt == "dicom-series":
            files = []
            for i, entry in enumerate(os.scandir(path)):
                if i > 100_000:
                    break
                if entry.is_file():
                    files.append(entry.path)
            if not files:
                return None
            ds = read_dicom(Path(sorted(files)[0]), stop_before_pixels=True)
            h, w = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            return h, w, h * w * len(files)
    except Exception as exc:  # PIL's DecompressionBombError among them: a header claiming a gigantic image
        if type(exc).__name__ == "DecompressionBombError":
            return DECLARED_HUGE, DECLARED_HUGE, DECLARED_HUGE
        return None
    return None


# ----------------------------------------------------------------------------------------------------------------
# Episodes that start from existing interactions
# ----------------------------------------------------------------------------------------------------------------

def interaction_reply(inter: Interaction, width: int, height: int) -> str:
    """A protocol reply that re-creates one session interaction (pixel coordinates -> normalized action)."""
    if inter.kind == "box":
        assert inter.box is not None
        x1, y1, x2, y2 = inter.box
        action = Action.make_box(to_normalized(x1, width), to_normalized(y1, height),
                                 to_normalized(x2, width), to_normalized(y2, height))
    else:
        x, y = to_normalized(inter.x, width), to_normalized(inter.y, height)
        action = Action.positive(x, y) if inter.positive else Action.negative(x, y)
    return format_reply(action, USER_REASONING)


def iter_episode(
    env: SegmentationEnv,
    policy: Policy,
    image: np.ndarray,
    query: str,
    gt: np.ndarray | None = None,
    prior: Sequence[Interaction] = (),
    *,
    step_guard: Callable[[], Any] | None = None,
) -> Iterator[tuple[StepRecord, Episode]]:
    """:func:`ibisagent.agent.iter_episode` that first replays ``prior`` interactions (the user's clicks) through the
    environment, then lets ``policy`` act. Yields ``(record, episode)`` after every step; the episode object is
    complete (``mask``, ``stop_reason``, timings) after the last yield.

    Replayed steps carry :data:`USER_REASONING` in their ``raw`` text; ``episode.meta["user_steps"]`` counts them.
    Build ``env`` with :func:`env_for` (``extra_steps=len(prior)``) so the agent keeps its full step budget.
    ``step_guard`` is a context-manager factory entered around every step (e.g. a segmenter lock).
    """
    prior = list(prior)
    if prior and any(p.kind == "box" for p in prior) and env.config.grammar != "extended":
        raise ValueError("the current prompts include a box, which this policy's grammar ('reference') cannot "
                         "express; reset or undo the box, or choose a policy with the extended grammar")
    h, w = np.asarray(image).shape[:2]
    replies = [interaction_reply(p, w, h) for p in prior]
    yield from _agent_iter_episode(env, policy, image, query, gt, prior=replies, step_guard=step_guard,
                                   meta={"user_steps": len(prior)})


def continue_episode(
    env: SegmentationEnv,
    policy: Policy,
    image: np.ndarray,
    query: str,
    gt: np.ndarray | None = None,
    prior: Sequence[Interaction] = (),
    on_step: Callable[[StepRecord], Any] | None = None,
    *,
    step_guard: Callable[[], Any] | None = None,
) -> Episode:
    """:func:`iter_episode` run to the end; returns the finished episode."""
    episode: Episode | None = None
    for rec, ep in iter_episode(env, policy, image, query, gt, prior, step_guard=step_guard):
        episode = ep
        if on_step is not None:
            on_step(rec)
    assert episode is not None
    return episode


def env_for(segmenter: Segmenter, policy: Policy, max_steps: int = 20, extra_steps: int = 0) -> SegmentationEnv:
    """A fresh environment for ``policy`` (its grammar and prompts) with ``max_steps + extra_steps`` turns."""
    grammar = getattr(policy, "grammar", "reference")
    cfg = EnvConfig(max_steps=max_steps + extra_steps, grammar=grammar,
                    prompts="extended" if grammar == "extended" else "reference")
    return SegmentationEnv(segmenter, cfg)

