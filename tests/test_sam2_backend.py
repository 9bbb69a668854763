"""The ``sam2`` backend: a tiny random SAM2 (built here from a small Hiera config) saved as a checkpoint and loaded
through ``create_segmenter``; parity with SAM2's own ``SAM2ImagePredictor``; clear errors for missing/mismatched
checkpoints and a missing package; torchvision never imported."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ibisagent.segmenters import SegmenterError, SegmenterUnavailable, create_segmenter, list_segmenters
from ibisagent.segmenters._sam2_transforms import (
    IMAGENET_MEAN,
    SAM2Transforms,
    normalize,
    patched_sam2_transforms,
    preprocess,
    resize_square,
    to_tensor,
)

TINY_CONFIG = """
model:
  _target_: sam2.modeling.sam2_base.SAM2Base
  image_encoder:
    _target_: sam2.modeling.backbones.image_encoder.ImageEncoder
    scalp: 1
    trunk:
      _target_: sam2.modeling.backbones.hieradet.Hiera
      embed_dim: 8
      num_heads: 1
      stages: [1, 1, 2, 1]
      global_att_blocks: [3]
      window_pos_embed_bkg_spatial_size: [4, 4]
      window_spec: [8, 4, 4, 4]
    neck:
      _target_: sam2.modeling.backbones.image_encoder.FpnNeck
      position_encoding:
        _target_: sam2.modeling.position_encoding.PositionEmbeddingSine
        num_pos_feats: 32
        normalize: true
        scale: null
        temperature: 10000
        warmup_cache: false
      d_model: 32
      backbone_channel_list: [64, 32, 16, 8]
      fpn_top_down_levels: [2, 3]
      fpn_interp_model: nearest
  memory_attention:
    _target_: sam2.modeling.memory_attention.MemoryAttention
    d_model: 32
    pos_enc_at_input: true
    layer:
      _target_: sam2.modeling.memory_attention.MemoryAttentionLayer
      activation: relu
      dim_feedforward: 32
      dropout: 0.0
      pos_enc_at_attn: false
      self_attention:
        _target_: sam2.modeling.sam.transformer.RoPEAttention
        rope_theta: 10000.0
        feat_sizes: [16, 16]
        embedding_dim: 32
        num_heads: 1
        downsample_rate: 1
        dropout: 0.0
      d_model: 32
      pos_enc_at_cross_attn_keys: true
      pos_enc_at_cross_attn_queries: false
      cross_attention:
        _target_: sam2.modeling.sam.transformer.RoPEAttention
        rope_theta: 10000.0
        feat_sizes: [16, 16]
        rope_k_repeat: true
        embedding_dim: 32
        num_heads: 1
        downsample_rate: 1
        dropout: 0.0
        kv_in_dim: 16
    num_layers: 1
  memory_encoder:
    _target_: sam2.modeling.memory_encoder.MemoryEncoder
    out_dim: 16
    in_dim: 32
    position_encoding:
      _target_: sam2.modeling.position_encoding.PositionEmbeddingSine
      num_pos_feats: 16
      normalize: true
      scale: null
      temperature: 10000
      warmup_cache: false
    mask_downsampler:
      _target_: sam2.modeling.memory_encoder.MaskDownSampler
      embed_dim: 32
      kernel_size: 3
      stride: 2
      padding: 1
    fuser:
      _target_: sam2.modeling.memory_encoder.Fuser
      layer:
        _target_: sam2.modeling.memory_encoder.CXBlock
        dim: 32
        kernel_size: 7
        padding: 3
        layer_scale_init_value: 1e-6
        use_dwconv: true
      num_layers: 1
  num_maskmem: 2
  image_size: 256
  sigmoid_scale_for_mem_enc: 20.0
  sigmoid_bias_for_mem_enc: -10.0
  use_mask_input_as_output_without_sam: true
  directly_add_no_mem_embed: true
  no_obj_embed_spatial: true
  use_high_res_features_in_sam: true
  multimask_output_in_sam: true
  iou_prediction_use_sigmoid: true
  use_obj_ptrs_in_encoder: true
  add_tpos_enc_to_obj_ptrs: true
  proj_tpos_enc_in_obj_ptrs: true
  use_signed_tpos_enc_to_obj_ptrs: true
  only_obj_ptrs_in_the_past_for_eval: true
  pred_obj_scores: true
  pred_obj_scores_mlp: true
  fixed_no_obj_ptr: true
  multimask_output_for_tracking: true
  use_multimask_token_for_obj_ptr: true
  multimask_min_pt_num: 0
  multimask_max_pt_num: 1
  use_mlp_for_obj_ptr_proj: true
  compile_image_encoder: false
"""

H, W = 90, 140  # deliberately not square and not the model size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config path, checkpoint path) of a tiny random SAM2 (256 px input, 16x16 embedding, 64x64 logits)."""
    pytest.importorskip("sam2", reason="sam2 not installed")
    from ibisagent.segmenters.sam2 import build_sam2_model

    d = tmp_path_factory.mktemp("tiny_sam2")
    cfg = d / "tiny_sam2.yaml"
    cfg.write_text(TINY_CONFIG)
    torch.manual_seed(0)
    model = build_sam2_model(cfg, None)
    with torch.no_grad():  # random but non-trivial weights everywhere (zero-initialized params included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt = d / "tiny_sam2.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    return cfg, ckpt


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = (rng.random((H, W, 3)) * 60).astype(np.uint8)
    img[20:60, 40:100] += 150  # a bright blob
    return img


@pytest.fixture(scope="module")
def seg(tiny: tuple[Path, Path], image: np.ndarray):
    cfg, ckpt = tiny
    s = create_segmenter("sam2", config=str(cfg), checkpoint=str(ckpt))
    s.set_image(image)
    return s


def test_registered() -> None:
    assert "sam2" in list_segmenters()


def test_predict_click_box_and_mask_feedback(seg, image: np.ndarray) -> None:
    assert seg.image_size == 256 and seg.mask_input_size == (64, 64)
    r1 = seg.predict(points=np.array([[70.0, 40.0]]), labels=np.array([1]))
    assert r1.mask.shape == (H, W) and r1.mask.dtype == np.bool_
    assert r1.logits.shape == (1, 64, 64) and r1.logits.dtype == np.float32
    assert np.isfinite(r1.score)
    assert np.abs(r1.logits).max() <= 32.0
    # the mask is the thresholded upsampled logits: consistent with the low-res logits' sign
    up = torch.nn.functional.interpolate(torch.from_numpy(r1.logits)[None], size=(H, W), mode="bilinear",
                                         align_corners=False)[0, 0].numpy()
    assert np.array_equal(r1.mask, up > 0)

    r2 = seg.predict(box=np.array([30.0, 15.0, 110.0, 70.0]))
    assert r2.mask.shape == (H, W) and r2.logits.shape == (1, 64, 64)
    r3 = seg.predict(points=np.array([[70.0, 40.0], [10.0, 80.0]]), labels=np.array([1, 0]),
                     box=np.array([30.0, 15.0, 110.0, 70.0]), mask_input=r2.logits)
    assert r3.mask.shape == (H, W) and r3.mask.dtype == np.bool_
    # each prompt reaches the model: different prompts give different logits
    assert not np.allclose(r2.logits, r3.logits)
    r4 = seg.predict(points=np.array([[70.0, 40.0], [10.0, 80.0]]), labels=np.array([1, 0]),
                     box=np.array([30.0, 15.0, 110.0, 70.0]))
    assert not np.allclose(r3.logits, r4.logits)  # the mask feedback changes the result
    assert seg.timings.encoder_calls == 1 and seg.timings.decoder_calls >= 4


def test_matches_sam2_image_predictor(tiny, image: np.ndarray) -> None:
    """Our torchvision-free pipeline gives the same outputs as SAM2's own predictor (run with the substitute
    transforms), for a single click (multimask) and for box + clicks + mask feedback (single mask)."""
    cfg, ckpt = tiny
    from ibisagent.segmenters.sam2 import build_sam2_model

    ours = create_segmenter("sam2", config=str(cfg), checkpoint=str(ckpt))
    ours.set_image(image)
    model = build_sam2_model(cfg, ckpt)
    with patched_sam2_transforms():
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        pred = SAM2ImagePredictor(model)
        pred._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # SAM2 hard-codes the 1024-px sizes
        pred.set_image(image)
        pts = np.array([[70.0, 40.0]])
        masks, ious, lows = pred.predict(point_coords=pts, point_labels=np.array([1]), multimask_output=True)
        k = int(np.argmax(ious))
        r = ours.predict(points=pts, labels=np.array([1]))
        np.testing.assert_allclose(r.logits[0], lows[k], atol=1e-4)
        assert np.array_equal(r.mask, masks[k] > 0)
        assert r.score == pytest.approx(float(ious[k]), abs=1e-5)

        pts2, lab2, box = np.array([[70.0, 40.0], [10.0, 80.0]]), np.array([1, 0]), np.array([30.0, 15.0, 110.0, 70.0])
        masks, ious, lows = pred.predict(point_coords=pts2, point_labels=lab2, box=box, mask_input=lows[k:k + 1],
                                         multimask_output=False)
        r2 = ours.predict(points=pts2, labels=lab2, box=box, mask_input=r.logits)
        np.testing.assert_allclose(r2.logits[0], lows[0], atol=1e-4)
        assert np.array_equal(r2.mask, masks[0] > 0)
    assert "sam2.utils.transforms" not in sys.modules or not getattr(
        sys.modules["sam2.utils.transforms"], "__ibisagent_fake__", False)


def test_bad_mask_input(seg) -> None:
    with pytest.raises(SegmenterError, match="mask_input"):
        seg.predict(points=np.array([[5.0, 5.0]]), labels=np.array([1]), mask_input=np.zeros((1, 256, 256)))


def test_missing_checkpoint(tiny, tmp_path: Path) -> None:
    cfg, _ = tiny
    with pytest.raises(SegmenterUnavailable, match="checkpoint not found"):
        create_segmenter("sam2", config=str(cfg), checkpoint=str(tmp_path / "nope.pt"))


def test_no_checkpoint_given(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from ibisagent.segmenters.sam2 import CHECKPOINT_ENV

    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    with pytest.raises(SegmenterUnavailable, match="needs a checkpoint"):
        create_segmenter("sam2", config=str(tiny[0]))


def test_mismatched_checkpoint(tiny, tmp_path: Path) -> None:
    cfg, ckpt = tiny
    state = torch.load(ckpt, weights_only=True)["model"]
    state.pop(next(iter(state)))
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save({"model": state}, bad)
    with pytest.raises(SegmenterUnavailable, match="does not match the config") as ei:
        create_segmenter("sam2", config=str(cfg), checkpoint=str(bad))
    assert "missing" in str(ei.value) and "unexpected" in str(ei.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SegmenterUnavailable, match="cannot read"):
        create_segmenter("sam2", config=str(cfg), checkpoint=str(junk))


def test_shipped_config_names(tiny) -> None:
    from ibisagent.segmenters.sam2 import load_sam2_config, resolve_config

    assert resolve_config("sam2.1_hiera_t").name == "sam2.1_hiera_t.yaml"
    assert resolve_config("configs/sam2.1/sam2.1_hiera_t.yaml").is_file()
    cfg = load_sam2_config("sam2.1_hiera_t", image_size=512)
    assert cfg.image_size == 512 and cfg.sam_mask_decoder_extra_args.dynamic_multimask_via_stability
    with pytest.raises(SegmenterUnavailable, match="sam2.1_hiera_t"):
        resolve_config("no_such_config")
    with pytest.raises(SegmenterError, match="multiple of 32"):
        load_sam2_config("sam2.1_hiera_t", image_size=500)


def test_sam2_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ibisagent.segmenters.sam2 import PIP_INSTALL_HINT

    monkeypatch.setitem(sys.modules, "sam2", None)  # makes `import sam2` raise ImportError
    with pytest.raises(SegmenterUnavailable, match="pip install") as ei:
        create_segmenter("sam2", config="x.yaml", checkpoint=str(tmp_path / "x.pt"))
    assert PIP_INSTALL_HINT in str(ei.value) and "--no-deps" in str(ei.value)


def test_transforms_without_torchvision() -> None:
    img = np.zeros((30, 50, 3), np.uint8)
    img[...] = (np.array(IMAGENET_MEAN) * 255).round().astype(np.uint8)
    x = to_tensor(img)
    assert x.shape == (3, 30, 50) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    y = normalize(resize_square(x, 64))
    assert y.shape == (3, 64, 64) and float(y.abs().max()) < 0.02  # mean colour -> ~0
    assert preprocess(img, 32).shape == (1, 3, 32, 32)
    t = SAM2Transforms(resolution=256, mask_threshold=0.0)
    c = t.transform_coords(torch.tensor([[25.0, 15.0]]), normalize=True, orig_hw=(30, 50))
    assert torch.allclose(c, torch.tensor([[128.0, 128.0]]))
    assert t.transform_boxes(torch.tensor([[0.0, 0.0, 50.0, 30.0]]), normalize=True, orig_hw=(30, 50)).shape == (1, 2, 2)
    assert t.postprocess_masks(torch.zeros(1, 3, 8, 8), (30, 50)).shape == (1, 3, 30, 50)
    with pytest.raises(ValueError, match="orig_hw"):
        t.transform_coords(torch.zeros(1, 2), normalize=True)


def test_torchvision_never_imported(seg) -> None:
    assert "torchvision" not in sys.modules


def test_multimask_true_is_the_release_choice(tiny, image: np.ndarray) -> None:
    """The release (``infer/sam2_engine.py``) asks SAM2 for 3 masks on every turn, keeps the best-scoring one and
    feeds that mask's low-res logits back as the next mask input; ``multimask=True`` does the same (the session
    passes the previous result's logits back), where the default asks for one mask from the second click. SAM2's
    stability fallback (single-mask requests only) is switched off here: on random weights it would pick the
    multimask answer anyway and hide the difference."""
    cfg, ckpt = tiny
    from ibisagent.session import Session

    release_like = Session(create_segmenter("sam2", config=str(cfg), checkpoint=str(ckpt), multimask=True))
    default = Session(create_segmenter("sam2", config=str(cfg), checkpoint=str(ckpt)))
    decoder = release_like.segmenter.model.sam_mask_decoder  # the model is shared by both (and cached)
    decoder.dynamic_multimask_via_stability = False
    try:
        _release_chain(release_like, default, cfg, ckpt, image)
    finally:
        decoder.dynamic_multimask_via_stability = True


def _release_chain(release_like, default, cfg: Path, ckpt: Path, image: np.ndarray) -> None:
    from ibisagent.protocol import Action
    from ibisagent.segmenters.sam2 import build_sam2_model

    for s in (release_like, default):
        s.set_image(image)
    model = build_sam2_model(cfg, ckpt)
    model.sam_mask_decoder.dynamic_multimask_via_stability = False
    clicks = [(Action.positive(70.5 / W, 40.5 / H), 1), (Action.negative(10.5 / W, 80.5 / H), 0),
              (Action.positive(50.5 / W, 30.5 / H), 1)]
    with patched_sam2_transforms():
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        pred = SAM2ImagePredictor(model)
        pred._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]
        pred.set_image(image)
        pts: list[list[float]] = []
        labs: list[int] = []
        prev = None
        for turn, (action, label) in enumerate(clicks):
            pts.append(list(action.pixel(W, H)))
            labs.append(label)
            masks, scores, lows = pred.predict(point_coords=np.array(pts, np.float32), point_labels=np.array(labs),
                                               mask_input=prev, multimask_output=True)
            k = int(np.argmax(scores))
            prev = lows[k][None]
            ours = release_like.apply(action)
            assert np.array_equal(ours, masks[k] > 0), f"turn {turn + 1}"
            np.testing.assert_allclose(release_like.logits[0], np.clip(lows[k], -32, 32), atol=1e-4)
            mine = default.apply(action)
            if turn == 0:
                assert np.array_equal(mine, ours)  # one click: both ask for 3 masks
    assert not np.allclose(default.logits, release_like.logits)  # from the second click the default differs


_MEDSAM2_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sam2" / "medsam2_hiera_t512.yaml"


@pytest.fixture(scope="module")
def medsam2_random(tmp_path_factory: pytest.TempPathFactory):
    """The MedSAM2 config built with random weights (no checkpoint), and that state dict saved as a checkpoint."""
    pytest.importorskip("sam2", reason="sam2 not installed")
    from ibisagent.segmenters.sam2 import build_sam2_model

    torch.manual_seed(0)
    model = build_sam2_model(_MEDSAM2_CONFIG, None)
    ckpt = tmp_path_factory.mktemp("medsam2") / "medsam2_random.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    return model, ckpt


def test_medsam2_config_builds_the_published_architecture(medsam2_random) -> None:
    """512 px input (128 x 128 low-res logits), Hiera-tiny; the same state-dict keys and shapes as SAM 2.1 tiny,
    which MedSAM2_latest.pt is fine-tuned from (so the checkpoint loads strictly)."""
    from ibisagent.segmenters.sam2 import build_sam2_model

    model, _ = medsam2_random
    assert model.image_size == 512
    assert tuple(model.sam_prompt_encoder.mask_input_size) == (128, 128)
    assert model.image_encoder.trunk.blocks[0].dim == 96 and len(model.image_encoder.trunk.blocks) == 12
    tiny21 = build_sam2_model("sam2.1_hiera_t", None)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in tiny21.state_dict().items()}


@pytest.mark.slow
def test_medsam2_config_segments_through_the_backend(medsam2_random) -> None:
    """The segmenter code path with the MedSAM2 config and a (random) checkpoint: a small image, one click, the
    release's multimask choice; the mask comes back at the image's size, the logits at 128 x 128."""
    _, ckpt = medsam2_random
    seg = create_segmenter("sam2", config=str(_MEDSAM2_CONFIG), checkpoint=str(ckpt), multimask=True)
    assert seg.image_size == 512
    img = np.zeros((40, 56, 3), np.uint8)
    img[10:30, 15:40] = 200
    seg.set_image(img)
    res = seg.predict(np.array([[27.0, 20.0]], np.float32), np.array([1]))
    assert res.mask.shape == (40, 56) and res.logits.shape == (1, 128, 128)
    again = seg.predict(np.array([[27.0, 20.0], [5.0, 5.0]], np.float32), np.array([1, 0]), mask_input=res.logits)
    assert again.mask.shape == (40, 56) and np.isfinite(again.score)
