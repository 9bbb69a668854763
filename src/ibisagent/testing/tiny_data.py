"""Tiny synthetic cases and an oracle trajectory dataset in the export layout, for fast LLM-training tests.

:func:`synthetic_cases` draws bright ellipses on a dark noisy background (the ``fake`` segmenter grows regions by
intensity, so the oracle's clicks work on them). :func:`oracle_sft_dataset` rolls the oracle out through
:class:`~ibisagent.env.SegmentationEnv` and saves one row per turn (``prompt`` / ``completion`` / ``images``) with
``datasets.save_to_disk``: the layout the SFT trainer reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TinyCase", "oracle_sft_dataset", "oracle_sft_rows", "synthetic_cases"]


@dataclass(frozen=True)
class TinyCase:
    image: np.ndarray  # HxWx3 uint8
    gt: np.ndarray  # HxW bool
    query: str


def synthetic_cases(n: int = 4, size: tuple[int, int] = (56, 56), seed: int = 0) -> list[TinyCase]:
    """``n`` images with one bright ellipse each (the target) and a dimmer distractor blob."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    cases = []
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.12, 0.25) * h, rng.uniform(0.12, 0.25) * w
        gt = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        img = rng.normal(30, 5, size=(h, w)).clip(0, 255)
        img[gt] = rng.normal(200, 5, size=int(gt.sum())).clip(0, 255)
        rgb = np.repeat(img.astype(np.uint8)[..., None], 3, axis=2)
        cases.append(TinyCase(rgb, gt, rng.choice(["the lesion", "the nodule", "the polyp"]) + f" number {i}"))
    return cases


def oracle_sft_rows(cases: list[TinyCase], segmenter: str = "fake", prompts: str = "reference",
                    max_steps: int = 6) -> list[dict]:
    """Roll the oracle out on each case; one row per turn: prompt messages, completion, images (PIL)."""
    from ibisagent.env import EnvConfig, SegmentationEnv
    from ibisagent.policies.base import create_policy
    from ibisagent.policies.hf import to_pil
    from ibisagent.segmenters.base import create_segmenter

    env = SegmentationEnv(create_segmenter(segmenter), EnvConfig(prompts=prompts, max_steps=max_steps))
    oracle = create_policy("oracle")
    rows: list[dict] = []
    for case in cases:
        obs = env.reset(case.image, case.query, case.gt)
        oracle.begin_episode(image=case.image, query=case.query, gt=case.gt)
        done = False
        while not done:
            reply = oracle.act(obs)
            messages, images = obs.messages()
            prompt = [{"role": m["role"], "content": " ".join(p["text"] for p in m["content"] if p["type"] == "text")}
                      for m in messages]
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": reply}],
                         "images": [to_pil(im) for im in images]})
            res = env.step(reply)
            obs, done = res.observation, res.done
    return rows


def oracle_sft_dataset(out_dir: str | Path, cases: list[TinyCase] | None = None, **kw) -> Path:
    """Write :func:`oracle_sft_rows` as a ``datasets`` directory (``save_to_disk``) and return its path."""
    from datasets import Dataset

    rows = oracle_sft_rows(cases if cases is not None else synthetic_cases(), **kw)
    out = Path(out_dir)
    Dataset.from_list(rows).save_to_disk(str(out))
    return out
