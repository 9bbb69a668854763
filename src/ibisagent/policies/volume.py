"""The 3D agent: the compact policy played over a volume (issue 28, item 3), from the query alone.

One episode, driven by :func:`ibisagent.episode.drive` over :class:`ibisagent.volume.VolumeEnv`:

1. **Key slice.** Before the first prompt the policy scans ``scan`` evenly spaced slices (bounding the encoder cost:
   each scanned slice is encoded once, and the session reuses the embedding) and runs the compact network on each
   with an empty state: its object map is its belief of where the query's object is on that slice. The key slice is
   the one whose belief covers the most pixels.
2. **Prompt.** On the key slice the compact policy's own first 2D action (a box around its belief for
   ``first_action="box"``, else its first click), written in the volume form with the slice index; the session
   propagates it through the volume.
3. **Inspect and correct.** Each later turn compares the 3D mask with the belief slice by slice (the belief is
   computed once per slice, from image + query alone, on the slices the mask covers and the scanned ones): the worst
   slice is the one with the most pixels where they disagree. When even the worst slice agrees (IoU of belief and
   mask >= ``agree_stop``) or ``max_interactions`` prompts were sent, the policy terminates; else it corrects on the
   worst slice with the compact policy's 2D action there (its click given the slice's mask, logits and clicks; the
   ``belief`` click rule by default: the deepest pixel of the larger disagreement region).

Registered as ``compact-3d``. ``hf-3d`` / ``openai-3d`` (:class:`VolumeChatPolicy`) play the same episode with a
multimodal LLM: the first turn shows an overview strip of slices spread over the volume, later turns the current
slice with its neighbours (:func:`ibisagent.chat.render_volume_chat`), and the model answers in the volume form.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ibisagent.env import Observation
from ibisagent.masks import bbox
from ibisagent.oracle_click import challenge_click, worst_slice_click
from ibisagent.overlay import policy_overlay
from ibisagent.policies.base import BasePolicy, PolicyError, register_policy
from ibisagent.policies.compact import CompactPolicy
from ibisagent.policies.oracle import box_action
from ibisagent.protocol import Action, ActionKind, format_reply, parse_reply, to_normalized
from ibisagent.volume.env import VolumeObservation

__all__ = ["VolumeAgent", "VolumeChallengeClicker", "VolumeChatPolicy", "VolumeOracle", "volume_box_action"]


class VolumeAgent(BasePolicy):
    """The compact policy over a volume (see the module docstring).

    Args:
        scan: slices scanned for the key slice (evenly spaced; all slices when the volume has fewer).
        max_interactions: prompts per volume before it terminates.
        agree_stop: terminate when the worst slice's belief and mask agree at this IoU.
        min_belief: belief pixels a slice needs to count as showing the object.
        **compact: options of the inner :class:`~ibisagent.policies.compact.CompactPolicy` (default
            ``first_action="box"``, ``click_rule="belief"``).
    """

    name = "compact-3d"
    requires_gt = False
    grammar = "extended"

    def __init__(self, scan: int = 8, max_interactions: int = 6, agree_stop: float = 0.8, min_belief: int = 20,
                 **compact: Any) -> None:
        super().__init__()
        if int(scan) < 1 or int(max_interactions) < 1:
            raise PolicyError("scan and max_interactions must be >= 1")
        compact.setdefault("first_action", "box")
        compact.setdefault("click_rule", "belief")
        self.inner = CompactPolicy(**compact)
        self.scan = int(scan)
        self.max_interactions = int(max_interactions)
        self.agree_stop = float(agree_stop)
        self.min_belief = int(min_belief)
        self._belief: dict[int, np.ndarray] = {}
        self._sent = 0
        self.key_slice: int | None = None

    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None:
        super().begin_episode(image=image, query=query, gt=gt)
        self._belief = {}
        self._sent = 0
        self.key_slice = None

    # --- the object belief, slice by slice ---------------------------------------------------------------------
    def belief(self, obs: VolumeObservation, z: int) -> np.ndarray:
        """The compact network's object map on slice ``z`` from image + query alone (cached per episode)."""
        if z not in self._belief:
            img = obs.stack.image(z)
            self.inner.begin_episode(image=img, query=obs.query)
            choice = self.inner.decide(self._slice_obs(obs, z, empty=True))
            self._belief[z] = self.inner.belief_mask(choice.obj, img.shape[:2])
        return self._belief[z]

    def _slice_obs(self, obs: VolumeObservation, z: int, *, empty: bool = False) -> Observation:
        s = obs.session
        img = obs.stack.image(z)
        mask = None if empty else s.slice_mask(z)
        if mask is not None and not mask.any() and not s.anchors.get(z):
            mask = None
        pts, labs = s.points(z) if not empty else (np.zeros((0, 2), np.float32), np.zeros((0,), np.int64))
        return Observation(image=img, overlay=policy_overlay(img, mask), query=obs.query,
                           step=0 if empty else obs.step, mask=mask,
                           logits=None if mask is None else s.slice_logits(z), points=pts, labels=labs,
                           box=None if empty else s.slice_box(z), chat=(), grammar="extended")

    def _scan_slices(self, depth: int) -> list[int]:
        if depth <= self.scan:
            return list(range(depth))
        return sorted({int(round(v)) for v in np.linspace(0, depth - 1, self.scan + 2)[1:-1]})

    # --- acting ------------------------------------------------------------------------------------------------
    def act(self, obs: VolumeObservation) -> str:  # type: ignore[override]
        if not isinstance(obs, VolumeObservation):
            raise PolicyError("the 3D agent plays volume episodes (ibisagent.volume.VolumeEnv)")
        if obs.mask is None:
            return self._first(obs)
        if self._sent >= self.max_interactions:
            return format_reply(Action.terminate(), f"I have sent {self._sent} prompts, the budget for one volume.",
                                "Stopped at the interaction budget.")
        z, agree = self._worst_slice(obs)
        if z is None or agree >= self.agree_stop:
            return format_reply(Action.terminate(),
                                f"On every inspected slice the mask agrees with my estimate of the object (the "
                                f"worst at IoU {agree:.2f}), so the 3D mask is complete.",
                                "The structure is segmented through the volume.")
        return self._act_on(obs, z, f"Slice {z} is where the 3D mask disagrees most with my estimate of the object "
                                    f"(IoU {agree:.2f}).")

    def _first(self, obs: VolumeObservation) -> str:
        areas = {z: int(self.belief(obs, z).sum()) for z in self._scan_slices(obs.stack.depth)}
        z = max(areas, key=lambda k: (areas[k], -abs(k - obs.stack.depth // 2)))
        self.key_slice = z
        why = (f"I scanned slices {', '.join(str(k) for k in sorted(areas))} of {obs.stack.depth}; my estimate of "
               f"the object is largest on slice {z} ({areas[z]} pixels), so I prompt there and propagate.")
        return self._act_on(obs, z, why)

    def _act_on(self, obs: VolumeObservation, z: int, why: str) -> str:
        img = obs.stack.image(z)
        self.inner.begin_episode(image=img, query=obs.query)
        self.inner._clicked = {(int(x), int(y)) for x, y in obs.session.points(z)[0]}  # never the same pixel twice
        reply = self.inner.act(self._slice_obs(obs, z))
        parsed = parse_reply(reply, "extended")
        if parsed.action.kind is ActionKind.TERMINATE:
            return format_reply(Action.terminate(), f"{why} My 2D policy sees nothing to correct there.",
                                parsed.answer or "The structure is segmented through the volume.")
        self._sent += 1
        return format_reply(parsed.action.on_slice(z), f"{why} {parsed.reasoning}")

    def _worst_slice(self, obs: VolumeObservation) -> tuple[int | None, float]:
        """The inspected slice with the most belief/mask disagreement and its IoU (None: nothing to inspect)."""
        assert obs.mask is not None
        covered = np.flatnonzero(obs.mask.any((1, 2)))
        zs = set(self._scan_slices(obs.stack.depth)) | set(covered.tolist())
        if len(covered):  # one slice beyond each end: where propagation may have stopped too early
            zs |= {int(covered[0]) - 1, int(covered[-1]) + 1}
        worst, worst_err, worst_iou = None, 0, 1.0
        for z in sorted(k for k in zs if 0 <= k < obs.stack.depth):
            b, m = self.belief(obs, z), obs.mask[z]
            if int(b.sum()) < self.min_belief and not m.any():
                continue
            inter, union = int((b & m).sum()), int((b | m).sum())
            err = union - inter
            if err > worst_err:
                worst, worst_err, worst_iou = z, err, inter / union if union else 1.0
        return worst, worst_iou

    def predicted_iou(self, mask: np.ndarray) -> float | None:
        """Agreement of a 3D mask with the belief on the slices inspected (voxel IoU over those slices)."""
        if not self._belief:
            return None
        m = np.asarray(mask, bool)
        inter = sum(int((b & m[z]).sum()) for z, b in self._belief.items())
        union = sum(int((b | m[z]).sum()) for z, b in self._belief.items())
        return inter / union if union else None


@register_policy("compact-3d", "the 3D agent: key slice from the compact policy's object belief, prompt, propagate, "
                               "correct on the worst slice (volume episodes)", volume=True)
def _make_compact_3d(**cfg: Any) -> VolumeAgent:
    return VolumeAgent(**cfg)


# ----------------------------------------------------------------------------------------------------------------
# A multimodal LLM over a volume: the strip observation
# ----------------------------------------------------------------------------------------------------------------

def overview_slices(depth: int, n: int) -> list[int]:
    """``n`` slice indices spread evenly over a volume of ``depth`` slices (first and last included)."""
    if depth < 1 or n < 1:
        raise ValueError("depth and n must be >= 1")
    return sorted({int(round(z)) for z in np.linspace(0, depth - 1, min(n, depth))})


class VolumeChatPolicy(BasePolicy):
    """A multimodal LLM over a volume episode: the ``hf`` or ``openai`` policy's model, shown strips of slices.

    Turn 1 (no mask yet): an **overview** strip of ``overview`` slices spread over the volume, so the model can pick
    the key slice itself. Later turns: the **current slice** (where the last prompt went) with ``neighbours`` slices
    on each side, every slice with the green overlay of the current 3D mask. The strip is one image (slices side by
    side at their own size; the indices are in the text, not drawn), the texts come from
    :func:`ibisagent.chat.render_volume_chat` with ``prompts`` (an extended-grammar template), and the model answers
    in the volume form (``Positive Point (x, y, z)``); an answer without ``z`` goes to the current slice.
    Only system + current turn are sent (no history). Remaining keywords go to the backend policy (``checkpoint``,
    ``base_url``, ``max_new_tokens``, ...).
    """

    grammar = "extended"

    def __init__(self, backend: str = "openai", *, neighbours: int = 2, overview: int = 5,
                 prompts: str | Any = "extended", **backend_cfg: Any) -> None:
        super().__init__()
        from ibisagent.policies.base import create_policy
        from ibisagent.prompts import PromptTemplate, load_prompts

        if backend not in ("hf", "openai"):
            raise PolicyError(f"backend must be 'hf' or 'openai', got {backend!r}")
        if int(neighbours) < 0 or int(overview) < 1:
            raise PolicyError("neighbours must be >= 0 and overview >= 1")
        self.name = f"{backend}-3d"
        self.neighbours, self.overview = int(neighbours), int(overview)
        self.template = prompts if isinstance(prompts, PromptTemplate) else load_prompts(prompts)
        if self.template.grammar != "extended":
            raise PolicyError(f"prompts {self.template.name!r} are for the {self.template.grammar} grammar; a volume "
                              "episode needs an extended-grammar template (the reference grammar has no slice index)")
        self.backend = create_policy(backend, **backend_cfg)
        send = getattr(self.backend, "generate", None) or getattr(self.backend, "complete", None)
        if send is None:  # pragma: no cover - both backends have one
            raise PolicyError(f"policy {backend!r} has no generate/complete method")
        self._send = send
        self.last_slices: list[int] = []

    def turn(self, obs: VolumeObservation) -> tuple[Any, ...]:
        """The chat turns (system, user with the strip) this policy sends for ``obs``."""
        from ibisagent.chat import render_volume_chat

        depth = obs.stack.depth
        if obs.is_first_turn and self.overview > 1:
            zs = overview_slices(depth, self.overview)
            strip = np.concatenate([obs.slice_overlay(z) for z in zs], axis=1)
        else:
            strip, zs = obs.strip(self.neighbours)
        self.last_slices = list(zs)
        return render_volume_chat(self.template, obs.query, strip, zs, depth=depth, current=obs.current_slice,
                                  first_turn=obs.is_first_turn)

    def act(self, obs: VolumeObservation) -> str:  # type: ignore[override]
        from ibisagent.chat import to_messages

        messages, images = to_messages(self.turn(obs))
        return self._send(messages, images)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


@register_policy("hf-3d", "a Qwen2.5-VL checkpoint (hf policy) over a volume: overview strip of slices, then the "
                          "current slice with its neighbours, answers in the volume form", volume=True)
def _make_hf_3d(**cfg: Any) -> VolumeChatPolicy:
    return VolumeChatPolicy("hf", **cfg)


@register_policy("openai-3d", "an OpenAI-compatible multimodal endpoint (openai policy) over a volume: overview "
                              "strip, then the current slice with its neighbours", volume=True)
def _make_openai_3d(**cfg: Any) -> VolumeChatPolicy:
    return VolumeChatPolicy("openai", **cfg)


# ----------------------------------------------------------------------------------------------------------------
# Simulated annotators for volumes (ground truth needed): the challenge protocol and the reference rule
# ----------------------------------------------------------------------------------------------------------------

def volume_box_action(gt: np.ndarray) -> Action:
    """The CVPR 2025 challenge's 3D box as an action: the tight 2D box of the object's middle slice (the middle of
    its z-extent), with the object's z-range."""
    g = np.asarray(gt, bool)
    zs = np.flatnonzero(g.any((1, 2)))
    if not len(zs):
        raise PolicyError("the ground-truth volume is empty: no box can be drawn")
    z = int((zs[0] + zs[-1]) // 2)
    if not g[z].any():  # a gap in the object: the nearest slice that holds it
        z = int(zs[np.argmin(np.abs(zs - z))])
    b = bbox(g[z])
    assert b is not None
    h, w = g.shape[1:]
    return box_action(b, w, h).on_slice(z, (int(zs[0]), int(zs[-1])))


class _VolumeAnnotator(BasePolicy):
    requires_gt = True
    grammar = "extended"

    def __init__(self, max_clicks: int = 5, box_first: bool = True) -> None:
        super().__init__()
        self.max_clicks = int(max_clicks)
        self.box_first = bool(box_first)
        self._clicks = 0

    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None:
        super().begin_episode(image=image, query=query, gt=gt)
        if self.gt is None or np.asarray(self.gt).ndim != 3 or not np.asarray(self.gt).any():
            raise PolicyError(f"the {self.name} policy needs a non-empty 3D ground-truth mask")
        self._clicks = 0

    def act(self, obs: VolumeObservation) -> str:  # type: ignore[override]
        assert self.gt is not None
        if obs.mask is None and self.box_first:
            return format_reply(volume_box_action(self.gt), "Box on the object's middle slice, with its z-range.")
        if self._clicks >= self.max_clicks:
            return format_reply(Action.terminate(), "All refinement clicks are used.", "Protocol done.")
        click = self._click(obs)
        if click is None:
            return format_reply(Action.terminate(), "The prediction matches the ground truth.", "No error left.")
        x, y, z, positive = click
        _, h, w = self.gt.shape
        nx, ny = to_normalized(x, w), to_normalized(y, h)
        self._clicks += 1
        act = (Action.positive if positive else Action.negative)(nx, ny).on_slice(z)
        where = "missed object" if positive else "wrongly included background"
        return format_reply(act, f"Click on slice {z} at the {self.rule} ({where}).")

    rule = ""

    def _click(self, obs: VolumeObservation) -> tuple[int, int, int, bool] | None:  # pragma: no cover - abstract
        raise NotImplementedError


class VolumeChallengeClicker(_VolumeAnnotator):
    """The CVPR 2025 interactive 3D challenge's simulated user: the 3D box (middle slice + z-range), then clicks at
    the centre of the largest 3D error component (26-connectivity), :func:`ibisagent.oracle_click.challenge_click`."""

    name = "challenge-3d"
    rule = "centre of the largest 3D error component"

    def _click(self, obs: VolumeObservation) -> tuple[int, int, int, bool] | None:
        c = challenge_click(obs.mask, self.gt)  # type: ignore[arg-type]
        return None if c is None else (int(c[0]), int(c[1]), int(c[2]), bool(c[3]))


class VolumeOracle(_VolumeAnnotator):
    """The reference distance-transform rule on the worst slice (:func:`ibisagent.oracle_click.worst_slice_click`);
    the first prompt is the 3D box unless ``box_first=False`` (then a click on the worst slice)."""

    name = "oracle-3d"
    rule = "deepest pixel of the larger error region of the worst slice"

    def _click(self, obs: VolumeObservation) -> tuple[int, int, int, bool] | None:
        pts, _ = obs.session.points()
        avoid: dict[int, list[tuple[float, float]]] = {}
        for x, y, z in pts:
            avoid.setdefault(int(z), []).append((float(x), float(y)))
        c = worst_slice_click(obs.mask, self.gt, avoid)  # type: ignore[arg-type]
        return None if c is None else (c.click.x, c.click.y, c.z, c.positive)


@register_policy("challenge-3d", "CVPR 2025 3D challenge clicker: the 3D box, then clicks at the centre of the "
                                 "largest 3D error component (volume episodes; needs ground truth)", volume=True)
def _make_challenge_3d(**cfg: Any) -> VolumeChallengeClicker:
    return VolumeChallengeClicker(**cfg)


@register_policy("oracle-3d", "reference oracle on volumes: the 3D box, then the distance-transform click on the "
                              "worst slice (needs ground truth)", volume=True)
def _make_oracle_3d(**cfg: Any) -> VolumeOracle:
    return VolumeOracle(**cfg)
