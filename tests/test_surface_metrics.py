"""masks.hd95 / masks.nsd: the surfel-area-weighted surface distances of the CVPR 2025 challenge evaluation.

Parity with two independent references, on real masks and on perturbed copies of them:
* MONAI's ``compute_surface_dice(use_subvoxels=True)`` (maintained; a port of DeepMind's algorithm) for NSD;
* DeepMind's ``surface-distance`` package (the code the challenge script copies as SurfaceDice.py) for NSD and the
  robust Hausdorff distance at 95%.
Plus shapes with known answers and the empty-mask conventions.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ibisagent.masks import MaskShapeError, hd95, nsd, surface_distances

TOLERANCES = (0.0, 1.0, 2.0, 3.5)
#: MONAI is the slow reference (torch transforms per call): checked at the challenge tolerance and one other
MONAI_TOLERANCES = (1.0, 2.0)


# ------------------------------------------------------------------------------------------------ references

@pytest.fixture(scope="module")
def deepmind():
    sd = pytest.importorskip("surface_distance", reason="surface-distance (constraints/nodeps.txt) not installed")
    return sd


@pytest.fixture(scope="module")
def monai_nsd():
    pytest.importorskip("monai", reason="monai not installed")
    import torch
    from monai.metrics import compute_surface_dice

    def run(pred: np.ndarray, gt: np.ndarray, tol: float, spacing: tuple[float, ...]) -> float:
        p = torch.from_numpy(pred.astype(np.float32))[None, None]
        g = torch.from_numpy(gt.astype(np.float32))[None, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compute_surface_dice(p, g, [tol], include_background=True, spacing=list(spacing),
                                       use_subvoxels=True)
        return float(out[0, 0])

    return run


def _deepmind_values(sd, pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> tuple[dict, float]:
    with warnings.catch_warnings():  # its scipy.ndimage.filters / morphology imports are deprecated
        warnings.simplefilter("ignore")
        dists = sd.compute_surface_distances(gt, pred, spacing)
    return dists, float(sd.compute_robust_hausdorff(dists, 95))


def _check_parity(deepmind, monai_nsd, pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> None:
    assert pred.any() and gt.any() and (pred != gt).any()
    dists, ref_hd = _deepmind_values(deepmind, pred, gt, spacing)
    assert hd95(pred, gt, spacing=spacing) == pytest.approx(ref_hd, rel=1e-9, abs=1e-9)
    for tol in TOLERANCES:
        ours = nsd(pred, gt, tolerance=tol, spacing=spacing)
        assert ours == pytest.approx(float(deepmind.compute_surface_dice_at_tolerance(dists, tol)), abs=1e-6), tol
        if tol in MONAI_TOLERANCES:
            assert ours == pytest.approx(monai_nsd(pred, gt, tol, spacing), abs=1e-5), tol


def _variants(gt: np.ndarray) -> list[np.ndarray]:
    """Predictions a segmenter could plausibly return: grown, shrunk, shifted, and a noisy border."""
    rng = np.random.default_rng(7)
    dil = ndimage.binary_dilation(gt, iterations=2)
    ero = ndimage.binary_erosion(gt, iterations=1)
    shift = np.roll(gt, (3,) + (-2,) * (gt.ndim - 1), axis=tuple(range(gt.ndim)))
    noisy = gt ^ (ndimage.binary_dilation(gt) & ~ndimage.binary_erosion(gt) & (rng.random(gt.shape) < 0.4))
    return [v for v in (dil, ero, shift, noisy) if v.any() and (v != gt).any()]


# ------------------------------------------------------------------------------------------------ real 2D masks

_MASKS_2D = ("ph2_dermoscopy/masks/ph2_IMD002__skin_lesion.png",)
_DATASETS_2D = ("acdc_cardiac_mri", "kits19_kidney_ct", "busi_breast_ultrasound", "glas_colon_glands",
                "drive_retinal_vessels")


def _real_2d_masks(root: Path) -> list[tuple[str, np.ndarray]]:
    paths = [root / p for p in _MASKS_2D]
    for name in _DATASETS_2D:
        index = root / name / "index.jsonl"
        if index.is_file():
            first = json.loads(index.read_text(encoding="utf-8").splitlines()[0])
            paths.append(root / name / first["mask"])
    out = []
    for p in paths:
        if p.is_file():
            m = np.asarray(Image.open(p).convert("L")) > 0
            if m.any():
                out.append((p.name, m))
    return out


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.8, 1.25)])
def test_parity_on_real_2d_masks(shared_data: Path, deepmind, monai_nsd, spacing) -> None:
    cases = _real_2d_masks(shared_data)
    assert len(cases) >= 4
    for _name, gt in cases:
        for pred in _variants(gt):
            _check_parity(deepmind, monai_nsd, pred, gt, spacing)


def test_parity_between_two_real_objects_of_one_image(shared_data: Path, deepmind, monai_nsd) -> None:
    """Two different annotated structures of one ACDC slice (far apart surfaces, partial overlap)."""
    masks = sorted((shared_data / "acdc_cardiac_mri" / "masks").glob("acdc_patient001_f01_z03__*.png"))
    if len(masks) < 2:
        pytest.skip("ACDC slice with two objects not found")
    a, b = (np.asarray(Image.open(p).convert("L")) > 0 for p in masks[:2])
    _check_parity(deepmind, monai_nsd, a, b, (1.0, 1.0))


# ------------------------------------------------------------------------------------------------ real 3D volumes

_VOLUMES = (("brats2013_glioma_mri_3d", "brats2013_pat0002_t1c_label.nii.gz", 1),
            ("nci_isbi2013_prostate_mri_3d", "nciisbi_Case04_label.nii.gz", 2),
            ("chaos_t2spir_abdomen_mri_3d", "chaos_mr01_label.nii.gz", 1))


@pytest.mark.parametrize(("folder", "name", "label"), _VOLUMES)
def test_parity_on_real_3d_label_volumes(shared_data: Path, deepmind, monai_nsd, folder, name, label) -> None:
    nib = pytest.importorskip("nibabel")
    path = shared_data / folder / "volumes" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    img = nib.load(str(path))
    gt = np.asanyarray(img.dataobj) == label
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    assert gt.any()
    for pred in _variants(gt)[:3]:
        _check_parity(deepmind, monai_nsd, pred, gt, spacing)


# ------------------------------------------------------------------------------------------------ known answers

def _disc(shape: tuple[int, ...], radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 1.5)])
def test_concentric_discs(spacing) -> None:
    inner, outer = _disc((161, 101), 20.0, spacing), _disc((161, 101), 26.0, spacing)
    # the two circles are 6 mm apart everywhere: pixelisation moves each surfel by less than one pixel diagonal
    slack = math.hypot(*spacing)
    assert 6.0 - slack <= hd95(inner, outer, spacing=spacing) <= 6.0 + slack
    assert nsd(inner, outer, tolerance=6.0 - slack, spacing=spacing) == 0.0
    assert nsd(inner, outer, tolerance=6.0 + slack, spacing=spacing) == 1.0
    # the contour lengths approximate the circumferences; the staircase of a digitised circle makes them 5-15% longer
    d = surface_distances(inner, outer, spacing=spacing)
    for length, radius in ((d.pred_sizes.sum(), 20.0), (d.gt_sizes.sum(), 26.0)):
        assert 1.0 <= length / (2 * math.pi * radius) <= 1.15


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.5)])
def test_concentric_spheres(spacing) -> None:
    shape = tuple(int(40 / s) + 1 for s in spacing)
    inner, outer = _disc(shape, 10.0, spacing), _disc(shape, 15.0, spacing)
    slack = math.sqrt(sum(s * s for s in spacing))
    assert 5.0 - slack <= hd95(inner, outer, spacing=spacing) <= 5.0 + slack
    assert nsd(inner, outer, tolerance=5.0 - slack, spacing=spacing) == 0.0
    assert nsd(inner, outer, tolerance=5.0 + slack, spacing=spacing) == 1.0
    d = surface_distances(inner, outer, spacing=spacing)  # digitised spheres: areas 5-15% above 4 pi r^2
    for area, radius in ((d.pred_sizes.sum(), 10.0), (d.gt_sizes.sum(), 15.0)):
        assert 1.0 <= area / (4 * math.pi * radius**2) <= 1.15


def test_2d_contour_lengths_are_exact_for_a_rectangle() -> None:
    """A 4x6-pixel rectangle: straight sides 2 * (3 + 5) segments plus 4 corner cuts of half a pixel diagonal."""
    m = np.zeros((10, 12), bool)
    m[2:6, 3:9] = True
    d = surface_distances(m, m, spacing=(2.0, 0.5))
    half_diag = 0.5 * math.hypot(2.0, 0.5)
    # rows run along axis 1 (0.5 each), columns along axis 0 (2.0 each)
    assert d.gt_sizes.sum() == pytest.approx(2 * 5 * 0.5 + 2 * 3 * 2.0 + 4 * half_diag)
    assert np.all(d.gt_to_pred == 0.0)
    assert nsd(m, m, tolerance=0.0) == 1.0 and hd95(m, m) == 0.0


def test_spacing_scales_distances() -> None:
    a = np.zeros((30, 30, 30), bool)
    a[10:20, 10:20, 10:20] = True
    b = np.roll(a, 2, axis=2)  # shifted 2 voxels along the last axis
    assert hd95(a, b, spacing=(1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(1.0, 1.0, 3.0)) == pytest.approx(6.0)
    assert hd95(a, b, spacing=(3.0, 3.0, 1.0)) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------ conventions, errors

@pytest.mark.parametrize("shape", [(12, 14), (6, 7, 8)])
def test_empty_mask_conventions(shape) -> None:
    empty = np.zeros(shape, bool)
    obj = np.zeros(shape, bool)
    obj[(slice(2, 5),) * len(shape)] = True
    spacing = (1.0,) * len(shape)
    # both empty: they agree (as dice/iou); the references would give NaN (NSD) and inf (HD)
    assert nsd(empty, empty, spacing=spacing) == 1.0
    assert hd95(empty, empty, spacing=spacing) == 0.0
    # exactly one empty: no overlap, no finite distance (as the references)
    for p, g in ((obj, empty), (empty, obj)):
        assert nsd(p, g, spacing=spacing) == 0.0
        assert math.isinf(hd95(p, g, spacing=spacing))


def test_bad_input_is_a_clear_error() -> None:
    a = np.zeros((8, 8), bool)
    with pytest.raises(MaskShapeError, match="differ"):
        nsd(a, np.zeros((8, 9), bool))
    with pytest.raises(MaskShapeError, match="spacing"):
        nsd(a, a, spacing=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(MaskShapeError, match="3D"):
        hd95(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="tolerance"):
        nsd(a, a, tolerance=-1.0)


def test_image_shaped_masks_are_2d() -> None:
    """An HxWx1 / HxWx3 mask (as PNGs load) is a 2D mask unless a 3-value spacing says it is a volume."""
    m = np.zeros((20, 20), bool)
    m[5:15, 5:12] = True
    rgb = np.repeat(m[..., None], 3, axis=2).astype(np.uint8) * 255
    assert nsd(rgb, m) == 1.0 and hd95(rgb, m) == 0.0
    vol = np.repeat(m[..., None], 3, axis=2)
    assert hd95(vol, np.roll(vol, 1, axis=0), spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------ evaluation uses them

def test_evaluation_calls_the_masks_metrics() -> None:
    from ibisagent.evaluation.challenge import NSD_MIN_DSC, challenge_nsd
    from ibisagent.evaluation.metrics import mask_metrics
    from ibisagent.masks import dice

    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True
    pred = np.roll(gt, 3, axis=1)
    m = mask_metrics(pred, gt, nsd_tolerance=2.0)
    assert m["hd95"] == hd95(pred, gt) and m["nsd"] == nsd(pred, gt, tolerance=2.0)
    assert 0.0 < m["nsd"] < 1.0
    assert challenge_nsd(pred, gt, dice(pred, gt)) == m["nsd"]
    far = np.roll(gt, 18, axis=1)  # Dice 0.1 <= 0.2: the challenge reports NSD 0 even though surfaces touch
    assert dice(far, gt) <= NSD_MIN_DSC and nsd(far, gt) > 0.0
    assert challenge_nsd(far, gt, dice(far, gt)) == 0.0


def test_a_run_folder_from_the_old_nsd_is_not_resumed(tmp_path: Path) -> None:
    """Rows written with the border-pixel NSD must not be mixed with surfel NSD rows in one summary."""
    from ibisagent.evaluation import EvalConfig, run_eval
    from ibisagent.evaluation.harness import EvalConfigError

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True
    img = np.full((40, 40, 3), 30, np.uint8)
    img[gt] = 200
    Image.fromarray(img).save(data / "images" / "sq.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(data / "masks" / "sq.png")
    row = {"id": "sq", "image": "images/sq.png", "mask": "masks/sq.png", "object": "square", "query": "the square",
           "modality": "synthetic", "dataset": "synthetic"}
    (data / "index.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "out"
    cfg = dict(data=str(data), out=str(out), policy="gt-box", segmenter="fake", report=False)
    run_eval(EvalConfig(**cfg))
    run_config = out / "run_config.json"
    old = json.loads(run_config.read_text())
    assert "surface-distance" in old["surface_metrics"]
    del old["surface_metrics"]  # as a run folder written before this change
    run_config.write_text(json.dumps(old))
    with pytest.raises(EvalConfigError, match="surface_metrics"):
        run_eval(EvalConfig(**cfg))
