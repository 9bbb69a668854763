"""Exports load back (json / pandas.read_parquet / datasets.load_from_disk) with images that exist, written once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from _synth_data import make_blobs
from ibisagent.exports import export
from ibisagent.exports.hf_dataset import load_hf_export
from ibisagent.rewards import compute_score, make_reward_functions
from ibisagent.synthesis.runner import SynthesisConfig, iter_trajectories, run_synthesis


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    data = make_blobs(tmp_path_factory.mktemp("blobs"), 4, seed=7)
    out = tmp_path_factory.mktemp("synth")
    run_synthesis(data, out, SynthesisConfig(variants=("oracle", "reflective", "box"), segmenter="fake",
                                             split="all"), progress=False)
    return out


def _steps(synth: Path) -> list[dict]:
    return [s for r in iter_trajectories(synth) for s in r["steps"]]


def _files(root: Path, sub: str) -> list[Path]:
    return [p for p in (root / sub).rglob("*.png")]


def test_llamafactory_export(synth: Path, tmp_path: Path) -> None:
    info = export("llamafactory", synth, tmp_path)
    rows = json.loads((tmp_path / "ibisagent_sft.json").read_text())
    steps = _steps(synth)
    n_err = sum(s["role"] == "error" for s in steps)
    assert n_err > 0 and len(rows) == len(steps) - n_err == info["samples"]
    error_replies = {s["reply"] for s in steps if s["role"] == "error"}
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>")
        assert user["content"].count("<image>") == len(row["images"]) == 1
        assert assistant["role"] == "assistant" and assistant["content"] not in error_replies
        assert row["system"].startswith("You are a medical image segmentation agent")
        assert (tmp_path / row["images"][0]).is_file()
    dataset_info = json.loads((tmp_path / "dataset_info.json").read_text())
    entry = dataset_info["ibisagent_sft"]
    assert entry["file_name"] == "ibisagent_sft.json" and entry["formatting"] == "sharegpt"
    assert entry["columns"]["images"] == "images" and entry["tags"]["assistant_tag"] == "assistant"
    # images written once: one file per case image, one per distinct overlay, far fewer than samples
    assert len(_files(tmp_path, "images")) == 4
    overlays = {r["images"][0] for r in rows if r["images"][0].startswith("overlays/")}
    assert len(_files(tmp_path, "overlays")) == len(overlays) < len(rows)
    # a second export into the same folder keeps other dataset_info entries and can include the error steps
    export("llamafactory", synth, tmp_path, name="with_errors", include_error_steps=True)
    both = json.loads((tmp_path / "dataset_info.json").read_text())
    assert set(both) == {"ibisagent_sft", "with_errors"}
    assert len(json.loads((tmp_path / "with_errors.json").read_text())) == len(steps)


def test_verl_parquet_export_scores_with_compute_score(synth: Path, tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    info = export("verl", synth, tmp_path)
    df = pd.read_parquet(tmp_path / "train.parquet")
    assert len(df) == info["rows"] > 0
    assert {"data_source", "prompt", "images", "ability", "reward_model", "extra_info"} <= set(df.columns)
    keys = set()
    for row in df.itertuples():
        ex = row.extra_info
        key = json.dumps([ex["case_id"], ex["grammar"], [[float(v) for v in p] for p in ex["points"]],
                          [int(v) for v in ex["labels"]], None if ex["box"] is None else [float(v) for v in ex["box"]]])
        assert key not in keys, "states must be deduplicated"
        keys.add(key)
        assert Path(row.images[0]["image"]).is_file() and Path(ex["image_path"]).is_file()
        assert Path(row.reward_model["ground_truth"]).is_file()
        assert row.prompt[0]["role"] == "system" and row.prompt[1]["content"].startswith("<image>")
        assert row.data_source.split("/")[0] == ("ibisagent-box" if ex["grammar"] == "extended" else "ibisagent")
        # the oracle's own action on this state is a placement hit and never loses IoU
        action = ex["oracle_action"]
        reply = f"<think>\nx\n</think>\n<action>\n{action}\n</action>" + (
            "\n<answer>\ndone\n</answer>" if action == "Terminate" else "")
        out = compute_score(row.data_source, reply, row.reward_model["ground_truth"], ex)
        assert out["format"] == 1.0
        if action.startswith(("Positive", "Negative")):
            assert out["placement"] == 1.0, (action, ex["case_id"])
        if action == "Terminate":
            assert out["placement"] == 1.0 and out["iou_before"] >= 0.8
    assert df["extra_info"].map(lambda e: e["variant"]).nunique() == 3


def test_hf_dataset_export_loads_back_for_trl(synth: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    info = export("hf", synth, tmp_path)
    raw = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert all(Path(p).is_file() for paths in raw["images"] for p in paths)
    ds = load_hf_export(tmp_path)
    assert len(ds) == info["rows"] > 0
    assert {"prompt", "completion", "images", "image_path", "ground_truth", "points", "labels", "step"} <= set(
        ds.column_names)
    row = ds[0]
    img = row["images"][0]
    assert isinstance(img, Image.Image) and img.size == (80, 64)
    assert row["prompt"][1]["content"][0]["type"] == "image"
    assert row["completion"][0]["role"] == "assistant"
    # images are referenced by path, not embedded per row: the dataset stays small
    for arrow in (tmp_path / "dataset").glob("data-*.arrow"):
        assert b"\x89PNG" not in arrow.read_bytes()
    # TRL reward functions read the state columns directly
    fns = {f.__name__: f for f in make_reward_functions(segmenter="fake")}
    cols = {k: ds[k] for k in ds.column_names if k not in ("prompt", "completion", "images")}
    fmt = fns["format_reward"](prompts=ds["prompt"], completions=ds["completion"], **cols)
    plc = fns["placement_reward"](prompts=ds["prompt"], completions=ds["completion"], **cols)
    assert all(v == 1.0 for v in fmt)
    roles = ds["role"]
    assert all(p == 1.0 for p, r in zip(plc, roles) if r == "normal")


def test_export_cli(synth: Path, tmp_path: Path, capsys) -> None:
    from ibisagent.cli.exports import add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    args = p.parse_args(["export", str(tmp_path / "missing"), "--format", "verl", "--out", str(tmp_path / "o")])
    assert args.func(args) == 2
    assert "not a synthesis folder" in capsys.readouterr().err
    args = p.parse_args(["export", str(synth), "--format", "llamafactory", "--out", str(tmp_path / "lf"),
                         "--variants", "box"])
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "lf" / "ibisagent_sft.json").read_text())
    assert rows and {r["variant"] for r in rows} == {"box"}
    assert "Box (" in rows[0]["messages"][1]["content"]
