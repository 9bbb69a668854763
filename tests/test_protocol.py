import pytest

from ibisagent.protocol import (
    Action,
    ActionKind,
    ActionParseError,
    format_reply,
    parse_action,
    parse_reply,
    to_normalized,
    to_pixel,
    validate_reply,
)

ACTIONS = [
    Action.positive(0.5, 0.25),
    Action.negative(0.0, 1.0),
    Action.positive(0.1234, 0.9876),
    Action.make_box(0.1, 0.2, 0.3, 0.4),
    Action.terminate("done"),
]


@pytest.mark.parametrize("action", ACTIONS, ids=lambda a: a.kind.value)
def test_round_trip(action: Action) -> None:
    text = format_reply(action, "some reasoning", answer="the answer" if action.kind is ActionKind.TERMINATE else None)
    assert validate_reply(text, "extended").ok, validate_reply(text, "extended").errors
    parsed = parse_reply(text, "extended")
    assert parsed.action.text() == action.text()
    assert parsed.reasoning == "some reasoning"


def test_exact_reference_layout() -> None:
    text = format_reply(Action.positive(0.5, 0.25), "r")
    assert text == "<think>\nr\n</think>\n<action>\nPositive Point (0.5000, 0.2500)\n</action>"
    stop = format_reply(Action.terminate(), "r", "a")
    assert stop == "<think>\nr\n</think>\n<action>\nTerminate\n</action>\n<answer>\na\n</answer>"


def test_pixel_conversion_reference_rule() -> None:
    assert to_pixel(1.0, 100) == 99
    assert to_pixel(0.0, 100) == 0
    assert to_pixel(0.505, 100) == 50
    for size in (7, 100, 333, 1348, 5000):
        for px in (0, 1, size // 2, size - 1):
            assert to_pixel(float(f"{to_normalized(px, size):.4f}"), size) == px


GOOD = [
    "<think>\nx\n</think>\n<action>\nPositive Point (0.1000, 0.2000)\n</action>",
    "<think>\nx\n</think>\n<action>\nNegative Point (1.0000, 0.0000)\n</action>",
    "<think>\nx\n</think>\n<action>\nTerminate\n</action>\n<answer>\nok\n</answer>",
    "<think>\nx\n</think>\n<action>\nTermination\n</action>\n<answer>\nok\n</answer>",
]
BAD = [
    ("<think>x</think><action>Positive Point (0.1, 0.2)</action>", "layout"),  # no newlines
    ("<action>\nPositive Point (0.1000, 0.2000)\n</action>", "think"),
    ("<think>\nx\n</think>\n<action>\nPositive Point (1.5000, 0.2000)\n</action>", "[0, 1]"),
    ("<think>\nx\n</think>\n<action>\nTerminate\n</action>", "answer"),
    ("<think>\nx\n</think>\n<action>\nPositive Point (0.1, 0.2)\n</action>\n<answer>\nhi\n</answer>", "only allowed"),
    ("<think>\nx\n</think>\n<action>\nClick (0.1, 0.2)\n</action>", "unrecognized"),
    ("<think>\nx\n</think>\n<action>\nPositive Point (0.1, 0.2)\nNegative Point (0.3, 0.4)\n</action>", "unrecognized"),
    ("<think>\nx\n</think>\n<think>\ny\n</think>\n<action>\nTerminate\n</action>", "exactly one <think>"),
    ("<think>\nx\n</think>\n<action>\nBox (0.5000, 0.2000, 0.1000, 0.4000)\n</action>", "x1 < x2"),
]


@pytest.mark.parametrize("text", GOOD)
def test_validator_accepts(text: str) -> None:
    assert validate_reply(text, "reference").ok


@pytest.mark.parametrize("text,why", BAD)
def test_validator_rejects(text: str, why: str) -> None:
    res = validate_reply(text, "extended")
    assert not res.ok
    assert any(why in e for e in res.errors), res.errors


def test_validator_reference_mode_rejects_box() -> None:
    text = "<think>\nx\n</think>\n<action>\nBox (0.1000, 0.2000, 0.3000, 0.4000)\n</action>"
    assert validate_reply(text, "extended").ok
    assert not validate_reply(text, "reference").ok


def test_lenient_parser() -> None:
    assert parse_action("<action> positive point( 0.3 ,0.4 ) </action>").text() == "Positive Point (0.3000, 0.4000)"
    assert parse_action("blah Terminate.").kind is ActionKind.TERMINATE
    assert parse_action("<action>Termination</action><answer> a </answer>").answer == "a"
    assert parse_action("Negative Point (0.2, 0.3) then Positive Point (0.5, 0.5)").kind is ActionKind.NEGATIVE


@pytest.mark.parametrize("text,reason", [
    ("I think we are done here", "no_action"),
    ("<action>Positive Point (120, 45)</action>", "pixel_coordinates"),
    ("<action>Box (0.5, 0.5, 0.4, 0.6)</action>", "invalid_box"),
    ("<action>Positive Point (-0.2, 0.5)</action>", "out_of_range"),
])
def test_parser_errors(text: str, reason: str) -> None:
    with pytest.raises(ActionParseError) as exc:
        parse_action(text)
    assert exc.value.reason == reason


def test_reference_mode_rejects_box_in_parser() -> None:
    with pytest.raises(ActionParseError) as exc:
        parse_action("<action>Box (0.1, 0.2, 0.3, 0.4)</action>", mode="reference")
    assert exc.value.reason == "box_not_allowed"
