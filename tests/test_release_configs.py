"""The release-named training configs (configs/llamafactory/release_sft_lora.yaml, configs/verl/release_grpo.yaml):
their values are the release's training_scripts (pinned here), they fit our exports, and our verl launcher runs
them (with ``python3`` replaced by a recorder, so neither verl nor a GPU is needed)."""

from __future__ import annotations

import inspect
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

_ROOT = Path(__file__).resolve().parent.parent
_LF = _ROOT / "configs" / "llamafactory"
_VERL = _ROOT / "configs" / "verl"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_release_sft_values():
    """training_scripts/qwen2_5vl_lora_sft.yaml of the release (commit 13f6fff)."""
    cfg = _load(_LF / "release_sft_lora.yaml")
    expected = {
        "stage": "sft", "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "freeze_vision_tower": True,
        "template": "qwen2_vl", "cutoff_len": 2048, "image_max_pixels": 262144, "video_max_pixels": 16384,
        "max_samples": 100000, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
        "learning_rate": 3.0e-4, "num_train_epochs": 32.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
        "bf16": True, "val_size": 0.05, "eval_strategy": "steps", "eval_steps": 50, "save_steps": 500,
        "report_to": "tensorboard",
    }
    assert {k: cfg.get(k) for k in expected} == expected
    # keys the release leaves to LLaMA-Factory's defaults stay unset
    for key in ("lora_alpha", "lora_dropout", "freeze_multi_modal_projector", "image_min_pixels"):
        assert key not in cfg, key


def test_release_sft_fits_our_export_and_differs_from_ours():
    from ibisagent.exports.llamafactory import export_llamafactory

    cfg = _load(_LF / "release_sft_lora.yaml")
    assert cfg["dataset"] == inspect.signature(export_llamafactory).parameters["name"].default
    assert cfg["dataset_dir"] == "exports/llamafactory"
    ours = _load(_LF / "ibisagent_sft_lora.yaml")
    assert ours["lora_rank"] != cfg["lora_rank"] and ours["cutoff_len"] != cfg["cutoff_len"]


def test_release_grpo_values():
    """training_scripts/grpo.sh of the release (commit 60fbe31)."""
    cfg = _load(_VERL / "release_grpo.yaml")
    assert cfg["defaults"] == ["ppo_trainer", "_self_"]
    alg, data, arr, tr = cfg["algorithm"], cfg["data"], cfg["actor_rollout_ref"], cfg["trainer"]
    assert alg == {"adv_estimator": "grpo", "use_kl_in_reward": False}
    assert (data["train_batch_size"], data["max_prompt_length"], data["max_response_length"]) == (256, 30000, 2768)
    assert data["image_key"] == "images" and data["truncation"] == "error"
    actor = arr["actor"]
    assert actor["optim"]["lr"] == pytest.approx(1e-6)
    assert (actor["ppo_mini_batch_size"], actor["ppo_micro_batch_size_per_gpu"]) == (128, 16)
    assert actor["use_kl_loss"] is False and actor["kl_loss_coef"] == 0.0 and actor["entropy_coeff"] == 0
    ro = arr["rollout"]
    assert (ro["name"], ro["n"], ro["tensor_model_parallel_size"], ro["gpu_memory_utilization"]) == ("vllm", 4, 2, 0.8)
    assert ro["engine_kwargs"]["vllm"]["disable_mm_preprocessor_cache"] is True
    assert arr["ref"]["fsdp_config"]["param_offload"] is True
    assert (tr["total_epochs"], tr["n_gpus_per_node"], tr["save_freq"], tr["test_freq"]) == (12, 8, 40, 8)


def _recording_python(tmp_path: Path) -> tuple[Path, Path]:
    """A ``python3`` on PATH that records the verl and preflight calls and runs everything else with this Python."""
    bindir, log = tmp_path / "bin", tmp_path / "calls.log"
    bindir.mkdir()
    shim = bindir / "python3"
    shim.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == "-m" || "$1" == *check_reward.py ]]; then echo "$*" >> "{log}"; exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return bindir, log


@pytest.mark.parametrize("config", [None, "release_grpo"])
def test_launcher_runs_the_chosen_config(tmp_path, config):
    bindir, log = _recording_python(tmp_path)
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    train, val = tmp_path / "train.parquet", tmp_path / "val.parquet"
    train.write_bytes(b"x")
    val.write_bytes(b"x")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(_ROOT / "src"),
           "MODEL": str(model), "TRAIN": str(train), "VAL": str(val)}
    if config:
        env["CONFIG"] = config
    res = subprocess.run(["bash", str(_VERL / "run_grpo.sh"), "trainer.total_epochs=1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert "check_reward.py" in calls[0]
    verl = calls[1]
    assert verl.startswith("-m verl.trainer.main_ppo")
    assert f"--config-name {config or 'ibisagent_grpo'} " in verl
    assert "compute_score" in verl and f"actor_rollout_ref.model.path={model}" in verl
    assert verl.endswith("trainer.total_epochs=1")


def test_launcher_refuses_an_unknown_config(tmp_path):
    bindir, log = _recording_python(tmp_path)
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "t.parquet").write_bytes(b"x")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(_ROOT / "src"),
           "MODEL": str(model), "TRAIN": str(tmp_path / "t.parquet"), "VAL": str(tmp_path / "t.parquet"),
           "CONFIG": "paper_grpo"}
    res = subprocess.run(["bash", str(_VERL / "run_grpo.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no config" in res.stderr
    assert not log.exists()
