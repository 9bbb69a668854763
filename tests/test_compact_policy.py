"""The compact CPU policy: text encoder, network, action rules, replies, episodes, shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ibisagent.agent import Agent
from ibisagent.policies.base import PolicyError, create_policy, list_policies
from ibisagent.policies.compact import (
    GRID,
    POLICY_WEIGHTS,
    CompactPolicy,
    CompactPolicyNet,
    action_log_prob,
    allowed_actions,
    cell_to_pixel,
    load_policy_net,
    save_policy_net,
    select_actions,
    state_planes,
)
from ibisagent.protocol import parse_reply, validate_reply
from ibisagent.segmenters import create_segmenter

# --- text encoder ---------------------------------------------------------------------------------------------

def test_text_encoder_matches_sentence_transformers_and_caches() -> None:
    from ibisagent.text_encoder import get_text_encoder

    enc = get_text_encoder()
    v = enc.encode("the polyp in this colonoscopy frame")
    assert v.shape == (384,) and v.dtype == np.float32
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-4
    # first values from sentence-transformers' SentenceTransformer(<package model dir>).encode(...) on this machine
    np.testing.assert_allclose(v[:5], [-0.03342576, 0.01862923, 0.01413688, -0.04096421, -0.01832735], atol=2e-4)
    calls = enc.forward_calls
    again = enc.encode("  the polyp in this   colonoscopy frame ")  # same query after whitespace normalization
    assert enc.forward_calls == calls and np.array_equal(again, v)
    liver, spleen = enc.encode("the liver in this CT slice"), enc.encode("the spleen in this CT slice")
    assert float(liver @ spleen) < 0.99  # different objects give different embeddings
    with pytest.raises(ValueError):
        enc.encode(None)  # type: ignore[arg-type]


# --- network and action rules ---------------------------------------------------------------------------------

def _planes(mask=None, points=(), labels=(), step=0, shape=(64, 64)) -> torch.Tensor:
    p = state_planes(mask, None, np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels), shape, step)
    return torch.from_numpy(p)[None]


def test_forward_shapes_and_factored_distribution_sums_to_one() -> None:
    torch.manual_seed(0)
    net = CompactPolicyNet().eval()
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:30] = True
    planes = _planes(mask, [(15, 15)], [1], step=1)
    with torch.no_grad():
        maps, stop, obj = net(torch.randn(1, 256, GRID, GRID), planes, torch.randn(1, 384))
        assert maps.shape == (1, 2, GRID, GRID) and stop.shape == (1,) and obj.shape == (1, GRID, GRID)
        allowed, _ = allowed_actions(planes)
        idx = torch.nonzero(allowed.flatten(1)[0])[:, 0]
        lp = action_log_prob(maps.expand(len(idx), -1, -1, -1), stop.expand(len(idx)),
                             planes.expand(len(idx), -1, -1, -1), idx)
        lp_stop = action_log_prob(maps, stop, planes, torch.tensor([-1]))
    total = float(torch.logsumexp(torch.cat([lp, lp_stop]), 0).exp())
    assert abs(total - 1.0) < 1e-4


def test_allowed_actions_follow_the_game_rules() -> None:
    planes = _planes(None, step=0)
    allowed, stop_ok = allowed_actions(planes)
    assert not bool(stop_ok[0]) and not allowed[0, 1].any() and allowed[0, 0].all()
    mask = np.zeros((64, 64), bool)
    mask[0:32, :] = True
    planes = _planes(mask, [(5.0, 40.0)], [1], step=1)
    allowed, stop_ok = allowed_actions(planes)
    assert bool(stop_ok[0])
    assert not allowed[0, 0, 40, 5] and not allowed[0, 1, 40, 5]  # the clicked cell is never clicked again
    assert not allowed[0, 0, 10, 10] and allowed[0, 1, 10, 10]  # inside the mask: negative only
    assert allowed[0, 0, 50, 50] and not allowed[0, 1, 50, 50]  # outside: positive only
    maps = torch.zeros(1, 2, GRID, GRID)
    acts, _, _ = select_actions(maps, torch.tensor([-5.0]), planes, temperature=1.0,
                                generator=torch.Generator().manual_seed(0))
    a = int(acts[0])
    assert a >= 0 and bool(allowed.flatten(1)[0, a])


def test_cell_to_pixel_lands_in_the_cell_on_the_right_side_of_the_mask() -> None:
    h, w = 128, 256
    mask = np.zeros((h, w), bool)
    mask[:, :130] = True  # cell column 32 spans x 128..131: pixels 128, 129 in the mask, 130, 131 outside
    maps = np.zeros((2, GRID, GRID), np.float32)
    flat = 10 * GRID + 32  # positive, row 10, col 32
    positive, x, y = cell_to_pixel(flat, maps, mask, (h, w))
    assert positive and 128 <= x < 132 and 20 <= y < 22 and not mask[y, x]
    positive, x, y = cell_to_pixel(GRID * GRID + flat, maps, mask, (h, w))
    assert not positive and mask[y, x]
    _, x2, y2 = cell_to_pixel(flat, maps, mask, (h, w), clicked={(x, y)} | {(130, 20), (131, 20)})
    assert (x2, y2) not in {(130, 20), (131, 20)}


# --- the policy in the environment -----------------------------------------------------------------------------

@pytest.fixture()
def blob() -> tuple[np.ndarray, np.ndarray]:
    img = np.full((90, 120, 3), 35, np.uint8)
    yy, xx = np.ogrid[:90, :120]
    gt = (yy - 40) ** 2 + (xx - 70) ** 2 <= 15 ** 2
    img[gt] = 210
    return img, gt


def test_registered_and_needs_no_ground_truth() -> None:
    names = list_policies()
    assert "compact" in names and "compact-box" in names
    pol = create_policy("compact", weights="random", embedder="fake")
    assert pol.requires_gt is False and pol.grammar == "reference"


def test_greedy_episode_on_fake_terminates_with_valid_replies(blob) -> None:
    img, gt = blob
    pol = CompactPolicy(weights="random", embedder="fake", max_clicks=4)
    ep = Agent(pol, "fake").segment(img, "the bright blob", gt)
    assert ep.stop_reason == "terminate"
    assert 1 <= ep.n_clicks <= 4
    seen = set()
    for s in ep.steps:
        assert validate_reply(s.raw, "reference").ok, s.raw
        assert "<think>" in s.raw and "probability" in s.raw  # reasoning mentions the network's own state
        a = parse_reply(s.raw, "reference").action
        if a.is_click:
            px = a.pixel(img.shape[1], img.shape[0])
            assert px not in seen
            seen.add(px)
    assert ep.steps[0].kind == "positive"


def test_box_first_variant_plays_in_extended_grammar(blob) -> None:
    img, gt = blob
    pol = create_policy("compact-box", weights="random", embedder="fake", max_clicks=2)
    assert pol.grammar == "extended"
    ep = Agent(pol, "fake").segment(img, "the bright blob", gt)
    assert ep.steps[0].kind == "box"
    assert validate_reply(ep.steps[0].raw, "extended").ok
    assert ep.stop_reason == "terminate"


def test_query_blind_variant_uses_empty_query() -> None:
    from ibisagent.text_encoder import get_text_encoder

    pol = CompactPolicy(weights="random", embedder="fake", query_blind=True)
    assert np.array_equal(pol.text_embedding("the liver"), get_text_encoder().encode(""))


def test_save_load_roundtrip_and_missing_weights(tmp_path) -> None:
    torch.manual_seed(1)
    net = CompactPolicyNet()
    path = save_policy_net(net, tmp_path / "p.safetensors", {"stage": "test", "steps": 3})
    net2, meta = load_policy_net(path)
    assert meta["stage"] == "test" and meta["steps"] == "3"
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(PolicyError, match="train-policy"):
        CompactPolicy(weights=tmp_path / "missing.safetensors")
    with pytest.raises(PolicyError):
        CompactPolicy(weights="random", first_action="lasso")


def test_query_maps_read_the_embedding_channels_the_query_keys_and_round_trip(tmp_path) -> None:
    """With ``query_maps`` the query picks channels of the full embedding: the maps are the cosine of each pixel's
    256 channels with a text-keyed vector, so the same image gives different inputs for different queries; the
    architecture is stored in the file and an older file (no ``query_maps``) still loads as before."""
    from ibisagent.policies.compact import CompactNetConfig

    torch.manual_seed(3)
    net = CompactPolicyNet(CompactNetConfig(width=64, query_maps=4)).eval()
    emb = torch.zeros(1, 256, GRID, GRID)
    emb[0, 7, :32] = 1.0  # the top half "is" channel 7, the bottom half channel 9
    emb[0, 9, 32:] = 1.0
    t = torch.zeros(1, net.cfg.text_hidden)
    with torch.no_grad():
        net.query_key.weight.zero_()
        net.query_key.bias.zero_()
        net.query_key.bias[7] = 2.0  # key 0 looks for channel 7
        net.query_key.bias[256 + 9] = 3.0  # key 1 for channel 9
        r = net.query_response(emb, t)
    assert r.shape == (1, 4, GRID, GRID)
    assert torch.allclose(r[0, 0, :32], torch.tensor(2.0)) and torch.allclose(r[0, 0, 32:], torch.tensor(0.0))
    assert torch.allclose(r[0, 1, 32:], torch.tensor(3.0)) and torch.allclose(r[0, 1, :32], torch.tensor(0.0))
    # a different query (text features) gives different network outputs on the same image and state
    torch.manual_seed(4)
    net2 = CompactPolicyNet(CompactNetConfig(query_maps=4)).eval()
    planes = _planes(np.zeros((64, 64), bool), [], [], step=0)
    e = torch.randn(1, 256, GRID, GRID)
    with torch.no_grad():
        o1 = net2(e, planes, torch.randn(1, 384))[2]
        o2 = net2(e, planes, torch.randn(1, 384))[2]
    assert not torch.allclose(o1, o2)
    path = save_policy_net(net2, tmp_path / "q.safetensors")
    back, _ = load_policy_net(path)
    assert back.cfg.query_maps == 4 and hasattr(back, "query_key")
    assert not hasattr(CompactPolicyNet(), "query_key")  # off by default: the shipped files' architecture


def test_act_before_begin_episode_is_a_clear_error(blob) -> None:
    from ibisagent.env import SegmentationEnv

    img, _ = blob
    env = SegmentationEnv(create_segmenter("fake"))
    obs = env.reset(img, "x")
    with pytest.raises(PolicyError, match="begin_episode"):
        CompactPolicy(weights="random", embedder="fake").act(obs)


# --- shipped weights --------------------------------------------------------------------------------------------

def test_shipped_weights_load() -> None:
    assert POLICY_WEIGHTS.is_file(), "the compact policy weights must ship inside the package"
    net, meta = load_policy_net()
    assert sum(p.numel() for p in net.parameters()) > 100_000
    assert "config" in meta and "stage" in meta


@pytest.mark.slow
def test_real_case_episode_with_shipped_weights(dermoscopy_case) -> None:
    img, gt, query = dermoscopy_case
    try:
        seg = create_segmenter("litemedsam-click")
    except Exception as exc:  # noqa: BLE001 - weights of another area may be absent in a partial checkout
        pytest.skip(f"litemedsam-click unavailable: {exc}")
    seg.memory_cache.clear()
    pol = create_policy("compact")
    ep = Agent(pol, seg).segment(img, query)  # no ground truth: the default use
    assert ep.stop_reason in ("terminate", "max_steps")
    assert ep.n_clicks >= 1
    assert all(validate_reply(s.raw, "reference").ok for s in ep.steps)
    assert seg.encoder_runs + pol.embedder.encoder_runs == 1  # one encoder pass for segmenter and policy
    from ibisagent.masks import iou

    assert iou(ep.final_mask, gt) > 0.6


def test_belief_rule_clicks_the_deepest_disagreement_and_stops_on_agreement() -> None:
    from ibisagent.env import Observation

    h, w = 128, 192
    pol = CompactPolicy(weights="random", embedder="fake", click_rule="belief", belief_stop=0.9)
    img = np.zeros((h, w, 3), np.uint8)
    pol.begin_episode(image=img, query="the square")
    obj = np.full((GRID, GRID), -5.0, np.float32)
    obj[16:48, 8:40] = 5.0  # belief: a square in the left half of the grid
    belief = pol.belief_mask(obj, (h, w))
    pol.net.forward = lambda emb, planes, txt: (torch.zeros(1, 2, GRID, GRID), torch.zeros(1),  # type: ignore
                                                torch.from_numpy(obj)[None])

    def obs(mask, points=(), labels=()):
        return Observation(image=img, overlay=img, query="the square", step=len(points), mask=mask, logits=None,
                           points=np.asarray(points, np.float32).reshape(-1, 2), labels=np.asarray(labels),
                           box=None, chat=(), grammar="reference")

    first = pol.decide(obs(None))
    assert first.index >= 0 and first.index < GRID * GRID and first.pixel is not None  # positive
    x, y = first.pixel
    assert belief[y, x] and 50 <= x <= 94 and abs(y - 64) <= 3  # on the medial axis of the 96x64 rectangle
    assert validate_reply(pol.reply_for(obs(None), first), "reference").ok

    leak = belief.copy()
    leak[10:60, 150:190] = True  # the mask also covers a blob the belief rejects
    neg = pol.decide(obs(leak, [(x, y)], [1]))
    assert neg.index >= GRID * GRID and not belief[neg.pixel[1], neg.pixel[0]] and leak[neg.pixel[1], neg.pixel[0]]

    done = pol.decide(obs(belief, [(x, y)], [1]))  # mask == belief: agreement 1.0 >= 0.9
    assert done.index == -1
    assert "Terminate" in pol.reply_for(obs(belief, [(x, y)], [1]), done)


@pytest.mark.slow
def test_shipped_policy_finds_the_named_ct_organ() -> None:
    """The query is used: on the bundled SAM-Med2D AMOS CT slice (a train image under the group split; the val-image
    check is the next test) the first click lands in the organ the query names; the query-blind variant clicks the
    same point whatever is asked."""
    from pathlib import Path

    from PIL import Image

    d = Path(__file__).resolve().parents[1] / "src" / "ibisagent" / "demo_data"
    img = np.asarray(Image.open(d / "images/sammed2d_amos_0006_90.png").convert("RGB"))
    masks = {o: np.asarray(Image.open(d / f"masks/sammed2d_amos_0006_90_000__{o}.png").convert("L")) > 0
             for o in ("aorta", "liver")}
    seg = create_segmenter("litemedsam-click")
    first: dict[tuple[bool, str], tuple[int, int]] = {}
    for blind in (False, True):
        for organ in masks:
            pol = create_policy("compact", query_blind=blind)
            ep = Agent(pol, seg).segment(img, f"the {organ} in this abdominal/thoracic CT slice")
            x, y = (int(v) for v in ep.steps[0].points[0])
            first[blind, organ] = (x, y)
    for organ, m in masks.items():
        x, y = first[False, organ]
        assert m[y, x], f"first click for {organ!r} at {(x, y)} is outside it"
    assert first[True, "aorta"] == first[True, "liver"]
    assert first[False, "aorta"] != first[False, "liver"]


@pytest.mark.slow
def test_shipped_policy_reads_the_query_on_unseen_chest_xrays(shared_data) -> None:
    """On the JSRT val images (patients never trained on; five objects each: both lungs, heart, both clavicles) the
    first click lands inside the object the query names for most queries (0.72 measured for the shipped weights),
    while the query-blind variant clicks one point per image whatever is asked."""
    from collections import defaultdict

    from ibisagent.io import load_case_arrays
    from ibisagent.io.manifest import load_manifest

    by_image = defaultdict(list)
    for c in load_manifest(shared_data, split="val", datasets=["jsrt_chest_xray"]):
        by_image[c.image_key].append(c)
    assert len(by_image) >= 5
    seg = create_segmenter("litemedsam-click")
    hits, total = 0, 0
    for cases in by_image.values():
        blind_first = set()
        for c in cases:
            img, gt = load_case_arrays(c)
            for blind in (False, True):
                ep = Agent(create_policy("compact", query_blind=blind, max_clicks=1), seg).segment(img, c.query)
                x, y = (int(v) for v in ep.steps[0].points[0])
                if blind:
                    blind_first.add((x, y))
                else:
                    hits += bool(gt[y, x])
                    total += 1
        assert len(blind_first) == 1
    assert hits / total >= 0.6, f"first click inside the named object for {hits} of {total} queries"


def test_probability_text_never_reads_zero() -> None:
    from ibisagent.policies.compact import _prob_text

    assert _prob_text(0.4321) == "0.43"
    assert _prob_text(0.0004) == "4.0e-04"
    assert _prob_text(0.0) == "0.0e+00"


def test_a_stop_forced_by_the_click_budget_says_so(blob) -> None:
    img, gt = blob
    pol = CompactPolicy(weights="random", embedder="fake", max_clicks=2, stop_threshold=2.0)  # never stops by itself
    ep = Agent(pol, "fake").segment(img, "the bright blob", gt)
    assert ep.n_clicks == 2 and ep.stop_reason == "terminate"
    last = ep.steps[-1].raw
    assert validate_reply(last, "reference").ok, last
    assert "budget" in last and "may still need correction" in last
    # a stop the policy chose itself keeps the ordinary wording
    pol = CompactPolicy(weights="random", embedder="fake", max_clicks=2, stop_threshold=0.0)
    ep = Agent(pol, "fake").segment(img, "the bright blob", gt)
    assert "budget" not in ep.steps[-1].raw


def test_tta_averages_the_mirrored_pass() -> None:
    """With test-time augmentation the outputs are the mean of the network on the image and on its mirror (mirrored
    back): for a mirror-symmetric image and state they are exactly mirror-symmetric, which one pass is not."""
    from ibisagent.env import Observation

    h, w = 64, 128
    img = np.zeros((h, w, 3), np.uint8)
    img[20:44, 32:96] = 200  # symmetric about the vertical centre line
    mask = img[..., 0] > 0

    def obs(m):
        return Observation(image=img, overlay=img, query="the bar", step=1, mask=m, logits=None,
                           points=np.asarray([[40, 32], [87, 32]], np.float32), labels=np.asarray([1, 1]),
                           box=None, chat=(), grammar="reference")

    plain = CompactPolicy(weights="random", embedder="fake", seed=0)
    tta = CompactPolicy(weights="random", embedder="fake", seed=0, tta=True)
    tta.net.load_state_dict(plain.net.state_dict())
    for p in (plain, tta):
        p.begin_episode(image=img, query="the bar")
    a, b = plain.decide(obs(mask)), tta.decide(obs(mask))
    assert np.allclose(b.maps, b.maps[..., ::-1], atol=1e-5) and np.allclose(b.obj, b.obj[..., ::-1], atol=1e-5)
    assert not np.allclose(a.maps, a.maps[..., ::-1], atol=1e-3)
    # and it is the average of the two passes
    emb = tta._emb_flip
    assert emb is not None and torch.equal(emb, tta._emb)  # the mirrored image is the image itself
    with torch.no_grad():
        m2 = plain.net(emb, torch.from_numpy(a.planes[..., ::-1].copy())[None], plain._text)[0][0].numpy()
    assert np.allclose(b.maps, (a.maps + m2[..., ::-1]) / 2, atol=1e-5)


def test_tta_skips_the_mirrored_pass_for_a_side_named_query() -> None:
    img = np.zeros((64, 128, 3), np.uint8)
    img[10:30, 5:40] = 200
    pol = CompactPolicy(weights="random", embedder="fake", tta=True)
    pol.begin_episode(image=img, query="the kidney left in this CT slice")
    assert pol._emb_flip is None
    pol.begin_episode(image=img, query="the liver in this CT slice")
    assert pol._emb_flip is not None


def test_flag_options_accept_text_and_refuse_nonsense() -> None:
    assert not CompactPolicy(weights="random", embedder="fake", tta="False").tta
    assert CompactPolicy(weights="random", embedder="fake", query_blind="true").query_blind
    with pytest.raises(PolicyError, match="tta must be true or false"):
        CompactPolicy(weights="random", embedder="fake", tta="maybe")


def test_predicted_iou_is_the_belief_agreement_and_reaches_the_episode(blob) -> None:
    img, gt = blob
    pol = CompactPolicy(weights="random", embedder="fake", max_clicks=2)
    ep = Agent(pol, "fake").segment(img, "the bright blob", gt)
    assert ep.predicted_iou is not None and 0.0 <= ep.predicted_iou <= 1.0
    belief = pol.belief_mask(pol.last.obj, gt.shape)
    m = ep.final_mask
    expected = (belief & m).sum() / max(1, (belief | m).sum())
    assert ep.predicted_iou == pytest.approx(expected)
    assert pol.predicted_iou(belief) == pytest.approx(1.0)  # a mask equal to the belief: full agreement
    js = ep.to_json()
    assert js["predicted_iou"] == pytest.approx(round(ep.predicted_iou, 4))
    assert js["low_confidence"] == (ep.predicted_iou < 0.5)
    # scripted policies have no estimate
    ep2 = Agent("oracle", "fake").segment(img, "the bright blob", gt)
    assert ep2.predicted_iou is None and ep2.to_json()["low_confidence"] is False


def test_text_only_mode_is_one_box_then_terminate(blob) -> None:
    img, gt = blob
    pol = create_policy("text-only", weights="random", embedder="fake")
    assert pol.name == "text-only" and pol.grammar == "extended"
    ep = Agent(pol, "fake").segment(img, "the bright blob")
    assert [s.kind for s in ep.steps] == ["box", "terminate"]
    assert ep.predicted_iou is not None
