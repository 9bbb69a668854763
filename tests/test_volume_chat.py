"""A multimodal LLM over a volume episode (issue 28, item 3): the strip observation and the volume chat, through a
local OpenAI-compatible server (a thread on 127.0.0.1) and on the tiny random Qwen2.5-VL checkpoint."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("httpx")

from ibisagent.chat import VOLUME_SYSTEM_NOTE, render_volume_chat  # noqa: E402
from ibisagent.episode import StopRules, play  # noqa: E402
from ibisagent.policies import PolicyError, create_policy, list_policies  # noqa: E402
from ibisagent.policies.volume import overview_slices  # noqa: E402
from ibisagent.prompts import load_prompts  # noqa: E402
from ibisagent.segmenters.base import create_segmenter  # noqa: E402
from ibisagent.volume import SliceStack, VolumeEnv, VolumeSession  # noqa: E402


def _ball(shape=(12, 40, 50), centre=(6, 20, 25), radii=(4, 10, 10)) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return sum(((a - c) / r) ** 2 for a, c, r in zip((zz, yy, xx), centre, radii)) <= 1


class ScriptedServer:
    """Chat-completions server answering ``replies`` in order; keeps every request body."""

    def __init__(self, replies: list[str]) -> None:
        self.replies, self.bodies = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                reply = outer.replies.pop(0)
                self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _user(body: dict) -> tuple[str, np.ndarray]:
    parts = body["messages"][-1]["content"]
    text = next(p["text"] for p in parts if p["type"] == "text")
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    return text, img


def _green(img: np.ndarray) -> np.ndarray:
    return (img[..., 1].astype(int) - img[..., 0].astype(int)) > 40


def test_overview_slices_spread_over_the_volume() -> None:
    assert overview_slices(12, 5) == [0, 3, 6, 8, 11]
    assert overview_slices(3, 5) == [0, 1, 2]
    assert overview_slices(1, 5) == [0]
    with pytest.raises(ValueError):
        overview_slices(0, 5)


def test_volume_chat_names_the_slices_and_the_volume_form() -> None:
    tpl = load_prompts("extended")
    strip = np.zeros((4, 12, 3), np.uint8)
    first = render_volume_chat(tpl, " the ball ", strip, [0, 5, 9], depth=10, current=5, first_turn=True)
    assert [t.role for t in first] == ["system", "user"]
    assert first[0].text.startswith(tpl.system) and first[0].text.endswith(VOLUME_SYSTEM_NOTE)
    assert first[1].text.startswith(tpl.first("the ball")) and "slices 0, 5, 9" in first[1].text
    assert "spread over the volume's 10" in first[1].text and first[1].image is strip
    later = render_volume_chat(tpl, "the ball", strip, [3, 4, 5], depth=10, current=4, first_turn=False)
    assert later[1].text.startswith(tpl.refine("the ball")) and "slices 3, 4, 5 of 10" in later[1].text
    with pytest.raises(ValueError):
        render_volume_chat(tpl, "x", strip, [], depth=10, current=0, first_turn=True)


def test_an_llm_plays_a_volume_episode_over_http_from_the_overview_strip() -> None:
    gt = _ball()
    stack = SliceStack.from_array(np.where(gt, 200, 30).astype(np.uint8))
    replies = ["<think>\nThe ball is clearest on slice 6.\n</think>\n<action>\nPositive Point (0.5000, 0.5000, 6)\n"
               "</action>", "<action>\nTerminate\n</action>"]
    assert {"hf-3d", "openai-3d"} <= set(list_policies(volume=True))
    with ScriptedServer(replies) as srv:
        pol = create_policy("openai-3d", base_url=srv.url, model="tiny", neighbours=2, overview=5, timeout=10)
        env = VolumeEnv(VolumeSession(create_segmenter("fake")), StopRules(max_steps=5))
        turns = play(env, pol, stack, "the ball", gt)
    assert [t.stop_reason for t in turns] == [None, "terminate"]
    assert turns[0].action.z == 6 and turns[-1].info["dice"] > 0.95
    (t1, img1), (t2, img2) = _user(srv.bodies[0]), _user(srv.bodies[1])
    assert VOLUME_SYSTEM_NOTE in str(srv.bodies[0]["messages"][0]["content"])  # a text-only system turn
    # turn 1: five slices spread over the volume, no mask yet
    assert "slices 0, 3, 6, 8, 11" in t1 and img1.shape == (40, 5 * 50, 3) and not _green(img1).any()
    # turn 2: slices 4..8 around the clicked slice, the propagated 3D mask on each of them
    assert "slices 4, 5, 6, 7, 8 of 12" in t2 and img2.shape == (40, 5 * 50, 3)
    tiles = np.split(_green(img2), 5, axis=1)
    assert all(t.any() for t in tiles) and tiles[2].sum() > tiles[0].sum()


def test_volume_chat_policy_refuses_bad_options() -> None:
    with pytest.raises(PolicyError, match="extended-grammar"):
        create_policy("openai-3d", base_url="http://127.0.0.1:9/v1", model="m", prompts="reference")
    with pytest.raises(PolicyError, match="neighbours"):
        create_policy("openai-3d", base_url="http://127.0.0.1:9/v1", model="m", neighbours=-1)


def test_the_tiny_qwen_checkpoint_reads_the_strip() -> None:
    """The real processor and model take the wide strip image; a random model's reply ends the episode cleanly."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from ibisagent.testing import shared_tiny_qwen_vl

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gt = _ball()
        stack = SliceStack.from_array(np.where(gt, 200, 30).astype(np.uint8))
        pol = create_policy("hf-3d", model_path=str(shared_tiny_qwen_vl()), max_new_tokens=8, overview=3)
        env = VolumeEnv(VolumeSession(create_segmenter("fake")), StopRules(max_steps=3))
        turns = play(env, pol, stack, "the ball", gt)
    finally:
        torch.set_num_threads(old)
    assert pol.last_slices == [0, 6, 11]
    assert turns[-1].stop_reason in ("unparseable", "invalid_action", "terminate", "max_steps", "repeated")
    assert pol.backend.last_new_tokens <= 8
