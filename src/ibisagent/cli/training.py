"""Training subcommands: ``train-segmenter`` (click fine-tuning of LiteMedSAM), ``train-policy`` (the compact CPU
policy) and ``train-llm-sft`` / ``train-llm-grpo`` (the multimodal-LLM policy with TRL).

Every field of the run's config dataclass is a flag (:func:`ibisagent.cli.util.add_dataclass_args`:
``--learning-rate``, ``--lora/--no-lora``, ...). For the LLM commands ``--config run.yaml`` supplies defaults and
flags override them::

    ibisagent train-llm-sft --model-path ckpt/Qwen2.5-VL-7B-Instruct --dataset exports/sft_hf --output-dir runs/sft
    ibisagent train-llm-grpo --config configs/grpo_tiny.yaml --steps 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ibisagent.cli.util import add_dataclass_args, dataclass_from_args

__all__ = ["add_parser", "config_from_args"]


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Dataclass config from ``--config`` YAML (if any) overridden by the flags that were given."""
    return dataclass_from_args(cls, args)


# ----------------------------------------------------------------------------------------------------------------
# train-segmenter / train-policy
# ----------------------------------------------------------------------------------------------------------------

def _run_segmenter(args: argparse.Namespace) -> int:
    from ibisagent.training.segmenter import SegmenterTrainConfig, train_segmenter

    path = train_segmenter(dataclass_from_args(SegmenterTrainConfig, args))
    print(path)
    return 0


def _run_policy(args: argparse.Namespace) -> int:
    from ibisagent.training.policy import PolicyTrainConfig, PolicyTrainError, train_policy

    try:
        train_policy(dataclass_from_args(PolicyTrainConfig, args))
    except (PolicyTrainError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_segmenter_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train-segmenter`` subcommand (sets ``func``)."""
    from ibisagent.training import segmenter
    from ibisagent.training.segmenter import SegmenterTrainConfig

    p = subparsers.add_parser(
        "train-segmenter",
        help="fine-tune LiteMedSAM's prompt encoder + mask decoder for clicks (cached embeddings)",
        description=segmenter.__doc__.split("\n\n")[0] if segmenter.__doc__ else None,
    )
    add_dataclass_args(p, SegmenterTrainConfig)
    p.set_defaults(func=_run_segmenter)
    return p


def add_policy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train-policy`` subcommand (sets ``func``)."""
    from ibisagent.training.policy import PolicyTrainConfig

    p = subparsers.add_parser(
        "train-policy",
        help="train the compact CPU policy (SFT on oracle trajectories, then multi-turn GRPO)",
        description="Train the compact CPU policy: stage 1 imitates oracle, reflective and DAgger trajectories; "
                    "stage 2 runs GRPO on whole episodes through the segmenter with the five reference rewards. "
                    "Writes the weights (default: the package's weights/compact_policy.safetensors), CSV logs and "
                    "PNG curves in --run-dir.",
    )
    add_dataclass_args(p, PolicyTrainConfig)
    p.set_defaults(func=_run_policy)
    return p


# ----------------------------------------------------------------------------------------------------------------
# train-llm-sft / train-llm-grpo
# ----------------------------------------------------------------------------------------------------------------

def _run_sft(args: argparse.Namespace) -> int:
    from ibisagent.policies.base import PolicyError
    from ibisagent.training.trl_sft import SFTRunConfig, merge_lora, run_sft

    try:
        cfg = config_from_args(SFTRunConfig, args)
        result = run_sft(cfg)
        print(f"SFT finished: {result.steps} steps, last loss "
              f"{result.losses[-1] if result.losses else float('nan'):.4f}, saved to {result.output_dir}")
        if cfg.lora and args.merge:
            merged = merge_lora(cfg.model_path, result.output_dir, Path(result.output_dir) / "merged", cfg.dtype)
            print(f"merged model (loads with --policy hf and vLLM): {merged}")
    except (ValueError, PolicyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_grpo(args: argparse.Namespace) -> int:
    from ibisagent.policies.base import PolicyError
    from ibisagent.training.trl_grpo import GRPORunConfig, run_grpo

    try:
        cfg = config_from_args(GRPORunConfig, args)
        result = run_grpo(cfg)
    except (ValueError, PolicyError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = result.log[-1] if result.log else {}
    print(f"GRPO finished: {len(result.log)} steps, last reward {last.get('reward/total', float('nan')):.3f}, "
          f"final IoU {last.get('episode/final_iou', float('nan')):.3f}; model and grpo_log.jsonl in "
          f"{result.output_dir}")
    return 0


def add_llm_parsers(subparsers: Any) -> None:
    """Add ``train-llm-sft`` and ``train-llm-grpo`` to the ``ibisagent`` CLI."""
    from ibisagent.training.trl_grpo import GRPORunConfig
    from ibisagent.training.trl_sft import SFTRunConfig

    sft = subparsers.add_parser(
        "train-llm-sft", help="supervised fine-tuning of a Qwen2.5-VL policy on exported trajectories (TRL)",
        description="Cold-start SFT with TRL's SFTTrainer on a prompt/completion/images dataset "
                    "(ibisagent export --format hf). Loss on the replies only; LoRA by default. "
                    "See docs/full_scale.md.")
    sft.add_argument("--config", help="YAML file with options (flags override it)")
    sft.add_argument("--merge", action="store_true",
                     help="after LoRA training, also write the merged model to OUTPUT_DIR/merged")
    add_dataclass_args(sft, SFTRunConfig, from_file=True, required=("model_path", "dataset", "output_dir"))
    sft.set_defaults(func=_run_sft)

    grpo = subparsers.add_parser(
        "train-llm-grpo", help="GRPO of a Qwen2.5-VL policy with the five reference rewards",
        description="--mode episodes (default): samples groups of whole multi-turn episodes per case (--data, a "
                    "manifest root) through the segmentation environment, scores every turn with ibisagent.rewards "
                    "and updates the policy with a clipped, KL-regularized group-relative policy gradient. "
                    "--mode steps: trl.GRPOTrainer on the per-step prompts of an `ibisagent export --format hf` "
                    "folder (--dataset), rewards from ibisagent.rewards.trl. See docs/full_scale.md.")
    grpo.add_argument("--config", help="YAML file with options (flags override it)")
    add_dataclass_args(grpo, GRPORunConfig, from_file=True, required=("model_path", "output_dir"))
    grpo.set_defaults(func=_run_grpo)


def add_parser(subparsers: Any) -> None:
    """Add every training subcommand."""
    add_segmenter_parser(subparsers)
    add_policy_parser(subparsers)
    add_llm_parsers(subparsers)
