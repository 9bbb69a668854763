import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ibisagent.cli import main


def test_help_lists_commands(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("segment", "demo", "list"):
        assert cmd in out


def test_segment_with_oracle_writes_outputs(tmp_path, capsys) -> None:
    img = np.full((60, 70, 3), 20, np.uint8)
    img[10:40, 20:50] = 220
    gt = np.zeros((60, 70), np.uint8)
    gt[10:40, 20:50] = 255
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(gt).save(tmp_path / "gt.png")
    rc = main(["segment", str(tmp_path / "img.png"), "--query", "the bright block", "--mask", str(tmp_path / "gt.png"),
               "--policy", "oracle", "--segmenter", "fake", "--out", str(tmp_path / "out"), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stop_reason"] == "terminate" and result["iou"] > 0.99
    mask = np.asarray(Image.open(result["mask"])) > 0
    assert np.logical_and(mask, gt > 0).sum() / np.logical_or(mask, gt > 0).sum() == pytest.approx(result["iou"])
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert trace["steps"][0]["action"].startswith("Positive Point")
    assert (tmp_path / "out" / "step_01.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["segment", "/no/such/file.png", "-q", "x", "--segmenter", "fake"], "not found"),
    (["segment", "{img}", "-q", "x", "--segmenter", "fake", "--policy", "oracle"], "needs the ground-truth mask"),
    (["segment", "{img}", "-q", "x", "--segmenter", "fake", "--mask", "{small}"], "mask"),
    (["segment", "{img}", "-q", "x", "--segmenter", "fake", "--mask", "{empty}"], "empty"),
    (["segment", "{img}", "-q", "x", "--segmenter", "nope", "--policy", "oracle", "--mask", "{gt}"], "unknown segmenter"),
    (["segment", "{corrupt}", "-q", "x", "--segmenter", "fake"], ""),
    (["demo", "--case", "nope", "--segmenter", "fake"], "no bundled case"),
])
def test_bad_input_exit_2(tmp_path, capsys, args, needle) -> None:
    img = np.zeros((30, 40, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "empty.png")
    gt = np.zeros((30, 40), np.uint8)
    gt[5:10, 5:10] = 255
    Image.fromarray(gt).save(tmp_path / "gt.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage" * 10)
    paths = {k: str(tmp_path / f"{k}.png") for k in ("img", "small", "empty", "corrupt", "gt")}
    rc = main([a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert needle in err


def test_demo_on_bundled_case(tmp_path, capsys) -> None:
    rc = main(["demo", "--segmenter", "fake", "--policy", "oracle", "--out", str(tmp_path), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["iou"] is not None and (tmp_path / "final_overlay.png").exists()


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "ibisagent.cli", "list"], capture_output=True, text=True, check=True)
    assert "oracle" in out.stdout and "fake" in out.stdout


def test_segment_reports_the_policys_confidence(tmp_path, capsys) -> None:
    img = np.full((60, 70, 3), 20, np.uint8)
    img[10:40, 20:50] = 220
    Image.fromarray(img).save(tmp_path / "img.png")
    rc = main(["segment", str(tmp_path / "img.png"), "--query", "the bright block", "--policy", "compact",
               "--policy-arg", "weights=random", "--policy-arg", "embedder=fake", "--segmenter", "fake",
               "--out", str(tmp_path / "out"), "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert 0.0 <= result["predicted_iou"] <= 1.0
    assert result["low_confidence"] == (result["predicted_iou"] < 0.5)
    assert "predicted IoU" in captured.err
    assert ("low confidence: check the mask" in captured.err) == result["low_confidence"]
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert trace["predicted_iou"] == result["predicted_iou"]
