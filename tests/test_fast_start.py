"""Warm single-image ``segment`` (issue 27, "quick start"): no PyTorch LiteMedSAM is built when its exported graphs
are cached, the segment path imports none of the heavy optional modules, and the masks are those of a cold start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGE = REPO / "src" / "ibisagent" / "demo_data" / "images" / "ph2_IMD006.png"
QUERY = "the pigmented skin lesion"
#: modules a single-image 2D ``segment`` never needs: DICOM / NIfTI / SimpleITK readers, tables, the web app and
#: server, the LLM stacks, plotting; ``onnx`` (only to export) and ``openvino`` (only the encoder uses it, and the
#: warm run below finds the image's embedding in the disk cache)
HEAVY = ("pydicom", "highdicom", "SimpleITK", "nibabel", "pandas", "pyarrow", "gradio", "fastapi", "uvicorn",
         "starlette", "transformers", "sentence_transformers", "matplotlib", "sklearn", "onnx", "openvino")

PROBE = """
import json, sys
from ibisagent.cli import main
rc = main(["segment", {image!r}, "--query", {query!r}, "--out", {out!r}, "--quiet"])
from ibisagent.segmenters import litemedsam as lm
print(json.dumps({{"rc": rc, "heavy": sorted(m for m in {heavy!r} if m in sys.modules),
                   "built": lm._BASE is not None or bool(lm._CLICK)}}))
"""


def _segment_in_subprocess(cache: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "IBISAGENT_CACHE_DIR": str(cache)}
    code = PROBE.format(image=str(DEMO_IMAGE), query=QUERY, out=str(out), heavy=HEAVY)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, run.stderr[-3000:]
    result["mask"] = np.asarray(Image.open(out / "mask.png"))
    return result


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> SimpleNamespace:
    """A cold ``segment`` in a fresh cache folder (exports the encoder and decoder, records their weights)."""
    cache = tmp_path_factory.mktemp("cache")
    result = _segment_in_subprocess(cache, tmp_path_factory.mktemp("out_first"))
    return SimpleNamespace(cache=cache, **result)


@pytest.mark.slow
def test_warm_segment_builds_no_model_imports_nothing_heavy_same_mask(first_run, tmp_path) -> None:
    assert first_run.built  # nothing cached yet: the PyTorch model was built (to export it)
    records = list((first_run.cache / "onnx" / "weights").glob("litemedsam-*.json"))
    assert records
    for r in records:  # without the record, a warm run builds the model and decodes through it (as before)
        r.unlink()
    built = _segment_in_subprocess(first_run.cache, tmp_path / "built")
    assert built["built"]
    # With the record (written again by that run) the model is not built. Masks are compared between warm runs:
    # the disk embedding cache keeps float16, so a cold run's mask may differ from a warm one's by a few pixels.
    warm = _segment_in_subprocess(first_run.cache, tmp_path / "warm")
    assert warm["heavy"] == []
    assert not warm["built"]
    assert np.array_equal(warm["mask"], built["mask"]) and warm["mask"].any()


@pytest.mark.slow
def test_record_follows_the_weights_file_and_the_model_is_built_on_demand(first_run, tmp_path, monkeypatch) -> None:
    from ibisagent.io import load_rgb
    from ibisagent.segmenters import litemedsam as lm

    monkeypatch.setenv("IBISAGENT_CACHE_DIR", str(first_run.cache))  # exported graphs + the image's embedding
    weights = tmp_path / "click.safetensors"  # the shipped weights under another name: same digests, new record
    shutil.copy(lm.CLICK_WEIGHTS, weights)
    img = load_rgb(DEMO_IMAGE)
    points, labels = np.array([[300.0, 260.0]]), np.array([1])
    assert lm.read_weights_record(weights) is None

    cold = lm.LiteMedSAMSegmenter(weights=weights, memory_cache=False)  # no record: built, record written
    assert cold._parts is not None
    assert lm.read_weights_record(weights) == lm.read_weights_record(lm.CLICK_WEIGHTS)
    cold.set_image(img)
    ref = cold.predict(points, labels)

    real_load = lm.load_click_model

    def no_model(*a, **k):
        raise AssertionError("the PyTorch model was built on a warm start")

    monkeypatch.setattr(lm, "_CLICK", {})  # as in a new process
    monkeypatch.setattr(lm, "load_click_model", no_model)
    warm = lm.LiteMedSAMSegmenter(weights=weights, memory_cache=False)
    warm.set_image(img)
    res = warm.predict(points, labels)
    assert warm._parts is None
    assert np.array_equal(res.mask, ref.mask) and np.array_equal(res.logits, ref.logits) and res.score == ref.score
    monkeypatch.setattr(lm, "load_click_model", real_load)
    assert warm.parts.mask_decoder is not None  # built when asked for (training, torch runtimes)

    st = weights.stat()  # a rewritten weights file (new mtime) has no record: the model is built again
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert lm.read_weights_record(weights) is None
    monkeypatch.setattr(lm, "_CLICK", {})
    assert lm.LiteMedSAMSegmenter(weights=weights, memory_cache=False)._parts is not None
