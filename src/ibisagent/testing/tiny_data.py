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


def oracle_sft_rows(cases: list[TinyCase], out_dir: str | Path, segmenter: str = "fake", prompts: str = "reference",
                    max_steps: int = 6, reasoning: str | None = None) -> list[dict]:
    """Roll the oracle out on each case; one row per turn in the ``ibisagent export --format hf`` layout: structured
    ``prompt`` (system, user with an image placeholder), ``completion``, ``images`` (paths of PNGs written under
    ``out_dir/images``) and the state columns the TRL rewards read.

    ``reasoning`` replaces the oracle's ``<think>`` text (short replies make tiny-model tests fast)."""
    import json

    from PIL import Image

    from ibisagent.chat import to_dataset_messages
    from ibisagent.env import EnvConfig, SegmentationEnv
    from ibisagent.episode import drive
    from ibisagent.masks import rle_encode
    from ibisagent.policies.base import create_policy
    from ibisagent.protocol import format_reply, parse_reply
    from ibisagent.segmenters.base import create_segmenter

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    env = SegmentationEnv(create_segmenter(segmenter), EnvConfig(prompts=prompts, max_steps=max_steps))
    oracle = create_policy("oracle")

    class _Oracle:  # the oracle, with ``reasoning`` in place of its own <think> text when given
        def begin_episode(self, **kw: object) -> None:
            oracle.begin_episode(**kw)

        def act(self, obs: object) -> str:
            reply = oracle.act(obs)
            if reasoning is None:
                return reply
            parsed = parse_reply(reply)
            return format_reply(parsed.action, reasoning, "Done." if parsed.answer is not None else None)

    policy = _Oracle()
    rows: list[dict] = []
    for ci, case in enumerate(cases):
        image_path = out / "images" / f"case{ci}.png"
        mask_path = out / "images" / f"case{ci}_mask.png"
        Image.fromarray(case.image).save(image_path)
        Image.fromarray(case.gt.astype(np.uint8) * 255).save(mask_path)
        for turn in drive(env, policy, case.image, case.query, case.gt):
            obs, reply = turn.observation, turn.reply
            obs_path = out / "images" / f"case{ci}_step{obs.step + 1}.png"
            Image.fromarray(obs.overlay).save(obs_path)
            rows.append({
                "prompt": to_dataset_messages(obs.chat),
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": reply}]}],
                "images": [str(obs_path.resolve())],
                "image_path": str(image_path.resolve()), "ground_truth": str(mask_path.resolve()),
                "points": obs.points.tolist(), "labels": obs.labels.tolist(), "box": None, "step": obs.step + 1,
                "prev_mask_rle": json.dumps(rle_encode(obs.mask)) if obs.mask is not None else "",
                "segmenter": segmenter, "grammar": "reference", "case_id": f"case{ci}", "variant": "oracle",
                "role": "normal",
            })
    return rows


def oracle_sft_dataset(out_dir: str | Path, cases: list[TinyCase] | None = None, **kw) -> Path:
    """Write :func:`oracle_sft_rows` like ``ibisagent export --format hf`` does (``OUT/dataset`` saved with
    ``save_to_disk``, images under ``OUT/images``) and return the export folder."""
    from datasets import Dataset

    out = Path(out_dir)
    rows = oracle_sft_rows(cases if cases is not None else synthetic_cases(), out, **kw)
    if not rows:
        raise ValueError("the oracle produced no turns")
    Dataset.from_list(rows).save_to_disk(str(out / "dataset"))
    return out
