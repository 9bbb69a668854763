"""Tests of the evaluation harness (issue 5) and the challenge protocol: metrics against hand-computed masks,
resume, the summary schema, compare, bad cases, workers, and gt-box == calling the segmenter directly."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibisagent.cli import main as cli_main
from ibisagent.cli.util import parse_kv
from ibisagent.evaluation import (
    SUMMARY_KEYS,
    EvalConfig,
    EvalConfigError,
    challenge_click,
    challenge_metrics,
    compare_runs,
    curve_auc,
    iou_at,
    noc,
    noc_measured,
    paired_differences,
    read_cases,
    run_eval,
)
from ibisagent.evaluation.compare import CompareError
from ibisagent.evaluation.metrics import group_of, pad_curve
from ibisagent.segmenters.base import Segmenter, SegResult, register_segmenter

H = W = 40
# ground truth: 20x20 square; the fixed test segmenter predicts the concentric 16x16 square inside it
GT = np.zeros((H, W), bool)
GT[10:30, 10:30] = True
PRED = np.zeros((H, W), bool)
PRED[12:28, 12:28] = True
# hand-computed: IoU 256/400, Dice 512/656. Surfaces on the voxel-corner lattice (masks.surface_distances): the gt
# square's 80 corner points are 76 straight unit segments and 4 corner cuts of length sqrt(2)/2 (total 76 + 2 sqrt 2),
# the prediction's 64 are 60 + 4 (60 + 2 sqrt 2). Every predicted surfel is 2 from the gt surface; of the gt surfels,
# 68 (length 68) are at 2, 8 (length 8) at sqrt(5) and the 4 corner cuts at sqrt(8). NSD@2 = (60 + 2 sqrt 2 + 68) /
# (136 + 4 sqrt 2); HD95: the gt side's cumulative length reaches 95% inside the sqrt(5) group (68/78.8 < 0.95 <=
# 76/78.8), the predicted side is 2 -> sqrt(5).
EXPECTED = {"iou": 0.64, "dice": 512 / 656, "hd95": math.sqrt(5),
            "nsd": (128 + 2 * math.sqrt(2)) / (136 + 4 * math.sqrt(2))}


class _FixedSegmenter(Segmenter):
    """Predicts PRED for any prompt."""

    name = "_eval-test-fixed"

    def _encode(self, image):
        return None

    def _decode(self, points, labels, box, mask_input):
        return SegResult(PRED.copy(), np.zeros((1, 8, 8), np.float32), 1.0)


class _GrowingSegmenter(Segmenter):
    """The bright square of the image, eroded by (3 - number of positive clicks) pixels: IoU 0.64, 0.81, 1.0."""

    name = "_eval-test-grow"

    def _encode(self, image):
        return image[..., 0] > 128

    def _decode(self, points, labels, box, mask_input):
        sq = self._features
        e = max(0, 3 - int((labels == 1).sum()))
        m = np.zeros_like(sq)
        rows, cols = np.flatnonzero(sq.any(1)), np.flatnonzero(sq.any(0))
        m[rows[0] + e : rows[-1] + 1 - e, cols[0] + e : cols[-1] + 1 - e] = True
        return SegResult(m, np.zeros((1, 8, 8), np.float32), 1.0)


register_segmenter("_eval-test-fixed", "test: fixed prediction")(lambda **kw: _FixedSegmenter())
register_segmenter("_eval-test-grow", "test: grows with clicks")(lambda **kw: _GrowingSegmenter())


def _write_case(folder: Path, cid: str, image: np.ndarray, mask: np.ndarray | None, **extra) -> dict:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{cid}.png")
    row = {"id": cid, "image": f"images/{cid}.png", "mask": f"masks/{cid}.png", "query": "the square",
           "object": "square", "modality": "synthetic", "dataset": "synthetic", **extra}
    if mask is not None:
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{cid}.png")
    return row


def _square_manifest(root: Path, n: int = 3, name: str = "squares") -> Path:
    folder = root / name
    rows = []
    for i in range(n):
        img = np.full((H, W, 3), 30, np.uint8)
        img[GT] = 200 + i
        rows.append(_write_case(folder, f"sq{i}", img, GT))
    (folder / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


@pytest.fixture()
def squares(tmp_path: Path) -> Path:
    return _square_manifest(tmp_path / "data")


@pytest.fixture()
def real_manifest(tmp_path: Path, shared_data: Path) -> Path:
    """Two real PH2 cases and one real BUSI case, pointed at by absolute paths."""
    folder = tmp_path / "real"
    folder.mkdir()
    rows = []
    for sub in ("ph2_dermoscopy", "busi_breast_ultrasound"):
        lines = (shared_data / sub / "index.jsonl").read_text().splitlines()
        for line in lines[: 2 if sub == "ph2_dermoscopy" else 1]:
            r = json.loads(line)
            r["image"] = str(shared_data / sub / r["image"])
            r["mask"] = str(shared_data / sub / r["mask"])
            rows.append(r)
    (folder / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def _cfg(data: Path, out: Path, **kw) -> EvalConfig:
    kw.setdefault("segmenter", "fake")
    kw.setdefault("report", False)
    return EvalConfig(data=str(data), out=str(out), **kw)


# ------------------------------------------------------------------------------------------------ pure metrics

def test_iou_at_noc_and_auc_by_hand():
    curve = [0.5, 0.82, 0.87, 0.91]
    assert iou_at(curve, 1) == 0.5
    assert iou_at(curve, 3) == 0.87
    assert iou_at(curve, 10) == 0.91  # stopped early: keeps the last IoU
    assert iou_at([], 5) == 0.0
    assert noc(curve, 0.80, 20) == 2
    assert noc(curve, 0.85, 20) == 3
    assert noc(curve, 0.95, 20) == 20  # never reached -> the budget
    assert noc(curve, 0.90, 3) == 3  # reached only after the budget
    assert noc_measured(curve, 0.95, 20, "terminate") is None  # stopped below 0.95 with budget left
    assert noc_measured(curve, 0.95, 4, "terminate") == 4  # used the whole budget
    assert noc_measured(curve, 0.95, 20, "max_steps") == 20
    assert noc_measured(curve, 0.85, 20, "terminate") == 3  # reached before stopping
    assert pad_curve([0.2, 0.4], 4) == [0.2, 0.4, 0.4, 0.4]
    assert curve_auc([0.6, 0.7, 0.8, 0.9, 1.0]) == pytest.approx(3.2)
    assert curve_auc([0.3]) == 0.0
    with pytest.raises(ValueError):
        iou_at(curve, 0)


def test_challenge_metrics_on_a_known_curve():
    m = challenge_metrics([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], total_seconds=3.0)
    assert m["dsc_auc"] == pytest.approx(3.2)  # box prediction left out, unit spacing over the 5 clicks
    assert m["nsd_auc"] == pytest.approx(0.25 + 0.35 + 0.45 + 0.55)
    assert m["dsc_final"] == 1.0 and m["nsd_final"] == 0.6
    assert m["seconds_per_interaction"] == pytest.approx(0.5)
    short = challenge_metrics([0.5, 0.7], [0.0, 0.3], total_seconds=1.2)  # stopped after one click
    assert short["dsc_curve"] == [0.5, 0.7, 0.7, 0.7, 0.7, 0.7]
    assert short["dsc_auc"] == pytest.approx(2.8)
    assert short["nsd_final"] == 0.3


def test_challenge_click_targets_the_largest_error_component():
    gt = np.zeros((40, 40), bool)
    gt[5:15, 5:15] = True  # 100 px object
    pred = np.zeros_like(gt)
    pred[5:15, 5:13] = True  # misses a 10x2 strip (FN 20 px)
    pred[22:34, 22:34] = True  # 12x12 false positive blob (144 px): the largest error
    x, y, positive = challenge_click(pred, gt)
    assert not positive
    assert 22 <= x <= 33 and 22 <= y <= 33
    assert (x, y) in {(27, 27), (27, 28), (28, 27), (28, 28)}  # a centre pixel of the blob
    x, y, positive = challenge_click(np.zeros_like(gt), gt)
    assert positive and gt[y, x] and (x, y) in {(9, 9), (9, 10), (10, 9), (10, 10)}
    assert challenge_click(gt, gt) is None


def test_group_of_marks_thin_structures():
    assert group_of("retinal blood vessels") == "thin"
    assert group_of("cell membranes") == "thin"
    assert group_of("all cell nuclei") == "thin"
    assert group_of("largest nucleus") == "regular"
    assert group_of("polyp") == "regular"


def test_parse_kv():
    assert parse_kv(["iou_threshold=0.9", "first_action=box", "flag=true"], "x") == {
        "iou_threshold": 0.9, "first_action": "box", "flag": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_kv(["oops"], "--policy-arg")


# ------------------------------------------------------------------------------------------------ harness

def test_case_metrics_match_hand_computed_masks(squares: Path, tmp_path: Path):
    res = run_eval(_cfg(squares, tmp_path / "out", policy="gt-box", segmenter="_eval-test-fixed", limit=1))
    (row,) = read_cases(tmp_path / "out")
    assert row["status"] == "ok"
    for key, value in EXPECTED.items():
        assert row[key] == pytest.approx(value, abs=1e-4), key
    assert (row["steps"], row["clicks"], row["interactions"]) == (2, 0, 1)  # box, then Terminate
    assert row["stop_reason"] == "terminate"
    assert row["iou_curve"] == [0.64]
    assert row["noc_80"] is None  # stopped (Terminate) below 0.8 after 1 of 20 interactions: not measurable
    assert res.summary["mean_iou"] == pytest.approx(0.64)
    assert res.summary["iou_at"] == {"1": 0.64, "3": 0.64, "5": 0.64, "10": 0.64}


def test_curves_noc_and_no_stop_with_the_oracle(squares: Path, tmp_path: Path):
    res = run_eval(_cfg(squares, tmp_path / "stop", policy="oracle", segmenter="_eval-test-grow", limit=1))
    (row,) = read_cases(tmp_path / "stop")
    assert row["iou_curve"] == [0.64, 0.81]  # the oracle stops at IoU >= 0.8
    assert (row["steps"], row["clicks"], row["stop_reason"]) == (3, 2, "terminate")
    # the oracle stopped at 0.81, below 0.85 and 0.9: those NoCs are not measurable (not "20 = the budget")
    assert res.summary["noc"] == {"80": 2.0, "85": None, "90": None}
    assert (row["noc_80"], row["noc_85"], row["noc_90"]) == (2, None, None)
    extra = json.loads((tmp_path / "stop" / "summary_extra.json").read_text())
    assert extra["overall"]["noc_not_measurable"] == {"80": 0, "85": 1, "90": 1}
    assert res.summary["iou_at"] == {"1": 0.64, "3": 0.81, "5": 0.81, "10": 0.81}
    res = run_eval(_cfg(squares, tmp_path / "nostop", policy="oracle", segmenter="_eval-test-grow", limit=1,
                        policy_args={"iou_threshold": 1.01}, max_steps=8))
    (row,) = read_cases(tmp_path / "nostop")
    assert row["iou_curve"] == [0.64, 0.81, 1.0]
    assert res.summary["noc"] == {"80": 2.0, "85": 3.0, "90": 3.0}
    assert res.summary["iou_at"]["10"] == 1.0


def test_default_oracle_is_the_no_stop_curve_cut_at_its_threshold(real_manifest: Path, tmp_path: Path):
    run_eval(_cfg(real_manifest, tmp_path / "stop", policy="oracle", max_steps=6, policy_args={"iou_threshold": 0.6}))
    run_eval(_cfg(real_manifest, tmp_path / "all", policy="oracle", max_steps=6, policy_args={"iou_threshold": 1.01}))
    full = {r["case_id"]: r["iou_curve"] for r in read_cases(tmp_path / "all")}
    for r in read_cases(tmp_path / "stop"):
        curve = full[r["case_id"]]
        k = noc(curve, 0.6, len(curve))
        assert r["iou_curve"] == curve[:k], r["case_id"]


def test_resume_skips_finished_cases(squares: Path, tmp_path: Path):
    out = tmp_path / "out"
    seen: list[str] = []
    r1 = run_eval(_cfg(squares, out, limit=1), progress=lambda i, n, row: seen.append(row["case_id"]))
    assert seen == ["sq0"] and r1.summary["cases"] == 1
    first = (out / "cases.csv").read_text().splitlines()[1]
    r2 = run_eval(_cfg(squares, out), progress=lambda i, n, row: seen.append(row["case_id"]))
    assert seen == ["sq0", "sq1", "sq2"]  # sq0 was not redone
    assert (r2.n_skipped, r2.n_run) == (1, 2)
    lines = (out / "cases.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[1] == first
    assert r2.summary["cases"] == 3
    r3 = run_eval(_cfg(squares, out), progress=lambda i, n, row: seen.append(row["case_id"]))
    assert r3.n_run == 0 and len(seen) == 3
    # a different run into the same folder is refused, --overwrite replaces it
    with pytest.raises(EvalConfigError, match="other settings"):
        run_eval(_cfg(squares, out, policy="gt-box"))
    r4 = run_eval(_cfg(squares, out, policy="gt-box", overwrite=True, limit=2))
    assert r4.n_run == 2 and len(read_cases(out)) == 2


def test_box_first_policies_are_evaluated(squares: Path, tmp_path: Path):
    res = run_eval(_cfg(squares, tmp_path / "ob", policy="oracle-box", segmenter="_eval-test-grow", limit=1,
                        policy_args={"iou_threshold": 1.01}))
    (row,) = read_cases(tmp_path / "ob")
    assert row["status"] == "ok"
    # the box alone gives the square eroded by 3 px (14x14: IoU 196/400), then each click grows it by 1 px
    assert row["iou_curve"] == [0.49, 0.64, 0.81, 1.0]
    assert (row["interactions"], row["clicks"]) == (4, 3)
    assert res.summary["noc"] == {"80": 3.0, "85": 4.0, "90": 4.0}
    pred = json.loads((tmp_path / "ob" / "predictions.jsonl").read_text().splitlines()[0])
    assert pred["box"] == [10.0, 10.0, 29.0, 29.0] and pred["labels"] == [1, 1, 1]
    # the challenge protocol wraps any policy: ground-truth box first, then its clicks
    run_eval(_cfg(squares, tmp_path / "ch", policy="oracle", segmenter="_eval-test-grow", limit=1,
                  protocol="box+5clicks", policy_args={"iou_threshold": 1.01}))
    (row,) = read_cases(tmp_path / "ch")
    assert row["iou_curve"] == [0.49, 0.64, 0.81, 1.0] and row["dsc_final"] == 1.0


def test_interrupt_keeps_written_rows_and_resumes(squares: Path, tmp_path: Path):
    out = tmp_path / "out"

    def stop_after_first(i, n, row):
        raise KeyboardInterrupt

    res = run_eval(_cfg(squares, out), progress=stop_after_first)
    assert res.interrupted and res.summary is None and res.n_run == 1
    assert [r["case_id"] for r in read_cases(out)] == ["sq0"]
    assert not (out / "summary.json").exists()
    res = run_eval(_cfg(squares, out))
    assert (res.n_skipped, res.n_run, res.summary["cases"]) == (1, 2, 3)


def test_summary_schema_is_exact(squares: Path, tmp_path: Path):
    res = run_eval(_cfg(squares, tmp_path / "out", policy="center-click"))
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert tuple(s) == SUMMARY_KEYS == ("cases", "mean_iou", "mean_dice", "mean_steps", "mean_seconds", "noc",
                                        "iou_at", "by_dataset", "config")
    assert s == json.loads(json.dumps(res.summary))
    assert set(s["noc"]) == {"80", "85", "90"}
    assert set(s["iou_at"]) == {"1", "3", "5", "10"}
    assert set(s["by_dataset"]) == {"squares"}
    assert set(s["by_dataset"]["squares"]) == set(SUMMARY_KEYS) - {"by_dataset", "config"}
    for key in ("policy", "segmenter", "policy_args", "segmenter_args", "protocol", "max_steps", "split",
                "versions", "machine", "date"):
        assert key in s["config"], key
    assert s["config"]["policy"] == "center-click" and s["config"]["segmenter"] == "fake"
    assert {"ibisagent", "torch"} <= set(s["config"]["versions"])
    assert s["cases"] == 3 and 0 <= s["mean_iou"] <= 1 and s["mean_steps"] == 2.0


def test_bad_cases_are_recorded_not_fatal(tmp_path: Path):
    folder = tmp_path / "bad"
    img = np.full((H, W, 3), 30, np.uint8)
    img[GT] = 200
    rows = [_write_case(folder, "good", img, GT), _write_case(folder, "empty", img, np.zeros((H, W), bool)),
            _write_case(folder, "wrong_size", img, np.ones((10, 12), bool)),
            {"id": "missing", "image": "images/nope.png", "mask": "masks/nope.png", "query": "x"}]
    (folder / "masks" / "broken.png").write_bytes(b"not a png")
    rows.append({**_write_case(folder, "broken", img, None), "mask": "masks/broken.png"})
    (folder / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = run_eval(_cfg(folder, tmp_path / "out", policy="gt-box", report=True))
    by_id = {r["case_id"]: r for r in read_cases(tmp_path / "out")}
    assert by_id["good"]["status"] == "ok"
    for cid, words in (("empty", "empty"), ("wrong_size", "10x12"), ("missing", "nope.png"), ("broken", "broken")):
        assert by_id[cid]["status"] == "error" and words in by_id[cid]["error"], (cid, by_id[cid]["error"])
    assert res.summary["cases"] == 1 and res.n_errors == 4
    extra = json.loads((tmp_path / "out" / "summary_extra.json").read_text())
    assert len(extra["errors"]) == 4
    assert "Skipped cases (4)" in (tmp_path / "out" / "report.md").read_text()


def test_workers_give_the_same_rows(squares: Path, tmp_path: Path):
    run_eval(_cfg(squares, tmp_path / "one", policy="oracle", max_steps=4))
    run_eval(_cfg(squares, tmp_path / "two", policy="oracle", max_steps=4, workers=2))
    keep = ("case_id", "iou", "dice", "hd95", "steps", "iou_curve", "stop_reason")
    one = sorted([tuple(str(r[k]) for k in keep) for r in read_cases(tmp_path / "one")])
    two = sorted([tuple(str(r[k]) for k in keep) for r in read_cases(tmp_path / "two")])
    assert one == two and len(one) == 3


def test_challenge_protocol_on_a_real_case(real_manifest: Path, tmp_path: Path):
    out = tmp_path / "ch"
    res = run_eval(_cfg(real_manifest, out, protocol="box+5clicks", policy="challenge", limit=1))
    (row,) = read_cases(out)
    assert row["status"] == "ok" and row["max_interactions"] == 6
    assert 1 <= row["interactions"] <= 6 and row["clicks"] == row["interactions"] - 1
    dsc = row["dice_curve"] + [row["dice_curve"][-1]] * (6 - len(row["dice_curve"]))
    assert row["dsc_auc"] == pytest.approx(curve_auc(dsc[1:]), abs=1e-3)
    assert row["dsc_final"] == pytest.approx(dsc[-1], abs=1e-4)
    assert row["dsc_final"] == pytest.approx(row["dice"], abs=1e-4)
    assert len(row["nsd_curve"]) == 6
    assert row["seconds_per_interaction"] == pytest.approx(row["total_s"] / 6, abs=1e-3)
    trace = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert trace[0]["box"] is not None  # the box stays with the clicks
    extra = json.loads((out / "summary_extra.json").read_text())
    assert set(extra["overall"]["challenge"]) == {"DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final",
                                                  "seconds_per_interaction"}
    assert res.summary["config"]["protocol"] == "box+5clicks"


def test_cli_eval_report_and_compare(real_manifest: Path, tmp_path: Path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(["eval", str(real_manifest), "--segmenter", "fake", "--policy", "center-click", "--out",
                     str(a), "--quiet"]) == 0
    assert cli_main(["eval", str(real_manifest), "--segmenter", "fake", "--policy", "oracle", "--no-stop",
                     "--max-steps", "3", "--out", str(b), "--quiet"]) == 0
    report = (a / "report.md").read_text()
    assert "## By dataset" in report and "| real | 3 |" in report
    for png in ("iou_vs_interactions.png", "per_dataset.png", "gallery.png"):
        assert (a / png).stat().st_size > 1000, png
    sb = json.loads((b / "summary.json").read_text())
    assert sb["config"]["policy_args"] == {"iou_threshold": 1.01} and sb["mean_steps"] == 3.0
    capsys.readouterr()
    assert cli_main(["compare", str(a), str(b), "--by-dataset"]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "| metric | a | b |"
    assert "| policy | center-click | oracle |" in table
    sa = json.loads((a / "summary.json").read_text())
    assert f"| mean IoU | {sa['mean_iou']:.3f} | {sb['mean_iou']:.3f} |" in table
    assert "IoU real" in table
    # paired differences: b - a per case, recomputed here from the two cases.csv files
    assert cli_main(["compare", str(a), str(b), "--paired"]) == 0
    paired = capsys.readouterr().out
    ra = {r["case_id"]: r for r in csv.DictReader((a / "cases.csv").open())}
    rb = {r["case_id"]: r for r in csv.DictReader((b / "cases.csv").open())}
    d = [float(rb[k]["iou"]) - float(ra[k]["iou"]) for k in ra]
    m = sum(d) / len(d)
    se = (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    better, worse = sum(x > 0.005 for x in d), sum(x < -0.005 for x in d)
    assert f"| b | {len(d)} | {m:+.3f} +- {se:.3f} |" in paired
    assert f"| {better} / {worse} / {len(d) - better - worse} |" in paired
    with pytest.raises(CompareError, match="baseline"):
        paired_differences([a])
    csv_text = compare_runs([a, b], fmt="csv")
    assert next(csv.reader(csv_text.splitlines())) == ["metric", "a", "b"]
    with pytest.raises(CompareError, match="no summary.json"):
        compare_runs([tmp_path / "nothing"])
    assert cli_main(["compare", str(tmp_path / "nothing")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_cli_bad_input_exits_2(squares: Path, tmp_path: Path, capsys):
    assert cli_main(["eval", str(squares), "--segmenter", "fake", "--policy", "nope", "--out",
                     str(tmp_path / "o1")]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert cli_main(["eval", str(squares), "--segmenter", "fake", "--datasets", "nope", "--out",
                     str(tmp_path / "o2")]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["eval", str(squares), "--segmenter", "fake", "--policy-arg", "bad", "--out",
                     str(tmp_path / "o4")]) == 2


@pytest.mark.slow
def test_gt_box_equals_calling_the_segmenter_directly(real_manifest: Path, tmp_path: Path):
    from ibisagent.io import load_case_arrays
    from ibisagent.io.manifest import load_manifest
    from ibisagent.masks import bbox
    from ibisagent.masks import iou as mask_iou
    from ibisagent.segmenters.base import create_segmenter

    case = load_manifest(real_manifest)[0]
    image, gt = load_case_arrays(case)
    seg = create_segmenter("litemedsam")  # shares the process-wide embedding cache: one encoder pass
    seg.set_image(image)
    direct = mask_iou(seg.predict(box=np.asarray(bbox(gt), np.float32)).mask, gt)
    run_eval(_cfg(real_manifest, tmp_path / "out", policy="gt-box", segmenter="litemedsam", limit=1))
    (row,) = read_cases(tmp_path / "out")
    assert row["status"] == "ok" and row["interactions"] == 1
    assert row["iou"] == pytest.approx(direct, abs=1e-4)
    assert direct > 0.5  # the box-trained model segments a dermoscopy lesion from its box


def test_confidence_ranking_reports_spearman_and_the_low_confidence_cases() -> None:
    from ibisagent.evaluation.summary import confidence_ranking

    rows = [{"predicted_iou": p, "iou": r} for p, r in [(0.9, 0.95), (0.8, 0.7), (0.3, 0.2), (0.1, 0.4)]]
    out = confidence_ranking(rows)
    assert out is not None
    assert out["spearman"] == pytest.approx(0.8)
    assert out["low_confidence_cases"] == 2
    assert out["mean_iou_low_confidence"] == pytest.approx(0.3)
    assert out["mean_iou_confident"] == pytest.approx(0.825)
    assert confidence_ranking([{"predicted_iou": "", "iou": 0.5}] * 5) is None


def test_cli_eval_says_when_noc_is_not_measurable(squares: Path, tmp_path: Path, capsys):
    out = tmp_path / "stop"
    assert cli_main(["eval", str(squares), "--segmenter", "_eval-test-grow", "--policy", "oracle", "--limit", "1",
                     "--out", str(out), "--quiet", "--no-report"]) == 0
    captured = capsys.readouterr()
    assert "NoC@85 not measurable" in captured.out
    assert "NoC@85: 1 of 1 cases" in captured.err and "--no-stop" in captured.err
    assert json.loads((out / "summary.json").read_text())["noc"]["85"] is None
