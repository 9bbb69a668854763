"""The whole loop on a real case with the default (real) segmenter."""

import pytest

from ibisagent.agent import Agent
from ibisagent.cli import default_segmenter
from ibisagent.demo import demo_data_dir
from ibisagent.io import load_case, load_manifest
from ibisagent.protocol import validate_reply


@pytest.fixture(scope="module")
def demo_case():
    case = next(c for c in load_manifest(demo_data_dir()) if c.id == "ph2_IMD006__skin_lesion")
    loaded, gt = load_case(case)
    return loaded.array, gt, case.query


@pytest.mark.slow
def test_oracle_episode_real_segmenter(demo_case) -> None:
    img, gt, query = demo_case
    name = default_segmenter()
    assert name == "litemedsam-click", "the click-tuned weights must ship with the package"
    ep = Agent("oracle", name).segment(img, query, gt)
    assert ep.stop_reason == "terminate", [s.action for s in ep.steps]
    assert ep.final_iou >= 0.8
    assert ep.encoder_s > 0 and ep.segmenter_s > 0
    for s in ep.steps:
        assert validate_reply(s.raw).ok


@pytest.mark.slow
def test_box_then_click_episode_real_segmenter(demo_case) -> None:
    img, gt, query = demo_case
    ep = Agent("oracle-box", default_segmenter(), policy_kwargs={"box_jitter": 0.1, "seed": 3}).segment(img, query, gt)
    assert ep.steps[0].kind == "box"
    assert ep.final_iou >= 0.8
