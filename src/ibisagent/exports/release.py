"""The public IBISAgent release's data files, both ways: read its trajectory JSON and RL parquet into our cases and
trajectories (``ibisagent import-release``), write ours in its layout (``ibisagent export --format release-verl`` /
``release-trajectories``).

Our reading of the release (``Yankai96/IBISAgent`` at its stored commits; written here, not copied):

* **Trajectory JSON** (``trajectory_gen/run_tr_gen.py``, one file per case): ``{"file", "type": "img"|"nii",
  "mask_file", "img_data": {"format", "size": [W, H], "reverse"} | null, "nii_data": {"size", "slice_dir",
  "slice_idx", "slice_size": [H, W], "mask_number", "window"} | null, "trajectory": [{"step", "coords_norm": [x / W,
  y / H], "coords_original": [x, y], "mask_rle"}]}``. ``mask_rle`` is the mask after the click in the release's
  decimal RLE (:func:`ibisagent.masks.rle_encode_release`). No click type, no query, no Terminate step. Its clicker
  picks the positive click in FN (object pixels) and the negative one in FP (background), so the type is read back
  from the ground truth at the click.
* **Converter input** (``trajectory_gen/convert_to_rl_data.py`` reads ``<dataset>/<split>.json``, ``{"data":
  [{"image_name", "mask_name", "caption", "clicks_list": [{"is_positive", "coor_norm", "coor", "mask": {"counts",
  "size": [H, W]}}]}]}``) with ``counts`` = base64(zlib(COCO compressed RLE)) (:func:`ibisagent.masks.rle_encode_coco`).
  Read only.
* **RL parquet** (that converter's output): one row per click, ``data_source`` ``"med-seg"``, ``prompt`` the user
  turn only (``"<image>" + caption``), ``images`` ``[{"bytes"}]`` (the plain image before the first click, else the
  image with the previous click's mask composited in RGBA (0, 255, 0, 128), PNG), ``ability`` ``"reasoning"``,
  ``reward_model`` ``{"style": "rule", "ground_truth": "<Positive|Negative> Point (x, y)"}`` and ``extra_info``
  ``{split, index, answer, question, dataset, original_image_name, gt_mask_name, clicklist (pixels of the clicks
  before), labels, current_gt_mask (the counts of the mask after this click), image_size [W, H]}``; no
  ``current_step`` / ``pre_iou``.

Coordinates: the release writes ``x / W`` for the pixel column x, ours ``(x + 0.5) / W`` (4 decimals, the pixel
centre, so ``min(int(v * W), W - 1)`` maps back to x). Export with ``profile="reference"`` writes the release's
``x / W`` (and, for RL rows, exactly the converter's ``extra_info``); the default profile writes our convention and
adds ``current_step`` / ``pre_iou`` so the release's reward can score length and progress.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import shutil
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ibisagent.exports.common import ExportError, load_trajectories
from ibisagent.masks import (
    iou,
    rle_decode,
    rle_decode_coco,
    rle_decode_release,
    rle_encode,
    rle_encode_coco,
    rle_encode_release,
)
from ibisagent.protocol import Action, ActionKind, ActionParseError, format_reply, parse_action, to_normalized
from ibisagent.reasoning import describe_click, describe_stop
from ibisagent.synthesis.trajectories import StepState, Trajectory, TrajectoryStep, target_name, variant_seed

__all__ = [
    "OVERLAY_RGBA",
    "RELEASE_DATA_SOURCE",
    "CoordProfile",
    "ReleaseCase",
    "ReleaseClick",
    "ReleaseFormatError",
    "export_release_trajectories",
    "export_release_verl",
    "import_release",
    "read_release",
    "release_overlay",
    "to_trajectory",
]

#: the release's RL ``data_source``
RELEASE_DATA_SOURCE = "med-seg"
#: the release converter's mask colour, alpha-composited over the image
OVERLAY_RGBA = (0, 255, 0, 128)
#: ``default``: our coordinate convention ((x + 0.5) / W) and the extra reward fields; ``reference``: the release's
CoordProfile = Literal["default", "reference"]
_PIL_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_VARIANT = "release"


class ReleaseFormatError(ExportError):
    """A file that is not in one of the release's layouts (or refers to files that are not there)."""


@dataclass
class ReleaseClick:
    """One release click: pixel (x, y), its type (None: not stored, read from the ground truth), the normalized
    coordinates as written, and the mask after it (HxW bool)."""

    x: int
    y: int
    positive: bool | None
    norm: tuple[float, float]
    mask: np.ndarray


@dataclass
class ReleaseCase:
    """One release trajectory with what is needed to rebuild it: the image (a file or encoded bytes), the
    ground-truth mask (HxW bool), the query when the file has one, and ``origin``: the release-only fields, kept so
    that an export of the imported trajectory writes them back unchanged."""

    key: str
    width: int
    height: int
    clicks: list[ReleaseClick]
    gt: np.ndarray
    origin: dict[str, Any]
    query: str | None = None
    image_file: Path | None = None
    image_array: np.ndarray | None = None  # a NIfTI slice, windowed to uint8
    image_bytes: bytes | None = None
    image_ext: str = ".png"
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------------

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "case"


def _pixel_from_norm(v: float, size: int) -> int:
    """The pixel a normalized coordinate was written from, for both conventions: ``x / W`` rounds back to x (float
    error included), ``(x + 0.5) / W`` floors back to x."""
    t = float(v) * size
    p = round(t) if abs(t - round(t)) < 1e-6 else int(t)
    return min(max(int(p), 0), size - 1)


def _norm(x: int, size: int, profile: CoordProfile) -> float:
    return x / size if profile == "reference" else round(to_normalized(x, size), 4)


def _coco_payload(mask: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(rle_encode_coco(mask).encode("ascii"))).decode("ascii")


def _decode_coco_payload(counts: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    if not isinstance(counts, str) or not counts:
        raise ReleaseFormatError(f"{where}: mask counts must be a non-empty base64 string")
    try:
        return rle_decode_coco(zlib.decompress(base64.b64decode(counts, validate=True)).decode("ascii"), shape)
    except (ValueError, zlib.error, UnicodeDecodeError) as exc:
        raise ReleaseFormatError(f"{where}: {exc}") from exc


def _gray_mask(path: Path, *, threshold: int, reverse: bool = False) -> np.ndarray:
    """A mask file read as the release does: grayscale, ``> threshold`` (``< 128`` with ``reverse``)."""
    g = np.asarray(Image.open(path).convert("L"))
    return g < 128 if reverse else g > threshold


def _resolve(name: Any, what: str, where: str, bases: list[Path]) -> Path:
    if not isinstance(name, str) or not name:
        raise ReleaseFormatError(f"{where}: no {what}")
    p = Path(name)
    cands = [p] if p.is_absolute() else [p, *(b / p for b in bases), *(b / p.name for b in bases)]
    for c in cands:
        for cand in (c, *(c.with_name(c.name + e) for e in _PIL_FORMAT)):
            if cand.is_file():
                return cand
    raise ReleaseFormatError(f"{where}: {what} {name!r} not found (looked as given and under "
                             f"{', '.join(map(str, bases)) or 'no folder'}; pass --root FOLDER)")


def release_overlay(image: Image.Image, mask: np.ndarray) -> bytes:
    """The release converter's observation image: the mask pasted in RGBA (0, 255, 0, 128) over the image,
    alpha-composited, converted to RGB, PNG bytes."""
    base = image.convert("RGBA")
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    layer.paste(OVERLAY_RGBA, mask=Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255, mode="L"))
    buf = io.BytesIO()
    Image.alpha_composite(base, layer).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------------
# Reading the release's files
# ------------------------------------------------------------------------------------------------------------------

def _release_slice(data: np.ndarray, axis: str, index: int) -> np.ndarray:
    from ibisagent.io.volumes import release_slice

    return release_slice(data, "xyz".index(axis), index)


def _trajectory_record(rec: dict[str, Any], key: str, where: str, bases: list[Path]) -> ReleaseCase:
    kind = rec.get("type")
    steps = rec.get("trajectory")
    if kind not in ("img", "nii") or not isinstance(steps, list):
        raise ReleaseFormatError(f"{where}: not a release trajectory record (needs type img|nii and a trajectory list)")
    image_file = _resolve(rec.get("file"), "image file", where, bases)
    mask_file = _resolve(rec.get("mask_file"), "mask file", where, bases)
    image_array = None
    if kind == "img":
        info = rec.get("img_data") or {}
        try:
            w, h = (int(v) for v in info["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseFormatError(f"{where}: img_data.size must be [W, H]") from exc
        gt = _gray_mask(mask_file, threshold=128, reverse=bool(info.get("reverse")))
    else:
        import nibabel as nib

        from ibisagent.io.volumes import release_window

        info = rec.get("nii_data") or {}
        try:
            axis, idx = str(info["slice_dir"]).lower(), int(info["slice_idx"])
            h, w = (int(v) for v in info["slice_size"])
            label = info.get("mask_number", 1)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseFormatError(f"{where}: nii_data needs slice_dir, slice_idx and slice_size") from exc
        if axis not in ("x", "y", "z"):
            raise ReleaseFormatError(f"{where}: nii_data.slice_dir must be x, y or z, got {axis!r}")
        win = info.get("window")
        raw = _release_slice(np.asarray(nib.load(str(image_file)).get_fdata()), axis, idx)
        image_array = release_window(raw, *(win if win else (None, None)))
        gt = _release_slice(np.asarray(nib.load(str(mask_file)).get_fdata()), axis, idx) == label
    if gt.shape != (h, w):
        raise ReleaseFormatError(f"{where}: the mask is {gt.shape[1]}x{gt.shape[0]} but the record says {w}x{h}")
    clicks = []
    for i, st in enumerate(steps):
        try:
            x, y = (int(v) for v in st["coords_original"])
            nx, ny = (float(v) for v in st["coords_norm"])
            m = rle_decode_release(st["mask_rle"], (h, w))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseFormatError(f"{where}: trajectory step {i}: {exc}") from exc
        if not (0 <= x < w and 0 <= y < h):
            raise ReleaseFormatError(f"{where}: trajectory step {i}: click ({x}, {y}) is outside the {w}x{h} image")
        clicks.append(ReleaseClick(x, y, None, (nx, ny), m))
    origin = {"layout": "trajectory", **{k: rec.get(k) for k in ("file", "type", "mask_file", "nii_data", "img_data")}}
    return ReleaseCase(key=key, width=w, height=h, clicks=clicks, gt=gt, origin=origin,
                       image_file=image_file if kind == "img" else None, image_array=image_array,
                       image_ext=Path(image_file).suffix.lower() if kind == "img" else ".png")


def _converter_sample(s: dict[str, Any], where: str, bases: list[Path]) -> ReleaseCase:
    try:
        name, mask_name, clicks_in = s["image_name"], s["mask_name"], s["clicks_list"]
    except (KeyError, TypeError) as exc:
        raise ReleaseFormatError(f"{where}: a sample needs image_name, mask_name and clicks_list") from exc
    caption = s.get("caption")
    caption = caption if isinstance(caption, str) else (caption[0] if caption else None)
    image_file = _resolve(name, "image", where, bases)
    gt = _gray_mask(_resolve(mask_name, "mask", where, bases), threshold=127)
    h, w = gt.shape
    clicks = []
    for i, c in enumerate(clicks_in):
        try:
            x, y = (int(round(float(v))) for v in c["coor"])
            nx, ny = (float(v) for v in c["coor_norm"])
            m = _decode_coco_payload(c["mask"]["counts"], (h, w), f"{where}: {name} click {i}")
            pos = bool(c["is_positive"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseFormatError(f"{where}: {name} click {i}: {exc}") from exc
        clicks.append(ReleaseClick(x, y, pos, (nx, ny), m))
    origin = {"layout": "converter", "image_name": name, "mask_name": mask_name, "caption": s.get("caption")}
    return ReleaseCase(key=f"{Path(str(name)).stem}_{Path(str(mask_name)).stem}", width=w, height=h, clicks=clicks,
                       gt=gt, origin=origin, query=caption, image_file=image_file,
                       image_ext=image_file.suffix.lower())


def _read_json(path: Path, bases: list[Path]) -> list[ReleaseCase]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReleaseFormatError(f"{path}: not readable JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return [_converter_sample(s, f"{path}: data[{i}]", bases) for i, s in enumerate(data["data"])]
    records = data if isinstance(data, list) else [data]
    if not records or not all(isinstance(r, dict) for r in records):
        raise ReleaseFormatError(f"{path}: expected a release trajectory record (or a list of them) or a converter "
                                 "dataset {\"data\": [...]}")
    many = len(records) > 1
    return [_trajectory_record(r, f"{path.stem}_{i}" if many else path.stem, f"{path}" + (f"[{i}]" if many else ""),
                               bases) for i, r in enumerate(records)]


def _plain(value: Any) -> Any:
    """Parquet values (numpy arrays, nested) as plain Python lists/dicts."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


_ANSWER = re.compile(r"^(Positive|Negative) Point \(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)$")


def _read_parquet(path: Path, bases: list[Path]) -> list[ReleaseCase]:
    try:
        import pandas as pd

        frame = pd.read_parquet(path)
    except ImportError as exc:  # pragma: no cover - pandas is in the train extra
        raise ReleaseFormatError("reading parquet needs pandas and pyarrow: pip install 'ibisagent[train]'") from exc
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise ReleaseFormatError(f"{path}: not a readable parquet file ({exc})") from exc
    missing = [c for c in ("data_source", "images", "extra_info") if c not in frame.columns]
    if missing:
        raise ReleaseFormatError(f"{path}: not the release's RL layout (no column {', '.join(missing)})")
    groups: dict[tuple, list[tuple[int, dict[str, Any], bytes]]] = {}
    for n, row in enumerate(frame.to_dict("records")):
        where = f"{path}: row {n}"
        if row["data_source"] != RELEASE_DATA_SOURCE:
            raise ReleaseFormatError(f"{where}: data_source {row['data_source']!r} is not the release's "
                                     f"{RELEASE_DATA_SOURCE!r}")
        info = _plain(row["extra_info"])
        images = _plain(row["images"])
        try:
            img_bytes = images[0]["bytes"]
            key = (info["dataset"], info["split"], info["original_image_name"], info["gt_mask_name"], info["question"])
        except (KeyError, IndexError, TypeError) as exc:
            raise ReleaseFormatError(f"{where}: missing {exc} (images[0].bytes or an extra_info field)") from exc
        groups.setdefault(key, []).append((int(info.get("index", n)), info, img_bytes))
    cases = []
    for (dataset, split, img_name, mask_name, question), rows in groups.items():
        rows.sort(key=lambda r: (len(r[1].get("clicklist") or []), r[0]))
        where = f"{path}: {img_name}"
        if [len(r[1].get("clicklist") or []) for r in rows] != list(range(len(rows))):
            raise ReleaseFormatError(f"{where}: the rows do not hold clicks 0..{len(rows) - 1} in order")
        try:
            w, h = (int(v) for v in rows[0][1]["image_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseFormatError(f"{where}: image_size must be [W, H]") from exc
        origin_bytes = rows[0][2]
        try:
            im = Image.open(io.BytesIO(origin_bytes))
            fmt = im.format or "PNG"
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise ReleaseFormatError(f"{where}: images[0].bytes is not an image ({exc})") from exc
        if im.size != (w, h):
            raise ReleaseFormatError(f"{where}: the image is {im.size[0]}x{im.size[1]}, image_size says {w}x{h}")
        gt = _gray_mask(_resolve(mask_name, "gt_mask_name", where, bases), threshold=127)
        if gt.shape != (h, w):
            raise ReleaseFormatError(f"{where}: the ground-truth mask is {gt.shape[1]}x{gt.shape[0]}, not {w}x{h}")
        clicks = []
        for i, (_, info, _) in enumerate(rows):
            m = _ANSWER.match(str(info.get("answer", "")).strip())
            if m is None:
                raise ReleaseFormatError(f"{where}: click {i}: answer {info.get('answer')!r} is not a point")
            nx, ny = float(m.group(2)), float(m.group(3))
            if i + 1 < len(rows):
                x, y = (int(round(float(v))) for v in rows[i + 1][1]["clicklist"][i])
            else:
                x, y = _pixel_from_norm(nx, w), _pixel_from_norm(ny, h)
            mask = _decode_coco_payload(info.get("current_gt_mask"), (h, w), f"{where}: click {i}")
            clicks.append(ReleaseClick(x, y, m.group(1) == "Positive", (nx, ny), mask))
        q = str(question)
        origin = {"layout": "rl", "dataset": dataset, "split": split, "original_image_name": img_name,
                  "gt_mask_name": mask_name, "question": q}
        cases.append(ReleaseCase(key=f"{dataset}_{Path(str(img_name)).stem}_{Path(str(mask_name)).stem}", width=w,
                                 height=h, clicks=clicks, gt=gt, origin=origin,
                                 query=q.removeprefix("<image>").strip(), image_bytes=origin_bytes,
                                 image_ext=".jpg" if fmt == "JPEG" else ".png"))
    return cases


def read_release(path: str | Path, roots: Iterable[str | Path] = ()) -> list[ReleaseCase]:
    """The release cases in one file: a trajectory JSON (a record or a list of them), a converter dataset JSON, or an
    RL parquet. Images and masks named in the file are looked up as given, beside the file and under ``roots``."""
    p = Path(path)
    if not p.is_file():
        raise ReleaseFormatError(f"{p}: no such file")
    bases = [p.parent, *(Path(r) for r in roots)]
    if p.suffix.lower() == ".parquet":
        return _read_parquet(p, bases)
    if p.suffix.lower() == ".json":
        return _read_json(p, bases)
    raise ReleaseFormatError(f"{p}: expected a .json (trajectories) or .parquet (RL rows) file of the release")


# ------------------------------------------------------------------------------------------------------------------
# Release case -> our trajectory
# ------------------------------------------------------------------------------------------------------------------

def to_trajectory(rc: ReleaseCase, case_id: str, query: str, *, iou_threshold: float = 0.8,
                  meta: dict[str, Any] | None = None) -> Trajectory:
    """Our trajectory of a release case: one click step per release click (our reply text: grounded reasoning and
    the click in our coordinate convention), then a Terminate step when the last mask reaches ``iou_threshold``
    (the release writes none). A click whose type the file does not store is positive where the ground truth is."""
    w, h, gt = rc.width, rc.height, rc.gt
    target = target_name(query)
    rng = random.Random(variant_seed(case_id, _VARIANT, 0))
    steps: list[TrajectoryStep] = []
    pts: list[list[float]] = []
    labels: list[int] = []
    prev: np.ndarray | None = None
    for c in rc.clicks:
        positive = bool(gt[c.y, c.x]) if c.positive is None else c.positive
        before = np.zeros_like(gt) if prev is None else prev
        region = (gt & ~before) if positive else (before & ~gt)
        think = describe_click(positive=positive, x=c.x, y=c.y, width=w, height=h, target=target, region=region,
                               mask=prev, rng=rng)
        nx, ny = to_normalized(c.x, w), to_normalized(c.y, h)
        action = Action.positive(nx, ny) if positive else Action.negative(nx, ny)
        state = StepState(clicks=[list(p) for p in pts], labels=list(labels), box=None,
                          prev_mask_rle=None if prev is None else rle_encode(prev), iou_before=iou(before, gt))
        steps.append(TrajectoryStep(step=len(steps) + 1, state=state, reply=format_reply(action, think),
                                    action=action.text(), kind=action.kind.value, iou_after=iou(c.mask, gt)))
        pts.append([float(c.x), float(c.y)])
        labels.append(int(positive))
        prev = c.mask
    final = iou(prev, gt) if prev is not None else 0.0
    extra = dict(meta or {})
    reached = prev is not None and final >= iou_threshold
    if reached:
        think, answer = describe_stop(mask=prev, target=target, rng=rng)
        stop = Action.terminate()
        steps.append(TrajectoryStep(step=len(steps) + 1,
                                    state=StepState(clicks=[list(p) for p in pts], labels=list(labels), box=None,
                                                    prev_mask_rle=rle_encode(prev), iou_before=final),
                                    reply=format_reply(stop, think, answer), action=stop.text(), kind="terminate",
                                    iou_after=final, role="stop"))
    elif prev is not None:
        extra["final_mask_rle"] = rle_encode(prev)  # no Terminate step holds the last mask
    return Trajectory(id=f"{case_id}::{_VARIANT}", case_id=case_id, variant=_VARIANT, query=query, target=target,
                      width=w, height=h, grammar="reference", segmenter="", steps=steps, final_iou=final,
                      reached=reached, meta=extra)


def import_release(paths: Iterable[str | Path], out: str | Path, *, roots: Iterable[str | Path] = (),
                   query: str | None = None, name: str = "release", iou_threshold: float = 0.8) -> dict[str, Any]:
    """Convert release files into our layout under ``out``: ``OUT/<name>/`` a dataset folder (``index.jsonl``,
    ``images/``, ``masks/``: usable by ``eval`` and ``synthesize``) and ``OUT/synth/`` a synthesis folder
    (``shards/shard-00000.jsonl``, ``manifest.json``: usable by ``export``). ``query`` is used for cases whose file
    has no caption (the trajectory JSON has none). Every file is read and checked before anything is written."""
    roots = list(roots)
    files = [Path(p) for p in paths]
    if not files:
        raise ReleaseFormatError("no release files given")
    cases = [(f, rc) for f in files for rc in read_release(f, roots)]
    if not cases:
        raise ReleaseFormatError(f"no release cases in {', '.join(map(str, files))}")
    for f, rc in cases:
        if not (rc.query or query):
            raise ReleaseFormatError(f"{f}: case {rc.key} has no caption; pass --query TEXT")
        if not rc.gt.any():
            raise ReleaseFormatError(f"{f}: case {rc.key}: the ground-truth mask is empty")
    out = Path(out)
    data_dir, synth_dir = out / _safe(name), out / "synth"
    if (synth_dir / "shards").exists():
        raise ReleaseFormatError(f"{synth_dir} already holds shards; choose another --out")
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    (data_dir / "masks").mkdir(parents=True, exist_ok=True)
    (synth_dir / "shards").mkdir(parents=True, exist_ok=True)
    index_rows, records, seen = [], [], set()
    for order, (_, rc) in enumerate(cases):
        key = _safe(rc.key)
        k, n = key, 1
        while k in seen:
            n += 1
            k = f"{key}_{n}"
        seen.add(k)
        img_rel, mask_rel = f"images/{k}{rc.image_ext}", f"masks/{k}.png"
        if rc.image_bytes is not None:
            (data_dir / img_rel).write_bytes(rc.image_bytes)
        elif rc.image_array is not None:
            Image.fromarray(rc.image_array).convert("RGB").save(data_dir / img_rel)
        else:
            assert rc.image_file is not None
            shutil.copyfile(rc.image_file, data_dir / img_rel)
        Image.fromarray(rc.gt.astype(np.uint8) * 255).save(data_dir / mask_rel)
        case_id = f"{_safe(name)}/{k}"
        q = rc.query or str(query)
        index_rows.append({"id": k, "image": img_rel, "mask": mask_rel, "query": q, "object": "", "modality": "",
                           "dataset": str(rc.origin.get("dataset") or name), "label_type": "binary"})
        meta = {"image": str((data_dir / img_rel).resolve()), "mask": str((data_dir / mask_rel).resolve()),
                "source": _safe(name), "dataset": str(rc.origin.get("dataset") or name), "modality": "",
                "object": "", "split": str(rc.origin.get("split") or "train"),
                "release": {**rc.origin, "key": rc.key, "order": order}}
        records.append(to_trajectory(rc, case_id, q, iou_threshold=iou_threshold, meta=meta).to_json())
    (data_dir / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index_rows), encoding="utf-8")
    (synth_dir / "shards" / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records),
                                                            encoding="utf-8")
    counts = {"kept": len(records), "reached": sum(r["reached"] for r in records),
              "clicks": sum(r["n_interactions"] for r in records)}
    manifest = {"source": "import-release", "files": [str(f) for f in files], "iou_threshold": iou_threshold,
                "dataset": str(data_dir), "status": "complete", "counts": counts}
    (synth_dir / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return {"format": "import-release", "dataset": str(data_dir), "synth": str(synth_dir), "cases": len(records),
            **counts}


# ------------------------------------------------------------------------------------------------------------------
# Our trajectories -> the release's layout
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class _Clicks:
    """The clicks of one of our trajectory records in release terms: pixels, types, the masks after each."""

    xy: list[tuple[int, int]]
    positive: list[bool]
    masks: list[np.ndarray]
    ious_before: list[float]


class _NotReleasable(Exception):
    """A trajectory the release's layout cannot hold (a box step)."""


def _release_clicks(rec: dict[str, Any]) -> _Clicks:
    w, h = int(rec["width"]), int(rec["height"])
    steps = rec["steps"]
    out = _Clicks([], [], [], [])
    for i, st in enumerate(steps):
        if st["kind"] == "terminate":
            continue
        if st["kind"] not in ("positive", "negative"):
            raise _NotReleasable(f"step {st['step']} is a {st['kind']}")
        try:
            action = parse_action(st["action"], "extended")
        except ActionParseError as exc:
            raise ExportError(f"{rec['id']}: step {st['step']}: {exc}") from exc
        nxt = steps[i + 1]["state"].get("prev_mask_rle") if i + 1 < len(steps) else rec.get("final_mask_rle")
        if nxt is None:
            break  # the mask after the last click is not stored: that click cannot be written
        out.xy.append(action.pixel(w, h))
        out.positive.append(action.kind is ActionKind.POSITIVE)
        out.masks.append(rle_decode(nxt))
        out.ious_before.append(float(st["state"]["iou_before"]))
    return out


def _records(synth_dir: str | Path, variants: Iterable[str] | None) -> Iterator[tuple[dict[str, Any], _Clicks | str]]:
    recs = load_trajectories(synth_dir, variants)
    recs.sort(key=lambda r: (0, (r.get("release") or {})["order"]) if "order" in (r.get("release") or {}) else (1, 0))
    for rec in recs:  # imported release cases first, in their files' order (a stable sort keeps ours by id)
        try:
            yield rec, _release_clicks(rec)
        except _NotReleasable as exc:
            yield rec, str(exc)


def export_release_trajectories(synth_dir: str | Path, out: str | Path, *, variants: Iterable[str] | None = None,
                                profile: CoordProfile = "default") -> dict[str, Any]:
    """Write ``OUT/trajectories/<id>.json``, one release trajectory record per trajectory (as
    ``trajectory_gen/run_tr_gen.py`` writes them). Trajectories with a box step are left out (counted)."""
    out = Path(out)
    (out / "trajectories").mkdir(parents=True, exist_ok=True)
    written, skipped = 0, 0
    for rec, clicks in _records(synth_dir, variants):
        if isinstance(clicks, str):
            skipped += 1
            continue
        w, h = int(rec["width"]), int(rec["height"])
        origin = rec.get("release") or {}
        if origin.get("layout") == "trajectory":
            head = {k: origin.get(k) for k in ("file", "type", "mask_file", "nii_data", "img_data")}
        else:
            head = {"file": rec["image"], "type": "img", "mask_file": rec["mask"], "nii_data": None,
                    "img_data": {"format": Path(rec["image"]).suffix.lstrip(".").lower(), "size": [w, h],
                                 "reverse": False}}
        steps = [{"step": i, "coords_norm": [_norm(x, w, profile), _norm(y, h, profile)], "coords_original": [x, y],
                  "mask_rle": rle_encode_release(m)} for i, ((x, y), m) in enumerate(zip(clicks.xy, clicks.masks))]
        stem = origin.get("key") or _safe(rec["case_id"].split("/", 1)[-1])
        path = out / "trajectories" / f"{stem}.json"
        path.write_text(json.dumps({**head, "trajectory": steps}, indent=4, ensure_ascii=False), encoding="utf-8")
        written += 1
    if not written:
        raise ExportError(f"no trajectory of {synth_dir} fits the release's layout ({skipped} have box steps)")
    return {"format": "release-trajectories", "folder": str(out / "trajectories"), "trajectories": written,
            "skipped_box": skipped, "profile": profile}


def _image_bytes(path: Path) -> bytes:
    """The case image as the release stores it: the file's own bytes for PNG/JPEG, else re-encoded as PNG."""
    with Image.open(path) as im:
        if im.format in ("PNG", "JPEG"):
            return path.read_bytes()
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


def export_release_verl(synth_dir: str | Path, out: str | Path, *, name: str = "train",
                        variants: Iterable[str] | None = None, profile: CoordProfile = "default") -> dict[str, Any]:
    """Write ``OUT/<name>.parquet`` in the release converter's RL layout, one row per click (see the module
    docstring). The default profile adds ``current_step`` (1-based) and ``pre_iou`` to ``extra_info``."""
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - pandas is in the train extra
        raise ExportError("the release-verl export needs pandas and pyarrow: pip install 'ibisagent[train]'") from exc
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    skipped = 0
    for rec, clicks in _records(synth_dir, variants):
        if isinstance(clicks, str):
            skipped += 1
            continue
        w, h = int(rec["width"]), int(rec["height"])
        origin = rec.get("release") or {}
        image_path = Path(rec["image"])
        if origin.get("layout") == "rl":
            fields = {k: origin[k] for k in ("dataset", "split", "original_image_name", "gt_mask_name", "question")}
        else:
            fields = {"dataset": rec.get("source") or rec.get("dataset") or "data", "split": rec.get("split", "train"),
                      "original_image_name": str(image_path), "gt_mask_name": str(rec["mask"]),
                      "question": f"<image>{rec['query']}"}
        plain = _image_bytes(image_path)
        with Image.open(io.BytesIO(plain)) as base:
            base.load()
            images = [plain] + [release_overlay(base, m) for m in clicks.masks[:-1]]
        for i, ((x, y), pos) in enumerate(zip(clicks.xy, clicks.positive)):
            answer = f"{'Positive' if pos else 'Negative'} Point ({_norm(x, w, profile)}, {_norm(y, h, profile)})"
            info = {"split": fields["split"], "index": len(rows), "answer": answer, "question": fields["question"],
                    "dataset": fields["dataset"], "original_image_name": fields["original_image_name"],
                    "gt_mask_name": fields["gt_mask_name"], "clicklist": [list(p) for p in clicks.xy[:i]],
                    "labels": [int(v) for v in clicks.positive[:i]], "current_gt_mask": _coco_payload(clicks.masks[i]),
                    "image_size": [w, h]}
            if profile != "reference":
                info.update(current_step=i + 1, pre_iou=clicks.ious_before[i])
            rows.append({"data_source": RELEASE_DATA_SOURCE,
                         "prompt": [{"role": "user", "content": fields["question"]}],
                         "images": [{"bytes": images[i]}], "ability": "reasoning",
                         "reward_model": {"style": "rule", "ground_truth": answer}, "extra_info": info})
    if not rows:
        raise ExportError(f"no trajectory of {synth_dir} fits the release's layout ({skipped} have box steps)")
    path = out / f"{name}.parquet"
    pd.DataFrame(rows).to_parquet(path, engine="pyarrow", index=False)
    return {"format": "release-verl", "file": str(path), "rows": len(rows), "skipped_box": skipped,
            "profile": profile}
