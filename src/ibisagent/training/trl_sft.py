"""Supervised fine-tuning (cold start) of a Qwen2.5-VL policy on exported trajectories, with TRL's ``SFTTrainer``.

Input: a Hugging Face ``datasets`` directory (``save_to_disk``) with one row per agent turn:

* ``prompt``: the chat up to the turn (system + user turn(s)); content as a string or as structured parts
  (``{"type": "image"}`` / ``{"type": "text", "text": ...}``),
* ``completion``: ``[{"role": "assistant", "content": <reply>}]``,
* ``images``: the images of the prompt in order (the overlay of the turn).

The loss covers the completion (the reply) only. ``lora=True`` trains LoRA adapters through peft (the paper's
cold-start recipe); the adapter or the full model is saved to ``output_dir`` with the processor files, so the result
loads with the ``hf`` policy (LoRA: merge first with ``merge_lora``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SFTDatasetError", "SFTRunConfig", "SFTResult", "load_sft_dataset", "merge_lora", "run_sft",
           "normalize_example", "finalize_checkpoint"]

log = logging.getLogger(__name__)


class SFTDatasetError(ValueError):
    """A training dataset that is missing, empty or lacks the prompt/completion/images columns."""


@dataclass
class SFTRunConfig:
    """Options of one SFT run (CLI flags mirror these)."""

    model_path: str = field(metadata={"help": "Qwen2.5-VL checkpoint directory to start from"})
    dataset: str = field(metadata={"help": "datasets directory (save_to_disk) with prompt/completion/images"})
    output_dir: str = field(metadata={"help": "where checkpoints, the final model and logs go"})
    split: str = field(default="train", metadata={"help": "split to use when the dataset is a DatasetDict"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: use epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (1e-4 LoRA, 1e-5 full)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps before the cosine decay"})
    batch_size: int = field(default=1, metadata={"help": "per-device batch size"})
    grad_accum: int = field(default=8, metadata={"help": "gradient accumulation steps"})
    max_length: int | None = field(default=None, metadata={"help": "truncate sequences to this many tokens"})
    lora: bool = field(default=True, metadata={"help": "train LoRA adapters (peft) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        metadata={"help": "module names LoRA adapts (language model only by default)"})
    freeze_vision: bool = field(default=True, metadata={"help": "keep the vision tower frozen (full fine-tune)"})
    max_pixels: int | None = field(default=262_144, metadata={"help": "image resize budget (paper: 262,144)"})
    min_pixels: int | None = field(default=None, metadata={"help": "lower image resize bound"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, auto"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    logging_steps: int = field(default=1, metadata={"help": "log every N steps"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    report_to: str = field(default="none", metadata={"help": "none, tensorboard, wandb"})
    max_rows: int | None = field(default=None, metadata={"help": "use only the first N rows (smoke tests)"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SFTResult:
    output_dir: Path
    steps: int
    losses: list[float]
    train_runtime_s: float


def load_sft_dataset(path: str | Path, split: str = "train", max_rows: int | None = None) -> Any:
    """Load and check a prompt/completion/images dataset saved with ``save_to_disk``."""
    from datasets import Dataset, DatasetDict, load_from_disk

    p = Path(path)
    if not p.exists():
        raise SFTDatasetError(f"dataset directory {p} does not exist; export trajectories first "
                              "(ibisagent export SYNTH_DIR --format hf --out DIR)")
    if (p / "dataset").is_dir():  # the export folder rather than its dataset subfolder
        p = p / "dataset"
    try:
        ds = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as exc:
        raise SFTDatasetError(f"{p} is not a datasets directory saved with save_to_disk: {exc}") from exc
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise SFTDatasetError(f"dataset {p} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    assert isinstance(ds, Dataset)
    missing = [c for c in ("prompt", "completion") if c not in ds.column_names]
    if missing:
        raise SFTDatasetError(f"dataset {p} lacks column(s) {missing}; has {ds.column_names}")
    if "images" not in ds.column_names and "image" not in ds.column_names:
        raise SFTDatasetError(f"dataset {p} has no images/image column; the policy needs the overlay images")
    if len(ds) == 0:
        raise SFTDatasetError(f"dataset {p} is empty")
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    return ds


def _clean_content(content: Any) -> Any:
    """Drop keys that Arrow filled with None (a text part must not carry ``image: None``: the Qwen chat template
    would render it as an image) and turn the ``text``-less image parts into bare placeholders."""
    if isinstance(content, str) or content is None:
        return content
    parts = []
    for part in content:
        clean = {k: v for k, v in dict(part).items() if v is not None}
        if clean.get("type") == "image":
            clean = {"type": "image"}
        parts.append(clean)
    return parts


def _as_pil(image: Any) -> Any:
    """A PIL RGB image from a PIL image, an array, a path (the export stores paths) or a datasets image dict."""
    from PIL import Image

    from ibisagent.policies.hf import to_pil

    if isinstance(image, dict) and ("path" in image or "bytes" in image):
        import io

        image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else image["path"]
    if isinstance(image, str | Path):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except OSError as exc:
            raise SFTDatasetError(f"cannot read image {image}: {exc}") from exc
    if hasattr(image, "convert"):
        return image.convert("RGB")
    return to_pil(np.asarray(image))


def normalize_example(example: dict[str, Any]) -> dict[str, Any]:
    """One dataset row -> what TRL's vision collator expects (PIL images, clean message parts)."""
    out = dict(example)
    single = out.pop("image", None)
    images = out.get("images", [single] if single is not None else [])
    out["images"] = [_as_pil(im) for im in (images or [])]
    for key in ("prompt", "completion"):
        out[key] = [{"role": m["role"], "content": _clean_content(m["content"])} for m in out[key]]
    return out


class _NormalizingCollator:
    """Normalizes rows, then hands them to TRL's vision-language collator (completion-only loss)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.inner([normalize_example(e) for e in examples])


class _LossLog:
    """Collects the training losses reported by the Trainer (for tests and the run summary)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any):
                if logs and "loss" in logs:
                    outer.losses.append(float(logs["loss"]))

        return _CB()


def run_sft(cfg: SFTRunConfig) -> SFTResult:
    """Run SFT with TRL and save the result (adapter or full model + processor files) to ``cfg.output_dir``."""
    import torch
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from ibisagent.policies.hf import load_vl_checkpoint

    ds = load_sft_dataset(cfg.dataset, cfg.split, cfg.max_rows)
    vl = load_vl_checkpoint(cfg.model_path, device=cfg.device, dtype=cfg.dtype, min_pixels=cfg.min_pixels,
                            max_pixels=cfg.max_pixels)
    model, processor = vl.model, vl.processor
    model.train()
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        # Restrict LoRA to the language model: the module names also occur in the vision tower's blocks.
        pattern = r".*language_model.*\.(" + "|".join(cfg.lora_targets) + r")$"
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=pattern, task_type="CAUSAL_LM")
    elif cfg.freeze_vision:
        for name, param in model.named_parameters():
            if ".visual." in f".{name}" or name.startswith("visual") or ".visual" in name:
                param.requires_grad_(False)
    out = Path(cfg.output_dir)
    use_bf16 = vl.dtype == torch.bfloat16
    args = SFTConfig(
        output_dir=str(out), max_steps=cfg.max_steps, num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length, completion_only_loss=True, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_strategy="steps" if cfg.save_steps > 0 else "no", seed=cfg.seed,
        report_to=cfg.report_to, bf16=use_bf16, fp16=False, gradient_checkpointing=cfg.gradient_checkpointing,
        use_cpu=vl.device == "cpu", dataloader_num_workers=0, remove_unused_columns=False,
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
    )
    tok = processor.tokenizer
    model.config.get_text_config().pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    collator = _NormalizingCollator(DataCollatorForVisionLanguageModeling(
        processor=processor, max_length=cfg.max_length, completion_only_loss=True))
    losses = _LossLog()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor,
                         data_collator=collator, peft_config=peft_config, callbacks=[losses.callback()])
    result = trainer.train()
    trainer.save_model(str(out))
    finalize_checkpoint(vl.path, out)
    bad = [v for v in losses.losses if not math.isfinite(v)]
    if bad:
        log.warning("non-finite SFT loss values were logged: %s", bad)
    return SFTResult(out, int(result.global_step), losses.losses, float(result.metrics.get("train_runtime", 0.0)))


def finalize_checkpoint(src: Path, dst: Path) -> None:
    """Make ``dst`` a complete, standard checkpoint: copy the base checkpoint's tokenizer/processor/template files and
    name the standard ``Qwen2_5_VLProcessor`` in ``processor_config.json`` (our image-only loader class is internal),
    so vLLM, LLaMA-Factory and ``AutoProcessor`` load the result."""
    import json
    import shutil

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
             "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
             "chat_template.jinja", "chat_template.json",
             "generation_config.json")
    for n in names:
        if (src / n).is_file() and not (dst / n).exists():
            shutil.copy2(src / n, dst / n)
    pc = dst / "processor_config.json"
    if pc.is_file():
        data = json.loads(pc.read_text())
        if data.get("processor_class") != "Qwen2_5_VLProcessor":
            data["processor_class"] = "Qwen2_5_VLProcessor"
            pc.write_text(json.dumps(data, indent=2))


def merge_lora(base_path: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Merge a LoRA adapter into its base model and write a plain checkpoint the ``hf`` policy (and vLLM) can load."""
    from peft import PeftModel

    from ibisagent.policies.hf import load_vl_checkpoint

    vl = load_vl_checkpoint(base_path, device="cpu", dtype=dtype)
    merged = PeftModel.from_pretrained(vl.model, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out)
    finalize_checkpoint(vl.path, out)
    return out
