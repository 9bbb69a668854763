"""Trajectory synthesis: records, reasoning, variants (reflective, lookahead, box), bad input, resume, workers, Ray."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _synth_data import make_blobs
from ibisagent.env import EnvConfig, SegmentationEnv
from ibisagent.masks import rle_decode
from ibisagent.protocol import validate_reply
from ibisagent.rewards import score_transition
from ibisagent.segmenters.base import create_segmenter
from ibisagent.synthesis.runner import (
    SynthesisConfig,
    SynthesisError,
    iter_skipped,
    iter_trajectories,
    run_synthesis,
    select_cases,
)

ALL = ("oracle", "box", "reflective", "box-reflective", "lookahead")
REPO = Path(__file__).resolve().parents[1]


def _cfg(**kw) -> SynthesisConfig:
    return SynthesisConfig(**{"variants": ALL, "segmenter": "fake", "split": "all", **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_blobs(tmp_path_factory.mktemp("blobs"), 8, bad=True)


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    run_synthesis(data, out, _cfg(), progress=False)
    return out


def _records(out: Path) -> dict[str, dict]:
    recs = list(iter_trajectories(out))
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "duplicate trajectories"
    return {r["id"]: r for r in recs}


# --- records and bad input ------------------------------------------------------------------------------------------

def test_bad_cases_are_skipped_with_reasons_and_counted(run: Path) -> None:
    skipped = {r["id"]: r["reason"] for r in iter_skipped(run)}
    for v in ALL:
        assert skipped[f"bad_empty::{v}"] == "empty_mask"
        assert skipped[f"bad_size::{v}"] == "size_mismatch"
        assert skipped[f"bad_image::{v}"] == "unreadable_image"
        assert skipped[f"bad_nomask::{v}"] == "unreadable_mask"
    assert skipped["bad_unreachable::oracle"] == "threshold_not_reached"
    manifest = json.loads((run / "manifest.json").read_text())
    c = manifest["counts"]
    assert manifest["status"] == "complete" and manifest["config"]["variants"] == list(ALL)
    assert c["jobs"] == 13 * len(ALL) and c["pending"] == 0
    assert c["kept"] + c["skipped"] == c["jobs"]
    assert c["kept"] == len(_records(run))
    assert c["skipped_by_reason"]["empty_mask"] == len(ALL)
    assert c["kept_by_variant"]["oracle"] == 8


def test_trajectory_steps_keep_state_and_replay_through_the_env(run: Path, data: Path) -> None:
    recs = _records(run)
    seg = create_segmenter("fake")
    for tid in ("c000::oracle", "c003::box", "c005::lookahead", "c002::reflective"):
        r = recs[tid]
        steps = r["steps"]
        assert r["reached"] and r["final_iou"] >= 0.8 and steps[-1]["action"] == "Terminate"
        assert steps[0]["state"]["prev_mask_rle"] is None and steps[0]["state"]["iou_before"] == 0.0
        for a, b in zip(steps, steps[1:]):
            assert b["state"]["iou_before"] == pytest.approx(a["iou_after"])
            assert rle_decode(b["state"]["prev_mask_rle"]).shape == (r["height"], r["width"])
        n_clicks = [len(s["state"]["clicks"]) for s in steps]
        assert n_clicks == sorted(n_clicks) and len(steps[-1]["state"]["labels"]) == n_clicks[-1]
        for s in steps:
            assert validate_reply(s["reply"], r["grammar"]), s["reply"]
        # replaying the replies through the environment reproduces every recorded IoU
        env = SegmentationEnv(seg, EnvConfig(grammar=r["grammar"], prompts=r["grammar"]))
        img = np.asarray(Image.open(r["image"]).convert("RGB"))
        gt = np.asarray(Image.open(r["mask"])) > 0
        env.reset(img, r["query"], gt)
        for s in steps:
            res = env.step(s["reply"])
            assert res.info["iou"] == pytest.approx(s["iou_after"], abs=1e-6)
        assert res.done and res.info["stop_reason"] == "terminate"


def test_reasoning_is_grounded_and_varied(run: Path) -> None:
    thinks, n = set(), 0
    for r in _records(run).values():
        for s in r["steps"]:
            think = s["reply"].split("</think>")[0].removeprefix("<think>\n")
            thinks.add(think)
            n += 1
            if s["kind"] in ("positive", "negative"):
                # says where (a location word) and how large (a size phrase)
                assert any(w in think for w in ("upper", "lower", "left", "right", "center", "middle")), think
            if s["kind"] in ("positive", "negative") and s["role"] == "normal":
                assert "area" in think, think  # how large the targeted region is
                assert (s["kind"] in think.lower()) or "click" in think.lower(), think  # what is done about it
    assert len(thinks) > 0.6 * n, "reasoning text repeats too often"


# --- variants -------------------------------------------------------------------------------------------------------

def test_reflective_steps_start_with_an_error_and_end_corrected(run: Path) -> None:
    recs = [r for r in _records(run).values() if r["variant"] in ("reflective", "box-reflective")]
    assert len(recs) >= 12
    for r in recs:
        roles = [s["role"] for s in r["steps"]]
        assert roles.count("error") == 1 and roles.count("correction") == 1, roles
        i = roles.index("error")
        err, fix = r["steps"][i], r["steps"][i + 1]
        assert fix["role"] == "correction" and fix["note"] == err["note"]
        # the error really is one: a placement miss by the reward's own rule, and no IoU gain (a box error leaves
        # the mask below the threshold)
        gt = np.asarray(Image.open(r["mask"])) > 0
        before = rle_decode(err["state"]["prev_mask_rle"]) if err["state"]["prev_mask_rle"] else None
        rew = score_transition(err["reply"], gt=gt, mask_before=before, mask_after=None if err["kind"] == "box"
                               else rle_decode(fix["state"]["prev_mask_rle"]), step=err["step"], mode=r["grammar"])
        assert rew.placement == -1.0
        if r["variant"] == "reflective":
            assert err["iou_after"] <= err["state"]["iou_before"]
            assert any(w in fix["reply"] for w in ("previous", "last", "mistake", "wrong", "off target", "poor choice"))
        else:
            assert err["kind"] == "box" and err["iou_after"] < 0.8
            assert "box" in fix["reply"].lower()
        # ... and the correction really corrects it: IoU rises
        assert fix["iou_after"] > err["iou_after"]
        assert r["reached"]


def test_lookahead_never_worse_on_a_step_and_not_longer_on_average(run: Path) -> None:
    recs = _records(run)
    cases = sorted({r["case_id"] for r in recs.values()})
    la, dt = [], []
    for c in cases:
        a, o = recs.get(f"{c}::lookahead"), recs.get(f"{c}::oracle")
        if a is None or o is None:
            continue
        assert a["steps"][0]["iou_after"] >= o["steps"][0]["iou_after"] - 1e-9
        la.append(a["n_interactions"])
        dt.append(o["n_interactions"])
    assert len(la) == 8 and np.mean(la) <= np.mean(dt)


def test_box_first_trajectories_start_with_a_box(run: Path) -> None:
    for r in _records(run).values():
        if r["variant"] == "box":
            assert r["grammar"] == "extended" and r["steps"][0]["kind"] == "box"
            assert r["steps"][0]["action"].startswith("Box (")
            assert all(s["state"]["box"] is not None for s in r["steps"][1:])


# --- resume, workers, Ray -------------------------------------------------------------------------------------------

def test_resume_after_torn_write_gives_the_same_set(run: Path, data: Path, tmp_path: Path) -> None:
    full = _records(run)
    shard = sorted((run / "shards").glob("*.jsonl"))[0].read_bytes().splitlines(keepends=True)
    out = tmp_path / "resumed"
    (out / "shards").mkdir(parents=True)
    # a killed run: 5 complete lines, then half of the 6th
    (out / "shards" / "shard-00000.jsonl").write_bytes(b"".join(shard[:5]) + shard[5][: len(shard[5]) // 2])
    res = run_synthesis(data, out, _cfg(), progress=False)
    assert res.processed == 13 * len(ALL) - 5
    assert _records(out) == full
    assert {r["id"] for r in iter_skipped(out)} == {r["id"] for r in iter_skipped(run)}
    # the torn line was cut off; resuming again does nothing
    assert (out / "shards" / "shard-00000.jsonl").read_bytes() == b"".join(shard[:5])
    assert run_synthesis(data, out, _cfg(), progress=False).processed == 0
    with pytest.raises(SynthesisError, match="different configuration"):
        run_synthesis(data, out, _cfg(seed=1), progress=False)


def _cli(*args: str) -> list[str]:
    code = "import sys; from ibisagent.cli.synthesis import add_parser; import argparse; p=argparse.ArgumentParser();"\
           " add_parser(p.add_subparsers()); a=p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    return [sys.executable, "-c", code, "synthesize", *args]


def test_killed_run_resumes_without_losing_or_duplicating(tmp_path: Path) -> None:
    data = make_blobs(tmp_path / "data", 20, seed=3)
    args = ["--segmenter", "fake", "--split", "all", "--variants", "oracle,lookahead", "--no-progress"]
    ref = tmp_path / "ref"
    run_synthesis(data, ref, _cfg(variants=("oracle", "lookahead")), progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(str(data), "--out", str(out), *args), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        shards = list((out / "shards").glob("*.jsonl")) if (out / "shards").is_dir() else []
        if shards and sum(len(p.read_bytes().splitlines()) for p in shards) >= 3:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    partial = len(list(iter_trajectories(out)))
    assert killed and partial < 40, (killed, partial)
    done = subprocess.run(_cli(str(data), "--out", str(out), *args), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert _records(out) == _records(ref)
    assert json.loads((out / "manifest.json").read_text())["counts"]["pending"] == 0


def test_worker_processes_give_the_same_records(data: Path, run: Path, tmp_path: Path) -> None:
    cases = [c for c in select_cases(data, _cfg()) if c.id.startswith("c")][:3]
    res = run_synthesis(cases, tmp_path / "pool", _cfg(variants=("oracle", "reflective"), workers=2),
                        progress=False)
    assert json.loads((tmp_path / "pool" / "manifest.json").read_text())["runs"][-1]["executor"] == "processes"
    assert res.processed == 6
    full = _records(run)
    for tid, rec in _records(tmp_path / "pool").items():
        assert rec == full[tid]


def test_ray_local_instance(data: Path, run: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    cases = [c for c in select_cases(data, _cfg()) if c.id.startswith("c")][:2]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024 * 1024)
    try:
        res = run_synthesis(cases, tmp_path / "ray", _cfg(variants=("oracle",), ray_address="local"),
                            progress=False)
    finally:
        ray.shutdown()
    assert res.processed == 2
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["runs"][-1]["executor"] == "ray"
    full = _records(run)
    for tid, rec in _records(tmp_path / "ray").items():
        assert rec == full[tid]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from ibisagent.cli.synthesis import add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    for argv, msg in (
        ([str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--segmenter", "fake"], "does not exist"),
        ([str(tmp_path), "--out", str(tmp_path / "o"), "--variants", "oracle,bogus"], "unknown variant"),
        ([str(tmp_path), "--out", str(tmp_path / "o"), "--segmenter", "bogus"], "unknown segmenter"),
    ):
        args = p.parse_args(["synthesize", *argv])
        assert args.func(args) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1


@pytest.mark.slow
def test_real_segmenter_box_trajectory(shared_data: Path, tmp_path: Path) -> None:
    """One real case through LiteMedSAM (original weights, box-trained): a box-first trajectory."""
    cases = [c for c in select_cases(shared_data, SynthesisConfig(datasets=("ph2_dermoscopy",), split="all"))][:1]
    seg = "litemedsam-click" if (REPO / "src/ibisagent/weights/litemedsam_click.safetensors").exists() \
        else "litemedsam"
    out = tmp_path / "real"
    res = run_synthesis(cases, out, SynthesisConfig(variants=("box",), segmenter=seg, max_steps=6, split="all"),
                        progress=False)
    assert res.processed == 1
    recs = list(iter_trajectories(out)) or []
    skipped = list(iter_skipped(out))
    if recs:
        r = recs[0]
        assert r["steps"][0]["kind"] == "box" and r["steps"][0]["iou_after"] > 0.5
        assert r["final_iou"] >= 0.8
    else:
        assert skipped[0]["reason"] == "threshold_not_reached"
    shutil.rmtree(out)


def test_a_failing_segmenter_skips_the_case_not_the_run(data: Path) -> None:
    from ibisagent.segmenters.base import SegmenterError
    from ibisagent.segmenters.fake import FakeSegmenter
    from ibisagent.synthesis.runner import synthesize_case

    class Broken(FakeSegmenter):
        def _decode(self, points, labels, box, mask_input):
            if box is not None:
                raise SegmenterError("box prompts are broken here")
            raise RuntimeError("decoder exploded")

    case = next(c for c in select_cases(data, _cfg()) if c.id == "c000")
    res = synthesize_case(case, ["oracle", "box"], _cfg(), segmenter=Broken())
    assert [r["status"] for r in res] == ["skipped", "skipped"]
    assert res[0]["reason"] == "error:RuntimeError" and "decoder exploded" in res[0]["message"]
    assert res[1]["reason"] == "segmenter_error"


def test_trajectory_json_round_trip(run: Path) -> None:
    from ibisagent.synthesis import Trajectory

    for rec in list(iter_trajectories(run))[:10]:
        assert Trajectory.from_json(rec).to_json() == rec
