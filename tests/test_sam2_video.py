"""SAM2's own video predictor as the volume session's propagation (``propagation="sam2-video"``), on the tiny random
SAM2 model of ``test_sam2_backend``: a random model gives random masks, so these tests check the plumbing (shapes,
which slices each pass visited, that a correction re-propagates, undo, errors), not quality."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ibisagent.episode import StopRules, play
from ibisagent.segmenters import SegmenterError, create_segmenter
from ibisagent.volume import SliceStack, VolumeEnv, VolumeSession
from model_fixtures import ScriptedReplies
from test_sam2_backend import tiny  # noqa: F401  (the tiny random SAM2 checkpoint fixture)

Z, H, W = 8, 64, 64


@pytest.fixture(scope="module")
def stack() -> SliceStack:
    rng = np.random.default_rng(1)
    img = (rng.random((Z, H, W)) * 60).astype(np.uint8)
    img[1:7, 20:44, 18:40] += 150  # a bright box through slices 1..6
    return SliceStack.from_array(img)


@pytest.fixture(scope="module")
def seg(tiny):  # noqa: F811
    cfg, ckpt = tiny
    return create_segmenter("sam2", config=str(cfg), checkpoint=str(ckpt))


class _Spy:
    """Records what the session asks of the video propagator (and what it returns)."""

    def __init__(self, session: VolumeSession) -> None:
        self.backend = vp = session._video
        assert vp is not None
        self.calls: list[tuple] = []
        self.results: list[dict] = []
        add, prop, reset = vp.add_prompts, vp.propagate, vp.reset

        def add_prompts(z, points=None, labels=None, box=None):
            self.calls.append(("add", z, None if points is None else np.asarray(points).tolist(),
                               None if labels is None else np.asarray(labels).tolist(), box))
            return add(z, points, labels, box)

        def propagate(z_range=None):
            out = prop(z_range)
            self.calls.append(("propagate", z_range, list(vp.visits)))
            self.results.append(out)
            return out

        def do_reset():
            self.calls.append(("reset",))
            reset()

        vp.add_prompts, vp.propagate, vp.reset = add_prompts, propagate, do_reset

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


_Script = ScriptedReplies


def test_a_volume_episode_through_the_driver_propagates_both_ways_and_a_correction_repropagates(seg, stack) -> None:
    session = VolumeSession(seg, propagation="sam2-video")
    assert session.propagation == "sam2-video"
    env = VolumeEnv(session, StopRules(max_steps=5))
    session.set_image(stack)  # the spy needs the backend's state (reset() sets the image again, same frames)
    spy = _Spy(session)
    gt = np.zeros(stack.shape, bool)
    gt[1:7, 20:44, 18:40] = True
    turns = play(env, _Script(["<action>\nPositive Point (0.4500, 0.5000, 3)\n</action>",
                               "<action>\nNegative Point (0.1000, 0.1000, 5)\n</action>",
                               "<action>\nTerminate\n</action>"]), stack, "the box", gt)
    assert [t.stop_reason for t in turns] == [None, None, "terminate"]
    assert all(t.info.get("error") is None for t in turns)

    # turn 1: the click goes to slice 3, then forward 3..7 and reverse 3..0
    add1, prop1 = spy.calls[0], spy.calls[1]
    assert add1[:2] == ("add", 3) and add1[3] == [1] and add1[4] is None
    assert add1[2] == [[pytest.approx(0.45 * (W - 1), abs=1.0), pytest.approx(0.5 * (H - 1), abs=1.0)]]
    assert prop1[2] == [(3, False), (4, False), (5, False), (6, False), (7, False),
                        (3, True), (2, True), (1, True), (0, True)]
    first = spy.results[0]
    assert sorted(first) == list(range(Z))
    assert all(r.mask.shape == (H, W) and r.mask.dtype == np.bool_ and r.logits.shape == (1, 64, 64)
               and 0.0 <= r.score <= 1.0 for r in first.values())
    m1 = turns[0].info["mask"]
    assert m1.shape == stack.shape and m1.dtype == np.bool_
    assert all(np.array_equal(m1[k], first[k].mask) for k in range(Z))  # every slice is the video result

    # turn 2: a negative click on slice 5 (a tracked slice): its prompts are set again and everything re-propagates
    add2, prop2 = spy.calls[2], spy.calls[3]
    assert add2[:2] == ("add", 5) and add2[3] == [0]
    assert spy.kinds() == ["add", "propagate", "add", "propagate"]
    assert {k for k, rev in prop2[2] if not rev} == set(range(3, Z))  # still from the first prompted slice
    assert {k for k, rev in prop2[2] if rev} == set(range(0, 4))
    second = spy.results[1]
    assert not np.allclose(first[5].logits, second[5].logits)  # the correction reached slice 5
    assert all(np.array_equal(turns[1].info["mask"][k], second[k].mask) for k in range(Z))
    assert sorted(session.anchors) == [3, 5]
    assert session.owners[4] == 3 or not turns[1].info["mask"][4].any()
    # every slice encoded once for the whole episode (SAM2 alone keeps only the last frame's features)
    assert session.timings.encoded_slices == Z and spy.backend.encoder_runs == Z
    assert turns[0].info["iou"] is not None


def test_undo_restores_the_masks_and_replays_the_predictor_before_the_next_prompt(seg, stack) -> None:
    s = VolumeSession(seg, propagation="sam2-video")
    s.set_image(stack)
    spy = _Spy(s)
    m1 = s.add_click(28.0, 32.0, z=3)
    m2 = s.add_click(10.0, 10.0, z=5, positive=False)
    assert m2.shape == m1.shape
    back = s.undo()
    assert np.array_equal(back, m1) and sorted(s.anchors) == [3]
    n = len(spy.calls)
    m3 = s.add_click(30.0, 30.0, z=6)
    replay = spy.calls[n:]
    # a fresh predictor state, the remaining interaction again, then the new one
    assert [c[0] for c in replay] == ["reset", "add", "propagate", "add", "propagate"]
    assert replay[1][1] == 3 and replay[3][1] == 6
    # the same as a session that never saw the undone click
    fresh = VolumeSession(seg, propagation="sam2-video")
    fresh.set_image(stack)
    fresh.add_click(28.0, 32.0, z=3)
    assert np.array_equal(fresh.add_click(30.0, 30.0, z=6), m3)
    assert np.array_equal(s.undo(), m1) and s.undo() is None and s.mask is None
    s.add_click(28.0, 32.0, z=3)
    s.reset()
    assert s.mask is None and s.anchors == {}


def test_a_box_with_a_z_range_bounds_the_propagation(seg, stack) -> None:
    s = VolumeSession(seg, propagation="sam2-video")
    s.set_image(stack)
    spy = _Spy(s)
    mask = s.set_box(18.0, 20.0, 39.0, 43.0, z=3, z_range=(2, 5))
    add, prop = spy.calls[0], spy.calls[1]
    assert add[1] == 3 and add[2] is None and add[4] == (18.0, 20.0, 39.0, 43.0)
    assert prop[1] == (2, 5) and {k for k, _ in prop[2]} == {2, 3, 4, 5}
    assert not mask[:2].any() and not mask[6:].any()
    with pytest.raises(SegmenterError, match="z-range"):
        s.set_box(18.0, 20.0, 39.0, 43.0, z=6, z_range=(5, 7))  # would leave out slice 3, where it starts
    assert sorted(s.anchors) == [3]


def test_the_video_propagation_needs_a_sam2_segmenter(stack) -> None:
    with pytest.raises(SegmenterError, match="needs a SAM2 / MedSAM2 segmenter"):
        VolumeSession(create_segmenter("fake"), propagation="sam2-video")
    with pytest.raises(ValueError, match="unknown propagation 'video'.*slices, sam2-video"):
        VolumeSession(create_segmenter("fake"), propagation="video")
    from ibisagent import Agent

    with pytest.raises(ValueError, match="needs a SAM2"):
        Agent(policy="oracle", segmenter="fake").segment_volume(stack, "the box", np.ones(stack.shape, bool),
                                                                 propagation="sam2-video")


@pytest.mark.slow
def test_litemedsam_is_refused_with_the_same_message() -> None:
    with pytest.raises(SegmenterError, match="'litemedsam-click' has no video predictor"):
        VolumeSession(create_segmenter("litemedsam-click"), propagation="sam2-video")


def test_a_propagation_config_is_refused_with_the_video_predictor(seg) -> None:
    from ibisagent.volume import PropagationConfig

    with pytest.raises(ValueError, match="slice-by-slice"):
        VolumeSession(seg, PropagationConfig(), propagation="sam2-video")


def test_frames_reach_init_state_in_memory(seg, stack, tmp_path: Path, monkeypatch) -> None:
    """No frame files: ``init_state`` gets the preprocessed slices; SAM2's loader is back in place afterwards."""
    import sam2.sam2_video_predictor as vp_mod

    from ibisagent.segmenters._sam2_transforms import preprocess

    original = vp_mod.load_video_frames
    monkeypatch.chdir(tmp_path)
    vp = seg.video_propagator()
    vp.set_frames(stack.images)
    assert vp_mod.load_video_frames is original and list(tmp_path.iterdir()) == []
    st = vp.state
    assert st["num_frames"] == Z and (st["video_height"], st["video_width"]) == (H, W)
    assert np.allclose(st["images"][4].numpy(), preprocess(stack.image(4), seg.image_size)[0].numpy())
    assert vp.predictor.sam_mask_decoder.iou_token.weight is not None
    # the video model shares the image model's tensors
    assert vp.predictor.image_encoder.trunk.patch_embed.proj.weight.data_ptr() == \
        seg.model.image_encoder.trunk.patch_embed.proj.weight.data_ptr()
    assert "torchvision" not in sys.modules


def test_agent_and_cli_run_a_volume_with_the_video_predictor(tiny, tmp_path: Path, capsys) -> None:  # noqa: F811
    import nibabel as nib

    from app_fixtures import write_blob_volume
    from ibisagent import Agent
    from ibisagent.cli import main

    cfg, ckpt = tiny
    ip, mp, _ = write_blob_volume(tmp_path, depth=6)
    gt = np.asarray(nib.load(mp).dataobj) > 0
    agent = Agent(policy="oracle", segmenter="sam2",
                  segmenter_kwargs={"config": str(cfg), "checkpoint": str(ckpt)})
    ep = agent.segment_volume(ip, "the blob", gt=gt, propagation="sam2-video")
    assert ep.mask.shape == gt.shape and ep.mask.dtype == bool and ep.n_interactions >= 1
    out = tmp_path / "out"
    rc = main(["segment", str(ip), "-q", "the blob", "--mask", str(mp), "--policy", "oracle", "--segmenter", "sam2",
               "--segmenter-arg", f"config={cfg}", "--segmenter-arg", f"checkpoint={ckpt}",
               "--propagation", "sam2-video", "--out", str(out), "--quiet"])
    assert rc == 0 and nib.load(out / "mask.nii.gz").shape == gt.shape
    capsys.readouterr()
    rc = main(["segment", str(ip), "-q", "the blob", "--segmenter", "fake", "--propagation", "sam2-video",
               "--out", str(tmp_path / "o2"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "needs a SAM2" in err[-1]
    rc = main(["segment", str(ip), "--slice", "2", "-q", "the blob", "--segmenter", "fake", "--propagation",
               "sam2-video", "--out", str(tmp_path / "o3"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "whole volume" in err[-1]


def test_the_cli_offers_the_session_propagations() -> None:
    """``--propagation`` spells its choices out (the parser loads no volume code); they are the session's."""
    import argparse

    from ibisagent.cli import build_parser
    from ibisagent.volume import PROPAGATIONS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    opt = next(a for a in sub.choices["segment"]._actions if "--propagation" in a.option_strings)
    assert tuple(opt.choices) == PROPAGATIONS and opt.default == "slices"


def test_eval_volumes_with_the_video_predictor(tiny, tmp_path: Path, capsys) -> None:  # noqa: F811
    """``ibisagent eval --volumes --propagation sam2-video`` plays every volume case through SAM2's video predictor
    (recorded in summary.json); without --volumes, or on a backend without one, it exits 2 with the reason."""
    import json

    from ibisagent.cli import main
    from ibisagent.evaluation.runfiles import read_cases
    from test_volume import _write_volume_dataset

    cfg, ckpt = tiny
    data = _write_volume_dataset(tmp_path)
    out = tmp_path / "run"
    seg_args = ["--segmenter", "sam2", "--segmenter-arg", f"config={cfg}", "--segmenter-arg", f"checkpoint={ckpt}"]
    rc = main(["eval", str(data), "--out", str(out), "--volumes", "--policy", "oracle", "--max-steps", "2",
               *seg_args, "--propagation", "sam2-video", "--no-report", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rows = read_cases(out)
    assert len(rows) == 2 and all(r["status"] == "ok" and r["depth"] == 10 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["propagation"] == "sam2-video" and summary["config"]["volumes"] is True
    capsys.readouterr()
    for extra, reason in ((["--volumes", "--segmenter", "fake"], "needs a SAM2"), ([], "add --volumes")):
        rc = main(["eval", str(data), "--out", str(tmp_path / "bad"), *extra, "--propagation", "sam2-video",
                   "--no-report", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and reason in err[-1]
