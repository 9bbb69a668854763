"""Data interchange with the public IBISAgent release (issue 21 item 3): its mask codecs, its trajectory JSON and RL
parquet read into our layout and written back identically, and our verl reward on its rows."""

from __future__ import annotations

import base64
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibisagent.cli import main as cli_main
from ibisagent.masks import rle_decode_coco, rle_decode_release, rle_encode_coco, rle_encode_release

pd = pytest.importorskip("pandas")


# ------------------------------------------------------------------------------------------------------------------
# codecs
# ------------------------------------------------------------------------------------------------------------------

def test_coco_rle_hand_derived() -> None:
    # a 1x43 mask with pixels 1 and 2 set: runs (column-major) 1, 2, 40. Each count < 16 is one character (value +
    # 48): "1", "2". 40 = 0b01000: low 5 bits 8 with 1 left over -> 8 | 0x20 (more) = 40 -> chr(88) "X", then 1 ->
    # "1". No deltas: only counts after the third (index > 2) are stored as differences.
    m = np.zeros((1, 43), bool)
    m[0, 1:3] = True
    assert rle_encode_coco(m) == "12X1"
    np.testing.assert_array_equal(rle_decode_coco("12X1", (1, 43)), m)
    # column-major: a 2x2 mask with only the top-right pixel set flattens (F order) to 0, 0, 1, 0 -> runs 2, 1, 1
    m2 = np.array([[0, 1], [0, 0]], bool)
    assert rle_encode_coco(m2) == "211"
    with pytest.raises(ValueError, match="pixels"):
        rle_decode_coco("211", (3, 3))
    with pytest.raises(ValueError, match="ends inside"):
        rle_decode_coco("1X", (1, 43))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 5), (64, 64)])
def test_release_codecs_round_trip_synthetic(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.05, 0.5, 1.0):
        m = rng.random(shape) < density
        np.testing.assert_array_equal(rle_decode_release(rle_encode_release(m), shape), m)
        np.testing.assert_array_equal(rle_decode_coco(rle_encode_coco(m), shape), m)
    # the delta coding of counts after the second: long runs that shrink and grow again (negative differences)
    m = np.zeros((300, 40), bool)
    m[5:290, 3:30] = True
    m[100:120, 10:12] = False
    np.testing.assert_array_equal(rle_decode_coco(rle_encode_coco(m), m.shape), m)


def test_release_codecs_round_trip_dev_masks(shared_data: Path) -> None:
    masks = sorted((shared_data / "busi_breast_ultrasound" / "masks").glob("*.png"))[:4]
    masks += sorted((shared_data / "kvasir_seg_polyp" / "masks").glob("*.png"))[:2] if (
        shared_data / "kvasir_seg_polyp").is_dir() else []
    assert masks, "no dev masks found"
    for p in masks:
        m = np.asarray(Image.open(p).convert("L")) > 127
        assert m.any()
        text = zlib.decompress(base64.b64decode(rle_encode_release(m))).decode()
        runs = [int(t) for t in text.split()]
        assert sum(runs) == m.size and sum(runs[1::2]) == int(m.sum())  # decimal text, background run first
        np.testing.assert_array_equal(rle_decode_release(rle_encode_release(m), m.shape), m)
        np.testing.assert_array_equal(rle_decode_coco(rle_encode_coco(m), m.shape), m)


# ------------------------------------------------------------------------------------------------------------------
# a release-shaped case written by the test
# ------------------------------------------------------------------------------------------------------------------

W, H = 48, 40


def _case(tmp: Path) -> tuple[Path, Path, np.ndarray, list[tuple[int, int, bool, np.ndarray]]]:
    """An image, its ground truth (a 16x12 rectangle) and three clicks as the release's clicker would write them:
    positive into FN, then a negative into FP, then a positive (the masks are chosen by hand)."""
    img = np.full((H, W, 3), 30, np.uint8)
    img[10:22, 14:30] = 200
    gt = np.zeros((H, W), bool)
    gt[10:22, 14:30] = True
    Image.fromarray(img).save(tmp / "case.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(tmp / "case_mask.png")
    m1 = np.zeros_like(gt)
    m1[10:22, 14:24] = True
    m1[22:26, 14:24] = True  # leaks below
    m2 = m1.copy()
    m2[22:26] = False
    m3 = gt.copy()
    return tmp / "case.png", tmp / "case_mask.png", gt, [(18, 15, True, m1), (18, 24, False, m2), (27, 15, True, m3)]


def _release_trajectory(tmp: Path) -> dict:
    img, mask, _, clicks = _case(tmp)
    return {"file": str(img), "type": "img", "mask_file": str(mask), "nii_data": None,
            "img_data": {"format": "png", "size": [W, H], "reverse": False},
            "trajectory": [{"step": i, "coords_norm": [x / W, y / H], "coords_original": [x, y],
                            "mask_rle": rle_encode_release(m)} for i, (x, y, _, m) in enumerate(clicks)]}


def _run(*argv: str) -> int:
    return cli_main(list(argv))


def test_trajectory_json_import_export_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = _release_trajectory(tmp_path)
    src = tmp_path / "traj_case.json"
    src.write_text(json.dumps(rec, indent=4, ensure_ascii=False), encoding="utf-8")
    assert _run("import-release", str(src), "--out", str(tmp_path / "imp"), "--query", "the bright box") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cases"] == 1 and info["clicks"] == 3 and info["reached"] == 1
    ours = [json.loads(line) for line in (tmp_path / "imp/synth/shards/shard-00000.jsonl").read_text().splitlines()]
    steps = ours[0]["steps"]
    # the click types are read from the ground truth; our replies carry our convention (x + 0.5) / W; a Terminate
    # step is added (the last mask is the ground truth: IoU 1 >= 0.8)
    assert [s["kind"] for s in steps] == ["positive", "negative", "positive", "terminate"]
    assert steps[0]["action"] == f"Positive Point ({(18 + 0.5) / W:.4f}, {(15 + 0.5) / H:.4f})"
    assert steps[2]["state"]["clicks"] == [[18.0, 15.0], [18.0, 24.0]] and steps[2]["state"]["labels"] == [1, 0]
    assert steps[-1]["state"]["iou_before"] == 1.0
    index = (tmp_path / "imp/release/index.jsonl").read_text().splitlines()
    assert json.loads(index[0])["query"] == "the bright box"
    # the imported folders are ordinary ones: the dataset loads as cases, the synthesis folder exports as ours
    from ibisagent.exports import export
    from ibisagent.io import load_case_arrays, load_manifest

    (case,) = load_manifest(tmp_path / "imp/release", split="all")
    image, gt = load_case_arrays(case)
    assert image.shape == (H, W, 3) and gt.sum() == 16 * 12
    assert export("llamafactory", tmp_path / "imp/synth", tmp_path / "lf")["samples"] == 4
    assert export("verl", tmp_path / "imp/synth", tmp_path / "vl")["rows"] == 4

    assert _run("export", str(tmp_path / "imp/synth"), "--format", "release-trajectories", "--profile", "reference",
                "--out", str(tmp_path / "exp")) == 0
    back = (tmp_path / "exp/trajectories/traj_case.json").read_text(encoding="utf-8")
    assert back == src.read_text(encoding="utf-8")  # byte for byte, as run_tr_gen.py writes it

    # the default profile writes our coordinate convention instead
    assert _run("export", str(tmp_path / "imp/synth"), "--format", "release-trajectories",
                "--out", str(tmp_path / "exp2")) == 0
    ours_back = json.loads((tmp_path / "exp2/trajectories/traj_case.json").read_text())
    assert ours_back["trajectory"][0]["coords_norm"] == [round((18 + 0.5) / W, 4), round((15 + 0.5) / H, 4)]
    assert ours_back["trajectory"][0]["coords_original"] == [18, 15]


def _release_rows(tmp: Path) -> list[dict]:
    """Rows as trajectory_gen/convert_to_rl_data.py builds them from one sample (our reading of it)."""
    img_path, mask_path, _, clicks = _case(tmp)
    origin = Image.open(img_path)
    buf = io.BytesIO()
    origin.save(buf, format="PNG")
    images = [buf.getvalue()]
    for _, _, _, m in clicks:
        base = origin.convert("RGBA")
        layer = Image.new("RGBA", origin.size, (0, 0, 0, 0))
        layer.paste((0, 255, 0, 128), mask=Image.fromarray(m.astype(np.uint8) * 255, mode="L"))
        out = io.BytesIO()
        Image.alpha_composite(base, layer).convert("RGB").save(out, format="PNG")
        images.append(out.getvalue())
    caption = "the bright box in this test image"
    rows = []
    for i, (x, y, pos, m) in enumerate(clicks):
        answer = f"{'Positive' if pos else 'Negative'} Point ({x / W}, {y / H})"
        rows.append({
            "data_source": "med-seg", "prompt": [{"role": "user", "content": f"<image>{caption}"}],
            "images": [{"bytes": images[i]}], "ability": "reasoning",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": "train", "index": i, "answer": answer, "question": f"<image>{caption}",
                           "dataset": "toy", "original_image_name": "case", "gt_mask_name": str(mask_path),
                           "clicklist": [[c[0], c[1]] for c in clicks[:i]], "labels": [int(c[2]) for c in clicks[:i]],
                           "current_gt_mask": base64.b64encode(zlib.compress(rle_encode_coco(m).encode())).decode(),
                           "image_size": (W, H)},
        })
    return rows


def _plain(v):
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def test_rl_parquet_import_export_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "train_rl.parquet"
    pd.DataFrame(_release_rows(tmp_path)).to_parquet(src, engine="pyarrow", index=False)
    assert _run("import-release", str(src), "--out", str(tmp_path / "imp")) == 0
    capsys.readouterr()
    rec = json.loads((tmp_path / "imp/synth/shards/shard-00000.jsonl").read_text().splitlines()[0])
    assert rec["query"] == "the bright box in this test image"
    assert [s["kind"] for s in rec["steps"]] == ["positive", "negative", "positive", "terminate"]
    assert _run("export", str(tmp_path / "imp/synth"), "--format", "release-verl", "--profile", "reference",
                "--out", str(tmp_path / "exp")) == 0
    a = [_plain(r) for r in pd.read_parquet(src).to_dict("records")]
    b = [_plain(r) for r in pd.read_parquet(tmp_path / "exp/train.parquet").to_dict("records")]
    assert a == b  # every column, image bytes (plain image and RGBA overlays) included

    # the default profile: our coordinates, plus the fields the release's reward reads and its converter omits
    assert _run("export", str(tmp_path / "imp/synth"), "--format", "release-verl", "--out", str(tmp_path / "e2")) == 0
    rows = pd.read_parquet(tmp_path / "e2/train.parquet").to_dict("records")
    assert rows[1]["extra_info"]["answer"] == f"Negative Point ({round(18.5 / W, 4)}, {round(24.5 / H, 4)})"
    assert [r["extra_info"]["current_step"] for r in rows] == [1, 2, 3]
    assert rows[0]["extra_info"]["pre_iou"] == 0.0 and rows[1]["extra_info"]["pre_iou"] > 0.5


def test_our_synthesis_exports_in_release_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Our own trajectories (boxes left out) -> release-verl -> import-release reads them back."""
    from ibisagent.exports.release import export_release_verl, import_release
    from ibisagent.masks import rle_encode
    from ibisagent.synthesis.trajectories import StepState, Trajectory, TrajectoryStep

    img_path, mask_path, gt, clicks = _case(tmp_path)
    steps, prev = [], None
    for i, (x, y, pos, m) in enumerate(clicks):
        kind = "positive" if pos else "negative"
        act = f"{'Positive' if pos else 'Negative'} Point ({(x + 0.5) / W:.4f}, {(y + 0.5) / H:.4f})"
        st = StepState([[float(c[0]), float(c[1])] for c in clicks[:i]], [int(c[2]) for c in clicks[:i]], None,
                       None if prev is None else rle_encode(prev), 0.0)
        steps.append(TrajectoryStep(i + 1, st, "", act, kind, 0.0))
        prev = m
    steps.append(TrajectoryStep(4, StepState([], [], None, rle_encode(prev), 1.0), "", "Terminate", "terminate", 1.0))
    meta = {"image": str(img_path), "mask": str(mask_path), "source": "toy", "split": "train"}
    ok = Trajectory("toy/a::oracle", "toy/a", "oracle", "the box", "the box", W, H, "reference", "fake", steps, 1.0,
                    True, meta)
    box = Trajectory("toy/b::box", "toy/b", "box", "the box", "the box", W, H, "extended", "fake",
                     [TrajectoryStep(1, StepState([], [], None, None, 0.0), "", "Box (0.1, 0.1, 0.5, 0.5)", "box",
                                     0.5)], 0.5, False, meta)
    (tmp_path / "s/shards").mkdir(parents=True)
    (tmp_path / "s/shards/shard-00000.jsonl").write_text(
        "".join(json.dumps(t.to_json()) + "\n" for t in (ok, box)))
    info = export_release_verl(tmp_path / "s", tmp_path / "e", profile="reference")
    assert info["rows"] == 3 and info["skipped_box"] == 1
    rows = pd.read_parquet(tmp_path / "e/train.parquet").to_dict("records")
    assert rows[2]["extra_info"]["answer"] == f"Positive Point ({27 / W}, {15 / H})"  # the release's x / W
    assert _plain(rows[2]["extra_info"]["clicklist"]) == [[18, 15], [18, 24]]
    back = import_release([tmp_path / "e/train.parquet"], tmp_path / "i")
    assert back["cases"] == 1 and back["clicks"] == 3
    rec = json.loads((tmp_path / "i/synth/shards/shard-00000.jsonl").read_text())
    assert [s["action"] for s in rec["steps"][:3]] == [s.action for s in steps[:3]]


@pytest.mark.parametrize("bad, message", [
    ("notjson", "not readable JSON"),
    ("wrongsource", "is not the release's 'med-seg'"),
    ("nomask", "not found"),
    ("notrajectory", "not a release trajectory record"),
    ("txt", "expected a .json"),
])
def test_import_release_bad_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str,
                                         message: str) -> None:
    if bad == "notjson":
        p = tmp_path / "x.json"
        p.write_text("{nope")
    elif bad == "wrongsource":
        rows = _release_rows(tmp_path)
        rows[0]["data_source"] = "ibisagent/toy"
        p = tmp_path / "x.parquet"
        pd.DataFrame(rows).to_parquet(p, index=False)
    elif bad == "nomask":
        rec = _release_trajectory(tmp_path)
        rec["mask_file"] = "missing_mask.png"
        p = tmp_path / "x.json"
        p.write_text(json.dumps(rec))
    elif bad == "notrajectory":
        p = tmp_path / "x.json"
        p.write_text(json.dumps({"file": "a.png"}))
    else:
        p = tmp_path / "x.txt"
        p.write_text("")
    assert _run("import-release", str(p), "--out", str(tmp_path / "o"), "--query", "q") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "synth").exists()  # nothing written


# ------------------------------------------------------------------------------------------------------------------
# our verl reward on the release's rows
# ------------------------------------------------------------------------------------------------------------------

def _reward_case(tmp: Path) -> None:
    img = np.zeros((40, 40, 3), np.uint8)
    img[10:20, 10:20] = 200
    Image.fromarray(img).save(tmp / "img.png")
    Image.fromarray((img[..., 0] > 0).astype(np.uint8) * 255).save(tmp / "gt.png")


REPLY = "<think>\n{}\n</think>\n<action>\n{}\n</action>"


def test_compute_score_release_rows_hand_derived(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand derivation from verl/utils/reward_score/med_seg.py (its compute_score: the mean of unified format, the
    IoU tier, placement, progress against ``pre_iou`` (0 when missing) and length (0 when ``current_step`` is
    missing)), on a 40x40 image with a 10x10 bright square = the ground truth, and our ``fake`` segmenter standing
    in for its SAM2 server (a positive click on the square selects exactly the square).

    Row A, no clicks yet, reply ``Positive Point (0.375, 0.375)``: pixel (int(0.375*40), ...) = (15, 15), in FN ->
    placement +1; mask = the square, IoU 1 > 0.8 -> answer 3; IoU 1 > pre_iou 0 -> progress 1; think/action layout
    and no <answer> on a click -> format 1; no current_step -> length 0. Score (1 + 3 + 1 + 1 + 0) / 5 = 1.2.

    Row B, clicklist [[15, 15]] (the square already segmented), reply ``Negative Point (0.9, 0.9)`` -> (36, 36), not
    in FP -> placement -1; the mask stays the square -> answer 3; progress compares IoU 1 with the missing pre_iou 0
    -> 1 (the release's fallback; the mask before is already at IoU 1, so our default profile would give 0); length
    0. Score (1 + 3 - 1 + 1 + 0) / 5 = 0.8. With pre_iou 1.0: progress 0 -> 0.6. With current_step 7: length
    -0.2 * (7 - 5) = -0.4 -> (1 + 3 - 1 + 1 - 0.4) / 5 = 0.72.
    """
    from ibisagent.rewards.verl import compute_score

    _reward_case(tmp_path)
    monkeypatch.setenv("IBISAGENT_REWARD_SEGMENTER", "fake")
    monkeypatch.setenv("IBISAGENT_RELEASE_ROOT", str(tmp_path))  # names as the converter writes them: no folder
    a = {"original_image_name": "img", "gt_mask_name": "gt.png", "clicklist": [], "labels": [], "image_size": [40, 40]}
    r = compute_score("med-seg", REPLY.format("seed", "Positive Point (0.375, 0.375)"), "Positive Point (0.375, 0.375)",
                      a)
    assert r["score"] == pytest.approx(1.2)
    assert (r["format"], r["answer"], r["placement"], r["progress"], r["length"]) == (1.0, 3.0, 1.0, 1.0, 0.0)
    b = {**a, "clicklist": np.array([[15, 15]]), "labels": np.array([1])}
    neg = REPLY.format("trim", "Negative Point (0.9, 0.9)")
    assert compute_score("med-seg", neg, "", b)["score"] == pytest.approx(0.8)
    assert compute_score("med-seg", neg, "", {**b, "pre_iou": 1.0})["score"] == pytest.approx(0.6)
    assert compute_score("med-seg", neg, "", {**b, "current_step": 7})["score"] == pytest.approx(0.72)


def test_compute_score_release_row_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ibisagent.rewards.core import RewardInputError
    from ibisagent.rewards.verl import compute_score

    _reward_case(tmp_path)
    monkeypatch.setenv("IBISAGENT_REWARD_SEGMENTER", "fake")
    monkeypatch.delenv("IBISAGENT_RELEASE_ROOT", raising=False)
    info = {"original_image_name": "img", "gt_mask_name": "gt.png", "clicklist": [], "labels": [],
            "image_size": [40, 40]}
    with pytest.raises(RewardInputError, match="IBISAGENT_RELEASE_ROOT"):
        compute_score("med-seg", REPLY.format("x", "Positive Point (0.3, 0.3)"), "", info)
    with pytest.raises(NotImplementedError):
        compute_score("med-seg-other", "", "", info)


# ------------------------------------------------------------------------------------------------------------------
# NIfTI slicing, the release's way
# ------------------------------------------------------------------------------------------------------------------

def test_reference_nifti_slicing(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    from ibisagent.io.volumes import load_volume, release_slice, release_window, slice_image

    rng = np.random.default_rng(0)
    data = rng.normal(100, 40, (12, 9, 5)).astype(np.float32)
    data[0, 0, :] = 5000  # an outlier the 99th percentile clips
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # our default orientation would flip columns; the release does not
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    vol = load_volume(tmp_path / "v.nii.gz")
    for k in (0, 3):
        raw = np.rot90(data[:, :, k]).astype(np.float64)
        lo, hi = np.percentile(raw, 1), np.percentile(raw, 99)
        want = ((np.clip(raw, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)  # process_nii.apply_windowing
        np.testing.assert_array_equal(release_slice(data, 2, k), np.rot90(data[:, :, k]))
        np.testing.assert_array_equal(release_window(raw), want)
        got = slice_image(vol, k, axis=2, profile="reference")
        np.testing.assert_array_equal(got.array[..., 0], want)
        assert got.meta["display_transform"] == (True, True, False)
    assert not np.array_equal(slice_image(vol, 3, axis=2).array[..., 0], slice_image(vol, 3, axis=2,
                                                                                      profile="reference").array[..., 0])

    # a release nii trajectory record imports with the same slice as its image
    from ibisagent.exports.release import import_release

    lab = np.zeros(data.shape, np.uint8)
    lab[3:8, 2:6, 3] = 2
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "l.nii.gz")
    gt = np.rot90(lab[:, :, 3]) == 2
    rec = {"file": str(tmp_path / "v.nii.gz"), "type": "nii", "mask_file": str(tmp_path / "l.nii.gz"),
           "nii_data": {"size": list(data.shape), "slice_dir": "z", "slice_idx": 3, "slice_size": list(gt.shape),
                        "mask_number": 2, "window": None}, "img_data": None,
           "trajectory": [{"step": 0, "coords_norm": [0.5, 0.5], "coords_original": [4, 6],
                           "mask_rle": rle_encode_release(gt)}]}
    (tmp_path / "n.json").write_text(json.dumps(rec))
    info = import_release([tmp_path / "n.json"], tmp_path / "o", query="the label")
    assert info["reached"] == 1
    img = np.asarray(Image.open(tmp_path / "o/release/images/n.png"))
    np.testing.assert_array_equal(img[..., 0], release_window(release_slice(data, 2, 3)))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o/release/masks/n.png")) > 0, gt)


# ------------------------------------------------------------------------------------------------------------------
# more layouts and our own pipeline
# ------------------------------------------------------------------------------------------------------------------

def test_converter_dataset_json_and_repeated_clicks(tmp_path: Path) -> None:
    """The converter's input ({"data": [...]}, COCO-RLE masks, click types stored) imports; a click repeated on the
    same pixel (the release's clicker allows it) is kept as its own step."""
    from ibisagent.exports.release import import_release

    img, mask, _, clicks = _case(tmp_path)
    clicks = [*clicks[:2], clicks[1], clicks[2]]  # the negative click twice
    sample = {"image_name": "case", "mask_name": "case_mask.png", "caption": ["the bright box"],
              "clicks_list": [{"is_positive": pos, "coor_norm": [x / W, y / H], "coor": [x, y],
                               "mask": {"counts": base64.b64encode(zlib.compress(rle_encode_coco(m).encode())).decode(),
                                        "size": [H, W]}} for x, y, pos, m in clicks]}
    src = tmp_path / "data" / "train.json"
    src.parent.mkdir()
    src.write_text(json.dumps({"data": [sample]}))
    info = import_release([src], tmp_path / "o", roots=[tmp_path])
    assert info["cases"] == 1 and info["clicks"] == 4
    rec = json.loads((tmp_path / "o/synth/shards/shard-00000.jsonl").read_text())
    assert rec["query"] == "the bright box"
    assert [s["kind"] for s in rec["steps"]] == ["positive", "negative", "negative", "positive", "terminate"]
    assert rec["steps"][1]["action"] == rec["steps"][2]["action"]
    assert rec["steps"][3]["state"]["clicks"] == [[18.0, 15.0], [18.0, 24.0], [18.0, 24.0]]


def test_synthesis_to_release_verl_and_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our runner's trajectories (fake segmenter) -> release-verl rows that our reward scores as the release's
    (the oracle's own answer pays for its placement), and back through import-release to the same clicks."""
    from _synth_data import make_blobs
    from ibisagent.exports.release import export_release_trajectories, export_release_verl, import_release
    from ibisagent.masks import rle_decode
    from ibisagent.rewards.verl import compute_score
    from ibisagent.synthesis.runner import SynthesisConfig, iter_trajectories, run_synthesis

    data = make_blobs(tmp_path / "blobs", 3, seed=3)
    synth = tmp_path / "synth"
    run_synthesis(data, synth, SynthesisConfig(variants=("oracle", "box"), segmenter="fake", split="all"),
                  progress=False)
    records = {r["id"]: r for r in iter_trajectories(synth)}
    info = export_release_verl(synth, tmp_path / "e")
    assert info["skipped_box"] == sum(r["variant"] == "box" for r in records.values()) > 0
    rows = pd.read_parquet(tmp_path / "e/train.parquet").to_dict("records")
    oracle = [r for r in records.values() if r["variant"] == "oracle"]
    assert len(rows) == sum(r["n_interactions"] for r in oracle)
    first = rows[0]["extra_info"]
    rec = records[sorted(r["id"] for r in oracle)[0]]
    h, w = rec["height"], rec["width"]
    np.testing.assert_array_equal(rle_decode_coco(zlib.decompress(base64.b64decode(first["current_gt_mask"])).decode(),
                                                  (h, w)), rle_decode(rec["steps"][1]["state"]["prev_mask_rle"]))
    monkeypatch.setenv("IBISAGENT_REWARD_SEGMENTER", "fake")
    for row in rows[:3]:
        reply = REPLY.format("replay", row["extra_info"]["answer"])
        r = compute_score(row["data_source"], reply, row["reward_model"]["ground_truth"], dict(row["extra_info"]))
        assert r["format"] == 1.0 and r["placement"] == 1.0 and r["length"] == 1.0  # current_step <= 5
    back = import_release([tmp_path / "e/train.parquet"], tmp_path / "i")
    assert back["cases"] == len(oracle)
    again = {r["case_id"].split("/", 1)[1]: r for r in iter_trajectories(tmp_path / "i/synth")}
    for r in again.values():
        src = next(o for o in oracle if o["image"] == r["release"]["original_image_name"])
        assert [s["action"] for s in r["steps"] if s["kind"] != "terminate"] == [
            s["action"] for s in src["steps"] if s["kind"] != "terminate"]
    assert export_release_trajectories(synth, tmp_path / "t")["trajectories"] == len(oracle)


def test_release_variant_follows_the_release_generator(tmp_path: Path) -> None:
    """``synthesize --variants release``: every click is the release clicker's on the mask before it, the threshold
    is checked before each click, up to max_steps clicks, then our Terminate; exported with the release's x / W."""
    pytest.importorskip("cv2")
    from _synth_data import make_blobs
    from ibisagent.exports.release import export_release_trajectories
    from ibisagent.io import load_mask
    from ibisagent.masks import rle_decode
    from ibisagent.oracle_click import next_click
    from ibisagent.protocol import parse_action
    from ibisagent.synthesis.runner import SynthesisConfig, iter_trajectories, run_synthesis

    cfg = SynthesisConfig(variants=("release",), segmenter="fake", split="all", max_steps=6, keep_unreached=True)
    env = cfg.env_config("release")
    assert env.max_steps == 7 and env.max_repeats > 6  # 6 clicks + Terminate, repeats never stop the episode
    data = make_blobs(tmp_path / "blobs", 3, seed=5)
    # plus a structure on the image edge: the release's clicker (no padding) clicks it at the edge, ours inside
    img = np.full((40, 40, 3), 20, np.uint8)
    img[8:30, 0:14] = 210
    Image.fromarray(img).save(data / "images" / "edge.png")
    Image.fromarray((img[..., 0] > 100).astype(np.uint8) * 255).save(data / "masks" / "edge.png")
    with (data / "index.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "edge", "image": "images/edge.png", "mask": "masks/edge.png",
                             "query": "the bright block"}) + "\n")
    run_synthesis(data, tmp_path / "s", cfg, progress=False)
    recs = list(iter_trajectories(tmp_path / "s"))
    edge = next(r for r in recs if r["case_id"].endswith("edge"))
    assert parse_action(edge["steps"][0]["action"], "reference").pixel(40, 40)[0] == 0
    for rec in recs:
        gt = load_mask(rec["mask"])
        clicks = [s for s in rec["steps"] if s["kind"] != "terminate"]
        assert 1 <= len(clicks) <= 6
        for st in clicks:
            prev = st["state"]["prev_mask_rle"]
            want = next_click(None if prev is None else rle_decode(prev), gt, rule="release")
            got = parse_action(st["action"], "reference")
            assert got.pixel(rec["width"], rec["height"]) == (want.x, want.y)
            assert (st["kind"] == "positive") == want.positive
            assert st["state"]["iou_before"] < 0.8
        if rec["reached"]:
            assert rec["steps"][-1]["kind"] == "terminate" and rec["steps"][-1]["state"]["iou_before"] >= 0.8
    export_release_trajectories(tmp_path / "s", tmp_path / "e", profile="reference")
    out = [json.loads(p.read_text()) for p in sorted((tmp_path / "e/trajectories").glob("*.json"))]
    assert len(out) == len(recs)
    for o in out:
        w, h = o["img_data"]["size"]
        assert all(s["coords_norm"] == [s["coords_original"][0] / w, s["coords_original"][1] / h]
                   for s in o["trajectory"])
