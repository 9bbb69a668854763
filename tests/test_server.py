"""The HTTP tool server: the reference /segment request, the JSON variants, path and size checks, bounded
concurrency (503), timeouts (504), and a short load run on a real loopback uvicorn server."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from app_fixtures import BLOB_CENTER, blob_image, write_blob_case
from ibisagent.masks import iou, rle_decode
from ibisagent.runtime import SegmenterHub
from ibisagent.segmenters.fake import FakeSegmenter
from ibisagent.server import (
    Busy,
    Limiter,
    PathRejected,
    ServerConfig,
    create_app,
    resolve_data_path,
    sniff_upload,
    uvicorn_config,
)
from ibisagent.session import Session

fastapi_testclient = pytest.importorskip("fastapi.testclient")


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "data"
    write_blob_case(r)
    outside = tmp_path / "outside"
    outside.mkdir()
    img, _ = blob_image(seed=3)
    from PIL import Image

    Image.fromarray(img).save(outside / "secret.png")
    os.symlink(outside / "secret.png", r / "images" / "link_out.png")
    os.symlink(r / "images" / "blob.png", r / "images" / "link_in.png")
    os.symlink(outside, r / "dir_out")
    return r


def _client(root: Path, **cfg):
    hub = cfg.pop("hub", None)
    app = create_app(ServerConfig(data_root=root, segmenter=cfg.pop("segmenter", "fake"), **cfg), hub=hub)
    return fastapi_testclient.TestClient(app)


def _ref_mask(points, labels) -> np.ndarray:
    img, _ = blob_image()
    seg = FakeSegmenter()
    seg.set_image(img)
    return seg.predict(np.asarray(points, np.float32), np.asarray(labels)).mask


# ------------------------------------------------------------------------------------------------- reference shape

def test_reference_request_returns_npy_mask(root):
    c = _client(root)
    body = {"image_path": "images/blob.png", "clicklist": [[130, 100], [10, 10]], "labels": [1, 0]}
    r = c.post("/segment", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    mask = np.load(io.BytesIO(r.content))  # exactly what the reference client does
    assert mask.shape == (200, 240) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask.astype(bool), _ref_mask([[130, 100], [10, 10]], [1, 0]))
    # absolute paths inside the root work too (the reference sends absolute paths)
    r2 = c.post("/segment", json={**body, "image_path": str(root / "images" / "blob.png")})
    assert r2.status_code == 200 and r2.content == r.content


def test_segment_options_and_empty_clicks(root):
    c = _client(root)
    r = c.post("/segment", json={"image_path": "images/blob.png", "clicklist": [], "labels": []})
    m = np.load(io.BytesIO(r.content))
    assert m.shape == (200, 240) and not m.any()
    r = c.post("/segment", json={"image_path": "images/blob.png", "clicklist": [[130, 100]], "labels": [1],
                                 "dtype": "float32"})
    m = np.load(io.BytesIO(r.content))
    assert m.dtype == np.float32 and m.max() == 1.0
    r = c.post("/segment", json={"image_path": "images/blob.png", "clicklist": [[1, 1]], "labels": [1],
                                 "dtype": "object"})
    assert r.status_code == 422


def test_json_variant_rle_matches_npy(root):
    c = _client(root)
    body = {"image_path": "images/blob.png", "clicklist": [[130, 100], [150, 100]], "labels": [1, 0]}
    npy = np.load(io.BytesIO(c.post("/segment", json=body).content)).astype(bool)
    j = c.post("/v1/segment", json=body).json()
    assert j["shape"] == [200, 240] and j["area"] == int(npy.sum())
    np.testing.assert_array_equal(rle_decode(j["mask_rle"]), npy)
    assert j["score"] is None  # the fake backend has no quality estimate (NaN -> null)
    assert {"load_s", "segment_s", "total_s"} <= set(j["timings"])
    # mask_feedback replays the clicks one by one with the previous logits, as an interactive session does
    j2 = c.post("/v1/segment", json={**body, "mask_feedback": True}).json()
    img, _ = blob_image()
    s = Session(FakeSegmenter())
    s.set_image(img)
    s.add_click(130, 100)
    s.add_click(150, 100, positive=False)
    np.testing.assert_array_equal(rle_decode(j2["mask_rle"]), s.mask)


def test_bad_requests_are_4xx(root):
    c = _client(root, max_clicks=4)
    base = {"image_path": "images/blob.png"}
    cases = [
        ({**base, "clicklist": [[1, 1]], "labels": [1, 0]}, 422),  # label count
        ({**base, "clicklist": [[1, 1, 1]], "labels": [1]}, 422),  # not pairs
        ({**base, "clicklist": [[500, 1]], "labels": [1]}, 422),  # off the image
        ({**base, "clicklist": [[1, 1]], "labels": [2]}, 422),  # label value
        ({**base, "clicklist": "1,1", "labels": [1]}, 422),
        ({**base, "clicklist": [[1, 1]] * 5, "labels": [1] * 5}, 413),  # too many clicks
        ({"clicklist": [[1, 1]], "labels": [1]}, 400),  # no image_path
    ]
    for body, status in cases:
        r = c.post("/segment", json=body)
        assert r.status_code == status, (body, r.text)
        assert "error" in r.json()
    r = c.post("/segment", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = c.post("/segment", json=[1, 2])
    assert r.status_code == 400


# ------------------------------------------------------------------------------------------------------ paths

@pytest.mark.parametrize("path, status", [
    ("../outside/secret.png", 400),
    ("images/../../outside/secret.png", 400),
    ("images/..\\..\\outside\\secret.png", 400),
    ("/etc/passwd", 403),
    ("images/link_out.png", 403),  # symlink leading out of the root
    ("dir_out/secret.png", 403),  # symlinked folder leading out
    ("images/missing.png", 404),
    ("", 400),
    ("images/blob.png\x00.txt", 400),
])
def test_path_traversal_is_refused(root, path, status):
    c = _client(root)
    r = c.post("/segment", json={"image_path": path, "clicklist": [[1, 1]], "labels": [1]})
    assert r.status_code == status, r.text


def test_absolute_path_outside_root_and_symlink_inside(root):
    c = _client(root)
    r = c.post("/segment", json={"image_path": str(root.parent / "outside" / "secret.png"),
                                 "clicklist": [[1, 1]], "labels": [1]})
    assert r.status_code == 403
    r = c.post("/segment", json={"image_path": "images/link_in.png", "clicklist": [[130, 100]], "labels": [1]})
    assert r.status_code == 200
    r = c.post("/segment", json={"image_path": 123, "clicklist": [[1, 1]], "labels": [1]})
    assert r.status_code == 400


def test_resolve_data_path_unit(root):
    assert resolve_data_path(root, "images/blob.png") == (root / "images" / "blob.png").resolve()
    with pytest.raises(PathRejected) as e:
        resolve_data_path(root, "images/link_out.png")
    assert e.value.status == 403


# ------------------------------------------------------------------------------------------------- size limits

def test_oversized_body_is_refused(root):
    c = _client(root, max_body_bytes=2048)
    big = {"image_path": "images/blob.png", "clicklist": [[1, 1]] * 400, "labels": [1] * 400}
    r = c.post("/segment", json=big)
    assert r.status_code == 413
    # without a Content-Length (chunked upload) the limit holds while reading

    def chunks():
        yield b'{"image_path": "images/blob.png", "clicklist": ['
        for _ in range(300):
            yield b"[1, 1],"
        yield b"[1, 1]]}"

    r = c.post("/segment", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    ok = c.post("/segment", json={"image_path": "images/blob.png", "clicklist": [[1, 1]], "labels": [1]})
    assert ok.status_code == 200


def test_sniff_upload():
    assert sniff_upload(b"\x89PNG\r\n\x1a\n" + b"0" * 10, 100) == ".png"
    assert sniff_upload(b"\xff\xd8\xff\xe0" + b"0" * 10, 100) == ".jpg"
    assert sniff_upload(b"\0" * 128 + b"DICM" + b"0" * 10, 1000) == ".dcm"
    for data, status in [(b"GIF89a" + b"0" * 10, 415), (b"", 400), (b"\x89PNG\r\n\x1a\n" + b"0" * 200, 413)]:
        with pytest.raises(Exception) as e:
            sniff_upload(data, 100)
        assert e.value.status == status


# ---------------------------------------------------------------------------------------------------- episodes

def test_episode_from_path_and_upload(root):
    c = _client(root)
    r = c.post("/v1/episode", json={"image_path": "images/blob.png", "mask_path": "masks/blob__lesion.png",
                                    "query": "segment the bright lesion"})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["stop_reason"] == "terminate" and j["final_iou"] > 0.95 and j["policy"] == "oracle"
    assert rle_decode(j["final_mask_rle"]).shape == (200, 240)
    files = {"image": ("x.png", (root / "images/blob.png").read_bytes(), "image/png"),
             "mask": ("m.png", (root / "masks/blob__lesion.png").read_bytes(), "image/png")}
    r = c.post("/v1/episode", files=files, data={"query": "segment the bright lesion", "max_steps": "5"})
    assert r.status_code == 200, r.text
    assert r.json()["final_iou"] > 0.95 and r.json()["n_steps"] <= 5


def test_episode_on_a_nifti_slice(root):
    from app_fixtures import write_blob_volume

    write_blob_volume(root)
    c = _client(root)
    r = c.post("/v1/episode", json={"image_path": "vol.nii.gz", "mask_path": "vol_label.nii.gz", "slice_index": 2,
                                    "window": "ct-soft-tissue", "query": "segment the lesion"})
    assert r.status_code == 200, r.text
    assert r.json()["final_iou"] > 0.9
    r = c.post("/v1/segment", json={"image_path": "vol.nii.gz", "clicklist": [[1, 1]], "labels": [1]})
    assert r.status_code == 422 and "slice_index" in r.json()["error"]  # a volume needs a slice


def test_episode_rejections(root):
    c = _client(root, max_upload_bytes=4000)
    png = (root / "images/blob.png").read_bytes()
    assert len(png) > 4000
    r = c.post("/v1/episode", files={"image": ("x.png", png, "image/png")}, data={"query": "q"})
    assert r.status_code == 413
    r = c.post("/v1/episode", files={"image": ("x.txt", b"just some text", "text/plain")}, data={"query": "q"})
    assert r.status_code == 415
    c = _client(root)
    r = c.post("/v1/episode", json={"image_path": "images/blob.png", "query": "segment it"})
    assert r.status_code == 422 and "ground-truth" in r.json()["error"]  # oracle without a mask
    r = c.post("/v1/episode", json={"image_path": "images/blob.png", "query": "", "mask_path": "masks/blob__lesion.png"})
    assert r.status_code == 422
    r = c.post("/v1/episode", json={"image_path": "images/blob.png", "query": "x", "policy": "nope",
                                    "mask_path": "masks/blob__lesion.png"})
    assert r.status_code == 422 and "unknown" in r.json()["error"]
    r = c.post("/v1/episode", json={"image_path": "../x.png", "query": "x"})
    assert r.status_code == 400


def test_health(root):
    c = _client(root, health_details=True)
    j = c.get("/health").json()
    assert j["status"] == "ok" and j["segmenter"] == "fake" and j["limits"]["concurrency"] == 2
    c.post("/segment", json={"image_path": "images/blob.png", "clicklist": [[1, 1]], "labels": [1]})
    c.post("/segment", json={"image_path": "images/blob.png", "clicklist": [[2, 2]], "labels": [1]})
    j = c.get("/health").json()
    assert j["image_cache"]["hits"] >= 1 and j["set_image_calls"] == 1  # one encode for repeated requests


# ----------------------------------------------------------------------------------------- concurrency / timeouts

class SlowFake(FakeSegmenter):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def _decode(self, *args):
        time.sleep(self.delay)
        return super()._decode(*args)


def test_limiter_queue_and_timeout():
    async def scenario():
        lim = Limiter(concurrency=1, max_queue=1)
        slow = asyncio.ensure_future(lim.run(lambda: time.sleep(0.3) or "a", timeout=5))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(lim.run(lambda: "b", timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await lim.run(lambda: "c", timeout=5)
        assert await slow == "a" and await queued == "b"
        with pytest.raises(TimeoutError):
            await lim.run(lambda: time.sleep(0.3), timeout=0.05)
        assert lim.running == 1  # the timed-out job keeps its slot until its thread ends
        await asyncio.sleep(0.4)
        assert lim.running == 0 and lim.stats()["timed_out"] == 1 and lim.stats()["rejected"] == 1

    asyncio.run(scenario())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(app):
    """Run ``app`` with uvicorn (configured as ``ibisagent serve`` runs it: :func:`uvicorn_config`) on a free
    127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn_config(app, app.state.service.config, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 15
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_http_503_when_queue_full_and_504_on_timeout(root):
    import httpx

    hub = SegmenterHub(factory=lambda name: SlowFake(0.5))
    app = create_app(ServerConfig(data_root=root, segmenter="fake", max_concurrency=1, max_queue=0,
                                  timeout_s=5), hub=hub)
    body = {"image_path": "images/blob.png", "clicklist": [[130, 100]], "labels": [1]}
    codes: list[int] = []
    with live_server(app) as url:
        def post() -> None:
            codes.append(httpx.post(f"{url}/segment", json=body, timeout=10).status_code)

        threads = [threading.Thread(target=post) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
    assert sorted(codes)[0] == 200 and 503 in codes, codes
    c = _client(root, hub=SegmenterHub(factory=lambda name: SlowFake(0.5)), timeout_s=0.1)
    r = c.post("/segment", json=body)
    assert r.status_code == 504 and "longer than" in r.json()["error"]


def test_loopback_server_under_short_load(root):
    """A real uvicorn server on 127.0.0.1: 4 clients for ~1.5 s, zero errors (benchmarks/bench_server.py does the
    8-client, 20-s run)."""
    import httpx

    app = create_app(ServerConfig(data_root=root, segmenter="fake", max_queue=16, health_details=True))
    with live_server(app) as url:
        errors: list[str] = []
        counts = [0] * 4

        def worker(i: int) -> None:
            rng = np.random.default_rng(i)
            with httpx.Client(base_url=url, timeout=10) as cl:
                end = time.time() + 1.5
                while time.time() < end:
                    x, y = int(rng.integers(0, 240)), int(rng.integers(0, 200))
                    r = cl.post("/segment", json={"image_path": "images/blob.png", "clicklist": [[x, y]],
                                                  "labels": [1]})
                    if r.status_code != 200 or np.load(io.BytesIO(r.content)).shape != (200, 240):
                        errors.append(f"{r.status_code}: {r.text[:80]}")
                    counts[i] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert sum(counts) >= 8
        assert httpx.get(f"{url}/health").json()["limits"]["rejected"] == 0


@pytest.mark.slow
def test_real_litemedsam_request(root):
    """One real LiteMedSAM request through the server (box prompt: the original weights are box-trained)."""
    pytest.importorskip("torch")
    import torch

    torch.set_num_threads(2)
    c = _client(root, segmenter="litemedsam", timeout_s=300, health_details=True)
    _, disk = blob_image()
    cx, cy = BLOB_CENTER
    r = c.post("/v1/segment", json={"image_path": "images/blob.png", "clicklist": [], "labels": [],
                                    "box": [cx - 50, cy - 50, cx + 50, cy + 50]})
    assert r.status_code == 200, r.text
    j = r.json()
    assert iou(rle_decode(j["mask_rle"]), disk) > 0.6 and j["score"] is not None
    r = c.post("/segment", json={"image_path": "images/blob.png", "clicklist": [[cx, cy]], "labels": [1]})
    assert r.status_code == 200
    assert np.load(io.BytesIO(r.content)).shape == (200, 240)
    assert c.get("/health").json()["set_image_calls"] == 1  # the second request reused the embedding


def test_serve_cli_errors(capsys, tmp_path, monkeypatch):
    import argparse

    from ibisagent.cli.serve import add_parser
    from ibisagent.server import DATA_ROOT_ENV

    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert args.func(args) == 2 and "--data-root" in capsys.readouterr().err
    args = parser.parse_args(["serve", "--data-root", str(tmp_path), "--segmenter", "nope"])
    assert args.func(args) == 2 and "unknown segmenter" in capsys.readouterr().err
    args = parser.parse_args(["serve", "--data-root", str(tmp_path / "missing"), "--segmenter", "fake"])
    assert args.func(args) == 2 and "not a folder" in capsys.readouterr().err
    with pytest.raises(ValueError):
        ServerConfig(data_root=tmp_path, max_concurrency=0)


# ------------------------------------------------------------------------------------- issue 17: bad inputs are 4xx

BIG = "9" * 5000  # a 5000-digit integer (json.dumps cannot write it: bodies with it are built as text)


def _raw_post(c, route: str, text: str):
    return c.post(route, content=text.encode(), headers={"content-type": "application/json"})


def _assert_4xx(r, body=None) -> None:
    assert 400 <= r.status_code < 500, (body, r.status_code, r.text[:200])
    err = r.json()["error"]
    assert isinstance(err, str) and err and "\n" not in err and "Traceback" not in err, err


SEG = '{"image_path": "images/blob.png", '
BAD_SEGMENT_BODIES = [
    SEG + f'"clicklist": [[{BIG}, 1]], "labels": [1]}}',  # 5000-digit coordinate
    SEG + f'"clicklist": [[1, 1]], "labels": [{BIG}]}}',
    SEG + f'"clicklist": [[1{"0" * 400}, 1]], "labels": [1]}}',  # parses, but overflows a float
    SEG + '"clicklist": [[1, 1]], "labels": [1], "window": {}}',
    SEG + '"clicklist": [[1, 1]], "labels": [1], "window": [[1], 2]}',
    SEG + '"clicklist": [[1, 1]], "labels": [1], "window": [true, 2]}',
    SEG + '"clicklist": [[1, 1]], "labels": [0.5]}',  # was a negative click
    SEG + '"clicklist": [[1, 1]], "labels": [true]}',
    SEG + '"clicklist": [[1, 1]], "labels": ["1"]}',
    SEG + '"clicklist": [[1, 1]], "labels": [1], "slice_index": true}',
    SEG + '"clicklist": [[1, 1]], "labels": [1], "slice_index": -1}',  # was the last slice
    SEG + '"clicklist": [[1, 1]], "labels": [1], "slice_index": 1.5}',
    SEG + f'"clicklist": [[1, 1]], "labels": [1], "slice_index": 1{"0" * 30}}}',
    SEG + '"clicklist": [[[1, 1]]], "labels": [1]}',  # nested one level too deep
    SEG + '"clicklist": [["1", 1]], "labels": [1]}',  # a string coordinate
    SEG + '"clicklist": [[true, 1]], "labels": [1]}',
    SEG + '"clicklist": [[NaN, 1]], "labels": [1]}',
    SEG + '"clicklist": [[1e400, 1]], "labels": [1]}',
    SEG + '"clicklist": [[Infinity, 1]], "labels": [1]}',
    SEG + '"clicklist": [[1, 1], [2, 2]], "labels": [1, 1], "mask_feedback": "no"}',
    SEG + '"clicklist": [[1, 1]], "points": [[1, 1]], "labels": [1]}',
    SEG + '"clicklist": [], "labels": [], "box": [1, 2, 3, "4"]}',
    SEG + '"clicklist": [], "labels": [], "box": {"x1": 1}}',
    SEG + '"clicklist": [[1, 1]], "labels": [1], "dtype": []}',
    '[' * 100_000 + ']' * 100_000,  # nested 100k levels deep
    '{"a": ' * 100_000 + '1' + '}' * 100_000,
    '{"image_path": "images/blob.png", "clicklist": [[1, 1]], "labels": [1]',  # truncated
    '\xff\xfe not utf-8',
]


@pytest.mark.parametrize("text", BAD_SEGMENT_BODIES, ids=range(len(BAD_SEGMENT_BODIES)))
def test_malformed_segment_requests_are_4xx_with_a_reason(root, text):
    c = _client(root)
    for route in ("/segment", "/v1/segment"):
        r = c.post(route, content=text.encode("utf-8", "surrogateescape") if text.isascii() else text.encode("latin-1"),
                   headers={"content-type": "application/json"})
        _assert_4xx(r, text[:80])


def test_label_half_is_refused_not_a_negative_click(root):
    c = _client(root)
    r = c.post("/v1/segment", json={"image_path": "images/blob.png", "clicklist": [[130, 100]], "labels": [0.5]})
    assert r.status_code == 422 and "label 0 must be 1" in r.json()["error"]
    r = c.post("/v1/segment", json={"image_path": "images/blob.png", "clicklist": [[130, 100]], "labels": [1.0]})
    assert r.status_code == 200  # an integral float is the same label


def test_slice_index_must_be_a_non_negative_integer(root):
    from app_fixtures import write_blob_volume

    write_blob_volume(root)
    c = _client(root)
    base = {"image_path": "vol.nii.gz", "clicklist": [[40, 30]], "labels": [1]}
    assert c.post("/v1/segment", json={**base, "slice_index": 2}).status_code == 200
    for bad in (True, -1, 2.0, "2"):
        r = c.post("/v1/segment", json={**base, "slice_index": bad})
        assert r.status_code == 422 and "slice_index" in r.json()["error"], (bad, r.text)


def test_click_cap_per_request(root):
    c = _client(root)  # the default: 64 clicks
    base = {"image_path": "images/blob.png"}
    r = c.post("/v1/segment", json={**base, "clicklist": [[130, 100]] * 64, "labels": [1] * 64})
    assert r.status_code == 200
    r = c.post("/v1/segment", json={**base, "clicklist": [[130, 100]] * 65, "labels": [1] * 65})
    assert r.status_code == 413 and "limit is 64" in r.json()["error"]


EP = {"image_path": "images/blob.png", "mask_path": "masks/blob__lesion.png", "query": "segment the lesion"}


@pytest.mark.parametrize("extra", [
    {"policy": "hf"},  # not enabled by default (needs a checkpoint)
    {"policy": ["oracle"]},
    {"policy": "openai"},
    {"max_steps": 0},  # was the default (20)
    {"max_steps": -3},  # was 1
    {"max_steps": 2.5},  # was 2
    {"max_steps": 50},  # over the server's limit: was silently 20
    {"max_steps": True},
    {"max_steps": "abc"},
    {"slice_index": True},
    {"slice_index": -1},
    {"window": {}},
    {"mask_path": [1]},
    {"query": ["x"]},
    {"query": "x" * 5000},
])
def test_bad_episode_requests_are_4xx(root, extra):
    c = _client(root)
    r = c.post("/v1/episode", json={**EP, **extra})
    _assert_4xx(r, extra)
    key = next(iter(extra))
    assert key in r.json()["error"] or key == "policy", r.json()


def test_episode_with_an_unavailable_policy_is_4xx(root):
    c = _client(root, policies=("oracle", "hf"))  # enabled, but no checkpoint configured
    r = c.post("/v1/episode", json={**EP, "policy": "hf"})
    _assert_4xx(r)
    assert "not available" in r.json()["error"]
    r = _raw_post(c, "/v1/episode", json.dumps(EP)[:-1] + f', "max_steps": {BIG}}}')
    _assert_4xx(r)
    r = c.post("/v1/episode", files={"image": ("x.png", (root / "images/blob.png").read_bytes(), "image/png")},
               data={"query": "q", "policy": "oracle", "max_steps": "0"})
    _assert_4xx(r)


# ------------------------------------------------------------------------------------------ fuzzing the JSON routes

_NASTY: list = [None, True, False, 0, -1, 1, 0.5, -0.0, 2**63, 10**30, 1e308, "", " ", "x", "1", "../x",
                "/etc/passwd", "images/blob.png", "masks/blob__lesion.png", "images", "\x00", "é" * 10, "x" * 5000,
                [], {}, [[]], [1], [1, 2], [1, 2, 3], [[1, 2]], [[1, 2, 3]], [[130, 100], [10, 10]], {"a": 1},
                "ct-soft-tissue", [40, 400], [0, 0], [[1], 2], "oracle", "hf", "compact", "uint8", "float32"]
_KEYS = ["image_path", "mask_path", "clicklist", "points", "labels", "box", "slice_index", "window",
         "mask_feedback", "dtype", "query", "policy", "max_steps", "extra"]


def _random_value(rng, depth: int = 0):
    r = rng.random()
    if r < 0.55 or depth > 2:  # a copy: _mutate edits lists in place and must not change (or loop) _NASTY
        return copy.deepcopy(_NASTY[int(rng.integers(len(_NASTY)))])
    if r < 0.8:
        return [_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {str(_KEYS[int(rng.integers(len(_KEYS)))]): _random_value(rng, depth + 1)
            for _ in range(int(rng.integers(0, 3)))}


def _mutate(rng, body: dict) -> dict:
    body = json.loads(json.dumps(body))
    for _ in range(int(rng.integers(1, 4))):
        key = _KEYS[int(rng.integers(len(_KEYS)))]
        op = rng.random()
        if op < 0.15:
            body.pop(key, None)
        elif op < 0.3 and isinstance(body.get("clicklist"), list) and body["clicklist"]:
            pt = body["clicklist"][int(rng.integers(len(body["clicklist"])))]
            if isinstance(pt, list) and pt:
                pt[int(rng.integers(len(pt)))] = _random_value(rng)
        elif op < 0.4 and isinstance(body.get("labels"), list) and body["labels"]:
            body["labels"][int(rng.integers(len(body["labels"])))] = _random_value(rng)
        else:
            body[key] = _random_value(rng)
    return body


def _text_mutation(rng, text: str) -> str:
    op = int(rng.integers(5))
    i = int(rng.integers(len(text) + 1))
    if op == 0:
        return text[:i]
    if op == 1:
        return text[:i] + BIG + text[i:]
    if op == 2:
        return text[:i] + rng.choice(["NaN", "-Infinity", "[" * 5000, "}", '"', "\\u0000", "1e999"]) + text[i:]
    if op == 3:
        return "[" * int(rng.integers(1, 3000)) + text
    return text.replace("1", BIG[: int(rng.integers(1, 5000))], 1)


def test_fuzz_json_routes_never_500(root, caplog):
    """A seeded, bounded fuzzer (about 10 s): mutated and random bodies on every JSON route get a 2xx or a 4xx with
    a one-line reason, never a 500 (the test client re-raises server exceptions) nor an error log."""
    import logging

    from app_fixtures import write_blob_volume

    write_blob_volume(root)
    caplog.set_level(logging.WARNING)
    c = _client(root, max_episode_steps=4)
    rng = np.random.default_rng(17)
    seg = {"image_path": "images/blob.png", "clicklist": [[130, 100], [10, 10]], "labels": [1, 0]}
    ep = {**EP, "max_steps": 3}
    vol = {"image_path": "vol.nii.gz", "slice_index": 2, "window": "ct-soft-tissue", "clicklist": [[40, 30]],
           "labels": [1]}
    routes = [("/segment", seg), ("/v1/segment", seg), ("/v1/segment", vol), ("/v1/episode", ep)]
    t_end = time.perf_counter() + 10.0
    n = 0
    statuses: dict[int, int] = {}
    while time.perf_counter() < t_end and n < 3000:
        route, base = routes[n % len(routes)]
        kind = rng.random()
        if kind < 0.6:
            text = json.dumps(_mutate(rng, base))
        elif kind < 0.8:
            text = _text_mutation(rng, json.dumps(base))
        else:
            text = json.dumps(_random_value(rng))
        r = c.post(route, content=text.encode(), headers={"content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (route, text[:300], r.text[:300])
        if r.status_code >= 400:
            _assert_4xx(r, text[:300])
        n += 1
    assert n >= 200 and statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k >= 400) > n // 4, statuses
    bad = [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert not bad, [rec.getMessage()[:200] for rec in bad[:3]]


# ------------------------------------------------------------------------------ issue 17: heavy requests, deadlines

class CountingSlowFake(FakeSegmenter):
    """A fake whose every decoder pass sleeps ``delay`` s (no CPU) and is counted."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.calls = 0

    def _decode(self, *args):
        self.calls += 1
        time.sleep(self.delay)
        return super()._decode(*args)


def _feedback_body(n: int) -> dict:
    pts = [[130 + (i % 7), 100 + (i % 5)] for i in range(n)]
    return {"image_path": "images/blob.png", "clicklist": pts, "labels": [1] * n, "mask_feedback": True}


def test_timed_out_replay_stops_consuming_the_worker(root):
    seg = CountingSlowFake(0.05)
    c = _client(root, hub=SegmenterHub(factory=lambda name: seg), timeout_s=0.5)
    t = time.perf_counter()
    r = c.post("/v1/segment", json=_feedback_body(64))  # 64 passes x 50 ms = 3.2 s of work
    assert r.status_code == 504 and time.perf_counter() - t < 2.0
    time.sleep(0.3)
    after_504 = seg.calls
    time.sleep(0.5)
    assert seg.calls == after_504 < 20, (after_504, seg.calls)  # the replay stopped at its next pass


def test_normal_requests_keep_their_latency_while_heavy_ones_run(root):
    """Two 40-click mask_feedback replays (40 x 40 ms each) in flight; 1-click requests behind them are still
    answered in about one pass (they take turns with the replays) instead of waiting for the replays to finish."""
    import httpx

    seg = CountingSlowFake(0.04)
    app = create_app(ServerConfig(data_root=root, segmenter="fake", timeout_s=20),
                     hub=SegmenterHub(factory=lambda name: seg))
    heavy_codes: list[int] = []
    normal: list[tuple[int, float]] = []
    with live_server(app) as url:
        def heavy() -> None:
            heavy_codes.append(httpx.post(f"{url}/v1/segment", json=_feedback_body(40), timeout=30).status_code)

        threads = [threading.Thread(target=heavy) for _ in range(2)]
        for th in threads:
            th.start()
        time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=30) as cl:
            for _ in range(5):
                t = time.perf_counter()
                r = cl.post("/segment", json={"image_path": "images/blob.png", "clicklist": [[130, 100]],
                                              "labels": [1]})
                normal.append((r.status_code, time.perf_counter() - t))
        heavy_running = any(th.is_alive() for th in threads)
        for th in threads:
            th.join()
    assert heavy_running, "the heavy requests ended before the normal ones were measured"
    assert [code for code, _ in normal] == [200] * 5
    assert max(dt for _, dt in normal) < 1.0, normal  # one or two 40 ms passes of waiting, not seconds
    assert sorted(heavy_codes) == [200, 200], heavy_codes  # the second replay queued in the heavy lane


def test_feedback_replay_matches_session_after_taking_turns(root):
    """Interleaving passes with other requests on another image does not change a replay's mask."""
    from app_fixtures import write_blob_case as write

    write(root, name="other", seed=5)
    seg = CountingSlowFake(0.01)
    c = _client(root, hub=SegmenterHub(factory=lambda name: seg))
    body = {"image_path": "images/blob.png", "clicklist": [[130, 100], [150, 100], [120, 90]], "labels": [1, 0, 1],
            "mask_feedback": True}
    alone = c.post("/v1/segment", json=body).json()["mask_rle"]
    results: list = []

    def other() -> None:
        for _ in range(10):
            c.post("/v1/segment", json={"image_path": "images/other.png", "clicklist": [[20, 20]], "labels": [1]})

    th = threading.Thread(target=other)
    th.start()
    for _ in range(3):
        results.append(c.post("/v1/segment", json=body).json()["mask_rle"])
    th.join()
    assert all(r == alone for r in results)


# ------------------------------------------------------------------------ issue 17: slow clients, connection cap

def _slow_sockets(url: str, n: int, head: bytes) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(head)
        socks.append(s)
    return socks


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        data = s.recv(4096)
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True
    if data:  # an answer (408) arrived: the server closes right after it
        s.settimeout(1.0)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        return True
    return True


def test_slow_clients_are_closed_within_the_read_timeout(root):
    """Five clients send a request 1 byte per second (headers, or a declared body); all are closed within the
    read timeout (1 s here) while a normal request is still served; bounded to about 3 s."""
    import httpx

    app = create_app(ServerConfig(data_root=root, segmenter="fake", read_timeout_s=1.0))
    with live_server(app) as url:
        body = b'{"image_path": "images/blob.png", "clicklist": [[130, 100]], "labels": [1]}'
        slow_head = _slow_sockets(url, 3, b"P")
        slow_body = _slow_sockets(url, 2, b"POST /segment HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                          b"content-length: %d\r\n\r\n{" % len(body))
        socks = slow_head + slow_body
        t0 = time.perf_counter()
        closed_at: dict[int, float] = {}
        ok = httpx.post(f"{url}/segment", content=body, headers={"content-type": "application/json"}, timeout=5)
        assert ok.status_code == 200
        while time.perf_counter() - t0 < 3.0 and len(closed_at) < len(socks):
            for i, s in enumerate(socks):
                if i in closed_at:
                    continue
                if _closed(s):
                    closed_at[i] = time.perf_counter() - t0
                    continue
                try:
                    s.send(b"O" if i < 3 else b" ")  # one more byte
                except OSError:
                    closed_at[i] = time.perf_counter() - t0
            time.sleep(1.0 if len(closed_at) < len(socks) else 0)
        for s in socks:
            s.close()
    assert len(closed_at) == len(socks), closed_at
    assert max(closed_at.values()) < 2.5, closed_at


def test_slow_body_gets_408(root):
    app = create_app(ServerConfig(data_root=root, segmenter="fake", read_timeout_s=0.5))
    with live_server(app) as url:
        (s,) = _slow_sockets(url, 1, b"POST /segment HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{")
        s.settimeout(3)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
        s.close()
    assert data.startswith(b"HTTP/1.1 408") and b"not received within" in data, data[:200]


def test_connection_cap(root):
    import httpx

    app = create_app(ServerConfig(data_root=root, segmenter="fake", max_connections=3, read_timeout_s=5))
    with live_server(app) as url:
        idle = _slow_sockets(url, 3, b"")
        time.sleep(0.2)
        r = httpx.get(f"{url}/health", timeout=5)
        assert r.status_code == 503 and "too many open connections" in r.json()["error"]
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200


# ------------------------------------------------------------------------------ issue 17: health, token, image size

def test_health_is_liveness_and_versions_only_by_default(root):
    c = _client(root)
    j = c.get("/health").json()
    assert j["status"] == "ok" and "ibisagent" in j["versions"] and "python" in j["versions"]
    text = c.get("/health").text
    assert str(root) not in text and "config" not in j and "data_root" not in text
    c = _client(root, health_details=True, token="s3cret-token")
    assert "config" not in c.get("/health").json()  # details only for token holders
    j = c.get("/health", headers={"authorization": "Bearer s3cret-token"}).json()
    assert j["data_root"] == str(root.resolve()) and j["config"]["token"] == "set"
    assert "s3cret-token" not in json.dumps(j)


def test_bearer_token_guards_every_route_but_health(root):
    c = _client(root, token="s3cret-token")
    body = {"image_path": "images/blob.png", "clicklist": [[130, 100]], "labels": [1]}
    assert c.get("/health").status_code == 200
    for route in ("/segment", "/v1/segment", "/v1/episode", "/nowhere"):
        r = c.post(route, json=body)
        assert r.status_code == 401 and "Bearer" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        r = c.post(route, json=body, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 403 and r.json()["error"] == "invalid token"
        r = c.post(route, json=body, headers={"authorization": "Basic czNjcmV0LXRva2Vu"})
        assert r.status_code == 403
    r = c.post("/segment", json=body, headers={"authorization": "Bearer s3cret-token"})
    assert r.status_code == 200
    r = c.get("/segment", headers={"authorization": "Bearer s3cret-token"})
    assert r.status_code == 405 and "routes: POST /segment" in r.json()["error"]
    r = c.get("/nowhere", headers={"authorization": "Bearer s3cret-token"})
    assert r.status_code == 404 and "Not Found" in r.json()["error"]


def test_serve_cli_token_from_env_and_guarded_config(tmp_path, monkeypatch, capsys):
    import argparse

    import uvicorn

    from ibisagent.cli.serve import add_parser
    from ibisagent.server import TOKEN_ENV

    seen: dict = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.setdefault("config", self.config))
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--data-root", str(tmp_path), "--segmenter", "fake", "--read-timeout", "7",
                              "--max-connections", "9"])
    assert args.func(args) == 0
    cfg = seen["config"]
    assert cfg.app.state.service.config.token == "from-env" and cfg.timeout_keep_alive == 5
    assert cfg.http.__name__ == "GuardedH11Protocol" and "token required" in capsys.readouterr().err
    args = parser.parse_args(["serve", "--data-root", str(tmp_path), "--segmenter", "fake", "--policies", "nope"])
    assert args.func(args) == 2 and "unknown policy" in capsys.readouterr().err


def _huge_png(path: Path, side: int = 6000) -> None:
    from PIL import Image

    Image.new("1", (side, side)).save(path)  # 36 Mpixel, a few KB on disk


def test_too_large_image_is_refused_from_its_header(root):
    _huge_png(root / "images" / "huge.png")
    c = _client(root)
    service = c.app.state.service
    calls = []
    real_load = service.images.load
    service.images.load = lambda *a, **k: calls.append(a) or real_load(*a, **k)
    t = time.perf_counter()
    r = c.post("/v1/segment", json={"image_path": "images/huge.png", "clicklist": [[1, 1]], "labels": [1]})
    dt = time.perf_counter() - t
    assert r.status_code == 413 and "6000x6000" in r.json()["error"]
    assert not calls and dt < 1.0, dt  # refused before any decoding
    r = c.post("/v1/episode", json={"image_path": "images/huge.png", "mask_path": "masks/blob__lesion.png",
                                    "query": "q"})
    assert r.status_code == 413
    r = c.post("/v1/episode", json={"image_path": "images/blob.png", "mask_path": "images/huge.png", "query": "q"})
    assert r.status_code == 413 and "mask" in r.json()["error"]


def test_too_large_volume_is_refused_from_its_header(root):
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.float32)
    with open(root / "big.nii", "wb") as fh:  # the header alone: decoding it would fail as truncated
        hdr.write_to(fh)
        fh.write(b"\0" * 16)
    c = _client(root)
    r = c.post("/v1/segment", json={"image_path": "big.nii", "slice_index": 0, "clicklist": [[1, 1]], "labels": [1]})
    assert r.status_code == 413 and "limit" in r.json()["error"]


def _huge_dicom(path: Path) -> None:
    """A CT DICOM whose header declares 6000x6000 pixels (the pixel data is a stub: only the header is read)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows = ds.Columns = 6000
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0\0" * 8
    ds.save_as(path, enforce_file_format=True)


def test_too_large_upload_is_refused_from_its_header(root, tmp_path):
    pytest.importorskip("pydicom")
    _huge_png(tmp_path / "huge.png")
    _huge_dicom(tmp_path / "huge.dcm")
    c = _client(root)
    for name in ("huge.png", "huge.dcm"):
        t = time.perf_counter()
        r = c.post("/v1/episode", files={"image": (name, (tmp_path / name).read_bytes(), "application/octet-stream")},
                   data={"query": "q"})
        assert r.status_code == 413 and "6000x6000" in r.json()["error"], r.text
        assert time.perf_counter() - t < 1.0
    (root / "huge.dcm").write_bytes((tmp_path / "huge.dcm").read_bytes())
    r = c.post("/v1/segment", json={"image_path": "huge.dcm", "clicklist": [[1, 1]], "labels": [1]})
    assert r.status_code == 413 and "6000x6000" in r.json()["error"], r.text
