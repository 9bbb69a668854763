"""The HTTP tool server: the reference /segment request, the JSON variants, path and size checks, bounded
concurrency (503), timeouts (504), and a short load run on a real loopback uvicorn server."""

from __future__ import annotations

import asyncio
import io
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
from ibisagent.server import Busy, Limiter, PathRejected, ServerConfig, create_app, resolve_data_path, sniff_upload
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
    assert r.status_code == 422 and "unknown policy" in r.json()["error"]
    r = c.post("/v1/episode", json={"image_path": "../x.png", "query": "x"})
    assert r.status_code == 400


def test_health(root):
    c = _client(root)
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
    """Run ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
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

    app = create_app(ServerConfig(data_root=root, segmenter="fake", max_queue=16))
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
    c = _client(root, segmenter="litemedsam", timeout_s=300)
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

    from ibisagent.server import DATA_ROOT_ENV, add_parser

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
