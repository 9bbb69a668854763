import json
import re
import subprocess
import sys
import time

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


# ------------------------------------------------------------------------------------- issue 17: bad inputs, outputs
def _block_case(tmp_path, name: str = "img"):
    img = np.full((60, 70, 3), 20, np.uint8)
    img[10:40, 20:50] = 220
    gt = np.zeros((60, 70), np.uint8)
    gt[10:40, 20:50] = 255
    Image.fromarray(img).save(tmp_path / f"{name}.png")
    Image.fromarray(gt).save(tmp_path / f"{name}_gt.png")
    return str(tmp_path / f"{name}.png"), str(tmp_path / f"{name}_gt.png")


def _nifti(tmp_path, shape, name: str) -> str:
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 50, shape).astype(np.int16)
    vol[5:15, 5:15] = 900  # a bright block on every slice (and every volume)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    return str(path)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected" not in err, err
    return err


@pytest.mark.parametrize("extra,needle", [
    (["-q", "   "], "--query is empty"),
    (["-q", ""], "--query is empty"),
    (["-q", "x", "--max-steps", "0"], "--max-steps must be >= 1"),
    (["-q", "x", "--max-steps", "-3"], "--max-steps must be >= 1"),
    (["-q", "x", "--policy-arg", "foo=1", "--policy", "oracle"], "valid: box_jitter, click_rule, first_action"),
    (["-q", "x", "--segmenter-arg", "colour=1"], "--segmenter-arg: segmenter 'fake' has no option colour; valid: "
                                                 "radius_frac, tolerance"),
    (["-q", "x", "--volume-index", "1"], "--volume-index 1 applies to 4D NIfTI"),
    (["-q", "x", "--mask-threshold", "nan"], "--mask-threshold must be a finite number"),
    (["-q", "x", "--axis", "7"], "--axis must be 0, 1 or 2"),
    (["-q", "x", "--segmenter-arg", "tolerance=abc"], "--segmenter-arg for segmenter 'fake': could not convert"),
    (["-q", "x", "--out", ""], "--out is empty"),
])
def test_segment_refuses_coercions(tmp_path, capsys, extra, needle):
    img, gt = _block_case(tmp_path)
    rc = main(["segment", img, "--segmenter", "fake", "--mask", gt, "--out", str(tmp_path / "o"), *extra])
    err = _err(capsys)
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert not (tmp_path / "o").exists()  # a refused run leaves no output folder behind


def test_segment_volume_slice_checks_name_the_cli_options(tmp_path, capsys):
    vol = _nifti(tmp_path, (20, 20, 5), "v.nii.gz")
    base = ["segment", vol, "-q", "the block", "--segmenter", "fake", "--out", str(tmp_path / "o")]
    assert main([*base, "--slice", "-1"]) == 2
    assert "--slice must be >= 0, got -1" in _err(capsys)
    assert main([*base, "--slice", "7"]) == 2
    err = _err(capsys)
    assert "--slice 7 is out of range" in err and "slice_index" not in err


def test_segment_4d_nifti_needs_volume_index_and_reports_it(tmp_path, capsys):
    vol = _nifti(tmp_path, (20, 20, 5, 3), "v4.nii.gz")
    out = tmp_path / "o"
    base = ["segment", vol, "-q", "the block", "--segmenter", "fake", "--slice", "2", "--out", str(out)]
    assert main(base) == 2
    assert "4D NIfTI file with 3 volumes; pick one with --volume-index 0..2" in _err(capsys)
    assert main([*base, "--volume-index", "3"]) == 2
    assert "--volume-index 3 is out of range" in _err(capsys)
    assert main([*base, "--volume-index", "1", "--policy", "center-click", "--json"]) == 2  # needs a mask
    capsys.readouterr()
    assert main([*base, "--volume-index", "1", "--json", "--max-steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "(slice 2 of 5, volume 1 of 3)" in captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["volume_index"] == 1
    assert json.loads((out / "trace.json").read_text())["meta"]["volume_index"] == 1


def test_load_nifti_volume_index_picks_the_volume(tmp_path):
    from ibisagent.io import load_image

    nib = pytest.importorskip("nibabel")
    vol = np.zeros((8, 8, 2, 3), np.int16)
    for k in range(3):
        vol[..., k] = 100 * (k + 1)
    vol[0, 0, :, :] = 0
    path = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    raws = [load_image(path, slice_index=0, volume_index=k).raw for k in range(3)]
    assert [int(r.max()) for r in raws] == [100, 200, 300]
    assert load_image(path, slice_index=0, volume_index=2).meta["volume_index"] == 2


def test_reused_out_folder_holds_no_stale_step_files(tmp_path, capsys):
    img, gt = _block_case(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    for name in ("step_01.png", "step_02.png", "step_03.png", "step_117.png", "mask.nii.gz"):
        (out / name).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")  # not ours: kept
    rc = main(["segment", img, "-q", "the block", "--mask", gt, "--policy", "oracle", "--segmenter", "fake",
               "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["steps"] == 2  # one click, then Terminate
    names = sorted(f.name for f in out.iterdir())
    assert names == ["final_overlay.png", "mask.png", "notes.txt", "step_01.png", "trace.json"]
    assert "removed 5 file(s) of an earlier run" in captured.err and "step_03.png" in captured.err
    assert set(result["removed_stale"]) == {"step_01.png", "step_02.png", "step_03.png", "step_117.png",
                                            "mask.nii.gz"}
    trace = json.loads((out / "trace.json").read_text())
    # the Terminate step changed nothing: no file of its own, its trace entry names the file showing its state
    assert [s.get("overlay") for s in trace["steps"]] == ["step_01.png", "step_01.png"]
    assert (out / "step_01.png").read_bytes() == (out / "final_overlay.png").read_bytes()


@pytest.mark.parametrize("where", ["file_parent", "is_file"])
def test_output_location_is_checked_before_any_work(tmp_path, capsys, monkeypatch, where):
    import ibisagent.agent as agent_mod

    img, gt = _block_case(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "sub" if where == "file_parent" else blocker
    monkeypatch.setattr(agent_mod.Agent, "segment", lambda *a, **k: pytest.fail("ran before checking --out"))
    rc = main(["segment", img, "-q", "x", "--mask", gt, "--policy", "oracle", "--segmenter", "fake",
               "--out", str(out)])
    err = _err(capsys)
    assert rc == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_folder_is_refused_first(tmp_path, capsys, monkeypatch):
    import os
    import tempfile

    import ibisagent.agent as agent_mod

    img, gt = _block_case(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:  # a real read-only folder (root writes through permissions, so simulate it there)
        out.chmod(0o500)
    else:
        def refuse(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(agent_mod.Agent, "segment", lambda *a, **k: pytest.fail("ran before checking --out"))
    try:
        rc = main(["segment", img, "-q", "x", "--mask", gt, "--policy", "oracle", "--segmenter", "fake",
                   "--out", str(out / "sub" if os.geteuid() != 0 else out)])
    finally:
        out.chmod(0o700)
    err = _err(capsys)
    assert rc == 2 and "is not writable" in err and "Permission denied" in err


def test_tiny_image_and_gray_mask_messages(tmp_path, capsys):
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "one.png")
    assert main(["segment", str(tmp_path / "one.png"), "-q", "x", "--segmenter", "fake",
                 "--out", str(tmp_path / "o")]) == 2
    assert "is 1x1 pixels; the minimum image size is 2x2" in _err(capsys)
    img, gt = _block_case(tmp_path)
    gray = np.asarray(Image.open(gt)).copy()
    gray[gray > 0] = np.random.default_rng(0).integers(130, 255, int((gray > 0).sum()))  # a soft mask
    gray[gray == 0] = np.random.default_rng(1).integers(0, 60, int((gray == 0).sum()))
    Image.fromarray(gray.astype(np.uint8)).save(tmp_path / "soft.png")
    base = ["segment", img, "-q", "x", "--policy", "oracle", "--segmenter", "fake", "--mask", str(tmp_path / "soft.png"),
            "--out", str(tmp_path / "o")]
    assert main(base) == 2
    err = _err(capsys)
    assert "--mask-threshold 127" in err and "threshold=" not in err
    assert main([*base, "--mask-threshold", "127", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["iou"] > 0.85


def test_done_line_reports_wall_time(tmp_path, capsys, monkeypatch):
    import ibisagent.agent as agent_mod

    img, gt = _block_case(tmp_path)
    real_save = agent_mod.Episode.save

    def slow_save(self, *a, **k):  # writing takes time the episode timer does not see
        time.sleep(0.6)
        return real_save(self, *a, **k)

    monkeypatch.setattr(agent_mod.Episode, "save", slow_save)
    rc = main(["segment", img, "-q", "x", "--mask", gt, "--policy", "oracle", "--segmenter", "fake",
               "--out", str(tmp_path / "o"), "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["seconds"]["wall"] >= result["seconds"]["episode"] + 0.6
    shown = re.search(r"; ([0-9.]+) s wall \(episode ([0-9.]+) s", captured.err)
    assert shown and float(shown.group(1)) >= float(shown.group(2)) + 0.6, captured.err


def test_make_test_installs_nothing_system_wide():
    """`make test` must not apt-get install Chromium (root, unasked): that is `make test-browser`'s job."""
    import shutil
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-C", str(repo), "test", "STAMP=/dev/null"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "apt-get" not in dry.stdout and "pytest" in dry.stdout and "-rs" in dry.stdout
    browser = subprocess.run(["make", "-n", "-C", str(repo), "test-browser", "STAMP=/dev/null"],
                             capture_output=True, text=True)
    assert "apt-get" in browser.stdout


def test_app_refuses_bad_numbers_before_starting(capsys):
    for extra, needle in ((["--max-steps", "0"], "--max-steps must be >= 1"), (["--port", "70000"], "--port")):
        assert main(["app", "--segmenter", "fake", *extra]) == 2
        assert needle in capsys.readouterr().err


def test_a_4d_nifti_mask_is_refused(tmp_path, capsys):
    vol = _nifti(tmp_path, (20, 20, 5), "v3.nii.gz")
    mask4 = _nifti(tmp_path, (20, 20, 5, 2), "m4.nii.gz")
    rc = main(["segment", vol, "-q", "the block", "--segmenter", "fake", "--slice", "2", "--mask", mask4,
               "--policy", "oracle", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "4D NIfTI with 2 volumes" in _err(capsys)
