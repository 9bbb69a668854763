"""The ``openai`` policy against a local fake OpenAI-compatible server (a thread on 127.0.0.1).

The server plays an oracle annotator: it decodes the overlay image from the request's data URL, recovers the current
mask from the green tint, and answers with the reference oracle's next click (or Terminate), so whole episodes run
over HTTP exactly as with vLLM.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("httpx")

from ibisagent.agent import Agent  # noqa: E402
from ibisagent.env import EnvConfig  # noqa: E402
from ibisagent.masks import iou  # noqa: E402
from ibisagent.policies import PolicyError, create_policy  # noqa: E402
from ibisagent.policies.openai import image_data_url, to_openai_messages  # noqa: E402
from ibisagent.policies.oracle import next_click  # noqa: E402
from ibisagent.protocol import Action, format_reply, to_normalized, validate_reply  # noqa: E402
from ibisagent.testing import synthetic_cases  # noqa: E402


class FakeServer:
    """A chat-completions server on a free port. ``mode``: ok | hang | flaky (two 503s, then ok) | reject (400)."""

    def __init__(self, image: np.ndarray, gt: np.ndarray, mode: str = "ok") -> None:
        self.image, self.gt, self.mode = image, gt, mode
        self.requests: list[dict] = []
        self.failures_left = 2
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # silence
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "tiny-ibis", "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                if outer.mode == "hang":
                    time.sleep(3.0)
                    return
                if outer.mode == "reject":
                    self._send(400, {"error": {"message": "max_tokens too large"}})
                    return
                if outer.mode == "flaky" and outer.failures_left > 0:
                    outer.failures_left -= 1
                    self._send(503, {"error": "warming up"})
                    return
                reply = outer.answer(body)
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": reply}}],
                                 "usage": {"prompt_tokens": 10, "completion_tokens": 20}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, body: dict) -> str:
        user = [m for m in body["messages"] if m["role"] == "user"][-1]
        urls = [p["image_url"]["url"] for p in user["content"] if p["type"] == "image_url"]
        head, b64 = urls[-1].split(",", 1)
        assert head == "data:image/png;base64"
        overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
        mask = np.any(overlay != self.image, axis=2)  # the green tint marks the mask
        h, w = self.gt.shape
        if mask.any() and iou(mask, self.gt) >= 0.8:
            return format_reply(Action.terminate(), "The mask matches.", "Done.")
        click = next_click(mask if mask.any() else None, self.gt)
        x, y = to_normalized(click.x, w), to_normalized(click.y, h)
        act = Action.positive(x, y) if click.positive else Action.negative(x, y)
        return format_reply(act, "Click the largest error region.")

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def case():
    return synthetic_cases(1, size=(48, 64), seed=2)[0]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_episode_over_http(case, monkeypatch):
    monkeypatch.setenv("IBIS_TEST_KEY", "secret-123")
    with FakeServer(case.image, case.gt) as srv:
        policy = create_policy("openai", base_url=srv.url, api_key_env="IBIS_TEST_KEY", timeout=10)
        ep = Agent(policy, "fake", EnvConfig(max_steps=10)).segment(case.image, case.query, case.gt)
    assert ep.stop_reason == "terminate"
    assert ep.n_clicks >= 1 and ep.final_iou >= 0.8
    assert all(validate_reply(s.raw, "reference") for s in ep.steps)
    first = srv.requests[0]
    assert first["auth"] == "Bearer secret-123"
    body = first["body"]
    assert body["model"] == "tiny-ibis"  # asked from /models
    assert body["temperature"] == 0.0 and body["max_tokens"] == 256
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user"]
    parts = body["messages"][1]["content"]
    assert parts[0]["type"] == "image_url" and parts[1]["type"] == "text" and case.query in parts[1]["text"]
    # every later overlay arrives as a new user turn with an image, never as a tool message
    for req in srv.requests[1:]:
        assert all(m["role"] != "tool" for m in req["body"]["messages"])
        assert req["body"]["messages"][-1]["content"][0]["type"] == "image_url"


def test_history_sends_earlier_turns(case):
    with FakeServer(case.image, case.gt) as srv:
        policy = create_policy("openai", base_url=srv.url, model="m", history=True)
        ep = Agent(policy, "fake", EnvConfig(max_steps=10)).segment(case.image, case.query, case.gt)
    assert len(ep.steps) >= 2
    msgs = srv.requests[1]["body"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == ep.steps[0].raw


def test_data_url_roundtrip():
    img = np.random.default_rng(0).integers(0, 255, (7, 9, 3), dtype=np.uint8)
    url = image_data_url(img)
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(back, img)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="placeholders"):
        to_openai_messages(msgs, [])


def test_server_down_is_a_clear_error(case):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    policy = create_policy("openai", base_url=url, model="m", retries=1, backoff=0.01, timeout=2)
    t = time.perf_counter()
    with pytest.raises(PolicyError, match="is the server running"):
        Agent(policy, "fake").segment(case.image, case.query)
    assert time.perf_counter() - t < 5


def test_hanging_endpoint_times_out(case):
    with FakeServer(case.image, case.gt, mode="hang") as srv:
        policy = create_policy("openai", base_url=srv.url, model="m", timeout=0.3, retries=1, backoff=0.01)
        t = time.perf_counter()
        with pytest.raises(PolicyError, match="did not answer within 0.3 s"):
            Agent(policy, "fake").segment(case.image, case.query)
        elapsed = time.perf_counter() - t
    assert elapsed < 2.5
    assert len(srv.requests) == 2  # the first try and one retry


def test_transient_errors_are_retried(case):
    with FakeServer(case.image, case.gt, mode="flaky") as srv:
        policy = create_policy("openai", base_url=srv.url, model="m", retries=2, backoff=0.01)
        ep = Agent(policy, "fake").segment(case.image, case.query, case.gt)
    assert ep.stop_reason == "terminate"
    assert srv.failures_left == 0


def test_client_errors_are_not_retried(case):
    with FakeServer(case.image, case.gt, mode="reject") as srv:
        policy = create_policy("openai", base_url=srv.url, model="m", retries=3, backoff=0.01)
        with pytest.raises(PolicyError, match="HTTP 400.*max_tokens"):
            Agent(policy, "fake").segment(case.image, case.query)
    assert len(srv.requests) == 1


def test_bad_options():
    with pytest.raises(PolicyError, match="http"):
        create_policy("openai", base_url="localhost:8000")
    with pytest.raises(PolicyError, match="timeout"):
        create_policy("openai", timeout=0)
    with pytest.raises(PolicyError, match="decoding profile"):
        create_policy("openai", profile="paper")


def test_reference_decoding_profile_in_the_request(case):
    """``profile="reference"``: the release's decoding (greedy, 512 new tokens) in every request; explicit options
    still win."""
    with FakeServer(case.image, case.gt) as srv:
        policy = create_policy("openai", base_url=srv.url, model="tiny-ibis", profile="reference", timeout=10)
        Agent(policy, "fake", EnvConfig(max_steps=3)).segment(case.image, case.query, case.gt)
        capped = create_policy("openai", base_url=srv.url, model="tiny-ibis", profile="reference",
                               max_new_tokens=100, timeout=10)
        Agent(capped, "fake", EnvConfig(max_steps=1)).segment(case.image, case.query, case.gt)
    bodies = [r["body"] for r in srv.requests]
    assert all(b["max_tokens"] == 512 and b["temperature"] == 0.0 for b in bodies[:-1])
    assert bodies[-1]["max_tokens"] == 100
