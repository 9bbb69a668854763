"""One chat renderer: the prompt the environment builds == the one the hf/openai policies send == the one the
exports write, for the same state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _synth_data import make_blobs
from ibisagent.chat import ChatTurn, render_chat, to_dataset_messages, to_messages, to_text_messages
from ibisagent.env import EnvConfig, SegmentationEnv
from ibisagent.exports import export
from ibisagent.io import load_mask, load_rgb
from ibisagent.policies.hf import HFPolicy
from ibisagent.policies.openai import OpenAIPolicy
from ibisagent.prompts import load_prompts
from ibisagent.segmenters.base import create_segmenter
from ibisagent.synthesis.runner import SynthesisConfig, iter_trajectories, run_synthesis


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    data = make_blobs(tmp_path_factory.mktemp("blobs"), 2, seed=3)
    out = tmp_path_factory.mktemp("synth")
    run_synthesis(data, out, SynthesisConfig(variants=("oracle",), segmenter="fake", split="all"), progress=False)
    return out


def test_layouts_of_one_turn() -> None:
    tpl = load_prompts("reference")
    img = np.zeros((4, 5, 3), np.uint8)
    first = render_chat(tpl, " the lesion ", img, first_turn=True)
    assert [t.role for t in first] == ["system", "user"] and first[1].text == tpl.first("the lesion")
    later = render_chat(tpl, "the lesion", img, first_turn=False, history=(ChatTurn("user", "u", img),
                                                                           ChatTurn("assistant", "a")))
    assert [t.role for t in later] == ["system", "user", "assistant", "user"]
    assert later[-1].text == tpl.refine("the lesion") and later[-1].image is img
    msgs, images = to_messages(later)
    assert len(images) == 2 and msgs[1]["content"][0] == {"type": "image"} and msgs[2]["content"][0]["type"] == "text"
    assert to_dataset_messages(later)[1]["content"][0] == {"type": "image", "text": None}
    assert to_text_messages(later)[3] == {"role": "user", "content": "<image>" + tpl.refine("the lesion")}


class _Replay:
    """Replies of a recorded trajectory, in order; records what each policy sends."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.sent: list[tuple[list, list]] = []

    def __call__(self, messages, images):
        self.sent.append((messages, images))
        return self.replies[len(self.sent) - 1]


def _strip_none(msgs: list[dict]) -> list[dict]:
    return [{**m, "content": [{k: v for k, v in p.items() if v is not None} for p in m["content"]]} for m in msgs]


def test_env_policies_and_exports_send_the_same_prompt(synth: Path, tmp_path: Path) -> None:
    import datasets

    export("hf", synth, tmp_path / "hf")
    export("llamafactory", synth, tmp_path / "lf")
    hf_rows = {(r["case_id"], r["step"]): r for r in datasets.load_from_disk(str(tmp_path / "hf" / "dataset")).to_list()}
    lf_rows = {(r["case_id"], r["step"]): r for r in json.loads((tmp_path / "lf" / "ibisagent_sft.json").read_text())}
    checked = 0
    for rec in iter_trajectories(synth):
        image, gt = load_rgb(rec["image"]), load_mask(rec["mask"])
        replies = [s["reply"] for s in rec["steps"]]
        hf_pol = HFPolicy(loaded=object())  # the model is never called: generate is replaced
        oa_pol = OpenAIPolicy(base_url="http://127.0.0.1:9", model="m")
        retemplated = OpenAIPolicy(base_url="http://127.0.0.1:9", model="m", prompts="reference")
        replays = [_Replay(replies) for _ in range(3)]
        hf_pol.generate = replays[0]
        oa_pol.complete = replays[1]
        retemplated.complete = replays[2]
        env = SegmentationEnv(create_segmenter("fake"), EnvConfig())
        obs = env.reset(image, rec["query"], gt)
        for pol in (hf_pol, oa_pol, retemplated):
            pol.begin_episode(image=image, query=rec["query"])
        for st in rec["steps"]:
            env_msgs, env_images = obs.messages()
            sent = [pol.act(obs) for pol in (hf_pol, oa_pol, retemplated)]
            assert sent == [st["reply"]] * 3
            for rp in replays:
                msgs, images = rp.sent[-1]
                assert msgs == env_msgs and len(images) == len(env_images) == 1
                assert np.array_equal(images[0], env_images[0])
            hf_row, lf_row = hf_rows[(rec["case_id"], st["step"])], lf_rows[(rec["case_id"], st["step"])]
            assert _strip_none(hf_row["prompt"]) == env_msgs
            assert np.array_equal(np.asarray(Image.open(hf_row["images"][0]).convert("RGB")), env_images[0])
            system, user = to_text_messages(obs.chat)
            assert lf_row["system"] == system["content"] and lf_row["messages"][0] == user
            assert np.array_equal(np.asarray(Image.open(tmp_path / "lf" / lf_row["images"][0]).convert("RGB")),
                                  env_images[0])
            checked += 1
            res = env.step(st["reply"])
            obs = res.observation
            if res.done:
                break
    assert checked >= 4
