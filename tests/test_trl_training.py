"""SFT (TRL) and multi-turn GRPO on a tiny real Qwen2.5-VL, on CPU in seconds; plus their CLI."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from PIL import Image  # noqa: E402

from ibisagent.agent import Agent  # noqa: E402
from ibisagent.cli import training as llm_cli  # noqa: E402
from ibisagent.env import EnvConfig, SegmentationEnv  # noqa: E402
from ibisagent.policies import PolicyError, create_policy  # noqa: E402
from ibisagent.policies.hf import check_checkpoint_dir, load_vl_checkpoint  # noqa: E402
from ibisagent.rewards import COMPONENTS, RewardBreakdown  # noqa: E402
from ibisagent.segmenters import create_segmenter  # noqa: E402
from ibisagent.testing import oracle_sft_dataset, shared_tiny_qwen_vl, synthetic_cases  # noqa: E402
from ibisagent.testing.tiny_agent import shared_taught_tiny_qwen_vl, write_short_prompts  # noqa: E402
from ibisagent.training.trl_grpo import (  # noqa: E402
    EpisodeRollout,
    GRPOCase,
    GRPOConfigError,
    GRPORunConfig,
    TurnSample,
    _turn_loss,
    completion_logprobs,
    compute_advantages,
    rollout_episode,
    run_grpo,
)
from ibisagent.training.trl_sft import (  # noqa: E402
    SFTDatasetError,
    SFTRunConfig,
    load_sft_dataset,
    merge_lora,
    normalize_example,
    run_sft,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_short_prompts(tmp_path_factory.mktemp("prompts") / "short.json")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, prompts):
    """Oracle trajectories on the fake segmenter, saved in the export layout (prompt/completion/images)."""
    out = tmp_path_factory.mktemp("data") / "sft"
    return oracle_sft_dataset(out, synthetic_cases(3, seed=7), prompts=str(prompts), reasoning="Click.")


# ------------------------------------------------------------------------------------------------------------------
# SFT
# ------------------------------------------------------------------------------------------------------------------

def test_sft_dataset_layout(sft_data):
    """Same layout as ``ibisagent export --format hf``: the export folder holds ``dataset/`` and the images."""
    assert (sft_data / "dataset").is_dir()
    ds = load_sft_dataset(sft_data)
    row = ds[0]
    assert {"prompt", "completion", "images", "ground_truth", "step"} <= set(ds.column_names)
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["completion"][0]["role"] == "assistant"
    assert "<action>" in row["completion"][0]["content"][0]["text"]
    assert len(row["images"]) == 1 and os.path.isfile(row["images"][0])
    ex = normalize_example(row)
    assert ex["images"][0].mode == "RGB" and ex["prompt"][1]["content"][0] == {"type": "image"}


def test_sft_full_finetune_learns_and_loads(sft_data, tmp_path):
    out = tmp_path / "sft"
    res = run_sft(SFTRunConfig(model_path=str(shared_tiny_qwen_vl()), dataset=str(sft_data), output_dir=str(out),
                               max_steps=5, batch_size=2, grad_accum=1, lora=False, learning_rate=2e-3,
                               save_steps=0, device="cpu"))
    assert res.steps == 5 and len(res.losses) == 5
    assert all(math.isfinite(v) for v in res.losses)
    assert res.losses[-1] < res.losses[0]
    # the result is a complete standard checkpoint that the hf policy plays episodes with
    check_checkpoint_dir(out)
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    case = synthetic_cases(1, seed=11)[0]
    ep = Agent(create_policy("hf", model_path=str(out), max_new_tokens=16), "fake").segment(case.image, case.query,
                                                                                          case.gt)
    assert ep.stop_reason is not None and len(ep.steps) >= 1


def test_sft_lora_and_merge(sft_data, tmp_path):
    out = tmp_path / "lora"
    res = run_sft(SFTRunConfig(model_path=str(shared_tiny_qwen_vl()), dataset=str(sft_data), output_dir=str(out),
                               max_steps=2, batch_size=2, grad_accum=1, lora=True, lora_r=4, learning_rate=1e-3,
                               save_steps=0, device="cpu"))
    assert all(math.isfinite(v) for v in res.losses)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "language_model" in str(cfg["target_modules"])  # the vision tower is left alone
    with pytest.raises(PolicyError, match="LoRA adapter"):
        check_checkpoint_dir(out)
    merged = merge_lora(shared_tiny_qwen_vl(), out, tmp_path / "merged")
    vl = load_vl_checkpoint(merged)
    assert vl.model.config.model_type == "qwen2_5_vl"


def test_sft_bad_dataset(tmp_path):
    with pytest.raises(SFTDatasetError, match="does not exist"):
        load_sft_dataset(tmp_path / "missing")
    from datasets import Dataset

    Dataset.from_list([{"text": "x"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(SFTDatasetError, match="prompt"):
        load_sft_dataset(tmp_path / "bad")


def test_normalize_example_drops_arrow_nulls():
    """Arrow unifies the keys of content parts: a text part can come back with ``image: None``, which the
    Qwen2.5-VL template would render as an image. Normalization removes such keys."""
    row = {
        "prompt": [{"role": "user", "content": [{"type": "image", "text": None, "image": None},
                                                 {"type": "text", "text": "Segment it.", "image": None}]}],
        "completion": [{"role": "assistant", "content": "Terminate"}],
        "images": [np.zeros((8, 8, 3), np.uint8)],
    }
    out = normalize_example(row)
    assert out["prompt"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Segment it."}]
    assert out["images"][0].mode == "RGB"


# ------------------------------------------------------------------------------------------------------------------
# GRPO
# ------------------------------------------------------------------------------------------------------------------

def _rb(total: float) -> RewardBreakdown:
    return RewardBreakdown(format=1, answer=0, placement=0, progress=0, length=1, total=total)


def _ep(totals: list[float]) -> EpisodeRollout:
    return EpisodeRollout("c", [TurnSample({}, None, "", _rb(t)) for t in totals], "terminate", 0.5)


def test_group_advantages():
    group = [_ep([1.0, 0.0]), _ep([0.2]), _ep([0.8, 0.8])]
    compute_advantages(group, "episode")
    means = [0.5, 0.2, 0.8]
    sd = float(np.std(means))
    for ep, m in zip(group, means):
        assert all(t.advantage == pytest.approx((m - np.mean(means)) / (sd + 1e-4)) for t in ep.turns)
    same = [_ep([0.4]), _ep([0.4])]
    compute_advantages(same, "episode")
    assert all(t.advantage == 0.0 for ep in same for t in ep.turns)
    compute_advantages(group, "turn", gamma=1.0)
    togo = [1.0, 0.0, 0.2, 1.6, 0.8]
    flat = [t.advantage for ep in group for t in ep.turns]
    expected = (np.array(togo) - np.mean(togo)) / (np.std(togo) + 1e-4)
    assert np.allclose(flat, expected)


def test_grpo_config_validation():
    with pytest.raises(GRPOConfigError, match="group_size"):
        GRPORunConfig(model_path="x", output_dir="y", group_size=1).validate()
    with pytest.raises(GRPOConfigError, match="temperature"):
        GRPORunConfig(model_path="x", output_dir="y", temperature=0).validate()


def test_policy_gradient_direction():
    """A positive advantage raises the log-probability of the sampled reply, a negative one lowers it."""
    taught = shared_taught_tiny_qwen_vl()
    cfg = GRPORunConfig(model_path=str(taught.checkpoint), output_dir="unused", max_new_tokens=24, beta=0.0)
    case = GRPOCase(taught.case.image, taught.case.gt, taught.case.query)
    for sign in (1.0, -1.0):
        vl = load_vl_checkpoint(taught.checkpoint)
        env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=2, prompts=str(taught.prompts)))
        turn = rollout_episode(vl.model, vl.processor, env, case, cfg, seed=1).turns[0]
        turn.advantage = sign
        with torch.no_grad():
            before = completion_logprobs(vl.model, turn.inputs, turn.completion_ids).sum().item()
        opt = torch.optim.SGD(vl.model.parameters(), lr=0.05)
        loss, info = _turn_loss(vl.model, None, turn, cfg)
        loss.backward()
        opt.step()
        with torch.no_grad():
            after = completion_logprobs(vl.model, turn.inputs, turn.completion_ids).sum().item()
        assert (after - before) * sign > 0


@pytest.mark.parametrize("lora", [False, True])
def test_grpo_multi_turn_steps(tmp_path, lora):
    """A few GRPO steps from the taught tiny model: whole episodes, five rewards logged, finite loss, updates."""
    taught = shared_taught_tiny_qwen_vl()
    cases = [GRPOCase(taught.case.image, taught.case.gt, taught.case.query, "taught")]
    out = tmp_path / "grpo"
    cfg = GRPORunConfig(model_path=str(taught.checkpoint), output_dir=str(out), segmenter="fake",
                        prompts=str(taught.prompts), steps=2, cases_per_step=1, group_size=4, max_turns=3,
                        max_new_tokens=24, learning_rate=1e-3, beta=0.04, temperature=1.0, lora=lora, seed=0,
                        device="cpu")
    res = run_grpo(cfg, cases)
    assert len(res.log) == 2
    for m in res.log:
        for k in (*COMPONENTS, "total"):
            assert math.isfinite(m[f"reward/{k}"])
        assert math.isfinite(m["loss"]) and math.isfinite(m["kl"]) and m["kl"] >= 0
        assert sum(m["episode/stop_reasons"].values()) == 4
        assert 1 <= m["episode/turns"] <= 3
    # the taught model's sampled episodes differ (some click then stop, some break the format): a learning signal
    assert any(m["reward/total_std"] > 0 and (m["grad_norm"] or 0) > 0 for m in res.log)
    assert any("terminate" in m["episode/stop_reasons"] for m in res.log)
    lines = (out / "grpo_log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["step"] == 1
    if lora:
        assert (out / "adapter_config.json").is_file()
    else:
        check_checkpoint_dir(out)
        from safetensors.torch import load_file

        new = load_file(str(out / "model.safetensors"))
        old = load_file(str(taught.checkpoint / "model.safetensors"))
        changed = [k for k in old if "visual" not in k and not torch.equal(old[k], new[k])]
        frozen = [k for k in old if "visual" in k and not torch.equal(old[k], new[k])]
        assert changed and not frozen


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ibisagent")
    llm_cli.add_parser(p.add_subparsers(dest="command"))
    return p


def _manifest(root, cases) -> None:
    root.mkdir(parents=True)
    rows = []
    for i, c in enumerate(cases):
        Image.fromarray(c.image).save(root / f"img{i}.png")
        Image.fromarray(c.gt.astype(np.uint8) * 255).save(root / f"mask{i}.png")
        rows.append({"id": f"c{i}", "image": f"img{i}.png", "mask": f"mask{i}.png", "query": c.query})
    (root / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_cli_grpo_with_yaml_config(tmp_path, capsys):
    taught = shared_taught_tiny_qwen_vl()
    data = tmp_path / "data"
    _manifest(data, [taught.case])
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(f"model_path: {taught.checkpoint}\nsegmenter: fake\nsplit: all\nprompts: {taught.prompts}\n"
                   "group_size: 2\ncases_per_step: 1\nmax_turns: 2\nmax_new_tokens: 20\nsteps: 5\n")
    args = _parser().parse_args(["train-llm-grpo", "--config", str(cfg), "--data", str(data), "--output-dir",
                                 str(tmp_path / "out"), "--steps", "1", "--no-history"])
    assert args.func(args) == 0
    assert "GRPO finished: 1 steps" in capsys.readouterr().out  # the flag overrides the YAML's 5 steps
    assert len((tmp_path / "out" / "grpo_log.jsonl").read_text().splitlines()) == 1


def test_cli_bad_input_exits_2(tmp_path, capsys):
    p = _parser()
    args = p.parse_args(["train-llm-sft", "--model-path", str(tmp_path / "none"), "--dataset", str(tmp_path),
                         "--output-dir", str(tmp_path / "o")])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    args = p.parse_args(["train-llm-grpo", "--output-dir", str(tmp_path / "o")])
    assert args.func(args) == 2
    assert "--model-path" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_path: x\noutput_dir: y\nnot_an_option: 1\n")
    args = p.parse_args(["train-llm-grpo", "--config", str(bad)])
    assert args.func(args) == 2
    assert "not_an_option" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# GPU-scale configurations (checked here for consistency; they run on GPU machines)
# ------------------------------------------------------------------------------------------------------------------

_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("name", "cls"), [("sft_lora.yaml", "SFTRunConfig"), ("grpo_multiturn.yaml", "GRPORunConfig"),
                                           ("grpo_steps.yaml", "GRPORunConfig")])
def test_trl_yaml_configs_load(name, cls):
    from ibisagent.training import trl_grpo, trl_sft

    klass = getattr(trl_sft, cls, None) or getattr(trl_grpo, cls)
    cfg = llm_cli.config_from_args(klass, argparse.Namespace(config=str(_ROOT / "configs" / "trl" / name)))
    assert cfg.model_path and cfg.output_dir
    if cls == "GRPORunConfig":
        cfg.validate()
        assert cfg.group_size == 4 and cfg.learning_rate == pytest.approx(1e-6)


def test_llamafactory_config_matches_export():
    import inspect

    import yaml

    from ibisagent.exports.llamafactory import export_llamafactory

    cfg = yaml.safe_load((_ROOT / "configs" / "llamafactory" / "ibisagent_sft_lora.yaml").read_text())
    default_name = inspect.signature(export_llamafactory).parameters["name"].default
    assert cfg["dataset"] == default_name
    assert cfg["template"] == "qwen2_vl" and cfg["stage"] == "sft" and cfg["finetuning_type"] == "lora"
    assert cfg["image_max_pixels"] == 262144


def test_verl_config_and_launcher():
    import subprocess

    import yaml

    cfg = yaml.safe_load((_ROOT / "configs" / "verl" / "ibisagent_grpo.yaml").read_text())
    assert cfg["algorithm"]["adv_estimator"] == "grpo"
    assert cfg["actor_rollout_ref"]["rollout"]["n"] == 4
    assert cfg["data"]["image_key"] == "images" and cfg["reward_model"]["reward_manager"] == "naive"
    script = _ROOT / "configs" / "verl" / "run_grpo.sh"
    text = script.read_text()
    assert "ibisagent.rewards.verl" in text and "compute_score" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_verl_reward_preflight(tmp_path, sft_data):
    """check_reward.py scores rows of the verl export layout in-process with the reward verl calls."""
    import importlib.util

    import pandas as pd

    from ibisagent.protocol import parse_action

    ds = load_sft_dataset(sft_data)
    rows = []
    for r in ds:
        reply = r["completion"][0]["content"][0]["text"]
        rows.append({
            "data_source": "ibisagent/tiny",
            "prompt": [{"role": "system", "content": r["prompt"][0]["content"][0]["text"]},
                       {"role": "user", "content": "<image>" + r["prompt"][1]["content"][1]["text"]}],
            "images": [{"image": r["images"][0]}], "ability": "medical_segmentation",
            "reward_model": {"style": "rule", "ground_truth": r["ground_truth"]},
            "extra_info": {"image_path": r["image_path"], "points": r["points"], "labels": r["labels"],
                           "box": None, "step": r["step"], "prev_mask_rle": r["prev_mask_rle"],
                           "segmenter": "fake", "grammar": "reference", "case_id": r["case_id"],
                           "oracle_action": parse_action(reply).text()},
        })
    pq = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(pq, index=False)
    spec = importlib.util.spec_from_file_location("check_reward", _ROOT / "configs" / "verl" / "check_reward.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(pq), "--rows", "4"]) == 0
    assert mod.main([str(tmp_path / "missing.parquet")]) == 2


def test_grpo_steps_mode_with_trl_grpotrainer(tmp_path):
    """Single-turn GRPO with trl.GRPOTrainer on the hf export layout; ibisagent's TRL reward functions apply each
    sampled reply through the segmenter. Each component is logged; the loss is finite."""
    taught = shared_taught_tiny_qwen_vl()
    export = oracle_sft_dataset(tmp_path / "export", [taught.case], prompts=str(taught.prompts),
                                reasoning="Click.")
    out = tmp_path / "grpo_steps"
    cfg = GRPORunConfig(model_path=str(taught.checkpoint), output_dir=str(out), mode="steps", dataset=str(export),
                        segmenter="fake", steps=2, cases_per_step=1, group_size=4, max_new_tokens=24,
                        learning_rate=1e-3, beta=0.04, device="cpu", seed=0)
    res = run_grpo(cfg)
    assert len(res.log) == 2
    for m in res.log:
        assert math.isfinite(m["loss"])
        for c in COMPONENTS:
            assert math.isfinite(m[f"reward/{c}"])
    # the placement/answer rewards need the segmenter: they are real numbers, not "not applicable"
    assert any(m["reward/answer"] > 0 for m in res.log)
    check_checkpoint_dir(out)
    with pytest.raises(GRPOConfigError, match="dataset"):
        run_grpo(GRPORunConfig(model_path=str(taught.checkpoint), output_dir=str(out), mode="steps"))


def test_sft_collator_masks_the_prompt(sft_data):
    """Completion-only loss: labels are -100 on the prompt (system, user turn, image tokens) and on padding; the
    supervised tokens are exactly the reply and its end-of-turn token."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from ibisagent.training.trl_sft import _NormalizingCollator

    vl = load_vl_checkpoint(shared_tiny_qwen_vl())
    collate = _NormalizingCollator(DataCollatorForVisionLanguageModeling(processor=vl.processor,
                                                                         completion_only_loss=True))
    rows = [load_sft_dataset(sft_data)[i] for i in range(2)]
    batch = collate(rows)
    tok = vl.tokenizer
    assert int((batch["input_ids"] == vl.processor.image_token_id).sum()) > 0
    for i, row in enumerate(rows):
        reply = row["completion"][0]["content"][0]["text"]
        supervised = batch["input_ids"][i][batch["labels"][i] != -100]
        text = tok.decode(supervised)
        assert text.startswith(reply) and "<|im_start|>" not in text and "Segment" not in text
        assert (batch["labels"][i][batch["input_ids"][i] == vl.processor.image_token_id] == -100).all()
