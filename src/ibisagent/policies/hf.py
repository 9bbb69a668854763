"""The ``hf`` policy: a Qwen2.5-VL checkpoint (the released IBISAgent model or a fine-tune) run with transformers.

>>> policy = create_policy("hf", model_path="checkpoints/IBISAgent-7B", prompts="prompts/ibisagent_release.json")
>>> Agent(policy, "litemedsam-click").segment(image, "the polyp")

The checkpoint is a plain local directory (``config.json``, safetensors weights, tokenizer files,
``preprocessor_config.json``, a chat template). Loading never touches the network. The processor is built from the
tokenizer, the image processor and the chat template only (no video processor), so it needs neither torchvision nor
a video backend. Decoding is greedy by default; ``temperature > 0`` samples. ``profile="reference"`` decodes as the
release's ``infer/mllm_engine.py`` (greedy, up to 512 new tokens; :mod:`ibisagent.policies.decoding`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.env import Observation
from ibisagent.policies._chat import ChatBuilder
from ibisagent.policies.base import BasePolicy, PolicyError, register_policy
from ibisagent.policies.decoding import resolve_decoding
from ibisagent.prompts import PromptTemplate

__all__ = ["HFPolicy", "LoadedVL", "check_checkpoint_dir", "encode_chat", "load_vl_checkpoint", "to_pil"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def check_checkpoint_dir(path: str | Path) -> Path:
    """Check that ``path`` is a complete local checkpoint; raise :class:`PolicyError` naming what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PolicyError(f"checkpoint directory {p} does not exist; download the weights there first "
                          "(see docs/full_scale.md)")
    if not p.is_dir():
        raise PolicyError(f"checkpoint path {p} is a file; give the directory that holds config.json")
    missing: list[str] = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    weights = [f for f in _WEIGHT_FILES if (p / f).is_file()]
    if not weights:
        missing.append("model weights (model.safetensors or model.safetensors.index.json + shards)")
    for index in (w for w in weights if w.endswith(".index.json")):
        try:
            shards = sorted(set(json.loads((p / index).read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise PolicyError(f"{p / index} is not a valid weight index: {exc}") from exc
        missing += [s for s in shards if not (p / s).is_file()]
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if (p / "vocab.json").is_file() and not (p / "tokenizer.json").is_file() and not (p / "merges.txt").is_file():
        missing.append("merges.txt")
    if not (p / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if missing:
        hint = ""
        if (p / "adapter_config.json").is_file():
            hint = (" (this is a LoRA adapter: merge it into its base model first, with "
                    "ibisagent.training.trl_sft.merge_lora(base, adapter, out), `ibisagent train-llm-sft ... --merge` "
                    "or `llamafactory-cli export`)")
        raise PolicyError(f"checkpoint directory {p} is incomplete; missing: {', '.join(missing)}{hint}")
    return p


def _chat_template(p: Path, tokenizer: Any) -> str:
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text(encoding="utf-8")
    if (p / "chat_template.json").is_file():
        data = json.loads((p / "chat_template.json").read_text(encoding="utf-8"))
        if isinstance(data.get("chat_template"), str):
            return data["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise PolicyError(f"checkpoint {p} has no chat template (chat_template.jinja, chat_template.json or "
                      "tokenizer_config.json['chat_template'])")


def _processor_class() -> type:
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor without the video processor (no torchvision / video backend needed)."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                     **kwargs: Any) -> None:
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwenVLProcessor


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PolicyError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise PolicyError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


@dataclass
class LoadedVL:
    """A loaded checkpoint: the model (eval mode), its processor, the device and dtype."""

    model: Any
    processor: Any
    device: str
    dtype: Any
    path: Path

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def load_vl_checkpoint(
    model_path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    attn_implementation: str | None = None,
) -> LoadedVL:
    """Load a Qwen2.5-VL checkpoint directory (model + image-only processor) without any network access."""
    p = check_checkpoint_dir(model_path)
    try:
        import torch  # noqa: F401  (checked here for a clear error)
        from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise PolicyError(f"the hf policy needs transformers and torch: pip install 'ibisagent[train]' ({exc})") from exc
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PolicyError(f"cannot load the tokenizer/image processor from {p}: {exc}") from exc
    size = dict(image_processor.size) if image_processor.size is not None else {}
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    if min_pixels is not None or max_pixels is not None:
        if size.get("shortest_edge", 0) > size.get("longest_edge", float("inf")):
            raise PolicyError(f"min_pixels ({size['shortest_edge']}) is larger than max_pixels ({size['longest_edge']})")
        image_processor.size = size
        for attr in ("min_pixels", "max_pixels"):  # legacy attributes would override ``size`` in every call
            if hasattr(image_processor, attr):
                setattr(image_processor, attr, None)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor = _processor_class()(image_processor, tokenizer, chat_template=_chat_template(p, tokenizer))
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(p, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise PolicyError(f"cannot load the model from {p}: {exc}") from exc
    model.to(dev).eval()
    return LoadedVL(model, processor, dev, torch_dtype, p)


def to_pil(image: np.ndarray) -> Any:
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return Image.fromarray(arr[..., :3].astype(np.uint8), "RGB")


#: the release's image budget before the processor: ``qwen_vl_utils`` (0.0.14) defaults, 4 to 16384 tokens of 28 x 28
RELEASE_PATCH = 28
RELEASE_MIN_PIXELS = 4 * RELEASE_PATCH**2
RELEASE_MAX_PIXELS = 16384 * RELEASE_PATCH**2
RELEASE_MAX_RATIO = 200


def release_size(height: int, width: int) -> tuple[int, int]:
    """The (height, width) the release resizes an image to before its processor sees it (``process_vision_info``
    of ``qwen_vl_utils``, called by its ``infer/mllm_engine.py``): each side rounded to the nearest multiple of 28 (at
    least 28); if that exceeds :data:`RELEASE_MAX_PIXELS`, both sides scaled down by the same factor and floored to
    multiples of 28; if it is below :data:`RELEASE_MIN_PIXELS`, scaled up and ceiled. Sides more than 200 : 1 are
    refused, as there. (transformers' own ``smart_resize`` differs for images below the minimum: it does not keep
    28 as the least side before that check.)"""
    h, w = int(height), int(width)
    if min(h, w) < 1:
        raise PolicyError(f"an image of {w}x{h} pixels has no area")
    if max(h, w) / min(h, w) > RELEASE_MAX_RATIO:
        raise PolicyError(f"the image's aspect ratio {max(h, w) / min(h, w):.0f} : 1 is above the release's "
                          f"{RELEASE_MAX_RATIO} : 1")
    f = RELEASE_PATCH
    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if hb * wb > RELEASE_MAX_PIXELS:
        scale = math.sqrt(h * w / RELEASE_MAX_PIXELS)
        hb, wb = math.floor(h / scale / f) * f, math.floor(w / scale / f) * f
    elif hb * wb < RELEASE_MIN_PIXELS:
        scale = math.sqrt(RELEASE_MIN_PIXELS / (h * w))
        hb, wb = math.ceil(h * scale / f) * f, math.ceil(w * scale / f) * f
    return hb, wb


def release_image(image: np.ndarray) -> Any:
    """The image as the release hands it to the processor: RGB (an RGBA image composited on white), resized with
    Pillow's default filter (bicubic) to :func:`release_size`. The processor then applies its own resize to the
    checkpoint's pixel budget, so with this the pixels match the release's two-step path even where the budgets
    differ."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 4:
        rgba = Image.fromarray(arr.astype(np.uint8), "RGBA")
        pil = Image.new("RGB", rgba.size, (255, 255, 255))
        pil.paste(rgba, mask=rgba.split()[3])
    else:
        pil = to_pil(arr)
    h, w = release_size(pil.height, pil.width)
    return pil.resize((w, h), Image.Resampling.BICUBIC)


def encode_chat(processor: Any, messages: list[dict[str, Any]], images: list[np.ndarray], *,
                add_generation_prompt: bool = True, device: str | None = None, release_images: bool = False) -> Any:
    """Chat template + tokenization + image preprocessing -> model inputs (batch of one). ``release_images``: each
    image first goes through :func:`release_image` (the ``reference`` profile)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    prep = release_image if release_images else to_pil
    batch = processor(text=[text], images=[prep(im) for im in images] or None, return_tensors="pt")
    return batch.to(device) if device is not None else batch


class HFPolicy(BasePolicy):
    """A Qwen2.5-VL checkpoint from a local directory, run with transformers (greedy by default).

    ``profile``: ``"default"`` (greedy, 256 new tokens) or ``"reference"`` (the release's decoding: greedy, 512 new
    tokens, and its image preparation, :func:`release_image`, before the processor); ``max_new_tokens`` /
    ``temperature`` / ``top_p`` given explicitly override the profile.
    """

    name = "hf"

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        profile: str = "default",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        history: bool | None = None,
        prompts: str | PromptTemplate | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        attn_implementation: str | None = None,
        seed: int = 0,
        loaded: LoadedVL | None = None,
    ) -> None:
        super().__init__()
        if loaded is None and model_path is None:
            raise PolicyError("the hf policy needs model_path=<checkpoint directory> (--model-path)")
        dec = resolve_decoding(profile, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.profile = profile
        self.chat = ChatBuilder(prompts=prompts, history=history)
        if self.chat.template is not None:
            self.grammar = self.chat.template.grammar
        self.max_new_tokens = dec.max_new_tokens
        self.temperature = dec.temperature
        self.top_p = dec.top_p
        self.seed = seed
        self.vl = loaded or load_vl_checkpoint(model_path, device=device, dtype=dtype, min_pixels=min_pixels,
                                               max_pixels=max_pixels, attn_implementation=attn_implementation)
        self.last_prompt_tokens = 0
        self.last_new_tokens = 0

    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None:
        super().begin_episode(image=image, query=query, gt=gt)
        self.chat.begin_episode()

    def generate(self, messages: list[dict[str, Any]], images: list[np.ndarray]) -> str:
        """One reply for a chat (messages in the transformers multimodal layout, images in order)."""
        import torch

        batch = encode_chat(self.vl.processor, messages, images, device=self.vl.device,
                            release_images=self.profile == "reference")
        tok = self.vl.tokenizer
        gen: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": tok.pad_token_id,
                               "eos_token_id": tok.eos_token_id}
        if self.temperature > 0:
            torch.manual_seed(self.seed)
            self.seed += 1
            gen.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.vl.model.generate(**batch, **gen)
        n_prompt = batch["input_ids"].shape[1]
        self.last_prompt_tokens, self.last_new_tokens = int(n_prompt), int(out.shape[1] - n_prompt)
        return tok.decode(out[0, n_prompt:], skip_special_tokens=True).strip()

    def act(self, obs: Observation) -> str:
        messages, images = self.chat.messages(obs)
        reply = self.generate(messages, images)
        self.chat.record_reply(reply)
        return reply


@register_policy("hf", "Qwen2.5-VL checkpoint (e.g. the released IBISAgent model) from a local directory, "
                       "run with transformers")
def _make_hf(**cfg: Any) -> HFPolicy:
    return HFPolicy(**cfg)
