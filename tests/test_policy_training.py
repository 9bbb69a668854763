"""Training the compact policy: oracle targets, GRPO advantages, one SFT step and one GRPO step on tiny data."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibisagent.policies.compact import GRID, load_policy_net
from ibisagent.training.policy import (
    PolicyTrainConfig,
    PolicyTrainError,
    click_target,
    grpo_advantages,
    train_policy,
)


@pytest.fixture()
def tiny_data(tmp_path: Path) -> Path:
    """Two synthetic train cases (bright discs) in the manifest layout."""
    root = tmp_path / "blobs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i, (cy, cx, r) in enumerate([(30, 40, 12), (40, 60, 10), (25, 30, 9), (35, 50, 11)]):
        img = np.full((64, 96, 3), 40, np.uint8)
        yy, xx = np.ogrid[:64, :96]
        gt = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[gt] = 200
        Image.fromarray(img).save(root / f"images/b{i}.png")
        Image.fromarray(gt.astype(np.uint8) * 255).save(root / f"masks/b{i}__blob.png")
        rows.append({"id": f"b{i}", "image": f"images/b{i}.png", "mask": f"masks/b{i}__blob.png", "object": "blob",
                     "query": "the bright blob", "modality": "synthetic", "dataset": "blobs"})
    (root / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _cfg(data: Path, run: Path, **kw) -> PolicyTrainConfig:
    base = dict(data=str(data), run_dir=str(run), out=str(run / "w.safetensors"), segmenter="fake", max_cases=2,
                sft_steps=2, sft_batch=4, rollout_clicks=2, ckpt_every=100, val_cases=0, grpo_iters=0,
                group_size=4, grpo_cases=2, max_turns=3, progress=False, dagger_rounds=0)
    base.update(kw)
    return PolicyTrainConfig(**base)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_click_target_puts_mass_in_the_error_regions() -> None:
    gt = np.zeros((64, 64), bool)
    gt[10:40, 10:40] = True
    t = click_target(None, gt)
    assert t is not None and t.shape == (2, GRID, GRID)
    assert abs(float(t.sum()) - 1) < 1e-5 and t[1].sum() == 0
    ys, xs = np.nonzero(t[0])
    assert ys.min() >= 10 and ys.max() < 40 and xs.min() >= 10 and xs.max() < 40
    mask = gt.copy()
    mask[40:60, 10:40] = True  # a false-positive slab larger than any miss
    t = click_target(mask, gt)
    assert t[1].sum() > 0.99 and np.nonzero(t[1])[0].min() >= 40
    assert click_target(gt, gt) is None


def test_grpo_advantages_are_normalized_rewards_to_go() -> None:
    adv = grpo_advantages([[1.0, 1.0], [0.0], [1.0, 0.0, 0.0]])
    flat = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    z = (flat - flat.mean()) / (flat.std() + 1e-6)
    np.testing.assert_allclose(adv[0], [z[0] + z[1], z[1]], atol=1e-6)
    np.testing.assert_allclose(adv[1], [z[2]], atol=1e-6)
    np.testing.assert_allclose(adv[2], [z[3] + z[4] + z[5], z[4] + z[5], z[5]], atol=1e-6)
    assert grpo_advantages([[0.5], [0.5]]) == [[0.0], [0.0]]


def test_sft_step_and_resume(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = train_policy(_cfg(tiny_data, run, stage="sft"))
    rows = _rows(run / "sft_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    assert (run / "sft.safetensors").is_file() and (run / "sft_curves.png").is_file()
    net, meta = load_policy_net(out)
    assert meta["stage"] == "sft" and json.loads(meta["sft_steps"]) == 2
    # resume continues from the checkpoint instead of starting over
    train_policy(_cfg(tiny_data, run, stage="sft", sft_steps=3, resume=True, ckpt_every=1))
    assert [int(r["step"]) for r in _rows(run / "sft_log.csv")] == [1, 2, 3]


def test_architecture_options_reach_the_weights_file(tiny_data: Path, tmp_path: Path) -> None:
    out = train_policy(_cfg(tiny_data, tmp_path / "q", stage="sft", net_width=16, query_maps=3))
    net, _ = load_policy_net(out)
    assert net.cfg.width == 16 and net.cfg.query_maps == 3 and net.query_key.out_features == 3 * 256
    with pytest.raises(PolicyTrainError, match="net-width"):
        train_policy(_cfg(tiny_data, tmp_path / "bad", stage="sft", net_width=20))
    with pytest.raises(PolicyTrainError, match="query-maps"):
        train_policy(_cfg(tiny_data, tmp_path / "bad", stage="sft", query_maps=-1))


def test_grpo_step_logs_every_reward_component(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_policy(_cfg(tiny_data, run, stage="sft"))
    train_policy(_cfg(tiny_data, run, stage="grpo", grpo_iters=1))
    steps = _rows(run / "grpo_steps.csv")
    assert len({r["episode"] for r in steps}) == 8  # 2 cases x group of 4 full episodes
    for r in steps:
        for k in ("format", "answer", "placement", "progress", "length", "total", "advantage"):
            assert math.isfinite(float(r[k])), (k, r)
        assert float(r["format"]) == 1.0
    assert any(r["action"] == "terminate" for r in steps)
    it = _rows(run / "grpo_iters.csv")
    assert len(it) == 1 and math.isfinite(float(it[0]["loss"])) and float(it[0]["kl"]) >= 0
    assert (run / "grpo_curves.png").is_file()


def test_bad_input_is_a_clear_error(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(PolicyTrainError, match="--data"):
        train_policy({"data": ""})
    with pytest.raises(PolicyTrainError, match="stage"):
        train_policy({"data": str(tiny_data), "stage": "ppo"})
    with pytest.raises(PolicyTrainError, match="needs"):
        train_policy(_cfg(tiny_data, tmp_path / "empty", stage="grpo", grpo_iters=1))
    from ibisagent.cli.training import add_policy_parser

    parser = argparse.ArgumentParser()
    add_policy_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["train-policy", "--data", str(tmp_path / "nowhere"), "--no-progress"])
    assert args.func(args) == 2


def test_synthetic_states_are_consistent_with_their_oracle_labels() -> None:
    from ibisagent.training.policy_states import RES, synth_batch, synth_case, target_from_masks

    gt = np.zeros((120, 200), bool)
    gt[30:90, 50:150] = True
    other = np.zeros_like(gt)
    other[5:25, 5:40] = True
    case = synth_case(gt, [other])
    rng = np.random.default_rng(0)
    planes, tgt, stop = synth_batch([case], [0] * 40, rng)
    assert planes.shape == (40, 6, GRID, GRID) and tgt.shape == (40, 2, GRID, GRID) and stop.shape == (40,)
    has = planes[:, 4, 0, 0]
    assert set(has.tolist()) <= {0.0, 1.0} and (has == 0).any() and (has == 1).any()
    assert (stop[has == 0] == 0).all()  # never stop before the first mask
    mass = tgt.flatten(1).sum(1)
    assert ((mass - 1).abs() < 1e-4).logical_or(mass == 0).all()
    assert ((planes[:, 2] + planes[:, 3]).flatten(1).sum(1)[has == 1] >= 1).all()  # masks come with clicks
    # the target of a mask that misses the object's right half points into that half (positive)
    g = case.gt
    m = g.copy()
    m[:, RES // 2 :] = False
    t = target_from_masks(m, g, case.sampling)
    assert t is not None and t[1].sum() == 0 and np.nonzero(t[0])[1].min() >= GRID // 2


def test_grpo_without_stop_keeps_the_stop_head(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_policy(_cfg(tiny_data, run, stage="sft"))
    sft, _ = load_policy_net(run / "sft.safetensors")
    out = train_policy(_cfg(tiny_data, run, stage="grpo", grpo_iters=2, grpo_stop=False, grpo_lr=1e-2))
    net, _ = load_policy_net(out)
    for (name, a), b in zip(sft.state_dict().items(), net.state_dict().values()):
        if name.startswith("stop."):
            assert torch.equal(a, b), name  # the stop head keeps its SFT weights
    moved = [n for (n, a), b in zip(sft.state_dict().items(), net.state_dict().values()) if not torch.equal(a, b)]
    assert moved, "the click maps must be trained"
    it = _rows(run / "grpo_iters.csv")
    assert len(it) == 2 and all(math.isfinite(float(r["loss"])) for r in it)


def test_grpo_temperature_scores_the_tempered_policy(tiny_data: Path, tmp_path: Path) -> None:
    """Rollouts at temperature 0.5: the loss must use the log-probs of the tempered policy, so on the first (and only)
    pass, before any update, every importance ratio is 1 (none clipped)."""
    run = tmp_path / "run"
    train_policy(_cfg(tiny_data, run, stage="sft"))
    train_policy(_cfg(tiny_data, run, stage="grpo", grpo_iters=2, grpo_epochs=1, grpo_temperature=0.5, grpo_absorbing=True,
                      clip=1e-4))
    it = _rows(run / "grpo_iters.csv")
    assert len(it) == 2 and all(float(r["clip_frac"]) == 0.0 for r in it), it
    with pytest.raises(PolicyTrainError, match="grpo_temperature"):
        train_policy(_cfg(tiny_data, run, stage="grpo", grpo_iters=1, grpo_temperature=0.0))


def test_absorbing_stop_compares_stops_over_the_same_number_of_turns() -> None:
    """Summed per-step rewards favour long episodes: every turn earns format + length. With the absorbing stop the
    early stop at a good mask keeps its Terminate reward for the remaining turns and wins over a worse click."""
    from types import SimpleNamespace

    from ibisagent.training.policy import _episode_rewards

    def ep(*steps: tuple[int, float]) -> SimpleNamespace:
        return SimpleNamespace(steps=[{"index": i, "reward": SimpleNamespace(total=t)} for i, t in steps])

    stop_now = ep((-1, 1.2))  # Terminate at a good mask (format 1, answer 3, placement 1, length 1) / 5
    click_then_stop = ep((5, 0.8), (-1, 0.8))  # a harmful click (placement -1, no progress), then a stop
    assert _episode_rewards(stop_now) == [1.2]
    assert _episode_rewards(stop_now, pad_to=3) == [1.2, 1.2, 1.2]
    assert _episode_rewards(click_then_stop, pad_to=3) == [0.8, 0.8, 0.8]
    assert _episode_rewards(ep((5, 1.0), (6, 1.0)), pad_to=3) == [1.0, 1.0]  # no Terminate: nothing to pad
    plain = grpo_advantages([_episode_rewards(stop_now), _episode_rewards(click_then_stop)])
    absorbing = grpo_advantages([_episode_rewards(stop_now, 3), _episode_rewards(click_then_stop, 3)])
    assert absorbing[0][0] > absorbing[1][0]
    assert plain[0][0] - plain[1][0] < absorbing[0][0] - absorbing[1][0]


def test_grpo_holdout_keeps_grpo_images_out_of_sft(tiny_data: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ibisagent.training.policy import split_holdout

    cases = [SimpleNamespace(id=f"c{i}", image_key=f"/data/images/im{i // 2}.png") for i in range(40)]
    cases += [SimpleNamespace(id=f"v{k}", image_key=f"ts/vol{k % 3}.nii.gz#z{k}") for k in range(30)]
    sft, grpo = split_holdout(cases, 0.4)  # type: ignore[arg-type]
    assert sft and grpo and {c.id for c in sft}.isdisjoint({c.id for c in grpo})
    assert len(sft) + len(grpo) == len(cases)
    group = {c.image_key.split("#")[0] for c in grpo}
    assert not group & {c.image_key.split("#")[0] for c in sft}  # an image or a volume is never split
    assert split_holdout(cases, 0.4) == (sft, grpo)  # stable
    assert split_holdout(cases, 0.0) == (cases, cases)
    # where the data lives does not change the split
    moved = [SimpleNamespace(id=c.id, image_key=c.image_key if "#" in c.image_key else "/elsewhere" + c.image_key)
             for c in cases]  # 2D keys are absolute paths; volume keys are already relative to the data folder
    assert [c.id for c in split_holdout(moved, 0.4)[1]] == [c.id for c in grpo]  # type: ignore[arg-type]
    # a run: every GRPO episode is on a held-out case (of the tiny set, b2 and b3 hash below 0.125)
    expected = {f"b{i}" for i in range(4)
                if int(hashlib.sha1(f"blobs/images/b{i}.png".encode()).hexdigest()[:8], 16) / 2**32 < 0.125}
    assert expected == {"b2", "b3"}
    run = tmp_path / "run"
    cfg = dict(max_cases=4, grpo_holdout=0.125)
    train_policy(_cfg(tiny_data, run, stage="sft", **cfg))
    train_policy(_cfg(tiny_data, run, stage="grpo", grpo_iters=2, grpo_cases=4, **cfg))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["grpo_masks"] == len(expected) and summary["sft_masks"] == 4 - len(expected)
    assert {r["case"] for r in _rows(run / "grpo_steps.csv")} == expected
    with pytest.raises(PolicyTrainError, match="grpo_holdout"):
        train_policy(_cfg(tiny_data, run, stage="sft", grpo_holdout=1.0))
    with pytest.raises(PolicyTrainError, match="same value"):  # GRPO must get the images SFT left out
        train_policy(_cfg(tiny_data, run, stage="grpo", grpo_iters=1, max_cases=4))


def test_grpo_stop_only_trains_only_the_stop_head(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_policy(_cfg(tiny_data, run, stage="sft"))
    sft, _ = load_policy_net(run / "sft.safetensors")
    out = train_policy(_cfg(tiny_data, run, stage="grpo", grpo_iters=3, grpo_stop_only=True, grpo_lr=5e-2,
                            grpo_epochs=1))
    net, _ = load_policy_net(out)
    moved = {n for (n, a), b in zip(sft.state_dict().items(), net.state_dict().values()) if not torch.equal(a, b)}
    assert moved and all(n.startswith("stop.") for n in moved), moved
    assert len(_rows(run / "grpo_iters.csv")) == 3
    with pytest.raises(PolicyTrainError, match="choose one"):
        train_policy(_cfg(tiny_data, run, stage="grpo", grpo_iters=1, grpo_stop_only=True, grpo_stop=False))


def test_greedy_clicks_sample_only_stop_or_click() -> None:
    from ibisagent.policies.compact import select_actions

    maps = torch.randn(64, 2, GRID, GRID)
    planes = torch.zeros(64, 6, GRID, GRID)
    planes[:, 0, :8, :8] = 1.0
    planes[:, 4] = 1.0  # a mask exists: stopping is allowed
    stop = torch.zeros(64)  # P(stop) = 0.5
    gen = torch.Generator().manual_seed(0)
    acts, _, _ = select_actions(maps, stop, planes, temperature=1.0, generator=gen, greedy_clicks=True)
    greedy, _, _ = select_actions(maps, torch.full((64,), -20.0), planes)
    clicked = acts >= 0
    assert 0 < int(clicked.sum()) < 64  # both decisions are sampled
    assert torch.equal(acts[clicked], greedy[clicked])  # every click is the best cell


def test_augment_adds_warped_variants_to_sft_only(tiny_data: Path, tmp_path: Path) -> None:
    from ibisagent.io import load_mask
    from ibisagent.training.augment import augment_mask, augment_params, kept_fraction
    from ibisagent.training.policy import AUG_TAG, held_out, split_holdout

    # the variants the trainer should make: 2 per image the held-out split leaves to SFT, minus masks pushed off
    variants = []
    for i in range(4):
        img = tiny_data / f"images/b{i}.png"
        if held_out(str(img), 0.125):
            continue
        gt = load_mask(tiny_data / f"masks/b{i}__blob.png")
        for k in (1, 2):
            p = augment_params(str(img), k)
            m = augment_mask(gt, p)
            if kept_fraction(gt, m, p) >= 0.8 and m.sum() >= 16:
                variants.append(f"b{i}{AUG_TAG}{k}")
    assert variants
    run = tmp_path / "run"
    cfg = dict(max_cases=4, grpo_holdout=0.125, augment=2)
    train_policy(_cfg(tiny_data, run, stage="sft", **cfg))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_cases"] == 4 + len(variants)
    assert summary["sft_masks"] == 2 + len(variants) and summary["grpo_masks"] == 2
    train_policy(_cfg(tiny_data, run, stage="grpo", grpo_iters=1, grpo_cases=4, **cfg))
    assert {r["case"] for r in _rows(run / "grpo_steps.csv")} == {"b2", "b3"}  # GRPO keeps to the originals
    # split_holdout keeps a variant with its image and never gives variants to GRPO
    from types import SimpleNamespace

    cases = [SimpleNamespace(id=f"c{i}{t}", image_key=f"/d/s/images/im{i}.png{t}")
             for i in range(30) for t in ("", f"{AUG_TAG}1")]
    sft, grpo = split_holdout(cases, 0.3)  # type: ignore[arg-type]
    assert grpo and all(AUG_TAG not in c.image_key for c in grpo)
    held = {c.image_key for c in grpo}
    assert all(c.image_key.split("#")[0] not in held for c in sft)
    assert all(AUG_TAG not in c.image_key for c in split_holdout(cases, 0.0)[1])
    with pytest.raises(PolicyTrainError, match="augment"):
        train_policy(_cfg(tiny_data, run, stage="sft", augment=-1))


def test_encoding_progress_is_logged_and_the_cache_reused(tiny_data: Path, tmp_path: Path) -> None:
    from ibisagent.segmenters.base import SegmenterUnavailable, create_segmenter

    try:
        create_segmenter("litemedsam-click")
    except (KeyError, SegmenterUnavailable) as exc:
        pytest.skip(f"litemedsam-click unavailable: {exc}")
    cache = tmp_path / "emb"
    kw = dict(segmenter="litemedsam-click", cache_dir=str(cache), max_cases=1, sft_steps=1, rollout_clicks=1,
              augment=1, threads=2)
    run1, run2 = tmp_path / "r1", tmp_path / "r2"
    train_policy(_cfg(tiny_data, run1, **kw))
    log1 = (run1 / "train.log").read_text()
    assert "encoding images: 1 done" in log1
    assert len(list(cache.rglob("*.npy"))) + len(list(cache.rglob("*.npz"))) == 3  # image, mirrored, one variant
    train_policy(_cfg(tiny_data, run2, **kw))
    assert "encoding images" not in (run2 / "train.log").read_text()  # all three read back from the disk cache


def test_variants_share_their_originals_sampling_weight() -> None:
    from types import SimpleNamespace

    from ibisagent.training.policy import AUG_TAG, case_weights

    plain = [SimpleNamespace(id="a"), SimpleNamespace(id="b")]
    assert case_weights(plain) is None  # uniform sampling, as without --augment
    cases = plain + [SimpleNamespace(id=f"b{AUG_TAG}1"), SimpleNamespace(id=f"b{AUG_TAG}2"),
                     SimpleNamespace(id="vol#z3")]
    w = case_weights(cases)  # type: ignore[arg-type]
    assert w is not None
    np.testing.assert_allclose(w, [1 / 3, 1 / 9, 1 / 9, 1 / 9, 1 / 3])


def test_sample_temperature_balances_datasets_and_objects() -> None:
    from types import SimpleNamespace

    from ibisagent.training.policy import PolicyTrainError, case_weights

    cases = [SimpleNamespace(id=f"a{i}", source="big") for i in range(90)]
    cases += [SimpleNamespace(id=f"b{i}", source="small") for i in range(10)]
    objs = ["liver"] * 80 + ["spleen"] * 10 + ["lesion"] * 10
    assert case_weights(cases, 1.0, objs) is None  # every mask alike, as before
    w = case_weights(cases, 0.5, objs)
    assert w is not None
    np.testing.assert_allclose(w.sum(), 1.0)
    p_small = w[90:].sum()
    np.testing.assert_allclose(p_small, 10**0.5 / (90**0.5 + 10**0.5))  # square-root sampling over datasets
    p_liver, p_spleen = w[:80].sum(), w[80:90].sum()
    np.testing.assert_allclose(p_liver / p_spleen, (80 / 10) ** 0.5)  # and over objects within a dataset
    w0 = case_weights(cases, 0.0, objs)
    np.testing.assert_allclose([w0[:80].sum(), w0[80:90].sum(), w0[90:].sum()], [0.25, 0.25, 0.5])
    with pytest.raises(PolicyTrainError):
        case_weights(cases, -1.0, objs)


def test_query_variants_keep_the_side_and_the_query_first() -> None:
    from ibisagent.queries import mirror_safe, query_variants

    v = query_variants("the left lung in this chest X-ray", "left lung", "X-ray")
    assert v[0] == "the left lung in this chest X-ray" and "left lung" in v and len(v) == len(set(v)) >= 5
    assert all(not mirror_safe(q) for q in v)  # every wording names the side: never mirrored in training
    assert "the optic cup in this fundus image" in query_variants("the optic cup", "optic cup", "fundus")
    assert query_variants("the polyp", "") == ["the polyp"]


def test_query_variants_reach_the_cases_and_a_balanced_run_trains(tiny_data: Path, tmp_path: Path) -> None:
    from ibisagent.training.policy import _Backend, _load_cases

    texts: dict[str, int] = {}
    cases = _load_cases(_cfg(tiny_data, tmp_path / "r0", query_variants=True), "train", _Backend("fake", "", ""),
                        texts, flip=False)
    assert cases and all(c.alt_texts for c in cases) and all(c.object == "blob" for c in cases)
    wording = {i: q for q, i in texts.items()}
    assert {wording[i] for i in cases[0].alt_texts} >= {"the blob", "blob", "segment the blob"}
    plain: dict[str, int] = {}
    assert all(not c.alt_texts for c in _load_cases(_cfg(tiny_data, tmp_path / "r1"), "train",
                                                    _Backend("fake", "", ""), plain, flip=False))
    out = train_policy(_cfg(tiny_data, tmp_path / "r2", stage="sft", query_variants=True, sample_temperature=0.5))
    assert out.is_file()


def test_sft_and_grpo_are_reproducible_from_the_seed(tiny_data: Path, tmp_path: Path) -> None:
    """Same config, same seed -> the same weights and the same logs (bar wall time): what lets a refactor of the
    trainers be checked for no behaviour change, and a model card's command reproduce its weights."""
    from safetensors.torch import load_file

    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        train_policy(_cfg(tiny_data, run, stage="all", sft_steps=2, grpo_iters=1, dagger_rounds=1))
    for name in ("sft.safetensors", "w.safetensors"):
        a, b = (load_file(str(run / name)) for run in runs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("sft_log.csv", "grpo_steps.csv", "grpo_iters.csv"):
        a, b = ([{k: v for k, v in r.items() if k != "elapsed_s"} for r in _rows(run / name)] for run in runs)
        assert a and a == b, name
