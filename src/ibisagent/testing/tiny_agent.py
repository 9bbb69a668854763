"""A tiny Qwen2.5-VL that has been taught to act, for multi-turn tests of the LLM policy and trainers.

:func:`shared_taught_tiny_qwen_vl` builds the tiny random checkpoint, fits it (a few seconds on CPU) to answer the
oracle's actions on one synthetic case (a positive click, then ``Terminate``) with a short prompt template, and saves
it as a normal checkpoint directory. Loaded through the ``hf`` policy it plays a whole episode; sampled at
temperature 1 it produces a mix of good, bad and malformed replies, which gives GRPO groups with different rewards.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SHORT_PROMPTS", "TaughtTinyModel", "shared_taught_tiny_qwen_vl", "write_short_prompts"]

#: A short prompt template (few tokens -> fast tiny-model tests), in the same JSON layout as the built-in ones.
SHORT_PROMPTS = {
    "name": "short-test",
    "grammar": "reference",
    "system": "Segment the target with points. Reply Positive Point (x, y), Negative Point (x, y) or Terminate.",
    "first_turn": "Segment {query}.",
    "refine_turn": "Green mask of {query}. Refine or Terminate?",
}


def write_short_prompts(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(SHORT_PROMPTS, indent=1))
    return p


@dataclass(frozen=True)
class TaughtTinyModel:
    checkpoint: Path  # checkpoint directory (loads with the hf policy)
    prompts: Path  # the prompt template file it was taught with
    case: object  # the TinyCase it was taught on
    replies: tuple[str, ...]  # the replies it was taught, in order
    losses: tuple[float, ...]  # teaching losses per step


def teach_oracle_episode(checkpoint: str | Path, out_dir: str | Path, prompts: str | Path, case, *,
                         steps: int = 100, lr: float = 5e-3, segmenter: str = "fake",
                         wrap: Callable[[str], str] | None = None) -> TaughtTinyModel:
    """Teach ``checkpoint`` to reply with the oracle's bare action text along one episode on ``case`` (or
    ``wrap(action_text)``, e.g. the action in the release's tag layout); save it."""
    from ibisagent.env import EnvConfig, SegmentationEnv
    from ibisagent.episode import drive
    from ibisagent.policies.base import create_policy
    from ibisagent.policies.hf import load_vl_checkpoint
    from ibisagent.protocol import parse_reply
    from ibisagent.segmenters.base import create_segmenter
    from ibisagent.testing.tiny_qwen import teach_replies
    from ibisagent.training.trl_sft import finalize_checkpoint

    env = SegmentationEnv(create_segmenter(segmenter), EnvConfig(prompts=str(prompts), max_steps=6))
    oracle = create_policy("oracle")

    class _BareOracle:  # the oracle's bare action text
        def begin_episode(self, **kw: object) -> None:
            oracle.begin_episode(**kw)

        def act(self, obs: object) -> str:
            text = parse_reply(oracle.act(obs)).action.text()
            return wrap(text) if wrap is not None else text

    examples = []
    for turn in drive(env, _BareOracle(), case.image, case.query, case.gt):
        messages, images = turn.observation.messages()
        examples.append((messages, images, turn.reply))
    vl = load_vl_checkpoint(checkpoint, device="cpu", dtype="float32")
    losses = teach_replies(vl.model, vl.processor, examples, steps=steps, lr=lr)
    out = Path(out_dir)
    vl.model.save_pretrained(out)
    finalize_checkpoint(vl.path, out)
    return TaughtTinyModel(out, Path(prompts), case, tuple(e[2] for e in examples), tuple(losses))


@functools.cache
def shared_taught_tiny_qwen_vl() -> TaughtTinyModel:
    """One taught tiny model per process (temporary directory, removed at exit). Do not modify it."""
    from ibisagent.testing.tiny_data import synthetic_cases
    from ibisagent.testing.tiny_qwen import shared_tiny_qwen_vl

    tmp = Path(tempfile.mkdtemp(prefix="ibisagent-taught-qwen-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    prompts = write_short_prompts(tmp / "short_prompts.json")
    case = synthetic_cases(1, seed=3)[0]
    return teach_oracle_episode(shared_tiny_qwen_vl(), tmp / "taught", prompts, case)
