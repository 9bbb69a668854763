"""SAM2 / MedSAM2 image segmenter from a config + checkpoint on disk (backend ``sam2``).

Uses the ``sam2`` package (facebookresearch/sam2, Apache-2.0) only for its model classes: the model is built from a
YAML config with ``hydra.utils.instantiate`` (no global Hydra state), the checkpoint's state dict is loaded strictly,
and the image-predictor steps are done here with torch so that ``torchvision`` (imported by
``sam2.utils.transforms``) is never needed:

1. RGB uint8 -> [0, 1] -> antialiased bilinear resize to ``image_size`` x ``image_size`` -> ImageNet normalization;
2. ``forward_image`` + ``_prepare_backbone_features`` (+ ``no_mem_embed``) -> image embedding and high-res features;
3. prompts: pixel (x, y) -> [0, 1] -> model frame; a box becomes two corner points with labels 2 / 3 placed before
   the clicks; previous low-res logits are the mask input;
4. ``sam_mask_decoder`` -> low-res logits (clamped to +-32, as SAM2 does) and predicted IoU; the best of 3 when
   multimask output is on; bilinear upsampling to the original size and threshold at 0.

Configs: a path to a YAML file (the format of ``sam2/configs/*``: a top-level ``model`` with ``_target_`` keys) or
the name of a config shipped with the package (``sam2.1_hiera_t``, ``configs/sam2.1/sam2.1_hiera_t.yaml``, ...).
For MedSAM2 (512 px) use its config or pass ``image_size=512``.

Volumes: besides the slice-by-slice propagation of :class:`ibisagent.volume.VolumeSession` (which works with any
backend), :meth:`SAM2Segmenter.video_propagator` gives SAM2's own video predictor over the volume's slices
(:mod:`ibisagent.segmenters.sam2_video`; ``VolumeSession(seg, propagation="sam2-video")``, ``ibisagent segment
vol.nii.gz --segmenter sam2 --propagation sam2-video``).

Install (torchvision is not needed and must not be installed here)::

    pip install hydra-core==1.3.2 omegaconf==2.3.0 iopath==0.1.10
    SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.segmenters.base import (
    Segmenter,
    SegmenterError,
    SegmenterUnavailable,
    SegResult,
    register_segmenter,
)

__all__ = [
    "CHECKPOINT_ENV",
    "CONFIG_ENV",
    "PIP_INSTALL_HINT",
    "SAM2Segmenter",
    "build_sam2_model",
    "import_sam2",
    "load_sam2_checkpoint",
    "load_sam2_config",
    "resolve_config",
]

PIP_INSTALL_HINT = (
    "pip install hydra-core==1.3.2 omegaconf==2.3.0 iopath==0.1.10 && "
    "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0"
)
#: environment variables with defaults for ``config`` / ``checkpoint``
CONFIG_ENV = "IBISAGENT_SAM2_CONFIG"
CHECKPOINT_ENV = "IBISAGENT_SAM2_CHECKPOINT"
DEFAULT_CONFIG = "sam2.1_hiera_t"
#: what SAM2's ``build_sam2(apply_postprocessing=True)`` adds to the mask decoder config
_POSTPROCESSING = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}

_LOCK = threading.RLock()
_MODELS: dict[tuple[str, str, str, int | None], Any] = {}


def import_sam2() -> Any:
    """Import and return the ``sam2`` package (with hydra/omegaconf), or raise :class:`SegmenterUnavailable` with the
    install command."""
    try:
        mod = importlib.import_module("sam2")
        importlib.import_module("omegaconf")
        importlib.import_module("hydra.utils")
        importlib.import_module("sam2.modeling.sam2_base")
    except ImportError as exc:
        raise SegmenterUnavailable(
            f"the 'sam2' backend needs the sam2 package and its config system ({exc}); install with: {PIP_INSTALL_HINT}"
        ) from exc
    return mod


def resolve_config(config: str | Path) -> Path:
    """A YAML path, or the name of a config shipped in the ``sam2`` package -> an existing file."""
    p = Path(config).expanduser()
    if p.is_file():
        return p
    sam2 = import_sam2()
    root = Path(next(iter(sam2.__path__)))
    name = str(config)
    stem = Path(name).name
    candidates = [root / name, root / f"{name}.yaml"]
    candidates += sorted((root / "configs").rglob(stem if stem.endswith(".yaml") else f"{stem}.yaml"))
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(q.stem for q in (root / "configs").rglob("*.yaml"))
    raise SegmenterUnavailable(
        f"SAM2 config {config!r} not found: give a YAML path or one of the shipped configs: {', '.join(shipped)}"
    )


def load_sam2_config(config: str | Path, image_size: int | None = None, postprocessing: bool = True) -> Any:
    """Load the YAML config as an OmegaConf ``DictConfig`` of the ``model`` node, with ``image_size`` overridden and
    SAM2's inference post-processing switches (dynamic multimask via stability) added."""
    import_sam2()
    from omegaconf import OmegaConf

    path = resolve_config(config)
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # omegaconf/yaml raise many types
        raise SegmenterUnavailable(f"cannot read SAM2 config {path}: {exc}") from exc
    if "model" not in cfg or "_target_" not in cfg.model:
        raise SegmenterUnavailable(f"SAM2 config {path} has no 'model' node with a '_target_' (see sam2/configs/)")
    model_cfg = cfg.model
    if image_size is not None:
        if int(image_size) % 32 or int(image_size) <= 0:
            raise SegmenterError(f"image_size must be a positive multiple of 32, got {image_size}")
        model_cfg.image_size = int(image_size)
    if postprocessing:
        extra = model_cfg.get("sam_mask_decoder_extra_args") or {}
        model_cfg.sam_mask_decoder_extra_args = {**OmegaConf.to_container(OmegaConf.create(extra)), **_POSTPROCESSING}
    OmegaConf.resolve(model_cfg)
    return model_cfg


def _existing_checkpoint(checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise SegmenterUnavailable(
            f"SAM2 checkpoint not found: {path}. Pass checkpoint=/path/to/sam2.1_hiera_tiny.pt (or a MedSAM2 .pt) "
            f"with the matching config, or set {CHECKPOINT_ENV}"
        )
    return path


def load_sam2_checkpoint(model: Any, checkpoint: str | Path) -> None:
    """Load a SAM2-format checkpoint (``{"model": state_dict}`` or a bare state dict) strictly into ``model``.
    Raises :class:`SegmenterUnavailable` if the file is missing or unreadable or its keys/shapes don't match."""
    import torch

    path = _existing_checkpoint(checkpoint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise SegmenterUnavailable(f"cannot read SAM2 checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SegmenterUnavailable(f"SAM2 checkpoint {path} holds no state dict (expected {{'model': state_dict}})")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise SegmenterUnavailable(
            f"SAM2 checkpoint {path} does not match the config: {'; '.join(parts)}. Use the config the checkpoint "
            "was trained with (and image_size, e.g. 512 for MedSAM2)"
        )
    model.load_state_dict(state, strict=True)


def build_sam2_model(
    config: str | Path,
    checkpoint: str | Path | None,
    device: str = "cpu",
    image_size: int | None = None,
) -> Any:
    """Instantiate the ``SAM2Base`` model of ``config`` and load ``checkpoint`` (``None`` keeps random weights, for
    tests). Eval mode, fp32, on ``device``."""
    import_sam2()
    from hydra.utils import instantiate

    model_cfg = load_sam2_config(config, image_size=image_size)
    try:
        model = instantiate(model_cfg, _recursive_=True)
    except Exception as exc:  # hydra wraps constructor errors
        raise SegmenterUnavailable(f"cannot build the SAM2 model from config {config}: {exc}") from exc
    if checkpoint is not None:
        load_sam2_checkpoint(model, checkpoint)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def _cached_model(config: str | Path, checkpoint: str | Path, device: str, image_size: int | None) -> Any:
    key = (str(resolve_config(config).resolve()), str(Path(checkpoint).expanduser().resolve()), device, image_size)
    ckpt = Path(checkpoint).expanduser()
    stamp = ckpt.stat().st_mtime_ns if ckpt.is_file() else None
    with _LOCK:
        hit = _MODELS.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        model = build_sam2_model(config, checkpoint, device=device, image_size=image_size)
        _MODELS[key] = (stamp, model)
        return model


class SAM2Segmenter(Segmenter):
    """SAM2 / MedSAM2 behind the :class:`Segmenter` interface.

    Args:
        config: YAML path or shipped config name (default ``$IBISAGENT_SAM2_CONFIG`` or ``sam2.1_hiera_t``).
        checkpoint: ``.pt`` file (default ``$IBISAGENT_SAM2_CHECKPOINT``); required.
        device: torch device string (``"cpu"``; ``"cuda"`` where available).
        image_size: override the config's model input size (e.g. 512 for MedSAM2).
        multimask: ``None`` = auto (3 masks and the best predicted IoU when the only prompt is one click, as SAM2
            recommends); True/False forces it.
        mask_threshold: logit threshold of the binary mask.
    """

    name = "sam2"
    capabilities = frozenset({"point", "box", "mask"})

    def __init__(
        self,
        config: str | Path | None = None,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        image_size: int | None = None,
        multimask: bool | None = None,
        mask_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        import_sam2()
        config = config if config is not None else os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)
        checkpoint = checkpoint if checkpoint is not None else os.environ.get(CHECKPOINT_ENV)
        if checkpoint is None or str(checkpoint) == "":
            raise SegmenterUnavailable(
                "the 'sam2' backend needs a checkpoint: create_segmenter('sam2', config=..., checkpoint='/path/to/"
                f"sam2.1_hiera_tiny.pt') or set {CHECKPOINT_ENV} (no weights are downloaded)"
            )
        _existing_checkpoint(checkpoint)
        import torch

        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise SegmenterError(f"bad device {device!r}: {exc}") from exc
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise SegmenterUnavailable(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        self.device = str(device)
        self.model = _cached_model(config, checkpoint, self.device, image_size)
        self.config = str(config)
        self.checkpoint = str(checkpoint)
        self.image_size = int(self.model.image_size)
        self.multimask = multimask
        self.mask_threshold = float(mask_threshold)

    def video_propagator(self) -> Any:
        """SAM2's own video predictor on this model, for a volume's slices as video frames (MedSAM2's way): a
        :class:`ibisagent.segmenters.sam2_video.SAM2VideoPropagator` (what ``VolumeSession(seg,
        propagation="sam2-video")`` uses)."""
        from ibisagent.segmenters.sam2_video import SAM2VideoPropagator

        return SAM2VideoPropagator(self.model, load_sam2_config(self.config, image_size=self.image_size),
                                   device=self.device, mask_threshold=self.mask_threshold)

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """(h, w) of the low-res logits / mask input (``image_size / 4``)."""
        return tuple(int(v) for v in self.model.sam_prompt_encoder.mask_input_size)  # type: ignore[return-value]

    # --- encoder ---------------------------------------------------------------------------------------------
    def _encode(self, image: np.ndarray) -> dict[str, Any]:
        import torch

        from ibisagent.segmenters._sam2_transforms import preprocess

        x = preprocess(image, self.image_size).to(self.device)
        with torch.inference_mode():
            backbone_out = self.model.forward_image(x)
            _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
            if self.model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
            feats = [f.permute(1, 2, 0).reshape(1, -1, *hw) for f, hw in zip(vision_feats, feat_sizes)]
        return {"image_embed": feats[-1], "high_res_feats": feats[:-1]}

    # --- decoder ---------------------------------------------------------------------------------------------
    def _decode(
        self, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None, mask_input: np.ndarray | None
    ) -> SegResult:
        import torch
        import torch.nn.functional as F

        h, w = self.image_shape
        scale = np.array([self.image_size / w, self.image_size / h], np.float32)
        coords = [np.asarray(points, np.float32).reshape(-1, 2) * scale]
        labs = [np.asarray(labels, np.int64).reshape(-1)]
        if box is not None:  # box corners first, labels 2 (top-left) and 3 (bottom-right), as SAM2 does
            coords.insert(0, np.asarray(box, np.float32).reshape(2, 2) * scale)
            labs.insert(0, np.array([2, 3], np.int64))
        pts_t = torch.from_numpy(np.concatenate(coords))[None].to(self.device)
        lab_t = torch.from_numpy(np.concatenate(labs)).to(torch.int32)[None].to(self.device)
        mask_t = None
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            if m.ndim == 2:
                m = m[None]
            if m.shape != (1, *self.mask_input_size) or not np.isfinite(m).all():
                raise SegmenterError(
                    f"mask_input must be the (1, {self.mask_input_size[0]}, {self.mask_input_size[1]}) logits of a "
                    f"previous result of this segmenter, got {m.shape}"
                )
            mask_t = torch.from_numpy(m)[None].to(self.device)
        multimask = self.multimask
        if multimask is None:
            multimask = box is None and len(points) == 1
        feats = self._features
        with torch.inference_mode():
            sparse, dense = self.model.sam_prompt_encoder(points=(pts_t, lab_t), boxes=None, masks=mask_t)
            low, iou, _, _ = self.model.sam_mask_decoder(
                image_embeddings=feats["image_embed"],
                image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=bool(multimask),
                repeat_image=False,
                high_res_features=feats["high_res_feats"],
            )
            k = int(torch.argmax(iou[0]))
            best = low[:, k : k + 1].float()
            up = F.interpolate(best, size=(h, w), mode="bilinear", align_corners=False)
            mask = (up[0, 0] > self.mask_threshold).cpu().numpy()
            logits = torch.clamp(best[0], -32.0, 32.0).cpu().numpy().astype(np.float32)
        return SegResult(mask=mask, logits=logits, score=float(iou[0, k]))


@register_segmenter("sam2", "SAM2 / MedSAM2 from a local config + checkpoint (sam2 package, no torchvision)",
                    tags=("offline", "point", "box"))
def _make_sam2(**cfg: Any) -> SAM2Segmenter:
    """SAM2 / MedSAM2 from config + checkpoint paths."""
    return SAM2Segmenter(**cfg)
