"""The episode engine (ibisagent.episode): the stop rules, the single driver, the lockstep driver and the seam for
sessions that are not 2D."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from ibisagent.env import EnvConfig, SegmentationEnv
from ibisagent.episode import StopReason, StopRules, drive, drive_lockstep, play
from ibisagent.protocol import Action, ActionKind, parse_reply
from ibisagent.segmenters.base import create_segmenter


def _parse(reply: str) -> Action:
    return parse_reply(reply, "reference").action


def _disc(h: int, w: int, cy: int, cx: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.ogrid[:h, :w]
    gt = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = np.full((h, w, 3), 40, np.uint8)
    img[gt] = 200
    return img, gt


class _Scripted:
    """A policy that replies from a fixed script, whatever it sees."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.k = 0

    def begin_episode(self, **_: Any) -> None:
        self.k = 0

    def act(self, obs: Any) -> str:
        r = self.replies[min(self.k, len(self.replies) - 1)]
        self.k += 1
        return r


P1, P2, N1 = "Positive Point (0.5000, 0.5000)", "Positive Point (0.2000, 0.3000)", "Negative Point (0.9000, 0.9000)"
#: (script, max_steps, expected stop reason, expected number of turns)
SCRIPTS = [
    ([P1, P2, "Terminate"], 20, StopReason.TERMINATE, 3),
    ([P1, P1, P1, P2], 20, StopReason.REPEATED, 3),
    ([P1, "I think the object is somewhere"], 20, StopReason.UNPARSEABLE, 2),
    ([P1, "Positive Point (1.7000, 0.2000)"], 20, StopReason.INVALID_ACTION, 2),
    (["Box (0.1000, 0.1000, 0.5000, 0.5000)"], 20, StopReason.INVALID_ACTION, 1),  # no boxes in the reference grammar
    ([P1, P2, N1, P1, P2, N1], 4, StopReason.MAX_STEPS, 4),
    (["Terminate"], 1, StopReason.TERMINATE, 1),
    ([P1], 1, StopReason.MAX_STEPS, 1),
]


@pytest.mark.parametrize(("script", "max_steps", "reason", "turns"), SCRIPTS)
def test_the_driver_runs_the_env_stop_rules(script: list[str], max_steps: int, reason: str, turns: int) -> None:
    img, gt = _disc(48, 64, 24, 32, 9)
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=max_steps))
    out = play(env, _Scripted(script), img, "the disc", gt)
    assert [t.stop_reason for t in out[:-1]] == [None] * (turns - 1)
    assert out[-1].stop_reason == reason and out[-1].done and len(out) == turns
    assert [t.step for t in out] == list(range(1, turns + 1))
    assert all(t.actor == "policy" for t in out)


@pytest.mark.parametrize(("script", "max_steps", "reason", "turns"), SCRIPTS)
def test_lockstep_gives_the_single_drivers_episodes(script: list[str], max_steps: int, reason: str,
                                                     turns: int) -> None:
    """Same replies -> same parsed actions, masks and stop reasons through drive_lockstep as through drive."""
    cases = [_disc(48, 64, 24, 32, 9), _disc(40, 56, 15, 20, 6), _disc(64, 64, 40, 30, 12)]
    scripts = [script, [P2, "Terminate"], [N1, P1, P1, P1]]  # episodes of different lengths share the batch
    single = []
    for (img, gt), sc in zip(cases, scripts):
        env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=max_steps))
        single.append(play(env, _Scripted(sc), img, "the disc", gt))

    seg = create_segmenter("fake")
    masks: list[list[np.ndarray | None]] = [[] for _ in cases]
    state: list[dict[str, Any]] = [{"points": [], "labels": [], "logits": None, "mask": None} for _ in cases]

    def act(idx: list[int], turn: int) -> list[str]:
        for i in idx:  # the mask each live episode holds when it replies
            masks[i].append(state[i]["mask"])
        return [scripts[i][min(turn, len(scripts[i]) - 1)] for i in idx]

    def apply(idx: list[int], actions: list[Action]) -> list[str | None]:
        for i, a in zip(idx, actions):
            img = cases[i][0]
            x, y = a.pixel(img.shape[1], img.shape[0])
            st = state[i]
            st["points"].append((x, y))
            st["labels"].append(int(a.kind is ActionKind.POSITIVE))
            seg.set_image(img)
            r = seg.predict(np.asarray(st["points"], np.float32), np.asarray(st["labels"]), None, st["logits"])
            st["mask"], st["logits"] = r.mask, r.logits
        return [None] * len(idx)

    lock = drive_lockstep(len(cases), act, apply, _parse, StopRules(max_steps=max_steps))
    assert single[0][-1].stop_reason == reason
    for i, turns_i in enumerate(single):
        assert lock.stop_reasons[i] == turns_i[-1].stop_reason
        assert lock.replies[i] == [t.reply for t in turns_i]
        assert [r.action.text() if r.action else None for r in lock.readings[i]] == [
            t.action.text() if t.action else None for t in turns_i]
        assert [r.error is not None for r in lock.readings[i]] == ["error" in t.info for t in turns_i]
        for m_lock, t in zip(masks[i], turns_i):
            m_single = t.observation.mask
            assert (m_lock is None) == (m_single is None)
            if m_lock is not None:
                assert np.array_equal(m_lock, m_single)
    assert [len(r) for r in lock.replies] == [len(t) for t in single]


def test_prior_replies_are_replayed_before_the_policy_acts() -> None:
    img, gt = _disc(48, 64, 24, 32, 9)
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=5))
    out = play(env, _Scripted([P2, "Terminate"]), img, "the disc", gt, prior=[N1])
    assert [t.actor for t in out] == ["user", "policy", "policy"]
    assert [t.reply for t in out] == [N1, P2, "Terminate"]
    assert out[0].policy_s == 0.0 and out[-1].stop_reason == StopReason.TERMINATE


def test_stop_rules_reject_a_budget_below_one() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        StopRules(max_steps=0)
    assert EnvConfig(max_steps=7, max_repeats=2).rules == StopRules(7, 2)


def test_lockstep_compact_rollouts_match_the_deployed_policy_through_the_env() -> None:
    """The compact trainer's lockstep rollouts (``_play``, validation and GRPO) give the same episodes, greedy, as
    the deployed CompactPolicy played by the single driver through SegmentationEnv: same actions (and reasoning),
    same masks after every turn, same stop reasons."""
    from ibisagent.agent import run_episode
    from ibisagent.policies.compact import (
        DEFAULT_MAX_CLICKS,
        CompactPolicy,
        CompactPolicyNet,
        load_policy_net,
        pool_to_grid,
    )
    from ibisagent.training.policy import PolicyTrainConfig, _Backend, _Case, _play, _text_bank

    shipped, _ = load_policy_net()
    torch.manual_seed(1)
    untrained = CompactPolicyNet().eval()  # its stop head fires after 1 or 2 clicks here, the shipped one never
    backend = _Backend("fake", "", "")
    query = "the bright disc"
    text_bank = _text_bank({query: 0})
    raw = [_disc(64, 96, 30, 40, 12), _disc(72, 96, 40, 60, 10), _disc(64, 80, 25, 30, 9), _disc(64, 96, 20, 70, 7)]
    cases = [_Case(f"c{i}", "blobs", query, 0, backend.embed(img), gt, pool_to_grid(gt.astype(np.float32)), img)
             for i, (img, gt) in enumerate(raw)]
    own_stop, forced_stop = 0, 0
    for net, max_turns in ((shipped.eval(), 3), (shipped, 20), (untrained, 20)):
        gen = torch.Generator().manual_seed(11)
        eps = _play(net, backend, text_bank, cases, PolicyTrainConfig(), 0.0, gen, False, max_turns)
        seeds_gen = torch.Generator().manual_seed(11)  # _play draws each episode's policy seed from gen, in order
        seeds = [int(torch.randint(0, 2**31, (1,), generator=seeds_gen)) for _ in cases]
        reasons = set()
        for c, e, seed in zip(cases, eps, seeds):
            pol = CompactPolicy(weights=net, embedder="fake", seed=seed,
                                max_clicks=min(max_turns - 1, DEFAULT_MAX_CLICKS))
            emb = backend.embs[c.emb].float().numpy()[None]  # the bank's (float16) embedding, as _play uses
            pol.embedder = lambda _img, emb=emb: emb  # type: ignore[assignment]
            env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=max_turns))
            ep = run_episode(env, pol, c.image, query, c.gt)
            assert [_parse(s["reply"]).text() for s in e.steps] == [s.action for s in ep.steps]
            # the reasoning is the same too, except that a stop forced by the turn budget is worded as a normal
            # stop in training (its policy's own click budget is the default one)
            assert [s["reply"] for s in e.steps if not s["forced"]] == [
                s.raw for s, t in zip(ep.steps, e.steps) if not t["forced"]]
            assert e.stop_reason == ep.stop_reason
            after = [s["before"] for s in e.steps[1:]] + [e.mask]
            for m, s in zip(after, ep.steps):
                assert (m is None) == (s.mask is None)
                if m is not None:
                    assert np.array_equal(m, s.mask)
            reasons.add(ep.stop_reason)
            forced_stop += e.steps[-1]["forced"]
            own_stop += not e.steps[-1]["forced"]
        assert reasons == {StopReason.TERMINATE}  # the policy stops itself or the click budget stops it
    assert own_stop >= 2 and forced_stop >= 2


# ----------------------------------------------------------------------------------------------------------------
# The seam for volumes: a session and an environment that are not 2D run through the same driver
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _VolumeObs:
    image: np.ndarray  # (D, H, W)
    mask: np.ndarray | None  # (D, H, W) bool
    step: int


class _ToyVolumeSession:
    """A volume session: a click on slice ``z`` grows (positive) or carves (negative) a ball in a 3D mask."""

    def __init__(self) -> None:
        self.volume: np.ndarray | None = None
        self.mask: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        self.volume, self.mask = np.asarray(image), None

    def apply(self, action: _VolumeAction) -> np.ndarray:
        assert self.volume is not None
        d, h, w = self.volume.shape
        zz, yy, xx = np.ogrid[:d, :h, :w]
        z, y, x = action.z, int(action.y * h), int(action.x * w)
        ball = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 9
        cur = np.zeros((d, h, w), bool) if self.mask is None else self.mask
        self.mask = (cur | ball) if action.positive else (cur & ~ball)
        return self.mask


@dataclass(frozen=True)
class _VolumeAction:
    kind: ActionKind
    x: float = 0.0
    y: float = 0.0
    z: int = 0
    positive: bool = True

    def text(self) -> str:
        return "Terminate" if self.kind is ActionKind.TERMINATE else f"{self.kind} ({self.x}, {self.y}, z={self.z})"


def _parse_volume(reply: str) -> _VolumeAction:
    """'Positive Point (x, y) on slice z' or 'Terminate' (a toy grammar with a slice index)."""
    from ibisagent.protocol import ActionParseError

    text = reply.strip()
    if text == "Terminate":
        return _VolumeAction(ActionKind.TERMINATE)
    try:
        head, rest = text.split(" Point (", 1)
        xy, z = rest.split(") on slice ")
        x, y = (float(v) for v in xy.split(","))
        positive = {"Positive": True, "Negative": False}[head]
        return _VolumeAction(ActionKind.POSITIVE if positive else ActionKind.NEGATIVE, x, y, int(z), positive)
    except (ValueError, KeyError):
        raise ActionParseError(f"not a volume action: {reply!r}") from None


class _ToyVolumeEnv:
    """An EpisodeEnv over a volume session: the same StopTracker, its own observation and parser."""

    def __init__(self, rules: StopRules) -> None:
        self.rules, self.session, self.gt = rules, _ToyVolumeSession(), None

    def reset(self, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> _VolumeObs:
        self.session.set_image(image)
        self.gt, self.tracker = gt, self.rules.tracker()
        return _VolumeObs(self.session.volume, None, 0)  # type: ignore[arg-type]

    def step(self, reply: str) -> Any:
        from types import SimpleNamespace

        reading = self.tracker.read(reply, _parse_volume)  # type: ignore[arg-type]
        if reading.needs_apply:
            self.session.apply(reading.action)  # type: ignore[arg-type]
        stop = self.tracker.close(reading)
        info = {"step": self.tracker.step, "stop_reason": stop, "mask": self.session.mask}
        if reading.action is not None:
            info["action"] = reading.action
        obs = _VolumeObs(self.session.volume, self.session.mask, self.tracker.step)  # type: ignore[arg-type]
        return SimpleNamespace(observation=obs, done=stop is not None, info=info)


def test_a_volume_session_plugs_into_the_same_driver() -> None:
    vol = np.zeros((8, 20, 24), np.float32)
    env = _ToyVolumeEnv(StopRules(max_steps=6))
    script = ["Positive Point (0.5, 0.5) on slice 2", "Positive Point (0.25, 0.5) on slice 5",
              "Negative Point (0.5, 0.5) on slice 2", "Terminate"]
    out = play(env, _Scripted(script), vol, "the ball")
    assert out[-1].stop_reason == StopReason.TERMINATE and len(out) == 4
    m = out[-1].info["mask"]
    assert m.shape == (8, 20, 24) and m[5].any() and not m[2, 10, 12]
    assert out[1].observation.mask[2, 10, 12]  # the second turn saw the first click's 3D mask
    # the stop rules are the env's: a repeated volume click stops the episode, an unreadable reply too
    rep = play(env, _Scripted([script[0]] * 5), vol, "the ball")
    assert rep[-1].stop_reason == StopReason.REPEATED and len(rep) == 3
    bad = play(env, _Scripted(["Box (0.1, 0.1, 0.2, 0.2)"]), vol, "the ball")
    assert bad[-1].stop_reason == StopReason.UNPARSEABLE


def test_synthesis_rollouts_follow_the_env_stop_rules() -> None:
    """A synthesized trajectory ends where the env would end its replay: the repeat rule and the step budget are the
    env's, undo takes a turn back, and nothing is applied after the end."""
    import random

    from ibisagent.synthesis.trajectories import Rollout, RolloutConfig, UnreachableError

    img, gt = _disc(48, 64, 24, 32, 9)
    ro = Rollout(create_segmenter("fake"), img, gt, "the disc", "the disc", RolloutConfig(), random.Random(0),
                 EnvConfig(max_steps=6))
    assert ro.env.config.rules == EnvConfig(max_steps=6).rules and ro.turns_left == 6
    for _ in range(3):
        ro.click(True, 5, 5, "again")
    assert ro.stop_reason == StopReason.REPEATED and ro.turns_left == 3
    with pytest.raises(UnreachableError, match="over"):
        ro.click(True, 30, 20, "more")
    ro.finish()  # ends at once: the episode is over
    assert len(ro.steps) == 3
    ro.undo()
    assert ro.stop_reason is None and ro.turns_left == 4
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=6))
    replay = play(env, _Scripted([s.reply for s in ro.steps] + [ro.steps[-1].reply]), img, "the disc", gt)
    assert replay[-1].stop_reason == StopReason.REPEATED and len(replay) == 3  # the env agrees


def test_the_env_takes_another_parser_and_session() -> None:
    """The seams of SegmentationEnv: a grammar's parser and a session are passed in, the stop rules stay the env's."""
    from ibisagent.protocol import ActionParseError
    from ibisagent.session import Session

    def parse(reply: str) -> Action:
        words = {"centre": Action.positive(0.5, 0.5), "corner": Action.negative(0.05, 0.05), "done": Action.terminate()}
        if reply not in words:
            raise ActionParseError(f"unknown word {reply!r}")
        return words[reply]

    seg = create_segmenter("fake")
    session = Session(seg, mask_feedback=False)
    img, gt = _disc(48, 64, 24, 32, 9)
    env = SegmentationEnv(seg, EnvConfig(max_steps=5), session=session, parser=parse)
    out = play(env, _Scripted(["centre", "corner", "done"]), img, "the disc", gt)
    assert env.session is session and out[-1].stop_reason == StopReason.TERMINATE
    assert session.labels.tolist() == [1, 0] and out[1].info["mask"] is not None
    assert play(env, _Scripted(["Positive Point (0.5000, 0.5000)"]), img, "x", gt)[-1].stop_reason == "unparseable"


def test_env_undo_takes_a_turn_back_and_drive_resumes_the_episode() -> None:
    """Synthesis searches by stepping a candidate through the env and taking it back, then lets the driver play the
    rest from there: undo restores the session, the turn count and the repeat rule's memory, also after an
    unparseable turn or a Terminate, and ``drive(resume=True)`` continues without a reset."""
    img, gt = _disc(48, 64, 24, 32, 9)
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=5))
    env.reset(img, "the disc", gt)
    first = env.step("<action>Positive point (0.5, 0.5)</action>")
    mask1 = first.info["mask"].copy()
    env.step("<action>Positive point (0.1, 0.1)</action>")
    env.undo()
    assert env.observation.step == 1 and np.array_equal(env.session.mask, mask1)
    env.step("no action here")  # unparseable: ends the episode, nothing reaches the session
    assert env.done
    env.undo()
    assert not env.done and env.observation.previous_actions == ("Positive Point (0.5000, 0.5000)",)
    env.step("<action>Terminate</action>")
    env.undo()
    with pytest.raises(RuntimeError, match="no step"):
        SegmentationEnv(create_segmenter("fake")).undo()
    # two more of the same click hit the repeat rule only if the first one is still remembered
    turns = play(env, _Scripted(["<action>Positive point (0.5, 0.5)</action>"] * 4), img, "the disc", gt,
                 resume=True)
    assert [t.step for t in turns] == [2, 3] and turns[-1].stop_reason == StopReason.REPEATED


def test_synthesis_plays_its_episodes_through_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    import ibisagent.synthesis.trajectories as traj
    from ibisagent.synthesis.trajectories import Rollout, RolloutConfig, rollout_oracle

    seen: list[int] = []

    def spy(*args: Any, **kw: Any):
        for turn in drive(*args, **kw):
            seen.append(turn.step)
            yield turn

    monkeypatch.setattr(traj, "drive", spy)
    img, gt = _disc(48, 64, 24, 32, 9)
    ro = Rollout(create_segmenter("fake"), img, gt, "the disc", "the disc", RolloutConfig(), random.Random(0),
                 EnvConfig(max_steps=6))
    rollout_oracle(ro)
    assert ro.steps[-1].kind == "terminate" and seen == [s.step for s in ro.steps]
