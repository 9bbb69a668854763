"""The ``openai`` policy: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted API).

>>> # vllm serve checkpoints/IBISAgent-7B --served-model-name ibisagent --port 8000
>>> policy = create_policy("openai", base_url="http://127.0.0.1:8000/v1", model="ibisagent")

Images travel as base64 PNG data URLs inside ``image_url`` content parts, each overlay in a ``user`` turn.
Every request has a timeout; connection errors, timeouts, HTTP 429 and 5xx are retried a bounded number of times
with exponential backoff; then a :class:`~ibisagent.policies.base.PolicyError` says what went wrong
(server down, no answer in time, bad request). Other HTTP errors are not retried.
"""

from __future__ import annotations

import base64
import io
import os
import time
from typing import Any

import numpy as np

from ibisagent.env import Observation
from ibisagent.policies._chat import ChatBuilder
from ibisagent.policies.base import BasePolicy, PolicyError, register_policy
from ibisagent.policies.decoding import resolve_decoding
from ibisagent.prompts import PromptTemplate

__all__ = ["OpenAIPolicy", "image_data_url", "to_openai_messages"]

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def image_data_url(image: np.ndarray) -> str:
    """An HxWx3 uint8 image as a ``data:image/png;base64,...`` URL."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(arr[..., :3].astype(np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict[str, Any]], images: list[np.ndarray]) -> list[dict[str, Any]]:
    """transformers-style messages (``{"type": "image"}`` placeholders) -> OpenAI messages with data URLs."""
    out: list[dict[str, Any]] = []
    it = iter(images)
    for msg in messages:
        parts: list[dict[str, Any]] = []
        for part in msg["content"]:
            if part.get("type") == "image":
                try:
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(next(it))}})
                except StopIteration as exc:
                    raise ValueError("more image placeholders than images") from exc
            else:
                parts.append({"type": "text", "text": part.get("text", "")})
        if msg["role"] in ("system", "assistant") and all(p["type"] == "text" for p in parts):
            out.append({"role": msg["role"], "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": msg["role"], "content": parts})
    return out


class OpenAIPolicy(BasePolicy):
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, ...).

    ``profile``: ``"default"`` (temperature 0, 256 tokens) or ``"reference"`` (the release's decoding: temperature 0,
    512 tokens); ``max_new_tokens`` / ``temperature`` / ``top_p`` given explicitly override the profile.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        profile: str = "default",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        history: bool | None = None,
        prompts: str | PromptTemplate | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise PolicyError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0:
            raise PolicyError("timeout must be > 0 seconds")
        if retries < 0:
            raise PolicyError("retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        dec = resolve_decoding(profile, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.profile = profile
        self.max_new_tokens = dec.max_new_tokens
        self.temperature = dec.temperature
        self.top_p = dec.top_p
        self.extra_body = dict(extra_body or {})
        self.chat = ChatBuilder(prompts=prompts, history=history)
        if self.chat.template is not None:
            self.grammar = self.chat.template.grammar
        key = os.environ.get(api_key_env) or "EMPTY"
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), headers={"Authorization": f"Bearer {key}"})
        self._model = model
        self.last_usage: dict[str, Any] = {}

    # --- HTTP ---------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        url = f"{self.base_url}{path}"
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._client.request(method, url, json=payload)
            except httpx.ConnectError as exc:
                last = f"cannot reach {url}: is the server running? ({exc})"
                continue
            except httpx.TimeoutException:
                last = f"{url} did not answer within {self.timeout:g} s (timeout); the server may be overloaded or hung"
                continue
            except httpx.HTTPError as exc:
                last = f"request to {url} failed: {exc}"
                continue
            if resp.status_code in _RETRY_STATUS:
                last = f"{url} answered HTTP {resp.status_code}: {resp.text[:300]}"
                continue
            if resp.status_code >= 400:
                raise PolicyError(f"{url} rejected the request with HTTP {resp.status_code}: {resp.text[:500]}")
            try:
                return resp.json()
            except ValueError as exc:
                raise PolicyError(f"{url} did not return JSON: {resp.text[:200]!r}") from exc
        raise PolicyError(f"{last} (after {self.retries + 1} attempt(s))")

    @property
    def model(self) -> str:
        """The served model name (asked from ``/models`` when not given)."""
        if self._model is None:
            data = self._request("GET", "/models").get("data") or []
            if not data or "id" not in data[0]:
                raise PolicyError(f"{self.base_url}/models lists no model; pass model=<served model name>")
            self._model = str(data[0]["id"])
        return self._model

    def complete(self, messages: list[dict[str, Any]], images: list[np.ndarray]) -> str:
        """One chat completion for transformers-style messages and their images."""
        payload: dict[str, Any] = {
            "model": self.model, "messages": to_openai_messages(messages, images),
            "max_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
            **self.extra_body,
        }
        data = self._request("POST", "/chat/completions", payload)
        try:
            content = data["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise PolicyError(f"unexpected chat-completion response (no choices[0].message): {str(data)[:300]}") from exc
        self.last_usage = dict(data.get("usage") or {})
        return (content or "").strip()

    def close(self) -> None:
        self._client.close()

    # --- policy ---------------------------------------------------------------------------------------------------
    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None:
        super().begin_episode(image=image, query=query, gt=gt)
        self.chat.begin_episode()

    def act(self, obs: Observation) -> str:
        messages, images = self.chat.messages(obs)
        reply = self.complete(messages, images)
        self.chat.record_reply(reply)
        return reply


@register_policy("openai", "any OpenAI-compatible chat endpoint (vLLM, SGLang) serving a multimodal model")
def _make_openai(**cfg: Any) -> OpenAIPolicy:
    return OpenAIPolicy(**cfg)
