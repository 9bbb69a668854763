"""``ibisagent segment`` in batch mode: folders, globs, manifests, error rows, resuming, ``--overwrite``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibisagent.agent import Agent, BatchItem
from ibisagent.cli import main

ORACLE = ["--policy", "oracle", "--segmenter", "fake", "--quiet"]
COMPACT = ["--policy", "compact", "--policy-arg", "weights=random", "--policy-arg", "embedder=fake",
           "--segmenter", "fake", "--quiet", "--max-steps", "3"]


@pytest.mark.parametrize("line,needle", [("{not json", "not valid JSON"), ("[1, 2]", "each line must be a JSON object")])
def test_a_bad_jsonl_manifest_line_is_one_line_exit_2(images: Path, tmp_path: Path, capsys, line, needle) -> None:
    man = tmp_path / "cases.jsonl"
    man.write_text('{"image": "imgs/a.png", "query": "the block"}\n' + line + "\n")
    assert main(["segment", str(man), "--out", str(tmp_path / "out"), *ORACLE]) == 2
    err = capsys.readouterr().err
    assert f"cases.jsonl:2: {needle}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _case(folder: Path, name: str, left: int) -> tuple[Path, Path]:
    img = np.full((60, 70, 3), 20, np.uint8)
    img[10:40, left:50] = 220
    gt = np.zeros((60, 70), np.uint8)
    gt[10:40, left:50] = 255
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder / f"{name}.png")
    (folder / "masks").mkdir(exist_ok=True)
    Image.fromarray(gt).save(folder / "masks" / f"{name}.png")
    return folder / f"{name}.png", folder / "masks" / f"{name}.png"


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for i, name in enumerate(("a", "b", "c", "d")):
        _case(tmp_path / "imgs", name, 15 + 5 * i)
    return tmp_path / "imgs"


def test_folder_one_query_for_all(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["segment", str(images), "-q", "the bright block", "--out", str(out), *COMPACT]) == 0
    rows = _rows(out)
    assert [Path(r["image"]).name for r in rows] == ["a.png", "b.png", "c.png", "d.png"]  # masks/ is not an image
    for r in rows:
        assert r["status"] == "ok" and r["query"] == "the bright block" and r["iou"] is None
        assert r["steps"] >= 1 and set(r["seconds"]) >= {"load", "episode", "encoder", "write"}
        assert Path(r["mask"]).parent == out / Path(r["image"]).stem
        assert (out / Path(r["image"]).stem / "trace.json").is_file()
        assert r["predicted_iou"] is not None  # the compact policy estimates its own IoU


def test_glob_and_several_files(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["segment", str(images / "[ab].png"), str(images / "d.png"), "-q", "the block", "--out", str(out),
                 *COMPACT]) == 0
    assert sorted(Path(r["image"]).name for r in _rows(out)) == ["a.png", "b.png", "d.png"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_per_row_queries_and_masks(images: Path, tmp_path: Path, fmt: str) -> None:
    rows_in = [{"image": "imgs/a.png", "query": "the left block", "mask": "imgs/masks/a.png"},
               {"image": "imgs/c.png", "query": "", "mask": "imgs/masks/c.png"}]  # empty query: --query
    man = tmp_path / f"cases.{fmt}"
    if fmt == "csv":
        man.write_text("image,query,mask\n" + "".join(f"{r['image']},{r['query']},{r['mask']}\n" for r in rows_in))
    else:
        man.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    out = tmp_path / "out"
    assert main(["segment", str(man), "-q", "the fallback block", "--out", str(out), *ORACLE]) == 0
    rows = _rows(out)
    assert [r["query"] for r in rows] == ["the left block", "the fallback block"]
    for r in rows:  # IoU against the row's own mask, and it matches the written mask
        gt = np.asarray(Image.open(images / "masks" / Path(r["image"]).name)) > 0
        mask = np.asarray(Image.open(r["mask"])) > 0
        assert r["iou"] == pytest.approx((mask & gt).sum() / (mask | gt).sum()) and r["iou"] > 0.9


def test_manifest_row_without_query_is_a_user_error(images: Path, tmp_path: Path, capsys) -> None:
    man = tmp_path / "cases.csv"
    man.write_text("image,query\nimgs/a.png,the block\nimgs/b.png,\n")
    assert main(["segment", str(man), "--out", str(tmp_path / "out"), *ORACLE]) == 2
    assert "line 3: no query" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_corrupt_image_in_the_middle_is_an_error_row(images: Path, tmp_path: Path, capsys) -> None:
    (images / "b.png").write_bytes(b"\x89PNG garbage" * 10)
    out = tmp_path / "out"
    assert main(["segment", str(images), "-q", "the block", "--out", str(out), *COMPACT]) == 2
    rows = _rows(out)
    assert [(Path(r["image"]).name, r["status"]) for r in rows] == [
        ("a.png", "ok"), ("b.png", "error"), ("c.png", "ok"), ("d.png", "ok")]
    assert "corrupt" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert "1 of 4 image(s) failed" in capsys.readouterr().err


def test_interrupted_run_resumes_without_redoing_or_losing_rows(images: Path, tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real = Agent.segment

    def segment(self, image, query, gt=None, on_step=None):
        if len(calls) == 2 and stop["now"]:
            raise KeyboardInterrupt
        calls.append(query)
        return real(self, image, query, gt, on_step)

    stop = {"now": True}
    monkeypatch.setattr(Agent, "segment", segment)
    out = tmp_path / "out"
    cmd = ["segment", str(images), "-q", "the block", "--out", str(out), *COMPACT]
    assert main(cmd) == 130
    first = _rows(out)
    assert [Path(r["image"]).name for r in first] == ["a.png", "b.png"]
    with (out / "results.jsonl").open("a") as f:  # a row cut short by a kill mid-write
        f.write('{"image": "/x/c.png", "sta')
    stop["now"] = False
    calls.clear()
    assert main(cmd) == 0
    assert len(calls) == 2  # only c and d were run
    rows = _rows(out)
    assert [Path(r["image"]).name for r in rows] == ["a.png", "b.png", "c.png", "d.png"]
    assert rows[:2] == first  # the finished rows are kept as they were
    calls.clear()
    assert main(cmd) == 0 and calls == []  # everything done: nothing to redo
    assert main([*cmd, "--overwrite"]) == 0 and len(calls) == 4
    assert sorted(Path(r["image"]).name for r in _rows(out)) == ["a.png", "b.png", "c.png", "d.png"]


def test_error_rows_are_retried_on_rerun(images: Path, tmp_path: Path) -> None:
    good = (images / "b.png").read_bytes()
    (images / "b.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    cmd = ["segment", str(images), "-q", "the block", "--out", str(out), *COMPACT]
    assert main(cmd) == 2
    (images / "b.png").write_bytes(good)
    assert main(cmd) == 0
    assert [(Path(r["image"]).name, r["status"]) for r in _rows(out)] == [
        ("a.png", "ok"), ("c.png", "ok"), ("d.png", "ok"), ("b.png", "ok")]


def test_same_name_in_two_folders_gets_two_output_folders(tmp_path: Path) -> None:
    a, _ = _case(tmp_path / "x", "scan", 15)
    b, _ = _case(tmp_path / "y", "scan", 25)
    out = tmp_path / "out"
    assert main(["segment", str(a), str(b), "-q", "the block", "--out", str(out), *COMPACT]) == 0
    assert sorted(Path(r["out"]).name for r in _rows(out)) == ["scan", "scan_2"]


def test_segment_many_python_api(images: Path) -> None:
    agent = Agent("oracle", "fake")
    items = [BatchItem(images / "a.png", "the block", mask=images / "masks" / "a.png"),
             BatchItem(images / "nope.png", "the block", mask=images / "masks" / "a.png"),
             BatchItem(images / "b.png", "the block")]  # the oracle needs a mask
    results = list(agent.segment_many(items))
    assert [r.ok for r in results] == [True, False, False]
    assert results[0].episode.final_iou > 0.9
    assert "needs a ground-truth mask" in results[2].error


def test_one_image_several_queries_is_several_jobs(images: Path, tmp_path: Path, capsys) -> None:
    man = tmp_path / "cases.jsonl"
    man.write_text("".join(json.dumps({"image": "imgs/a.png", "query": q, "mask": "imgs/masks/a.png"}) + "\n"
                           for q in ("the block", "the bright block")))
    out = tmp_path / "out"
    assert main(["segment", str(man), "--out", str(out), *ORACLE]) == 0
    rows = _rows(out)
    assert [(r["query"], Path(r["out"]).name) for r in rows] == [("the block", "a"), ("the bright block", "a_2")]
    assert main(["segment", str(man), "--out", str(out), *ORACLE]) == 0 and _rows(out) == rows  # both skipped
    man.write_text(man.read_text() + man.read_text().splitlines()[0] + "\n")  # the same job twice
    assert main(["segment", str(man), "--out", str(out), *ORACLE]) == 2
    assert "given twice with the query 'the block'" in capsys.readouterr().err
