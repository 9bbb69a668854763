"""A tiny random Qwen2.5-VL checkpoint for tests: real architecture, real processor, about 2 MB.

:func:`build_tiny_qwen_vl` writes a normal checkpoint directory (``config.json``, ``model.safetensors``, tokenizer
files, ``preprocessor_config.json``, ``chat_template.jinja``) that every loader in the package reads exactly like
the released IBISAgent checkpoint. Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the
action grammar and the prompt wording, plus the special tokens Qwen2.5-VL's chat template and vision tower use.

>>> from ibisagent.testing import build_tiny_qwen_vl
>>> path = build_tiny_qwen_vl("/tmp/tiny-qwen")
>>> policy = create_policy("hf", model_path=path)
"""

from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path

__all__ = ["QWEN_VL_CHAT_TEMPLATE", "SPECIAL_TOKENS", "TAG_TOKENS", "build_tiny_qwen_vl", "shared_tiny_qwen_vl",
           "tiny_corpus"]

#: Special tokens Qwen2.5-VL's chat template and vision tower rely on.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)
#: The reply grammar's tags, kept as single (non-special) tokens so decoding keeps them.
TAG_TOKENS = ("<think>", "</think>", "<action>", "</action>", "<answer>", "</answer>")

#: A chat template with the same layout as Qwen2.5-VL's (ChatML; an image becomes
#: ``<|vision_start|><|image_pad|><|vision_end|>``); used only by the tiny test checkpoint.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def tiny_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Strings in the agent's language (prompts, replies with coordinates) to train the tiny tokenizer on."""
    from ibisagent.prompts import builtin_prompt_names, load_prompts
    from ibisagent.protocol import Action, format_reply

    rng = random.Random(seed)
    texts: list[str] = []
    targets = ["the polyp", "the left kidney", "the liver", "the tumor", "the lesion", "the optic disc", "the nodule"]
    for name in builtin_prompt_names():
        p = load_prompts(name)
        texts += [p.system] + [p.first(t) + " " + p.refine(t) for t in targets]
    for _ in range(n):
        kind = rng.random()
        x, y = rng.random(), rng.random()
        t = rng.choice(targets)
        if kind < 0.45:
            texts.append(format_reply(Action.positive(x, y), f"The green mask misses part of {t}; I add a point."))
        elif kind < 0.8:
            texts.append(format_reply(Action.negative(x, y), f"The mask spills beyond {t}; I remove that region."))
        else:
            texts.append(format_reply(Action.terminate(), f"The mask of {t} looks complete.", f"{t} is segmented."))
    texts += [f"{i:04d} 0.{i:04d} ({i}" for i in range(0, 10000, 37)]
    return texts


def _train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(seed=seed), trainer=trainer)
    tok.add_tokens(list(TAG_TOKENS))
    return tok


def _image_only_processor_config(min_pixels: int, max_pixels: int) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }


def build_tiny_qwen_vl(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vocab_size: int = 700,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint to ``out_dir`` and return the path.

    Images are resized to at most ``max_pixels`` (default 112x112 -> at most 16 image tokens), so a forward pass
    with a picture takes milliseconds on CPU. The weights are random: replies are gibberish until trained.
    """
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(vocab_size, seed)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        model_max_length=4096, padding_side="left",
    )
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    n_vocab = len(tokenizer)
    heads = 4
    head_dim = hidden_size // heads
    half = head_dim // 2  # mrope sections (temporal, height, width) must add up to head_dim / 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": n_vocab, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers, "num_attention_heads": heads, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "use_sliding_window": False,
            "max_window_layers": num_layers, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 1, "hidden_size": vision_hidden_size, "intermediate_size": 2 * vision_hidden_size,
            "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 56, "out_hidden_size": hidden_size, "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(_image_only_processor_config(min_pixels, max_pixels), indent=1))
    (out / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)
    return out


@functools.cache
def shared_tiny_qwen_vl() -> Path:
    """One tiny checkpoint per process (built on first use in a temporary directory, removed at exit); tests
    must not modify it (copy it first)."""
    tmp = Path(tempfile.mkdtemp(prefix="ibisagent-tiny-qwen-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return build_tiny_qwen_vl(tmp / "tiny-qwen2.5-vl")


def teach_replies(model, processor, examples, *, steps: int = 40, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """Fit a (tiny) model to answer each chat with a fixed reply: ``examples`` is a list of
    ``(messages, images, reply)``. Returns the mean negative log-likelihood per step. Used by tests to get a small
    model that emits parseable actions, so that whole multi-turn episodes can be exercised."""
    import torch

    from ibisagent.policies.hf import encode_chat
    from ibisagent.training.trl_grpo import completion_logprobs

    torch.manual_seed(seed)
    tok = processor.tokenizer
    device = next(model.parameters()).device
    batches = []
    for messages, images, reply in examples:
        inputs = dict(encode_chat(processor, messages, images, device=str(device)))
        ids = tok(reply + tok.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"][0].to(device)
        batches.append((inputs, ids))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / max(1, steps))  # linear decay to 0
    history = []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for inputs, ids in batches:
            loss = -completion_logprobs(model, inputs, ids).mean() / len(batches)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        sched.step()
        history.append(total)
    model.eval()
    return history
