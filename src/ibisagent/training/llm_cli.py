"""CLI subcommands for training the multimodal-LLM policy: ``train-llm-sft`` and ``train-llm-grpo``.

Every option of :class:`~ibisagent.training.trl_sft.SFTRunConfig` / :class:`~ibisagent.training.trl_grpo.GRPORunConfig`
is a flag (``--learning-rate``, ``--lora/--no-lora``, ...); ``--config run.yaml`` supplies defaults and flags
override them::

    ibisagent train-llm-sft --model-path ckpt/Qwen2.5-VL-7B-Instruct --dataset exports/sft_hf --output-dir runs/sft
    ibisagent train-llm-grpo --config configs/grpo_tiny.yaml --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "config_from_args"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type, required: tuple[str, ...]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            help_text += f" (default: {f.default})"
        if f.name in required:
            help_text += " [required, here or in --config]"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(_flag(f.name), nargs="+", metavar="NAME", **kw)
        elif tp is dict or typing.get_origin(tp) is dict:
            parser.add_argument(_flag(f.name), type=json.loads, metavar="JSON", **kw)
        elif tp in (int, float, str):
            parser.add_argument(_flag(f.name), type=tp, metavar=f.name.upper(), **kw)
        else:
            parser.add_argument(_flag(f.name), metavar=f.name.upper(), **kw)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Dataclass config from ``--config`` YAML (if any) overridden by the flags that were given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_load_yaml(args.config))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown option(s) in {args.config}: {unknown}; known: {sorted(names)}")
    values.update({k: v for k, v in vars(args).items() if k in names})
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join(_flag(m) for m in missing)}")
    if "lora_targets" in values and isinstance(values["lora_targets"], list):
        values["lora_targets"] = tuple(values["lora_targets"])
    return cls(**values)


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


def add_parser(subparsers: Any) -> None:
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
    _add_dataclass_args(sft, SFTRunConfig, required=("model_path", "dataset", "output_dir"))
    sft.set_defaults(func=_run_sft)

    grpo = subparsers.add_parser(
        "train-llm-grpo", help="GRPO of a Qwen2.5-VL policy with the five reference rewards",
        description="--mode episodes (default): samples groups of whole multi-turn episodes per case (--data, a "
                    "manifest root) through the segmentation environment, scores every turn with ibisagent.rewards "
                    "and updates the policy with a clipped, KL-regularized group-relative policy gradient. "
                    "--mode steps: trl.GRPOTrainer on the per-step prompts of an `ibisagent export --format hf` "
                    "folder (--dataset), rewards from ibisagent.rewards.trl. See docs/full_scale.md.")
    grpo.add_argument("--config", help="YAML file with options (flags override it)")
    _add_dataclass_args(grpo, GRPORunConfig, required=("model_path", "output_dir"))
    grpo.set_defaults(func=_run_grpo)
