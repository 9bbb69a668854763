"""The compact CPU policy: a small convolutional network that plays the click game in the reference grammar.

Inputs (all on the 64x64 grid of the LiteMedSAM image embedding, which covers the whole image, aspect not kept):

* the image embedding (256 x 64 x 64), taken from the segmenter's embedding cache (no second encoder pass),
* the query's sentence embedding (all-MiniLM-L6-v2, :mod:`ibisagent.text_encoder`), applied by FiLM,
* the state planes: current mask (area fraction per cell), its logits (squashed), the positive and negative clicks
  so far (one-hot cells), whether a mask exists, the step.

Outputs: a positive-click map and a negative-click map (logits over the 64x64 cells), a stop logit, and an auxiliary
object map (the network's belief of where the target is; used for the box-first action and in the reasoning text).
The action distribution is factored: ``P(stop) = sigmoid(stop)``, ``P(click c) = (1 - P(stop)) * softmax(maps)[c]``
over the *allowed* cells: never a cell already clicked, positive clicks only where the mask does not already cover
the cell, negative clicks only where it does, and neither stop nor negative clicks before the first mask.

The chosen cell becomes a pixel of the original image (sub-cell soft-argmax of the 3x3 neighbourhood, then snapped
to a pixel on the correct side of the current mask), and the reply is written with :func:`ibisagent.protocol.
format_reply` and reasoning built from the network's own state (where its map peaks, how that relates to the mask,
its stop probability, how far its object belief and the mask agree).

Registered as ``compact`` (clicks only) and ``compact-box`` (first action = a box around the object belief; extended
grammar).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ibisagent.env import Observation
from ibisagent.masks import error_regions
from ibisagent.policies.base import BasePolicy, PolicyError, register_policy
from ibisagent.protocol import Action, format_reply, to_normalized
from ibisagent.queries import mirror_safe
from ibisagent.reasoning import describe_box, describe_click, describe_stop, location_phrase

__all__ = [
    "DEFAULT_MAX_CLICKS",
    "GRID",
    "N_PLANES",
    "POLICY_WEIGHTS",
    "ActionChoice",
    "CompactNetConfig",
    "CompactPolicy",
    "CompactPolicyNet",
    "action_log_prob",
    "policy_entropy",
    "select_actions",
    "allowed_actions",
    "cell_to_pixel",
    "fake_embedding",
    "load_policy_net",
    "masked_logits",
    "pool_to_grid",
    "save_policy_net",
    "state_planes",
    "to_rgb",
]

#: side of the action grid (= the LiteMedSAM embedding grid)
GRID = 64
#: state planes: mask fraction, squashed logits, positive clicks, negative clicks, has-mask, step / 10
N_PLANES = 6
#: the shipped weights
POLICY_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "compact_policy.safetensors"
_NEG_INF = -1e9


# ----------------------------------------------------------------------------------------------------------------
# State encoding (shared by inference and training)
# ----------------------------------------------------------------------------------------------------------------

#: click budget of an episode: 4 clicks + Terminate = 5 turns at most (the issue's <= 5 steps)
DEFAULT_MAX_CLICKS = 4

def to_rgb(image: np.ndarray) -> np.ndarray:
    """The image as the segmenter sees it in ``set_image`` (gray replicated, alpha dropped, contiguous uint8)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise PolicyError(f"expected an HxWx3 image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise PolicyError(f"expected uint8 RGB pixels, got {img.dtype}")
    return np.ascontiguousarray(img[..., :3])


def pool_to_grid(arr: np.ndarray, grid: int = GRID) -> np.ndarray:
    """Area-average an HxW array onto a grid x grid array (cell i covers rows [floor(i*H/grid), floor((i+1)*H/grid)),
    the cells of :func:`pixel_to_cell`)."""
    a = np.asarray(arr, dtype=np.float32)
    h, w = a.shape
    if h < grid or w < grid:  # cells smaller than a pixel: overlapping adaptive pooling
        t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
        return F.adaptive_avg_pool2d(t, grid)[0, 0].numpy()
    rs = (np.arange(grid) * h) // grid
    cs = (np.arange(grid) * w) // grid
    sums = np.add.reduceat(np.add.reduceat(a, rs, axis=0), cs, axis=1)
    counts = np.diff(np.append(rs, h))[:, None] * np.diff(np.append(cs, w))[None, :]
    return (sums / counts).astype(np.float32)


def pixel_to_cell(x: float, y: float, width: int, height: int, grid: int = GRID) -> tuple[int, int]:
    """Pixel (x, y) -> cell (row, col)."""
    return min(int(y * grid / height), grid - 1), min(int(x * grid / width), grid - 1)


def state_planes(
    mask: np.ndarray | None,
    logits: np.ndarray | None,
    points: np.ndarray,
    labels: np.ndarray,
    shape: tuple[int, int],
    step: int,
) -> np.ndarray:
    """The (N_PLANES, 64, 64) float32 state of one turn. ``shape`` = (H, W) of the image; ``points`` in pixels."""
    h, w = shape
    planes = np.zeros((N_PLANES, GRID, GRID), np.float32)
    if mask is not None:
        planes[0] = pool_to_grid(np.asarray(mask, dtype=np.float32))
        planes[4] = 1.0
        if logits is not None:
            lg = np.asarray(logits, dtype=np.float32)
            lg = lg.reshape(lg.shape[-2:]) if lg.ndim == 3 else lg
            planes[1] = np.tanh(pool_to_grid(lg) / 8.0)
        else:
            planes[1] = planes[0] * 2 - 1
    pts = np.asarray(points, np.float32).reshape(-1, 2)
    labs = np.asarray(labels).reshape(-1)
    for (x, y), lab in zip(pts, labs):
        r, c = pixel_to_cell(float(x), float(y), w, h)
        planes[2 if int(lab) == 1 else 3, r, c] = 1.0
    planes[5] = min(step, 20) / 10.0
    return planes


def allowed_actions(planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, G, G) bool of allowed positive/negative cells and (B,) bool of whether stop is allowed.

    Positive clicks go where the mask covers < 90% of the cell, negative ones where it covers > 10%; a cell already
    clicked is never clicked again; before the first mask only positive clicks are allowed.
    """
    frac, pos, neg, has = planes[:, 0], planes[:, 2], planes[:, 3], planes[:, 4, 0, 0] > 0.5
    fresh = (pos < 0.5) & (neg < 0.5)
    allow_pos = fresh & (frac < 0.9)
    allow_neg = fresh & (frac > 0.1) & has[:, None, None]
    allowed = torch.stack([allow_pos, allow_neg], 1)
    # a state with no allowed cell (pathological) keeps every fresh cell positive so the distribution is proper
    empty = ~allowed.flatten(1).any(1)
    if empty.any():
        allowed[empty, 0] = fresh[empty] | ~fresh[empty].flatten(1).any(1)[:, None, None]
    return allowed, has


def masked_logits(maps: torch.Tensor, planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (B, 2*G*G) click logits with disallowed cells at -inf, and (B,) stop-allowed flags."""
    allowed, stop_ok = allowed_actions(planes)
    return maps.masked_fill(~allowed, _NEG_INF).flatten(1), stop_ok


def action_log_prob(
    maps: torch.Tensor, stop_logit: torch.Tensor, planes: torch.Tensor, actions: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log P(action) under the factored policy. ``actions`` (B,) = flat click index in [0, 2*G*G) or -1 = stop."""
    logits, stop_ok = masked_logits(maps / temperature, planes)
    logp_click = torch.log_softmax(logits, dim=1)
    s = stop_logit / temperature
    logp_stop = F.logsigmoid(s)
    logp_go = torch.where(stop_ok, F.logsigmoid(-s), torch.zeros_like(s))
    idx = actions.clamp_min(0)
    lp_c = logp_go + logp_click.gather(1, idx[:, None])[:, 0]
    return torch.where(actions < 0, logp_stop, lp_c)


def policy_entropy(maps: torch.Tensor, stop_logit: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """(B,) entropy of the factored action distribution."""
    logits, stop_ok = masked_logits(maps, planes)
    lp = torch.log_softmax(logits, 1)
    h_click = -(lp.exp() * lp).sum(1)
    ps = torch.sigmoid(stop_logit) * stop_ok
    h_stop = -(ps * torch.log(ps.clamp_min(1e-8)) + (1 - ps) * torch.log((1 - ps).clamp_min(1e-8)))
    return h_stop + (1 - ps) * h_click


def select_actions(
    maps: torch.Tensor, stop_logit: torch.Tensor, planes: torch.Tensor, *, temperature: float = 0.0,
    stop_threshold: float = 0.5, force_stop: torch.Tensor | None = None, generator: torch.Generator | None = None,
    greedy_clicks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick one action per state: greedy (``temperature`` 0: stop if P(stop) >= ``stop_threshold``, else the best
    allowed cell) or sampled at ``temperature``. ``force_stop`` (B,) bool forces Terminate where stopping is allowed.
    Returns (actions (B,) with -1 = stop, log-probs (B,) under the sampling temperature (1 when greedy),
    P(stop) (B,) at temperature 1). With ``greedy_clicks`` (and ``temperature`` > 0) only stop-or-click is sampled;
    the click is the best allowed cell, as deployed."""
    logits, stop_ok = masked_logits(maps, planes)
    p_stop = torch.sigmoid(stop_logit) * stop_ok
    if temperature <= 0:
        acts = torch.argmax(logits, 1)
        stop = stop_ok & (p_stop >= stop_threshold)
        t_eval = 1.0
    else:
        if greedy_clicks:
            acts = torch.argmax(logits, 1)
        else:
            probs = torch.softmax(logits / temperature, 1)
            acts = torch.multinomial(probs, 1, generator=generator)[:, 0]
        ps_t = torch.sigmoid(stop_logit / temperature) * stop_ok
        stop = torch.rand(ps_t.shape, generator=generator) < ps_t
        t_eval = temperature
    if force_stop is not None:
        stop = stop | (force_stop & stop_ok)
    acts = torch.where(stop, torch.full_like(acts, -1), acts)
    lp = action_log_prob(maps, stop_logit, planes, acts, temperature=t_eval)
    return acts, lp, p_stop


def cell_to_pixel(
    flat: int, maps: np.ndarray, mask: np.ndarray | None, shape: tuple[int, int],
    clicked: set[tuple[int, int]] | None = None,
) -> tuple[bool, int, int]:
    """Flat action index -> (positive, x, y) pixel of the original image.

    The position inside the cell is the soft-argmax of the chosen map over the 3x3 cell neighbourhood (sub-cell
    precision), then moved to the nearest pixel of the cell that lies on the correct side of the current mask
    (outside it for a positive click, inside for a negative one) and was not clicked before.
    """
    h, w = shape
    ch, rest = divmod(int(flat), GRID * GRID)
    r, c = divmod(rest, GRID)
    m = maps[ch]
    r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, GRID), max(c - 1, 0), min(c + 2, GRID)
    sub = m[r0:r1, c0:c1].astype(np.float64)
    wts = np.exp(sub - sub.max())
    wts /= wts.sum()
    rr, cc = np.mgrid[r0:r1, c0:c1]
    fy = float((wts * (rr + 0.5)).sum())
    fx = float((wts * (cc + 0.5)).sum())
    # keep the point inside the chosen cell
    fy = min(max(fy, r + 0.05), r + 0.95)
    fx = min(max(fx, c + 0.05), c + 0.95)
    py, px = fy * h / GRID, fx * w / GRID
    y0, y1 = int(r * h / GRID), max(int(r * h / GRID) + 1, int(np.ceil((r + 1) * h / GRID)))
    x0, x1 = int(c * w / GRID), max(int(c * w / GRID) + 1, int(np.ceil((c + 1) * w / GRID)))
    y1, x1 = min(y1, h), min(x1, w)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    ok = np.ones(ys.shape, bool)
    positive = ch == 0
    if mask is not None:
        inside = np.asarray(mask)[y0:y1, x0:x1].astype(bool)
        side = ~inside if positive else inside
        if side.any():
            ok &= side
    if clicked:
        for cx, cy in clicked:
            if y0 <= cy < y1 and x0 <= cx < x1:
                ok[cy - y0, cx - x0] = False
    if not ok.any():
        ok[:] = True
    d = (ys + 0.5 - py) ** 2 + (xs + 0.5 - px) ** 2
    d[~ok] = np.inf
    k = int(np.argmin(d))
    return positive, int(xs.flat[k]), int(ys.flat[k])


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompactNetConfig:
    """Architecture of :class:`CompactPolicyNet` (stored in the weights file)."""

    emb_channels: int = 256
    text_dim: int = 384
    width: int = 48
    stem: int = 32
    head: int = 24
    dilations: tuple[int, ...] = (1, 2, 4, 8, 1, 2)
    text_hidden: int = 128
    #: query maps: the query's text features become this many key vectors over the embedding's channels, and their
    #: dot products with the (channel-normalized) embedding are extra input maps at 64 x 64 -- the query picks
    #: channels of the full 256-channel embedding before the 1x1 stem squeezes it (0 = off: the older architecture)
    query_maps: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CompactNetConfig:
        d = json.loads(text)
        d["dilations"] = tuple(d.get("dilations", (1, 2, 4, 8, 1, 2)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class _FiLMBlock(nn.Module):
    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.norm = nn.GroupNorm(8, width)
        self.mix = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        y = y * (1 + gamma[..., None, None]) + beta[..., None, None]
        return x + self.mix(F.gelu(y))


class CompactPolicyNet(nn.Module):
    """Embedding + state planes + text -> (maps (B, 2, 64, 64), stop logit (B,), object logits (B, 64, 64)).

    The body runs at 32x32 with dilated residual blocks modulated by the text (FiLM); the heads come back to 64x64
    through a skip connection from the full-resolution stem.
    """

    def __init__(self, cfg: CompactNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or CompactNetConfig()
        w, s = cfg.width, cfg.stem
        self.emb_in = nn.Sequential(nn.Conv2d(cfg.emb_channels, s, 1), nn.GroupNorm(8, s), nn.GELU())
        self.state_in = nn.Conv2d(N_PLANES + 2, s, 3, padding=1)
        self.down = nn.Conv2d(s, w, 3, stride=2, padding=1)
        self.text = nn.Sequential(nn.Linear(cfg.text_dim, cfg.text_hidden), nn.GELU())
        self.film = nn.Linear(cfg.text_hidden, 2 * w * len(cfg.dilations))
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.blocks = nn.ModuleList(_FiLMBlock(w, d) for d in cfg.dilations)
        if cfg.query_maps:
            self.query_key = nn.Linear(cfg.text_hidden, cfg.query_maps * cfg.emb_channels)
            nn.init.normal_(self.query_key.weight, std=0.02)
            nn.init.zeros_(self.query_key.bias)
            self.query_in = nn.Conv2d(cfg.query_maps, s, 1)
        self.fuse = nn.Conv2d(w + s, cfg.head, 1)
        self.head_conv = nn.Conv2d(cfg.head, cfg.head, 3, padding=1)
        self.head = nn.Conv2d(cfg.head, 3, 1)  # positive, negative, object
        self.stop = nn.Sequential(nn.Linear(2 * w + cfg.text_hidden + 4, 64), nn.GELU(), nn.Linear(64, 1))
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, GRID), torch.linspace(-1, 1, GRID), indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)

    def forward(
        self, emb: torch.Tensor, planes: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = emb.shape[0]
        st = torch.cat([planes, self.coords.expand(b, -1, -1, -1)], 1)
        t = self.text(text)
        x64 = self.emb_in(emb) + self.state_in(st)
        if self.cfg.query_maps:
            x64 = x64 + self.query_in(self.query_response(emb, t))
        x64 = F.gelu(x64)
        x = F.gelu(self.down(x64))
        film = self.film(t).view(b, len(self.blocks), 2, -1)
        for i, blk in enumerate(self.blocks):
            x = blk(x, film[:, i, 0], film[:, i, 1])
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        y = F.gelu(self.fuse(torch.cat([up, x64], 1)))
        y = F.gelu(self.head_conv(y))
        out = self.head(y)
        frac = planes[:, 0]
        obj_p = torch.sigmoid(out[:, 2]).detach()
        inter = (obj_p * frac).flatten(1).sum(1)
        union = (obj_p + frac - obj_p * frac).flatten(1).sum(1).clamp_min(1e-3)
        scalars = torch.stack([
            frac.flatten(1).mean(1) * 10, (planes[:, 2] + planes[:, 3]).flatten(1).sum(1) / 10,
            planes[:, 5, 0, 0], inter / union,
        ], 1)
        g = torch.cat([x.mean((2, 3)), x.amax((2, 3)), t, scalars], 1)
        stop = self.stop(g)[:, 0]
        return out[:, :2], stop, out[:, 2]


    def query_response(self, emb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, query_maps, 64, 64): dot products of the query's key vectors with the embedding, each pixel's 256
        channels scaled to unit length (so a map is the cosine with the key times the key's length)."""
        b, c = emb.shape[:2]
        keys = self.query_key(t).view(b, self.cfg.query_maps, c)
        unit = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return torch.einsum("bchw,bkc->bkhw", unit, keys)


def save_policy_net(net: CompactPolicyNet, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the network (float32 tensors) and its config + ``meta`` to a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = {"config": net.cfg.to_json(), "format": "ibisagent-compact-policy-v1"}
    md.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (meta or {}).items()})
    state = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata=md)
    return path


def load_policy_net(path: str | Path | None = None) -> tuple[CompactPolicyNet, dict[str, str]]:
    """Load a network written by :func:`save_policy_net` (default: the shipped weights) and its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path) if path is not None else POLICY_WEIGHTS
    if not p.is_file():
        raise PolicyError(f"compact policy weights not found at {p}; train them with `ibisagent train-policy "
                          "--data /path/to/data` or pass weights=PATH")
    try:
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(p))
        cfg = CompactNetConfig.from_json(meta["config"]) if "config" in meta else CompactNetConfig()
        net = CompactPolicyNet(cfg)
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise PolicyError(f"cannot load compact policy weights {p}: {exc}") from exc
    return net.eval(), meta


# ----------------------------------------------------------------------------------------------------------------
# Image embeddings (through the segmenter's cache)
# ----------------------------------------------------------------------------------------------------------------

def fake_embedding(image: np.ndarray, channels: int = 256) -> np.ndarray:
    """A cheap deterministic stand-in for the LiteMedSAM embedding (tests with the ``fake`` segmenter): pooled colour
    and gradient features mixed by a fixed random projection. (1, channels, 64, 64) float32."""
    img = to_rgb(image).astype(np.float32) / 255.0
    gray = img.mean(2)
    gy, gx = np.gradient(gray)
    feats = [pool_to_grid(img[..., k]) for k in range(3)] + [pool_to_grid(gray), pool_to_grid(np.hypot(gx, gy) * 8)]
    f = np.stack(feats)  # (5, 64, 64)
    proj = np.random.default_rng(12345).normal(size=(channels, f.shape[0])).astype(np.float32)
    return np.tanh(np.einsum("ck,khw->chw", proj, f - 0.5))[None].astype(np.float32)


class _Embedder:
    """Gets the (1, 256, 64, 64) image embedding: the segmenter's in-memory cache first (a hit when the environment's
    segmenter already encoded the image), else runs the LiteMedSAM encoder once (and caches it)."""

    def __init__(self, kind: str = "litemedsam") -> None:
        if kind not in ("litemedsam", "fake"):
            raise PolicyError(f"unknown embedder {kind!r}; use 'litemedsam' or 'fake'")
        self.kind = kind
        self._seg = None
        #: encoder passes this policy ran itself (0 when every image came from the cache)
        self.encoder_runs = 0
        self.cache_hits = 0

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img = to_rgb(image)
        if self.kind == "fake":
            return fake_embedding(img)
        from ibisagent.segmenters.embedding_cache import default_memory_cache, embedding_key
        from ibisagent.segmenters.litemedsam import ENCODER_ID

        hit = default_memory_cache().get(embedding_key(img, ENCODER_ID))
        if hit is not None:
            self.cache_hits += 1
            return hit
        if self._seg is None:
            from ibisagent.segmenters.litemedsam import LiteMedSAMSegmenter

            self._seg = LiteMedSAMSegmenter(weights="original")
        before = self._seg.encoder_runs
        emb = self._seg.embedding(img)
        self.encoder_runs += self._seg.encoder_runs - before
        return emb


# ----------------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class ActionChoice:
    """One decision of the network with the state it came from (what training needs to score it again)."""

    index: int  # flat click index, or -1 for stop
    log_prob: float
    stop_prob: float
    planes: np.ndarray
    maps: np.ndarray = field(repr=False)
    obj: np.ndarray = field(repr=False)
    #: (x, y) pixel chosen by the ``belief`` click rule (None: the cell of ``index`` is turned into a pixel)
    pixel: tuple[int, int] | None = None


def _flag(value: Any, name: str) -> bool:
    """A boolean option that may arrive as text from the command line ("true", "False", "1", ...)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "1", "yes", "on"):
            return True
        if v in ("false", "0", "no", "off", ""):
            return False
        raise PolicyError(f"{name} must be true or false, got {value!r}")
    return bool(value)


class CompactPolicy(BasePolicy):
    """Learned CPU policy (image embedding + query text + mask + clicks -> next click or stop).

    Args:
        weights: a ``.safetensors`` file from ``ibisagent train-policy``; default the shipped weights; ``"random"``
            for an untrained network (tests), or a :class:`CompactPolicyNet` instance.
        first_action: ``"click"`` (reference grammar) or ``"box"`` (a box around the object belief first; extended
            grammar).
        temperature: 0 = greedy (argmax); > 0 samples (as GRPO rollouts do).
        max_clicks: stop after this many clicks whatever the stop head says.
        stop_threshold: stop when P(stop) >= this (greedy mode).
        embedder: ``"litemedsam"`` (the segmenter's embedding, from its cache) or ``"fake"`` (tests).
        query_blind: replace every query by the empty string (ablation).
        seed: RNG seed for sampling and the wording of the reasoning.
        click_rule: ``"maps"`` (default: the learned click maps and stop head, what GRPO trains) or ``"belief"``
            (the reference distance-transform rule applied to the network's own object map instead of the ground
            truth: click the deepest pixel of the larger disagreement region between its object belief and the
            mask; stop when they agree at IoU >= ``belief_stop``).
        belief_stop: agreement (IoU of belief and mask) at which the ``belief`` rule stops.
        tta: test-time augmentation: also run the network on the mirrored image and state (one more encoder pass per
            image) and average the two outputs (click maps, stop logit, object map), mirrored back. Skipped when the
            query names a side (left/right). Slower; off by default.
    """

    name = "compact"
    requires_gt = False

    def __init__(
        self,
        weights: str | Path | CompactPolicyNet | None = None,
        first_action: str = "click",
        temperature: float = 0.0,
        max_clicks: int = DEFAULT_MAX_CLICKS,
        stop_threshold: float = 0.5,
        embedder: str = "litemedsam",
        query_blind: bool = False,
        seed: int = 0,
        threads: int = 1,
        click_rule: str = "maps",
        belief_stop: float = 0.9,
        tta: bool = False,
    ) -> None:
        super().__init__()
        if first_action not in ("click", "box"):
            raise PolicyError("first_action must be 'click' or 'box'")
        if click_rule not in ("maps", "belief"):
            raise PolicyError("click_rule must be 'maps' or 'belief'")
        self.click_rule = click_rule
        self.belief_stop = float(belief_stop)
        self.tta = _flag(tta, "tta")
        self._emb_flip: torch.Tensor | None = None
        if isinstance(weights, CompactPolicyNet):
            self.net, self.meta = weights, {}
        elif weights == "random":
            torch.manual_seed(seed)
            self.net, self.meta = CompactPolicyNet().eval(), {}
        else:
            self.net, self.meta = load_policy_net(weights)
        self.first_action = first_action
        self.grammar = "extended" if first_action == "box" else "reference"
        self.temperature = float(temperature)
        self.max_clicks = int(max_clicks)
        self.stop_threshold = float(stop_threshold)
        self.query_blind = _flag(query_blind, "query_blind")
        self.threads = int(threads)
        self.embedder = _Embedder(embedder)
        self._seed = seed
        self._rng = random.Random(seed)
        self._gen = torch.Generator().manual_seed(seed)
        self._emb: torch.Tensor | None = None
        self._text: torch.Tensor | None = None
        self._clicked: set[tuple[int, int]] = set()
        #: the last decision (for training and inspection)
        self.last: ActionChoice | None = None

    # --- episode ---------------------------------------------------------------------------------------------
    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None:
        super().begin_episode(image=image, query=query, gt=gt)
        self._emb = torch.from_numpy(np.array(self.embedder(image), dtype=np.float32).reshape(1, -1, GRID, GRID))
        self._emb_flip = None
        if self.tta and mirror_safe(query):  # a mirrored "left kidney" would be the right one: no mirrored pass
            flipped = np.ascontiguousarray(np.asarray(image)[:, ::-1])
            self._emb_flip = torch.from_numpy(
                np.array(self.embedder(flipped), dtype=np.float32).reshape(1, -1, GRID, GRID))
        self._text = torch.from_numpy(self.text_embedding(query))[None]
        self._clicked = set()
        self.last = None

    def text_embedding(self, query: str) -> np.ndarray:
        from ibisagent.text_encoder import get_text_encoder

        return get_text_encoder().encode("" if self.query_blind else query)

    def target_name(self) -> str:
        from ibisagent.policies.oracle import _target_from_query

        return _target_from_query(self.query)

    # --- decisions -------------------------------------------------------------------------------------------
    def decide(self, obs: Observation) -> ActionChoice:
        """Run the network on the observation and pick an action (greedy or sampled)."""
        if self._emb is None or self._text is None:
            raise PolicyError("begin_episode must be called before act")
        planes = state_planes(obs.mask, obs.logits, obs.points, obs.labels, (obs.height, obs.width), obs.step)
        pt = torch.from_numpy(planes)[None]
        prev = torch.get_num_threads()
        torch.set_num_threads(max(1, min(prev, self.threads)))
        try:
            with torch.inference_mode():
                maps, stop, obj = self.net(self._emb, pt, self._text)
                if self._emb_flip is not None:
                    maps, stop, obj = self._mirror_average(pt, maps, stop, obj)
                force = torch.tensor([len(obs.points) >= self.max_clicks])
                acts, lps, p_stops = select_actions(maps, stop, pt, temperature=self.temperature,
                                                    stop_threshold=self.stop_threshold, force_stop=force,
                                                    generator=self._gen)
        finally:
            torch.set_num_threads(prev)
        index, lp, p_stop = int(acts[0]), float(lps[0]), float(p_stops[0])
        choice = ActionChoice(index, lp, p_stop, planes, maps[0].numpy(), obj[0].numpy())
        if self.click_rule == "belief" and self.temperature <= 0:
            choice = self._belief_choice(choice, obs, bool(force[0]))
        self.last = choice
        return choice

    def _mirror_average(self, planes: torch.Tensor, maps: torch.Tensor, stop: torch.Tensor,
                        obj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Average the outputs with those for the mirrored image and state, mirrored back. The state is mirrored on
        the 64 x 64 grid, as the training's mirror augmentation does."""
        m2, s2, o2 = self.net(self._emb_flip, planes.flip(-1), self._text)
        return (maps + m2.flip(-1)) / 2, (stop + s2) / 2, (obj + o2.flip(-1)) / 2

    def predicted_iou(self, mask: np.ndarray) -> float | None:
        """Quality estimate of the final mask: its IoU with the network's own object belief (from the last decision,
        upsampled to the image). Needs no ground truth; a low value means the mask and what the network thinks the
        query names disagree (docs/benchmarks.md reports how well it ranks cases)."""
        if self.last is None:
            return None
        m = np.asarray(mask, bool)
        belief = self.belief_mask(self.last.obj, m.shape)
        union = int((belief | m).sum())
        return float((belief & m).sum() / union) if union else 0.0

    def belief_mask(self, obj: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The network's object map (64x64 logits) upsampled to the image (bilinear) and thresholded at 0."""
        t = torch.from_numpy(np.asarray(obj, np.float32))[None, None]
        return (F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0] > 0).numpy()

    def _belief_choice(self, choice: ActionChoice, obs: Observation, forced_stop: bool) -> ActionChoice:
        """The ``belief`` click rule: the reference distance-transform oracle run against the object belief."""
        h, w = obs.height, obs.width
        belief = self.belief_mask(choice.obj, (h, w))
        mask = np.zeros((h, w), bool) if obs.mask is None else np.asarray(obs.mask, bool)
        if not belief.any():  # no belief: keep the learned maps' choice
            return choice
        union = (belief | mask).sum()
        agree = float((belief & mask).sum() / union) if union else 1.0
        if obs.mask is not None and (forced_stop or agree >= self.belief_stop):
            return dataclasses.replace(choice, index=-1)
        er = error_regions(mask, belief)  # FN: belief not yet covered; FP: mask beyond the belief
        best: tuple[float, bool, int, int] | None = None
        for positive, dt in ((True, er.fn_dt), (False, er.fp_dt)):
            if not dt.any() or (not positive and obs.mask is None):
                continue
            dt = dt.copy()
            for cx, cy in self._clicked:
                if 0 <= cy < h and 0 <= cx < w:
                    dt[cy, cx] = 0
            k = int(np.argmax(dt))
            if dt.flat[k] > 0 and (best is None or dt.flat[k] > best[0]):
                best = (float(dt.flat[k]), positive, k % w, k // w)
        if best is None:
            return dataclasses.replace(choice, index=-1) if obs.mask is not None else choice
        _, positive, x, y = best
        r, c = pixel_to_cell(x, y, w, h)
        index = (0 if positive else 1) * GRID * GRID + r * GRID + c
        return dataclasses.replace(choice, index=index, pixel=(int(x), int(y)))

    def act(self, obs: Observation) -> str:
        if obs.step == 0 and obs.mask is None and self.first_action == "box":
            return self._box_reply(obs)
        return self.reply_for(obs, self.decide(obs))

    def reply_for(self, obs: Observation, choice: ActionChoice) -> str:
        """The reply text (reference grammar) for a decision, with reasoning grounded in the network's state."""
        return self.reply_text(choice, obs.mask, (obs.height, obs.width))

    def reply_text(self, choice: ActionChoice, mask: np.ndarray | None, shape: tuple[int, int]) -> str:
        """Reply for ``choice`` taken on ``mask`` (None before the first click) of an image of ``shape`` (H, W).
        Records the click pixel so that the same pixel is never clicked twice in the episode."""
        h, w = shape
        target = self.target_name()
        agree = _grid_iou(choice.obj > 0, choice.planes[0] > 0.5)
        if choice.index < 0:
            n = len(self._clicked)
            if mask is not None and n >= self.max_clicks and choice.stop_prob < self.stop_threshold:
                # stopped by the click budget, not because the mask looks finished: say so
                think = (f"I have placed {n} points, the budget of one episode, so I stop here although my stop "
                         f"probability is only {choice.stop_prob:.2f} and my estimate of {target} agrees with the "
                         f"mask at about {agree:.2f} IoU; the mask may still need correction.")
                answer = f"Stopped at the click budget; the mask of {target} may be incomplete."
                return format_reply(Action.terminate(), think, answer)
            think, answer = describe_stop(mask=mask, target=target, rng=self._rng)
            think += (f" My stop probability is {choice.stop_prob:.2f}, and my estimate of the object agrees with the "
                      f"mask at about {agree:.2f} IoU.")
            return format_reply(Action.terminate(), think, answer)
        if choice.pixel is not None:
            positive, (x, y) = choice.index < GRID * GRID, choice.pixel
        else:
            positive, x, y = cell_to_pixel(choice.index, choice.maps, mask, (h, w), self._clicked)
        self._clicked.add((x, y))
        # the region the click targets, from the network's own state on the 64x64 grid: its object belief minus the
        # mask (positive) or the mask minus the belief (negative), the component under the click
        belief, covered = choice.obj > 0, choice.planes[0] > 0.5
        region = (belief & ~covered) if positive else (covered & ~belief)
        r, c = pixel_to_cell(x, y, w, h)
        region = _component_at(region, c, r)
        if not region[r, c]:
            region = np.zeros((GRID, GRID), bool)
            region[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = True
        region = region[(np.arange(h) * GRID // h)[:, None], (np.arange(w) * GRID // w)[None, :]]
        # the chosen cell's probability under the click distribution the policy samples from (allowed cells only)
        logits, _ = masked_logits(torch.from_numpy(np.asarray(choice.maps, np.float32))[None],
                                  torch.from_numpy(np.asarray(choice.planes, np.float32))[None])
        peak = float(torch.softmax(logits.double(), 1)[0, choice.index])
        think = describe_click(positive=positive, x=x, y=y, width=w, height=h, target=target, region=region,
                               mask=mask, rng=self._rng)
        kind = "positive" if positive else "negative"
        if choice.pixel is not None:
            gap = "my object estimate covers but the mask misses" if positive else "the mask covers beyond my estimate"
            think += (f" The point is the deepest pixel of the largest region {gap} ({kind} click); my {kind} map"
                      f" gives its cell probability {_prob_text(peak)}")
        else:
            think += (f" My {kind} map peaks in the {location_phrase(x, y, w, h)} (cell probability {_prob_text(peak)});"
                      f" stop probability {choice.stop_prob:.2f}")
        think += f", object estimate vs mask IoU {agree:.2f}." if mask is not None else "."
        act = (Action.positive if positive else Action.negative)(to_normalized(x, w), to_normalized(y, h))
        return format_reply(act, think)

    def predicted_box(self, obs: Observation) -> tuple[int, int, int, int]:
        """Pixel box (x1, y1, x2, y2) around the object belief's component that contains its peak."""
        choice = self.decide(obs)
        h, w = obs.height, obs.width
        prob = 1 / (1 + np.exp(-choice.obj))
        r, c = np.unravel_index(int(np.argmax(prob)), prob.shape)
        comp = _component_at(prob > 0.5, c, r)
        if not comp.any():
            comp = prob >= 0.5 * prob.max()
            comp = _component_at(comp, c, r)
        rows, cols = np.nonzero(comp)
        y1, y2 = rows.min() * h / GRID, (rows.max() + 1) * h / GRID - 1
        x1, x2 = cols.min() * w / GRID, (cols.max() + 1) * w / GRID - 1
        x1, y1 = max(0, int(x1)), max(0, int(y1))
        x2, y2 = min(w - 1, max(int(x2), x1 + 1)), min(h - 1, max(int(y2), y1 + 1))
        if x2 <= x1:
            x1 = max(0, x2 - 1)
        if y2 <= y1:
            y1 = max(0, y2 - 1)
        return x1, y1, x2, y2

    def _box_reply(self, obs: Observation) -> str:
        from ibisagent.policies.oracle import box_action

        box = self.predicted_box(obs)
        h, w = obs.height, obs.width
        think = describe_box(box=box, width=w, height=h, target=self.target_name(), rng=self._rng)
        think += " The box encloses the part of my object map above probability 0.5 around its peak."
        return format_reply(box_action(box, w, h), think)


def _prob_text(p: float) -> str:
    """A probability for the reasoning text: two decimals, or scientific notation when that would read 0.00 (a
    softmax over 8192 cells puts small numbers on single cells)."""
    return f"{p:.2f}" if p >= 0.005 else f"{p:.1e}"


def _grid_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _component_at(region: np.ndarray, x: int, y: int) -> np.ndarray:
    """The connected component of ``region`` containing (x, y), or its largest component when (x, y) is outside."""
    if not region.any():
        return region
    lab, n = ndimage.label(region)
    k = lab[y, x] if 0 <= y < region.shape[0] and 0 <= x < region.shape[1] else 0
    if k == 0:
        sizes = ndimage.sum(region, lab, range(1, n + 1))
        k = int(np.argmax(sizes)) + 1
    return lab == k


@register_policy("compact", "learned CPU policy (image embedding + query text + mask -> clicks); no ground truth")
def _make_compact(**cfg: Any) -> CompactPolicy:
    return CompactPolicy(**cfg)


@register_policy("compact-box", "the compact policy with a box as its first action (extended grammar)")
def _make_compact_box(**cfg: Any) -> CompactPolicy:
    cfg.setdefault("first_action", "box")
    return CompactPolicy(**cfg)


@register_policy("text-only", "single shot from the query: the compact policy's box around its object belief, then "
                              "Terminate (the baseline that shows the agent's multi-step gain)")
def _make_text_only(**cfg: Any) -> CompactPolicy:
    cfg.setdefault("first_action", "box")
    cfg.setdefault("max_clicks", 0)
    pol = CompactPolicy(**cfg)
    pol.name = "text-only"
    return pol
