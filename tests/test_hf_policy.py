"""The ``hf`` policy on a tiny real Qwen2.5-VL checkpoint (built here, no downloads): loading, chat building,
whole episodes through the environment, and clear errors for bad checkpoints."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ibisagent.agent import Agent, run_episode  # noqa: E402
from ibisagent.env import EnvConfig, SegmentationEnv  # noqa: E402
from ibisagent.policies import PolicyError, create_policy, list_policies  # noqa: E402
from ibisagent.policies._chat import ChatBuilder  # noqa: E402
from ibisagent.policies.hf import HFPolicy, check_checkpoint_dir, load_vl_checkpoint  # noqa: E402
from ibisagent.segmenters import create_segmenter  # noqa: E402
from ibisagent.testing import shared_tiny_qwen_vl, synthetic_cases  # noqa: E402
from ibisagent.testing.tiny_agent import shared_taught_tiny_qwen_vl, write_short_prompts  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models are overhead-bound: one thread is many times faster than two on a busy shared CPU.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_dir():
    return shared_tiny_qwen_vl()


@pytest.fixture(scope="module")
def taught():
    return shared_taught_tiny_qwen_vl()


def test_registered():
    names = list_policies()
    assert "hf" in names and "openai" in names


def test_tiny_checkpoint_is_a_normal_directory(tiny_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "chat_template.jinja"):
        assert (tiny_dir / name).is_file(), name
    vl = load_vl_checkpoint(tiny_dir)
    assert vl.device == "cpu" and vl.dtype == torch.float32
    tok = vl.tokenizer
    for t in ("<think>", "</action>", "<|image_pad|>", "<|im_start|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    # the chat template renders an image as vision tokens, and the processor expands them to the image's patches
    msgs = [{"role": "system", "content": [{"type": "text", "text": "sys"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Segment it."}]}]
    text = vl.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Segment it." in text
    assert text.endswith("<|im_start|>assistant\n")


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        create_policy("hf", model_path=str(tmp_path / "nope"))
    with pytest.raises(PolicyError, match="model_path"):
        create_policy("hf")


def test_incomplete_checkpoint_names_missing_files(tiny_dir, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").unlink()
    (bad / "preprocessor_config.json").unlink()
    with pytest.raises(PolicyError) as err:
        check_checkpoint_dir(bad)
    msg = str(err.value)
    assert "model weights" in msg and "preprocessor_config.json" in msg and "config.json," not in msg
    # a sharded index whose shard is missing
    (bad / "preprocessor_config.json").write_text((tiny_dir / "preprocessor_config.json").read_text())
    (bad / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(PolicyError, match="model-00001-of-00002.safetensors"):
        check_checkpoint_dir(bad)
    # a LoRA adapter directory gets a hint to merge
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(PolicyError, match="LoRA adapter"):
        check_checkpoint_dir(adapter)


def test_bad_options(tiny_dir):
    with pytest.raises(PolicyError, match="dtype"):
        create_policy("hf", model_path=str(tiny_dir), dtype="int3")
    with pytest.raises(PolicyError, match="max_new_tokens"):
        create_policy("hf", model_path=str(tiny_dir), max_new_tokens=0)


def test_random_model_reply_never_parses_ends_episode(tiny_dir):
    """A model that writes gibberish: the episode ends after one turn, recorded as unparseable, no exception."""
    case = synthetic_cases(1, seed=1)[0]
    agent = Agent(create_policy("hf", model_path=str(tiny_dir), max_new_tokens=12), "fake", EnvConfig(max_steps=4))
    ep = agent.segment(case.image, case.query, case.gt)
    assert ep.stop_reason in ("unparseable", "invalid_action")
    assert len(ep.steps) == 1 and ep.steps[0].error
    assert agent.policy.last_new_tokens <= 12


def test_taught_model_plays_a_whole_episode(taught):
    """Load from the directory via the registry, prompts from a file: click, mask fed back as a new user turn with
    the overlay, then Terminate; greedy decoding is deterministic."""
    policy = create_policy("hf", model_path=str(taught.checkpoint), device="cpu", dtype="float32",
                           max_new_tokens=32, prompts=str(taught.prompts))
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=5))
    case = taught.case
    ep = run_episode(env, policy, case.image, case.query, case.gt)
    assert [s.raw for s in ep.steps] == list(taught.replies)
    assert ep.stop_reason == "terminate"
    assert ep.n_clicks == 1 and ep.final_iou is not None and ep.final_iou > 0.5
    ep2 = run_episode(env, policy, case.image, case.query, case.gt)
    assert [s.raw for s in ep2.steps] == [s.raw for s in ep.steps]


def test_prompt_file_overrides_environment_wording(taught, tmp_path):
    """The released checkpoint's wording comes from a file; the policy renders system + turns with it."""
    builder = ChatBuilder(prompts=str(taught.prompts))
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(prompts="reference"))
    case = taught.case
    obs = env.reset(case.image, case.query, case.gt)
    msgs, images = builder.messages(obs)
    assert msgs[0]["content"][-1]["text"].startswith("Segment the target with points")
    assert msgs[1]["content"][-1]["text"] == f"Segment {case.query}."
    assert len(images) == 1 and images[0].shape == case.image.shape
    custom = write_short_prompts(tmp_path / "p.json")
    assert ChatBuilder(prompts=str(custom)).template.system == builder.template.system


@pytest.mark.parametrize("history", [False, True])
def test_history_option(taught, history):
    """history=False: system + current turn only; history=True: earlier user turns (each with its overlay image)
    and replies are sent too, as user/assistant turns (never tool messages)."""
    policy = HFPolicy(loaded=load_vl_checkpoint(taught.checkpoint), history=history, max_new_tokens=32)
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=5, prompts=str(taught.prompts)))
    case = taught.case
    seen: list[tuple[list[str], int]] = []
    orig = policy.generate

    def spy(messages, images):
        seen.append(([m["role"] for m in messages], len(images)))
        return orig(messages, images)

    policy.generate = spy  # type: ignore[method-assign]
    ep = run_episode(env, policy, case.image, case.query, case.gt)
    assert len(ep.steps) == 2
    assert seen[0] == (["system", "user"], 1)
    if history:
        assert seen[1] == (["system", "user", "assistant", "user"], 2)
    else:
        assert seen[1] == (["system", "user"], 1)
    assert all("tool" not in roles for roles, _ in seen)


def test_environment_history_is_followed(taught):
    """With history=None the policy sends what the environment keeps (EnvConfig.history=True)."""
    vl = load_vl_checkpoint(taught.checkpoint)
    policy = HFPolicy(loaded=vl, max_new_tokens=32)
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=5, history=True, prompts=str(taught.prompts)))
    obs = env.reset(taught.case.image, taught.case.query, taught.case.gt)
    policy.begin_episode(image=obs.image, query=obs.query, gt=None)
    env.step(policy.act(obs))
    msgs, images = policy.chat.messages(env._observe())
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"] and len(images) == 2


def test_image_budget_option(tiny_dir):
    vl = load_vl_checkpoint(tiny_dir, max_pixels=28 * 28 * 4)
    from ibisagent.policies.hf import encode_chat

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    small = encode_chat(vl.processor, msgs, [np.zeros((200, 300, 3), np.uint8)])
    big = encode_chat(load_vl_checkpoint(tiny_dir).processor, msgs, [np.zeros((200, 300, 3), np.uint8)])
    assert int(small["image_grid_thw"].prod()) < int(big["image_grid_thw"].prod())
    with pytest.raises(PolicyError, match="min_pixels"):
        load_vl_checkpoint(tiny_dir, min_pixels=10_000, max_pixels=5_000)


def test_reference_profile_episode_on_the_tiny_model(taught, tmp_path):
    """A whole episode with the release's rules (reference parser, repeat rule before the segmenter): a tiny model
    taught replies in the release's tag layout clicks, sees the mask and Terminates; the bare-text model (no tags)
    is unparseable under the same profile after one turn, as under the release's parser."""
    from ibisagent.testing.tiny_agent import teach_oracle_episode

    ref = EnvConfig(max_steps=5, parser="reference", repeat_check="before")

    def wrap(action: str) -> str:
        return f"<think>\nthe target is left to segment\n</think>\n<action>\n{action}\n</action>"

    tagged = teach_oracle_episode(shared_tiny_qwen_vl(), tmp_path / "tagged", taught.prompts, taught.case, wrap=wrap)
    policy = create_policy("hf", model_path=str(tagged.checkpoint), device="cpu", dtype="float32",
                           max_new_tokens=48, prompts=str(tagged.prompts))
    case = tagged.case
    ep = run_episode(SegmentationEnv(create_segmenter("fake"), ref), policy, case.image, case.query, case.gt)
    assert [s.raw for s in ep.steps] == list(tagged.replies)
    assert ep.stop_reason == "terminate" and ep.n_clicks == 1
    bare = create_policy("hf", model_path=str(taught.checkpoint), device="cpu", dtype="float32", max_new_tokens=32,
                         prompts=str(taught.prompts))
    ep2 = run_episode(SegmentationEnv(create_segmenter("fake"), ref), bare, case.image, case.query, case.gt)
    assert ep2.stop_reason == "unparseable" and len(ep2.steps) == 1


@pytest.mark.parametrize("profile, expected", [("default", 256), ("reference", 512)])
def test_decoding_profile_reaches_generate(tiny_dir, profile, expected):
    """``profile="reference"`` decodes as the release's mllm_engine (greedy, up to 512 new tokens), ours 256. The
    random model is held to the full length (``min_new_tokens``) so the real generation shows the cap."""
    vl = load_vl_checkpoint(tiny_dir)
    seen: list[dict] = []
    real = vl.model.generate

    def spy(**kwargs):
        seen.append(dict(kwargs))
        return real(**kwargs, min_new_tokens=kwargs["max_new_tokens"])

    vl.model.generate = spy
    policy = HFPolicy(loaded=vl, profile=profile)
    case = synthetic_cases(1, size=(32, 32), seed=3)[0]
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=1))
    policy.begin_episode(image=case.image, query=case.query)
    policy.act(env.reset(case.image, case.query, case.gt))
    assert seen[0]["max_new_tokens"] == expected and seen[0]["do_sample"] is False
    assert policy.last_new_tokens == expected


def test_decoding_profile_options(tiny_dir):
    vl = load_vl_checkpoint(tiny_dir)
    ref = HFPolicy(loaded=vl, profile="reference", max_new_tokens=64)  # an explicit option wins over the profile
    assert (ref.max_new_tokens, ref.temperature) == (64, 0.0)
    assert HFPolicy(loaded=vl).max_new_tokens == 256
    with pytest.raises(PolicyError, match="decoding profile"):
        HFPolicy(loaded=vl, profile="paper")


@pytest.mark.parametrize(("hw", "expected"), [
    ((512, 512), (504, 504)),     # each side to the nearest multiple of 28
    ((1000, 750), (1008, 756)),
    ((10, 101), (28, 112)),       # 28 is the least side; 28 x 112 = the 3,136-pixel minimum, kept
    ((20, 20), (56, 56)),         # below the minimum: scaled up, ceiled
    ((5000, 4000), (4004, 3192)),  # above 16,384 tokens: scaled down, floored (qwen_vl_utils 0.0.14 gives the same)
])
def test_release_size(hw, expected):
    from ibisagent.policies.hf import RELEASE_MAX_PIXELS, RELEASE_MIN_PIXELS, release_size

    h, w = release_size(*hw)
    assert (h, w) == expected and h % 28 == 0 and w % 28 == 0
    assert RELEASE_MIN_PIXELS <= h * w <= RELEASE_MAX_PIXELS
    with pytest.raises(PolicyError, match="aspect ratio"):
        release_size(10, 2500)


def test_reference_profile_prepares_images_as_the_release(tiny_dir):
    """With ``profile="reference"`` an image is resized to :func:`release_size` (bicubic, RGBA on white) before the
    processor applies the checkpoint's own budget, as the release's ``process_vision_info`` + processor; where the
    budgets differ (the tiny model's is 12,544 pixels) the pixels differ from our one-step default."""
    from PIL import Image

    from ibisagent.policies.hf import encode_chat, release_image

    vl = load_vl_checkpoint(tiny_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (173, 251, 3), dtype=np.uint8)
    ref = encode_chat(vl.processor, msgs, [rgb], release_images=True)
    by_hand = Image.fromarray(rgb).resize((252, 168), Image.Resampling.BICUBIC)  # 173 x 251 -> 168 x 252
    text = vl.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert torch.equal(ref["pixel_values"], vl.processor(text=[text], images=[by_hand], return_tensors="pt")["pixel_values"])
    ours = encode_chat(vl.processor, msgs, [rgb])
    assert ours["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    assert not torch.equal(ours["pixel_values"], ref["pixel_values"])
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])  # fully transparent: white, as the release's to_rgb
    assert np.asarray(release_image(rgba)).min() == 255
    policy = HFPolicy(loaded=vl, profile="reference")
    seen = []
    orig = vl.processor.__class__.__call__

    def spy(self, *a, **kw):
        seen.append(kw["images"][0].size)
        return orig(self, *a, **kw)

    vl.processor.__class__.__call__ = spy
    try:
        policy.generate(msgs, [rgb])
    finally:
        vl.processor.__class__.__call__ = orig
    assert seen == [(252, 168)]  # the reference profile hands the release-sized image to the processor
