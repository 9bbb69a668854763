"""Release parity (issue 21): the release's RLE codec, its reply parser as the ``reference`` profile, and the
prompt importer. Inputs are small and release-shaped, written by the tests themselves."""

from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest

from ibisagent.masks import rle_decode, rle_decode_release, rle_encode, rle_encode_release
from ibisagent.protocol import Action, ActionKind, ActionParseError, parse_action, parse_reply


def _release_layout_encode(mask: np.ndarray) -> str:
    """The release's documented layout, written out plainly: C-order runs starting with background, decimal text
    joined by spaces, zlib (default level), base64."""
    flat = [1 if v else 0 for v in np.asarray(mask).reshape(-1)]
    runs: list[int] = []
    current, count = 0, 0
    for v in flat:
        if v == current:
            count += 1
        else:
            runs.append(count)
            current, count = v, 1
    runs.append(count)
    return base64.b64encode(zlib.compress(" ".join(map(str, runs)).encode("utf-8"))).decode("utf-8")


def test_release_rle_decodes_a_mask_encoded_as_the_release_does() -> None:
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[1, 1:4] = 1
    mask[2, 2] = 1
    payload = _release_layout_encode(mask)
    # the payload text is the decimal run list (6 background, 3 fg, 3 bg, 1 fg, 7 bg)
    assert zlib.decompress(base64.b64decode(payload)).decode() == "6 3 3 1 7"
    np.testing.assert_array_equal(rle_decode_release(payload, (4, 5)), mask.astype(bool))
    assert rle_encode_release(mask) == payload


def test_release_rle_first_pixel_foreground_gets_leading_zero_run() -> None:
    mask = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
    payload = rle_encode_release(mask)
    assert zlib.decompress(base64.b64decode(payload)).decode() == "0 2 3 1"
    assert payload == _release_layout_encode(mask)
    np.testing.assert_array_equal(rle_decode_release(payload, (2, 3)), mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_release_rle_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    mask = rng.random((h, w)) < rng.uniform(0.05, 0.95)
    payload = rle_encode_release(mask)
    assert payload == _release_layout_encode(mask)
    np.testing.assert_array_equal(rle_decode_release(payload, (h, w)), mask)


@pytest.mark.parametrize("fill", [False, True])
def test_release_rle_uniform_masks(fill: bool) -> None:
    mask = np.full((3, 7), fill)
    payload = rle_encode_release(mask)
    assert zlib.decompress(base64.b64decode(payload)).decode() == ("0 21" if fill else "21")
    np.testing.assert_array_equal(rle_decode_release(payload, (3, 7)), mask)


def test_release_rle_is_not_our_rle() -> None:
    mask = np.eye(6, dtype=bool)
    ours = rle_encode(mask)
    with pytest.raises(ValueError):
        rle_decode_release(ours["counts"], (6, 6))
    # and ours cannot read the release's text (decimal text is not uint32 runs covering 36 pixels)
    with pytest.raises(ValueError):
        rle_decode({"size": [6, 6], "counts": rle_encode_release(mask)})


def test_release_rle_bad_input_is_a_clear_error() -> None:
    good = rle_encode_release(np.eye(4, dtype=bool))
    with pytest.raises(ValueError, match="expected 20"):
        rle_decode_release(good, (4, 5))
    with pytest.raises(ValueError, match="corrupt"):
        rle_decode_release("not base64!!", (4, 4))
    with pytest.raises(ValueError, match="corrupt"):
        rle_decode_release(base64.b64encode(zlib.compress(b"3 x 4")).decode(), (4, 4))
    with pytest.raises(ValueError, match="empty"):
        rle_decode_release("", (2, 2))
    with pytest.raises(ValueError, match="2D"):
        rle_encode_release(np.zeros((2, 2, 2), bool))
    assert rle_encode_release(np.zeros((0, 3), bool)) == ""
    assert rle_decode_release("", (0, 3)).shape == (0, 3)


# --------------------------------------------------------------------------------------------------------------
# The release's reply parser: the ``reference`` parsing profile
# --------------------------------------------------------------------------------------------------------------

def _ref(text: str) -> Action:
    return parse_action(text, "reference", profile="reference")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nok\n</think>\n<action>\nPositive Point (0.5000, 0.2500)\n</action>", Action.positive(0.5, 0.25)),
        ("<action>Negative Point (0.1,0.9)</action>", Action.negative(0.1, 0.9)),
        ("<action>Positive Point(0.3,   0.4)</action>", Action.positive(0.3, 0.4)),
        # Terminate is checked first, as a substring
        ("<action>Positive Point (0.5, 0.5) then Terminate</action>", Action.terminate()),
        ("<action>\nTerminate\n</action>\n<answer>\nDone.\n</answer>", Action.terminate("Done.")),
        # Positive before Negative; the first (x, y) in the body wins
        ("<action>Negative Point (0.1, 0.1) or Positive Point (0.2, 0.2)</action>", Action.positive(0.1, 0.1)),
        # only the first <action> block counts
        ("<action>Negative Point (0.7, 0.7)</action><action>Terminate</action>", Action.negative(0.7, 0.7)),
    ],
)
def test_reference_parser_accepts(text: str, expected: Action) -> None:
    got = _ref(text)
    assert got.kind is expected.kind and got.text() == expected.text()
    if expected.kind is ActionKind.TERMINATE:
        assert got.answer == expected.answer


@pytest.mark.parametrize(
    "text",
    [
        "Positive Point (0.5000, 0.2500)",  # no tags: the release needs them (ours falls back to the whole reply)
        "<think>click Positive Point (0.2, 0.3)</think><action>I am not sure</action>",  # click only in <think>
        "<action>positive point (0.5, 0.5)</action>",  # case-sensitive
        "<ACTION>Positive Point (0.5, 0.5)</ACTION>",  # case-sensitive tags
        "<action>Termination</action>",  # only the Terminate spelling stops
        "<action>Positive Point (0.5 , 0.5)</action>",  # no space allowed before the comma
        "<action>Positive Point (-0.5, 0.5)</action>",  # no sign in the release's number pattern
        "<action>Box (0.1, 0.1, 0.5, 0.5)</action>",  # no Box in the release
        "<action>Positive Point</action>",  # no coordinates
    ],
)
def test_reference_parser_rejects(text: str) -> None:
    with pytest.raises(ActionParseError):
        _ref(text)


def test_lenient_stays_the_default_and_differs_where_documented() -> None:
    think_click = "<think>maybe Positive Point (0.2, 0.3)</think> Positive Point (0.6, 0.6)"
    assert parse_action(think_click).text() == "Positive Point (0.2000, 0.3000)"  # ours: whole reply, first match
    with pytest.raises(ActionParseError):
        _ref(think_click)
    assert parse_action("<action>Termination</action>").kind is ActionKind.TERMINATE
    assert parse_action("<action>positive point (0.5, 0.5)</action>").kind is ActionKind.POSITIVE
    # ours takes the first action in the body; the release checks Terminate first
    both = "<action>Positive Point (0.5, 0.5) then Terminate</action>"
    assert parse_action(both).kind is ActionKind.POSITIVE
    assert _ref(both).kind is ActionKind.TERMINATE


def test_reference_parser_errors_are_clear() -> None:
    with pytest.raises(ActionParseError) as e:
        _ref("<action>Positive Point (1.2.3, 0.5)</action>")
    assert e.value.reason == "unparseable"
    with pytest.raises(ActionParseError) as e:
        _ref("<action>Positive Point (120, 45)</action>")
    assert e.value.reason == "pixel_coordinates"
    with pytest.raises(ValueError, match="unknown parser profile"):
        parse_action("<action>Terminate</action>", profile="strict")  # type: ignore[arg-type]


def test_reference_parse_reply_reads_think_case_sensitively() -> None:
    r = parse_reply("<think>\nthe lesion\n</think>\n<action>\nNegative Point (0.1000, 0.2000)\n</action>",
                    "reference", profile="reference")
    assert r.reasoning == "the lesion" and r.action.kind is ActionKind.NEGATIVE and r.answer is None
    r2 = parse_reply("<THINK>x</THINK><action>Terminate</action>", "reference", profile="reference")
    assert r2.reasoning == ""


# --------------------------------------------------------------------------------------------------------------
# `ibisagent prompts --from-release`: a template from a release-shaped clone (dummy wording, written here)
# --------------------------------------------------------------------------------------------------------------

_DUMMY_SYSTEM_A = "You are test agent Q7. "
_DUMMY_SYSTEM_B = "Reply in <think> and <action> tags.\nUse {braces} literally."

_MULTI_TURN = f'''import argparse

SYSTEM_PROMPT = (
    "{_DUMMY_SYSTEM_A}"
    "{_DUMMY_SYSTEM_B.encode("unicode_escape").decode()}"
)


def main():
    args = argparse.Namespace(prompt="x")
    for turn in range(1, 3):
        is_first_turn = (turn == 1)
        current_prompt = f"<image>{{args.prompt}}" if is_first_turn else args.prompt


raise SystemExit("this file must never be executed")
'''

_ENGINE = '''class Engine:
    def chat(self, user_prompt=None, is_first_turn=True):
        if is_first_turn:
            pass
        else:
            refinement_prompt = f"<image>Dummy refine step. Asked: \\"{user_prompt}\\". More points or Terminate?"
            return refinement_prompt
'''


def _write_clone(root, multi_turn: str = _MULTI_TURN, engine: str = _ENGINE):
    (root / "infer").mkdir(parents=True)
    (root / "infer" / "multi_turn.py").write_text(multi_turn, encoding="utf-8")
    (root / "infer" / "mllm_engine.py").write_text(engine, encoding="utf-8")
    (root / "trajectory_gen").mkdir()
    (root / "trajectory_gen" / "broken.py").write_text("def (:\n", encoding="utf-8")  # unparsable: skipped
    return root


def test_prompts_from_release_cli_writes_a_template_that_renders_the_release_messages(tmp_path, capsys) -> None:
    from ibisagent.chat import render_chat, to_messages
    from ibisagent.cli import main
    from ibisagent.prompts import load_prompts

    clone = _write_clone(tmp_path / "IBISAgent")
    out = tmp_path / "reference_release.json"
    assert main(["prompts", "--from-release", str(clone), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    t = load_prompts(str(out))
    assert t.system == _DUMMY_SYSTEM_A + _DUMMY_SYSTEM_B
    assert t.grammar == "reference" and t.verbatim_query

    query = "  Is there a polyp in this image? "  # the release passes the question verbatim
    img = np.zeros((4, 4, 3), np.uint8)
    first, _ = to_messages(render_chat(t, query, img, first_turn=True))
    assert first == [
        {"role": "system", "content": [{"type": "text", "text": _DUMMY_SYSTEM_A + _DUMMY_SYSTEM_B}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>" + query}]},
    ]
    later, _ = to_messages(render_chat(t, query, img, first_turn=False))
    assert later[1]["content"][1]["text"] == (
        '<image>Dummy refine step. Asked: "' + query + '". More points or Terminate?'
    )
    # {braces} in the release's text stay literal
    assert "{braces}" in t.system


def test_prompts_from_release_errors_are_one_line_exit_2(tmp_path, capsys) -> None:
    from ibisagent.cli import main

    out = tmp_path / "t.json"
    assert main(["prompts", "--from-release", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err
    clone = _write_clone(tmp_path / "c1", engine="x = 1\n")
    assert main(["prompts", "--from-release", str(clone), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "refinement_prompt" in err and err.count("\n") == 1
    clone2 = _write_clone(tmp_path / "c2")
    assert main(["prompts", "--from-release", str(clone2), "--out", str(tmp_path / "t.txt")]) == 2
    assert ".json" in capsys.readouterr().err
    out.write_text("{}", encoding="utf-8")
    assert main(["prompts", "--from-release", str(clone2), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["prompts", "--from-release", str(clone2), "--out", str(out), "--force"]) == 0


def test_release_prompt_extraction_reads_ast_only(tmp_path) -> None:
    from ibisagent.release_prompts import ReleasePromptError, extract_release_prompts

    # `not is_first_turn` puts the first-turn f-string in the else branch
    flipped = _MULTI_TURN.replace('f"<image>{args.prompt}" if is_first_turn else args.prompt',
                                  'args.prompt if not is_first_turn else f"Q: {args.prompt}"')
    got = extract_release_prompts(_write_clone(tmp_path / "a", multi_turn=flipped))
    assert got.first_turn == "Q: {query}"
    assert got.sources["refine_turn"].startswith("infer/mllm_engine.py:")
    assert set(got.digests) == {"infer/multi_turn.py", "infer/mllm_engine.py"}
    two_holes = _ENGINE.replace('Asked: \\"{user_prompt}\\"', "{user_prompt} and {user_prompt}")
    assert two_holes != _ENGINE
    with pytest.raises(ReleasePromptError, match="one placeholder"):
        extract_release_prompts(_write_clone(tmp_path / "b", engine=two_holes))


def test_verbatim_query_is_opt_in() -> None:
    from ibisagent.prompts import load_prompts

    t = load_prompts("reference")
    assert not t.verbatim_query and "{query}" not in t.first("  polyp ")
    assert " polyp " not in t.first("  polyp ") and "polyp" in t.first("  polyp ")


# --------------------------------------------------------------------------------------------------------------
# The profile reaches the episode: EnvConfig(parser=...) and `segment --parser`
# --------------------------------------------------------------------------------------------------------------


def test_env_reference_parser_does_not_apply_a_click_from_think(square_image) -> None:
    from ibisagent.env import EnvConfig, SegmentationEnv
    from ibisagent.episode import StopReason
    from ibisagent.segmenters.base import create_segmenter

    img, gt = square_image
    reply = "<think>I could try Positive Point (0.5000, 0.4500)</think>\nI am not sure."  # no <action> tags
    ours = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=5))
    ours.reset(img, "the bright square", gt)
    res = ours.step(reply)
    assert not res.done and res.info["iou"] > 0  # the lenient parser finds the click in <think>
    ref = SegmentationEnv(create_segmenter("fake"), EnvConfig(max_steps=5, parser="reference"))
    ref.reset(img, "the bright square", gt)
    res = ref.step(reply)
    assert res.done and res.info["stop_reason"] == StopReason.UNPARSEABLE
    with pytest.raises(ValueError, match="parser must be one of"):
        EnvConfig(parser="strict")  # type: ignore[arg-type]


def test_segment_cli_has_the_parser_option() -> None:
    from ibisagent.cli import build_parser

    args = build_parser().parse_args(["segment", "img.png", "--query", "q", "--parser", "reference"])
    assert args.parser == "reference"
    assert build_parser().parse_args(["segment", "img.png", "--query", "q"]).parser == "lenient"


# ------------------------------------------------------------------------------------------------------------------
# The reference reward profile (the release's reward function, checked against our reading of its source)
# ------------------------------------------------------------------------------------------------------------------

def _reward_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 10x10 ground truth of 20 pixels; a mask before with IoU 0.60 (12 of them), after with IoU 0.75 (15)."""
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:7] = True  # 4 x 5 = 20 pixels
    before = np.zeros_like(gt)
    before[2:5, 2:6] = True  # 12 pixels inside: IoU 12 / 20
    after = before.copy()
    after[5, 2:5] = True  # 15 pixels: IoU 15 / 20
    return gt, before, after


def _reply(action: str, answer: str | None = None) -> str:
    tail = f"\n<answer>\n{answer}\n</answer>" if answer is not None else ""
    return f"<think>\nthe lower rim is missed\n</think>\n<action>\n{action}\n</action>{tail}"


def test_reference_reward_worked_example_is_1_2() -> None:
    """The issue's example: a valid positive click into the false-negative region raising IoU 0.60 -> 0.75 at step
    3 scores (format 1 + answer 2 + placement 1 + progress 1 + length 1) / 5 = 1.2, in both profiles."""
    from ibisagent.rewards import RewardConfig, score_transition

    gt, before, after = _reward_case()
    reply = _reply("Positive Point (0.4500, 0.5500)")  # pixel (4, 5): in gt, not in the mask before
    for cfg in (RewardConfig(), RewardConfig(profile="reference")):
        b = score_transition(reply, gt=gt, mask_before=before, mask_after=after, step=3, config=cfg)
        assert (b.iou_before, b.iou_after) == (pytest.approx(0.60), pytest.approx(0.75))
        assert b.components() == {"format": 1.0, "answer": 2.0, "placement": 1.0, "progress": 1.0, "length": 1.0}
        assert b.total == pytest.approx(1.2)


def test_reference_reward_quirks_differ_from_our_default() -> None:
    from ibisagent.rewards import RewardConfig, score_transition

    gt, before, after = _reward_case()
    ref = RewardConfig(profile="reference")

    def score(reply: str, cfg: RewardConfig, step: int | None = 3, mask_before: np.ndarray = before):
        return score_transition(reply, gt=gt, mask_before=mask_before, mask_after=after, step=step, config=cfg)

    # a stop: the release spells it Termination and scores placement 0 (we: +1 for a stop at IoU >= 0.8)
    good = np.zeros_like(gt)
    good[2:6, 2:6] = True  # IoU 16 / 20 = 0.8: answer tier 2 (strict > 0.8 for 3)
    stop = _reply("Termination", answer="the mask covers the lesion")
    r = score(stop, ref, mask_before=good)
    assert r.components() == {"format": 1.0, "answer": 2.0, "placement": 0.0, "progress": 0.0, "length": 1.0}
    assert r.total == pytest.approx(4 / 5)
    d = score(stop, RewardConfig(), mask_before=good)
    assert d.placement == 1.0 and d.total == pytest.approx(5 / 5)
    # "Terminate" (what its inference parser and ours emit) is no action for the release's reward
    r = score(_reply("Terminate", answer="done"), ref, mask_before=good)
    assert r.components() == {"format": 0.0, "answer": 0.0, "placement": 0.0, "progress": 0.0, "length": 1.0}
    # a Termination without an answer fails its format check only
    assert score(_reply("Termination"), ref, mask_before=good).format == 0.0
    # no space after the comma passes its format check; ours rejects it
    tight = _reply("Positive Point (0.45,0.55)")
    assert score(tight, ref).format == 1.0 and score(tight, ref).total == pytest.approx(1.2)
    assert score(tight, RewardConfig()).format == 0.0
    # spaces inside the action block pass its format check but no action is read: answer/placement/progress 0
    padded = "<think>\nx\n</think>\n<action>\n Positive Point (0.45, 0.55) \n</action>"
    r = score(padded, ref)
    assert r.components() == {"format": 1.0, "answer": 0.0, "placement": 0.0, "progress": 0.0, "length": 1.0}
    # a click outside the false-negative region, and an unknown step (its converter writes no current_step)
    miss = _reply("Positive Point (0.0500, 0.0500)")
    r = score(miss, ref, step=None)
    assert (r.placement, r.length) == (-1.0, 0.0)
    with pytest.raises(ValueError, match="step is required"):
        score(miss, RewardConfig(), step=None)
    # beyond the optimal 5 steps: -0.2 per extra step, as ours
    assert score(miss, ref, step=8).length == pytest.approx(-0.6)


def test_reference_reward_profile_is_checked_and_reads_from_dicts() -> None:
    from ibisagent.rewards import RewardConfig

    assert RewardConfig.from_dict({"profile": "reference"}).profile == "reference"
    with pytest.raises(ValueError, match="profile"):
        RewardConfig(profile="release")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------------
# The repeat rule's order (the release checks it before calling the segmenter)
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("check,applied", [("after", 3), ("before", 2)])
def test_repeat_rule_order(check: str, applied: int) -> None:
    """Three identical clicks stop the episode either way; under the release's order the third is not applied."""
    from ibisagent.env import EnvConfig, SegmentationEnv
    from ibisagent.episode import StopReason, StopRules, drive_lockstep
    from ibisagent.segmenters.base import create_segmenter

    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 200
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig(repeat_check=check))  # type: ignore[arg-type]
    env.reset(img, "the square")
    click = "<think>\nx\n</think>\n<action>\nPositive Point (0.5000, 0.5000)\n</action>"
    infos = [env.step(click).info for _ in range(3)]
    assert [i["stop_reason"] for i in infos] == [None, None, StopReason.REPEATED]
    assert len(env.session.points) == applied
    # the lockstep driver runs the same rule: only the applied turns reach its segmenter call
    calls: list[int] = []
    res = drive_lockstep(1, lambda live, turn: [click] * len(live),
                         lambda idx, acts: calls.append(len(idx)) or [None] * len(idx),
                         lambda r: parse_reply(r).action, StopRules(repeat_check=check))  # type: ignore[arg-type]
    assert res.stop_reasons == [StopReason.REPEATED] and len(calls) == applied
    with pytest.raises(ValueError, match="repeat_check"):
        EnvConfig(repeat_check="never")  # type: ignore[arg-type]


def test_segment_cli_has_the_repeat_check_option() -> None:
    from ibisagent.cli import build_parser

    args = build_parser().parse_args(["segment", "x.png", "--query", "q", "--repeat-check", "before"])
    assert args.repeat_check == "before"


# ------------------------------------------------------------------------------------------------------------------
# The release's trajectory clicker (oracle click_rule="release")
# ------------------------------------------------------------------------------------------------------------------

def test_release_clicker_clicks_a_border_touching_region_at_the_border() -> None:
    pytest.importorskip("cv2")
    from ibisagent.oracle_click import next_click

    gt = np.zeros((40, 40), bool)
    gt[10:31, 0:6] = True  # a 6-wide strip on the left edge
    ours, rel = next_click(None, gt), next_click(None, gt, rule="release")
    assert (ours.x, ours.y, ours.depth) == (2, 12, 3.0)  # padded: the image edge is border
    assert (rel.x, rel.y, rel.depth) == (0, 15, 6.0)  # unpadded: the edge is not border, first maximum row-major
    inner = np.zeros((40, 40), bool)
    inner[10:31, 10:21] = True  # away from the edge both rules agree
    a, b = next_click(None, inner), next_click(None, inner, rule="release")
    assert (a.positive, a.x, a.y) == (b.positive, b.x, b.y) == (True, 15, 15)


def test_release_clicker_ties_go_to_fn_and_it_may_repeat_a_click() -> None:
    pytest.importorskip("cv2")
    from ibisagent.oracle_click import next_click

    gt = np.zeros((30, 30), bool)
    gt[5:10, 5:10] = True  # FN: a 5x5 square
    pred = np.zeros_like(gt)
    pred[20:25, 20:25] = True  # FP: the same size elsewhere
    pick = next_click(pred, gt, rule="release")
    assert pick.positive and (pick.x, pick.y) == (7, 7)
    again = next_click(pred, gt, avoid=[(7, 7)], rule="release")  # the release keeps no memory of its clicks
    assert (again.x, again.y) == (7, 7)
    assert (next_click(pred, gt, avoid=[(7, 7)]).x, next_click(pred, gt, avoid=[(7, 7)]).y) != (7, 7)
    with pytest.raises(ValueError, match="rule"):
        next_click(pred, gt, rule="nearest")


def test_oracle_policy_takes_the_release_click_rule() -> None:
    pytest.importorskip("cv2")
    from ibisagent.env import EnvConfig, SegmentationEnv
    from ibisagent.policies.oracle import OraclePolicy
    from ibisagent.segmenters.base import create_segmenter

    img = np.zeros((40, 40, 3), np.uint8)
    gt = np.zeros((40, 40), bool)
    gt[10:31, 0:6] = True
    img[gt] = 200
    env = SegmentationEnv(create_segmenter("fake"), EnvConfig())
    obs = env.reset(img, "the strip", gt)
    policy = OraclePolicy(click_rule="release")
    policy.begin_episode(image=img, query="the strip", gt=gt)
    assert parse_reply(policy.act(obs)).action.pixel(40, 40) == (0, 15)
    with pytest.raises(ValueError, match="click_rule"):
        OraclePolicy(click_rule="nearest")
