"""Bounded load test of the tool server (``ibisagent serve``) on loopback.

Starts the server in a subprocess on 127.0.0.1 (a free port, configured as ``ibisagent serve`` runs it), then N
client threads (httpx, keep-alive) send the reference ``POST /segment`` request (1-3 random clicks on one image)
for a fixed time, and reports requests/s, p50/p90/p99/max latency and every non-200 answer. Optionally, at the same
time, ``--heavy-clients`` threads send 64-click ``mask_feedback`` replays (``POST /v1/segment``, 64 segmenter passes
each) and ``--slow-clients`` sockets send a request 1 byte per second (the server must close them within its
``--read-timeout``); their figures are reported separately, so the normal requests' latency can be compared with and
without them. Nothing leaves the machine.

    .venv/bin/python benchmarks/bench_server.py --clients 8 --duration 20 --segmenter fake
    .venv/bin/python benchmarks/bench_server.py --clients 4 --heavy-clients 2 --slow-clients 8 --duration 15 \\
        --segmenter fake --pass-delay 0.02
    .venv/bin/python benchmarks/bench_server.py --clients 8 --duration 20 --segmenter litemedsam \\
        --md runs/bench_server_litemedsam.md

``--pass-delay`` (fake segmenter only) makes every fake decoder pass sleep that long, standing in for a real
decoder's cost without using the CPU. Exit code 1 when any normal request failed (so a CI smoke run can use
``--duration 3``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SERVER_CODE = """
import sys, time, uvicorn, torch
torch.set_num_threads(int(sys.argv[5]))
from pathlib import Path
from ibisagent.runtime import SegmenterHub
from ibisagent.segmenters.fake import FakeSegmenter
from ibisagent.server import ServerConfig, create_app, uvicorn_config
delay = float(sys.argv[6])

class DelayedFake(FakeSegmenter):
    def _decode(self, *args):
        time.sleep(delay)
        return super()._decode(*args)

hub = SegmenterHub(factory=lambda name: DelayedFake()) if sys.argv[2] == "fake" and delay > 0 else None
cfg = ServerConfig(data_root=Path(sys.argv[1]), segmenter=sys.argv[2], max_concurrency=int(sys.argv[4]),
                   max_queue=64, timeout_s=float(sys.argv[7]), read_timeout_s=float(sys.argv[8]),
                   health_details=True)
uvicorn.Server(uvicorn_config(create_app(cfg, hub=hub, warm=True), cfg, port=int(sys.argv[3]),
                              log_level="error")).run()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _synthetic_root() -> tuple[Path, str, tuple[int, int]]:
    """A temp data root with one 512x512 synthetic image (a bright disk on noise)."""
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="ibisagent-bench-"))
    rng = np.random.default_rng(0)
    img = rng.normal(60, 8, (512, 512))
    yy, xx = np.mgrid[:512, :512]
    img[(yy - 256) ** 2 + (xx - 280) ** 2 <= 90**2] = 200
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "bench.png")
    return root, "bench.png", (512, 512)


def _wait_health(url: str, proc: subprocess.Popen, timeout: float) -> dict:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def _pct(values_ms: list[float], q: float) -> float | None:
    return round(float(np.percentile(values_ms, q)), 1) if values_ms else None


def _slow_client(host: str, port: int, t_end: float, closed_after: list[float], lock: threading.Lock) -> None:
    """Send a request 1 byte per second; when the server closes the socket, record how long it stayed open and
    open a new one, until ``t_end``."""
    head = b"POST /segment HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 4096\r\n\r\n"
    while time.perf_counter() < t_end:
        try:
            s = socket.create_connection((host, port), timeout=5)
        except OSError:
            time.sleep(0.5)
            continue
        opened = time.perf_counter()
        s.settimeout(0.05)
        i = 0
        try:
            while time.perf_counter() < t_end:
                s.send(head[i : i + 1] if i < len(head) else b" ")
                i += 1
                try:
                    s.recv(4096)  # an answer (408/503) or EOF: the server is closing the connection
                except TimeoutError:  # nothing yet: still open
                    time.sleep(0.95)
                    continue
                with lock:
                    closed_after.append(time.perf_counter() - opened)
                break
        except OSError:  # reset / broken pipe: closed by the server
            with lock:
                closed_after.append(time.perf_counter() - opened)
        finally:
            s.close()


def run(args: argparse.Namespace) -> dict:
    import httpx

    if args.data_root:
        root, rel = Path(args.data_root), args.image
        from PIL import Image

        with Image.open(root / rel) as im:
            size = (im.height, im.width)
    else:
        root, rel, size = _synthetic_root()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-c", SERVER_CODE, str(root), args.segmenter, str(port), str(args.concurrency),
           str(args.threads), str(args.pass_delay), str(args.server_timeout), str(args.read_timeout)]
    proc = subprocess.Popen(cmd, env=env)
    try:
        _wait_health(url, proc, timeout=args.startup_timeout)
        # warm-up: the first request of an image runs the encoder
        httpx.post(f"{url}/segment", json={"image_path": rel, "clicklist": [[5, 5]], "labels": [1]}, timeout=300)
        lat: list[list[float]] = [[] for _ in range(args.clients)]
        heavy_lat: list[float] = []
        heavy_codes: dict[str, int] = {}
        slow_closed: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        h, w = size
        t_end = time.perf_counter() + args.duration

        def client(i: int) -> None:
            rng = np.random.default_rng(1000 + i)
            with httpx.Client(base_url=url, timeout=args.request_timeout) as cl:
                n = 0
                while time.perf_counter() < t_end and n < args.max_requests:
                    k = int(rng.integers(1, 4))
                    pts = [[int(rng.integers(0, w)), int(rng.integers(0, h))] for _ in range(k)]
                    labels = [1] + [int(v) for v in rng.integers(0, 2, k - 1)]
                    t = time.perf_counter()
                    try:
                        r = cl.post("/segment", json={"image_path": rel, "clicklist": pts, "labels": labels})
                        ok = r.status_code == 200 and np.load(io.BytesIO(r.content)).shape == (h, w)
                        msg = f"HTTP {r.status_code}: {r.text[:100]}" if not ok else ""
                    except httpx.HTTPError as exc:
                        ok, msg = False, f"{type(exc).__name__}: {exc}"
                    dt = time.perf_counter() - t
                    with lock:
                        if ok:
                            lat[i].append(dt)
                        else:
                            errors.append(msg)
                    n += 1

        def heavy_client(i: int) -> None:
            rng = np.random.default_rng(5000 + i)
            with httpx.Client(base_url=url, timeout=args.request_timeout) as cl:
                while time.perf_counter() < t_end:
                    pts = [[int(rng.integers(0, w)), int(rng.integers(0, h))] for _ in range(64)]
                    body = {"image_path": rel, "clicklist": pts, "labels": [1] * 64, "mask_feedback": True}
                    t = time.perf_counter()
                    try:
                        code = str(cl.post("/v1/segment", json=body).status_code)
                    except httpx.HTTPError as exc:
                        code = type(exc).__name__
                    with lock:
                        heavy_codes[code] = heavy_codes.get(code, 0) + 1
                        if code == "200":
                            heavy_lat.append(time.perf_counter() - t)
                    if code == "503":
                        time.sleep(0.2)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads += [threading.Thread(target=heavy_client, args=(i,)) for i in range(args.heavy_clients)]
        threads += [threading.Thread(target=_slow_client, args=("127.0.0.1", port, t_end, slow_closed, lock))
                    for _ in range(args.slow_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        health = httpx.get(f"{url}/health", timeout=5).json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    all_lat = [x * 1000.0 for li in lat for x in li]
    heavy_ms = [x * 1000.0 for x in heavy_lat]
    n_ok = len(all_lat)
    result = {
        "segmenter": args.segmenter + (f" (+{args.pass_delay * 1000:g} ms/pass)" if args.pass_delay else ""),
        "clients": args.clients, "heavy_clients": args.heavy_clients, "slow_clients": args.slow_clients,
        "duration_s": round(wall, 2), "server_concurrency": args.concurrency, "image": f"{size[1]}x{size[0]}",
        "requests_ok": n_ok, "errors": len(errors), "error_samples": errors[:5],
        "rps": round(n_ok / wall, 1) if wall > 0 else 0.0,
        "p50_ms": _pct(all_lat, 50), "p90_ms": _pct(all_lat, 90), "p99_ms": _pct(all_lat, 99),
        "max_ms": round(max(all_lat), 1) if all_lat else None,
        "heavy_status_counts": heavy_codes, "heavy_p50_ms": _pct(heavy_ms, 50), "heavy_p99_ms": _pct(heavy_ms, 99),
        "slow_closed": len(slow_closed),
        "slow_open_s_max": round(max(slow_closed), 2) if slow_closed else None,
        "slow_open_s_p50": round(float(np.percentile(slow_closed, 50)), 2) if slow_closed else None,
        "server_read_timeout_s": args.read_timeout,
        "server_set_image_calls": health.get("set_image_calls"),
        "server_rejected_503": health.get("limits", {}).get("rejected"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible ({args.machine_note})",
        "command": " ".join(["benchmarks/bench_server.py", *sys.argv[1:]]),
    }
    return result


def to_markdown(r: dict) -> str:
    heavy = ", ".join(f"{k}: {v}" for k, v in sorted(r["heavy_status_counts"].items())) or "-"
    slow = (f"{r['slow_closed']} closed, open <= {r['slow_open_s_max']} s" if r["slow_clients"] else "-")
    return (
        f"| {r['segmenter']} | {r['clients']} | {r['heavy_clients']} | {r['slow_clients']} | {r['duration_s']} | "
        f"{r['image']} | {r['requests_ok']} | {r['errors']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | "
        f"{r['max_ms']} | {heavy} (p50 {r['heavy_p50_ms']} ms) | {slow} |"
    )


MD_HEADER = ("| segmenter | clients | heavy clients | slow clients | seconds | image | requests OK | errors | req/s | "
             "p50 ms | p99 ms | max ms | heavy answers | slow clients |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (bounded)")
    p.add_argument("--max-requests", type=int, default=100_000, help="per-client request cap")
    p.add_argument("--segmenter", default="fake")
    p.add_argument("--concurrency", type=int, default=2, help="server --max-concurrency")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    p.add_argument("--data-root", default=None, help="serve this folder (default: a synthetic 512x512 image)")
    p.add_argument("--image", default=None, help="image path relative to --data-root")
    p.add_argument("--heavy-clients", type=int, default=0,
                   help="threads sending 64-click mask_feedback replays at the same time (default 0)")
    p.add_argument("--slow-clients", type=int, default=0,
                   help="sockets sending a request 1 byte per second at the same time (default 0)")
    p.add_argument("--pass-delay", type=float, default=0.0,
                   help="fake segmenter only: seconds every decoder pass sleeps (stands in for a real decoder)")
    p.add_argument("--server-timeout", type=float, default=120.0, help="server --timeout")
    p.add_argument("--read-timeout", type=float, default=15.0, help="server --read-timeout")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--machine-note", default="2 CPU cores, shared")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--md", default=None, help="write a markdown table row (with header) here")
    args = p.parse_args(argv)
    if args.data_root and not args.image:
        p.error("--image is required with --data-root")
    r = run(args)
    print(json.dumps(r, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=1))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(MD_HEADER + "\n" + to_markdown(r) + "\n")
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
