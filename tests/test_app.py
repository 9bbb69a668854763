"""The web app's logic without a browser: Annotator (open, agent runs, user clicks, undo/reset, continue, export),
the shared segmenter hub, episodes that start from user prompts, and the Gradio app construction."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from app_fixtures import BLOB_CENTER, BLOB_RADIUS, write_blob_case, write_blob_volume
from ibisagent.masks import iou
from ibisagent.policies.base import create_policy
from ibisagent.runtime import (
    USER_REASONING,
    SegmenterHub,
    continue_episode,
    env_for,
    find_bundled_dir,
    image_key,
    interaction_reply,
)
from ibisagent.segmenters.fake import FakeSegmenter
from ibisagent.session import Interaction, Session
from ibisagent.ui.annotator import Annotator, AnnotatorError


@pytest.fixture()
def case(tmp_path):
    ip, mp = write_blob_case(tmp_path / "bundled")
    return tmp_path / "bundled", ip, mp


@pytest.fixture()
def hub():
    return SegmenterHub()


def _annotator(hub, case) -> Annotator:
    _, ip, mp = case
    a = Annotator(hub, "fake", "oracle")
    a.open(ip, mask_path=mp, query="segment the bright lesion")
    return a


def test_open_and_run_agent_step_by_step(hub, case):
    a = _annotator(hub, case)
    assert a.image.shape == (200, 240, 3) and a.mask is None and a.current_iou() == 0.0
    views = []
    for v in a.run_agent():
        views.append(v)
        assert a.mask is not None  # the state is updated while the episode plays
    assert [v.actor for v in views] == ["agent"] * len(views)
    assert views[0].action.startswith("Positive Point") and views[-1].action == "Terminate"
    assert a.episode is not None and a.episode.stop_reason == "terminate"
    assert a.current_iou() > 0.95
    assert "IoU" in a.status() and "agent stopped: terminate" in a.status()
    assert views[0].reasoning and "Step 1 [agent]" in a.log_text()


def test_user_clicks_undo_reset(hub, case):
    a = _annotator(hub, case)
    cx, cy = BLOB_CENTER
    m1 = a.click(cx, cy, positive=True).copy()
    assert iou(m1, a.gt) > 0.95
    a.episode = object()  # a finished agent run is no longer the state once the user clicks
    m2 = a.click(5, 5, positive=True).copy()  # background: the mask grows there
    assert a.episode is None and "agent stopped" not in a.status()
    assert m2.sum() > m1.sum() and m2[5, 5]
    m3 = a.click(cx + BLOB_RADIUS // 2, cy, positive=False).copy()
    assert m3.sum() < m2.sum() and not m3[cy, cx + BLOB_RADIUS // 2]
    a.undo()
    np.testing.assert_array_equal(a.mask, m2)
    assert len(a.session.points) == 2
    a.reset()
    assert a.mask is None and len(a.session.points) == 0
    with pytest.raises(AnnotatorError, match="outside"):
        a.click(500, 5)


def test_agent_continues_from_user_state(hub, case):
    a = _annotator(hub, case)
    a.click(5, 5, positive=True)  # a wrong positive click on the background
    wrong = a.mask.copy()
    assert iou(wrong, a.gt) < 0.1
    views = list(a.run_agent(from_current=True))
    s = a.session
    # the user's click is still the first prompt and the agent repaired the mask from there
    assert s.points[0].tolist() == [5.0, 5.0] and s.labels[0] == 1
    assert len(s.points) > 1
    assert a.current_iou() > 0.9
    assert all(v.actor == "agent" for v in views)
    assert "[user] Positive click (5, 5)" in a.log_text()
    assert a.episode.meta["user_steps"] == 1
    assert a.episode.steps[0].raw.count(USER_REASONING) == 1


def test_policy_needing_gt_and_missing_image(hub, case):
    a = Annotator(hub, "fake", "oracle")
    with pytest.raises(AnnotatorError, match="open an image"):
        a.click(1, 1)
    _, ip, _ = case
    a.open(ip, query="segment the bright lesion")
    with pytest.raises(AnnotatorError, match="ground-truth mask"):
        list(a.run_agent())
    with pytest.raises(AnnotatorError, match="unknown policy"):
        list(a.run_agent(policy="no-such-policy"))
    a.policy_name = "oracle"
    with pytest.raises(AnnotatorError, match="query"):
        list(a.run_agent(query="  "))


def test_export_png_roundtrip(hub, case, tmp_path):
    from ibisagent.io import load_mask

    a = _annotator(hub, case)
    a.click(*BLOB_CENTER)
    p = a.export("png", tmp_path / "out")
    assert p.name == "blob_mask.png"
    np.testing.assert_array_equal(load_mask(p), a.mask)
    with pytest.raises(AnnotatorError):
        a.export("jpeg", tmp_path)


def test_volume_slices_window_and_nifti_export(hub, tmp_path):
    import nibabel as nib

    ip, mp, affine = write_blob_volume(tmp_path)
    a = Annotator(hub, "fake", "oracle")
    a.open(ip, mask_path=mp, query="segment the lesion")
    assert a.is_volume and a.n_slices == 5
    assert 1 <= a.slice_index <= 3 and a.gt is not None and a.gt.any()  # a slice that shows the object
    soft = a.image.copy()
    a.set_window("ct-lung")
    assert not np.array_equal(a.image, soft)
    a.set_slice(0)
    assert a.slice_index == 0 and not a.gt.any()
    a.set_window("ct-soft-tissue")  # lesion (60 HU) vs surroundings (-100 HU) well apart
    a.set_slice(2)
    for _ in a.run_agent():
        pass
    assert a.current_iou() > 0.9
    out = a.export("nifti", tmp_path / "out")
    img = nib.load(out)
    data = np.asarray(img.dataobj)
    assert data.shape == (80, 64, 5)
    np.testing.assert_allclose(img.affine, affine)
    assert data[..., 2].sum() == a.mask.sum() and data[..., [0, 1, 3, 4]].sum() == 0
    lab = np.asarray(nib.load(mp).dataobj)[..., 2].astype(bool)
    assert iou(data[..., 2].astype(bool), lab) > 0.9  # the mask lands where the label is, in voxel order


def test_set_segmenter_reapplies_prompts(case):
    hub = SegmenterHub(factory=lambda name: FakeSegmenter(tolerance=40.0 if name == "fake" else 5.0))
    a = Annotator(hub, "fake", "oracle")
    _, ip, mp = case
    a.open(ip, mask_path=mp)
    a.click(*BLOB_CENTER)
    a.click(5, 5)
    before = a.mask.copy()
    a.set_segmenter("strict")
    assert len(a.session.points) == 2
    assert a.session.segmenter is hub.get("strict")
    assert not np.array_equal(a.mask, before)  # the low tolerance gives a different (speckled) mask


def test_hub_shares_one_segmenter_between_sessions(tmp_path):
    hub = SegmenterHub()
    ip1, mp1 = write_blob_case(tmp_path / "a", "one", seed=1)
    ip2, _ = write_blob_case(tmp_path / "b", "two", seed=2)
    a, b = Annotator(hub, "fake"), Annotator(hub, "fake")
    a.open(ip1, mask_path=mp1)
    b.open(ip2)
    assert a.session.segmenter is b.session.segmenter
    ma = a.click(*BLOB_CENTER).copy()
    b.click(5, 5)  # re-binds the segmenter to b's image
    ma2 = a.click(10, 190).copy()  # and back to a's: a's mask must come from a's image
    ref = Session(FakeSegmenter())
    ref.set_image(a.image)
    ref.add_click(*BLOB_CENTER)
    np.testing.assert_array_equal(ref.mask, ma)
    np.testing.assert_array_equal(ref.add_click(10, 190), ma2)
    assert hub.set_image_calls >= 3


def test_interaction_reply_maps_back_to_the_same_pixel():
    from ibisagent.protocol import parse_reply

    for w, h, x, y in [(240, 200, 0, 0), (240, 200, 239, 199), (1348, 1070, 1000, 733), (7, 5, 3, 4)]:
        act = parse_reply(interaction_reply(Interaction("click", x, y, False), w, h)).action
        assert act.pixel(w, h) == (x, y) and act.kind.value == "negative"
    box = parse_reply(interaction_reply(Interaction("box", box=(3, 4, 100, 90)), 240, 200)).action
    assert box.pixel_box(240, 200) == (3, 4, 100, 90)


def test_continue_episode_without_prior_matches_fresh_run(tmp_path):
    from ibisagent.agent import run_episode

    ip, mp = write_blob_case(tmp_path)
    a = Annotator(SegmenterHub(), "fake")
    a.open(ip, mask_path=mp)
    seg = FakeSegmenter()
    pol = create_policy("oracle")
    ep1 = continue_episode(env_for(seg, pol), pol, a.image, "segment the lesion", a.gt)
    ep2 = run_episode(env_for(FakeSegmenter(), pol), create_policy("oracle"), a.image, "segment the lesion", a.gt)
    assert [s.action for s in ep1.steps] == [s.action for s in ep2.steps]
    np.testing.assert_array_equal(ep1.mask, ep2.mask)


def test_image_key_depends_on_content():
    x = np.zeros((4, 5, 3), np.uint8)
    y = x.copy()
    y[0, 0, 0] = 1
    assert image_key(x) == image_key(x.copy()) != image_key(y)


def test_bundled_examples_and_app_build(case):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from ibisagent.ui.app import AppConfig, build_app, bundled_examples, display_factor, display_scaled

    folder, ip, _ = case
    assert find_bundled_dir(folder) == folder
    assert find_bundled_dir(folder / "missing") is None
    ex = bundled_examples(folder)
    assert len(ex) == 1 and ex[0].image == ip.resolve() and ex[0].query == "segment the bright lesion"
    cfg = AppConfig(segmenters=["fake"], segmenter="fake", examples=ex)
    assert "oracle" in cfg.policies
    demo = build_app(cfg)
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"canvas", "run", "continue", "undo", "reset", "export", "slice", "window", "example"} <= ids
    a = Annotator(SegmenterHub(), "fake")
    a.open(ip)
    k = display_factor(a)
    assert k == 2  # 240 px wide: shown twice as large
    assert display_scaled(a.render(), k).shape == (400, 480, 3)


def test_cli_parsers_register():
    import argparse

    from ibisagent.cli.app import add_parser as add_app
    from ibisagent.cli.serve import add_parser as add_serve

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_app(sub)
    add_serve(sub)
    args = parser.parse_args(["app", "--segmenter", "fake", "--port", "7999"])
    assert args.host == "127.0.0.1" and args.port == 7999 and callable(args.func)
    args = parser.parse_args(["serve", "--data-root", "/tmp"])
    assert args.host == "127.0.0.1" and callable(args.func)


def test_app_cli_rejects_unknown_segmenter(capsys):
    import argparse

    from ibisagent.cli.app import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["app", "--segmenter", "nope"])
    assert args.func(args) == 2
    assert "unknown segmenter" in capsys.readouterr().err


def test_open_dicom_series_from_several_uploaded_files(hub, tmp_path):
    from app_fixtures import write_dicom_series

    files = write_dicom_series(tmp_path / "upload", n=3)
    a = Annotator(hub, "fake")
    a.open_files([str(f) for f in files])
    assert a.is_volume and a.n_slices == 3 and a.image.shape == (48, 64, 3)
    a.set_slice(0)
    m = a.click(30, 24)
    assert m[24, 30] and not m[2, 2]  # the disk, not the air around it
    with pytest.raises(AnnotatorError, match="DICOM series"):
        a.open_files([str(files[0]), str(tmp_path / "x.png")])
    a.open_files([str(files[1])])  # one file: a single DICOM slice
    assert not a.is_volume and a.image.shape == (48, 64, 3)


def test_app_defaults_learned_policy_first_example_and_upload_on_top(case):
    """Issue 17: the app starts with the learned policy (a user's own image has no ground truth), the example
    dropdown shows an example (opened with the page) and the upload panel comes first in the left column."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ibisagent.cli import default_policy
    from ibisagent.ui.app import AppConfig, build_app, bundled_examples

    folder, _, _ = case
    ex = bundled_examples(folder)
    cfg = AppConfig(segmenters=["fake"], segmenter="fake", examples=ex)
    assert cfg.policy == default_policy()
    if (Path(__file__).resolve().parents[1] / "src/ibisagent/weights/compact_policy.safetensors").is_file():
        assert cfg.policy == "compact"
    demo = build_app(cfg)
    comps = {c.get("props", {}).get("elem_id"): c for c in demo.config["components"]}
    assert comps["example"]["props"]["value"] == ex[0].label
    order = [c.get("props", {}).get("elem_id") for c in demo.config["components"]]
    assert order.index("upload") < order.index("example") < order.index("query") < order.index("run")
    assert any(event == "load" for d in demo.config["dependencies"] for _, event in d["targets"])


def test_status_shows_the_agents_confidence_until_the_user_edits(hub, case, monkeypatch):
    from ibisagent.policies import base as policy_base
    from ibisagent.policies.compact import CompactPolicy

    monkeypatch.setattr(policy_base, "create_policy",
                        lambda name, **kw: CompactPolicy(weights="random", embedder="fake", max_clicks=2))
    _, ip, mp = case
    a = Annotator(hub, "fake", "compact")
    a.open(ip, query="segment the bright lesion")
    list(a.run_agent())
    est = a.episode.predicted_iou
    assert est is not None and f"agent's predicted IoU {est:.2f}" in a.status()
    assert ("low confidence" in a.status()) == (est < 0.5)
    a.click(5, 5, positive=False)  # the user changes the mask: the estimate no longer applies
    assert "predicted IoU" not in a.status()
