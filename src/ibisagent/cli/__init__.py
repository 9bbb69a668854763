"""The ``ibisagent`` command line: one subcommand per job, each calling one public function.

This package is the CLI layer: ``segment`` / ``demo`` / ``list`` live here, every other area's subcommands in one
module of this package each (``ibisagent.cli.evaluation``, ``.synthesis``, ``.exports``, ``.training``, ``.serve``,
``.app``, ``.export_encoder``); domain modules export config dataclasses and functions only. Options generated from
a config dataclass come from :func:`ibisagent.cli.util.add_dataclass_args`.

Exit codes: 0 success, 2 bad input (a message says what to fix), 1 an unexpected failure (``--debug`` shows the
traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from ibisagent import __version__
from ibisagent.cli.util import UserError, parse_kv

__all__ = ["main", "build_parser", "check_output_dir", "parse_kv", "default_policy", "default_segmenter", "UserError"]

#: the subcommands of the area modules: name -> (module that adds it through ``add_parser(subparsers)`` or one of its
#: ``ADD_PARSERS``, the one-line help shown by ``ibisagent --help``). A module is imported only when one of its commands
#: runs (or for :func:`build_parser` with every area), so that ``--help`` and the light commands start without
#: torch; tests/test_cli_util.py checks this table against what the modules add.
AREA_COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("ibisagent.cli.evaluation", "evaluate a policy + segmenter on a dataset folder (IoU, Dice, NoC, ...)"),
    "compare": ("ibisagent.cli.evaluation", "side-by-side table of several evaluation runs"),
    "synthesize": ("ibisagent.cli.synthesis", "synthesize SFT/RL trajectories with the oracle (resumable, parallel)"),
    "export": ("ibisagent.cli.exports", "export trajectories for LLaMA-Factory, verl or TRL"),
    "train-segmenter": ("ibisagent.cli.training",
                        "fine-tune LiteMedSAM's prompt encoder + mask decoder for clicks (cached embeddings)"),
    "train-policy": ("ibisagent.cli.training",
                     "train the compact CPU policy (SFT on oracle trajectories, then multi-turn GRPO)"),
    "train-llm-sft": ("ibisagent.cli.training",
                      "supervised fine-tuning of a Qwen2.5-VL policy on exported trajectories (TRL)"),
    "train-llm-grpo": ("ibisagent.cli.training", "GRPO of a Qwen2.5-VL policy with the five reference rewards"),
    "serve": ("ibisagent.cli.serve",
              "run the segmenter/agent HTTP tool server (POST /segment as in the reference release)"),
    "app": ("ibisagent.cli.app", "start the annotation web app (Gradio) on 127.0.0.1"),
    "export-encoder": ("ibisagent.cli.export_encoder",
                       "export LiteMedSAM's image encoder to ONNX once (cached) and check it against PyTorch"),
    "prompts": ("ibisagent.cli.prompts", "write a prompt template from a clone of the release"),
    "import-release": ("ibisagent.cli.release_import",
                       "convert the release's trajectory JSON / RL parquet into a dataset + synthesis folder"),
}


def __getattr__(name: str) -> Any:  # re-exported registry defaults, imported on use (they pull in numpy/scipy)
    if name in ("default_policy", "default_segmenter"):
        from ibisagent.policies.base import default_policy
        from ibisagent.segmenters.base import default_segmenter

        return {"default_policy": default_policy, "default_segmenter": default_segmenter}[name]
    raise AttributeError(f"module 'ibisagent.cli' has no attribute {name!r}")


DESCRIPTION = """\
IBISAgent: text-prompted interactive medical image segmentation.

A policy looks at the image, your query and the current mask, and places one click (positive/negative) or a box
per turn; a promptable segmenter (LiteMedSAM fine-tuned for clicks, by default) turns the prompts into a mask;
repeat until the policy says Terminate.

Common jobs:
  ibisagent demo                                   run the agent on a bundled case, write overlays to ./demo_out
  ibisagent segment IMG --query "the polyp" --out DIR
                                                   segment one image (PNG/JPEG/TIFF/BMP/DICOM/NIfTI slice)
  ibisagent segment FOLDER|GLOB|rows.csv --query "the polyp" --out DIR
                                                   segment many in one process (results.jsonl, resumable)
  ibisagent eval DATA --split val --out DIR        score the agent (or --policy oracle, gt-box, ...) on a dataset
  ibisagent list                                   show the available policies, segmenters and prompt templates
"""


# ----------------------------------------------------------------------------------------------------------------
# segment / demo / list
# ----------------------------------------------------------------------------------------------------------------

def _add_agent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default=None,
                   help="policy name (see `ibisagent list`); default: the learned `compact` policy if its weights "
                        "are installed, else `oracle` (needs --mask)")
    p.add_argument("--segmenter", default=None,
                   help="segmenter backend (see `ibisagent list`); default: litemedsam-click")
    p.add_argument("--policy-arg", action="append", metavar="KEY=VALUE", help="extra policy option (repeatable)")
    p.add_argument("--segmenter-arg", action="append", metavar="KEY=VALUE",
                   help="extra segmenter option (repeatable), e.g. checkpoint=/path/model.pt")
    p.add_argument("--max-steps", type=int, default=20,
                   help="maximum policy turns per episode, Terminate included (>= 1, default 20)")
    p.add_argument("--history", action="store_true", help="send the whole conversation each turn (default: off)")
    p.add_argument("--prompts", default=None,
                   help="prompt template name (reference, extended) or a JSON file with your own wording")
    p.add_argument("--parser", choices=("lenient", "reference"), default="lenient",
                   help="reply parser: lenient (default) or reference (the release's rules: <action> tags needed, "
                        "case-sensitive, Terminate first)")
    p.add_argument("--repeat-check", choices=("after", "before"), default="after",
                   help="when the stop-on-3-repeats rule runs: after the segmenter applied the action (default) or "
                        "before it, as the reference release (the repeat that stops is not applied)")


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment", help="segment an image from a text query (or several: paths, a folder, a glob, a manifest)",
        description="Run the agent on one image: it clicks until it decides to stop, then writes the mask "
                    "(PNG, or NIfTI for a volume slice), the trace (JSON) and overlays.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  ibisagent segment scan.png --query 'the polyp in this colonoscopy frame' --out out/\n"
               "  ibisagent segment ct.nii.gz --slice 15 --window ct-abdomen --query 'the liver' --out out/\n"
               "  ibisagent segment mr.nii.gz --query 'the left kidney' --out out/   (whole volume, 3D agent)\n"
               "batch mode (models loaded once; one folder per image under --out plus --out/results.jsonl; a rerun "
               "skips finished images):\n"
               "  ibisagent segment scans/ --query 'the skin lesion' --out out/\n"
               "  ibisagent segment 'scans/*.png' --query 'the skin lesion' --out out/\n"
               "  ibisagent segment cases.csv --out out/     (columns image, query, mask, slice)",
    )
    p.add_argument("image", nargs="+",
                   help="image file: PNG/JPEG/TIFF/BMP, DICOM (.dcm) or a NIfTI slice (--slice); a NIfTI volume or a DICOM "
                        "series folder without --slice runs the 3D agent (mask.nii.gz, and mask.dcm DICOM SEG for a series; "
                        "trace.json); several "
                        "files, a folder, a quoted glob ('scans/*.png') or a manifest (.csv / .jsonl with columns "
                        "image, query, and optionally mask, slice) run in batch mode")
    p.add_argument("--query", "-q", default=None,
                   help="what to segment, e.g. 'the tumor in this breast ultrasound' (in batch mode: for every image "
                        "whose manifest row has no query of its own)")
    p.add_argument("--overwrite", action="store_true",
                   help="batch mode: redo images already in --out/results.jsonl (default: skip them, so that a rerun "
                        "resumes an interrupted batch)")
    p.add_argument("--mask", default=None, help="ground-truth mask (for IoU reporting, and required by oracle policies)")
    p.add_argument("--mask-label", type=int, default=None, help="label value in a multi-label mask file")
    p.add_argument("--mask-threshold", type=float, default=None, metavar="T",
                   help="binarize a grayscale / probability mask file: pixels > T are the object")
    p.add_argument("--slice", type=int, default=None,
                   help="slice index (0-based) for a volume (NIfTI, DICOM series / multi-frame, TIFF stack)")
    p.add_argument("--axis", type=int, default=2, help="slicing axis for NIfTI volumes (default 2 = axial)")
    p.add_argument("--volume-index", type=int, default=None, metavar="K",
                   help="which 3D volume of a 4D NIfTI file to use (0-based; required for 4D files)")
    p.add_argument("--propagation", choices=("slices", "sam2-video"), default="slices",
                   help="whole volume: how prompts spread through the slices: slices (default: the segmenter slice by "
                        "slice) or sam2-video (SAM2's own video predictor, the slices as frames; --segmenter sam2)")
    p.add_argument("--window", default=None,
                   help="intensity window: a preset (ct-abdomen, ct-lung, ct-bone, ct-brain, ...), 'percentile', "
                        "or CENTER,WIDTH")
    p.add_argument("--out", "-o", default="ibisagent_out",
                   help="output folder (default ./ibisagent_out); files of an earlier run there (trace.json, "
                        "mask.*, step_NN.png, final_overlay.png) are removed first, other files are kept")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON result on stdout")
    p.add_argument("--no-overlays", action="store_true", help="do not write per-step overlay PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_agent_options(p)
    p.set_defaults(func=cmd_segment)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the agent on a bundled real case",
        description="Segment a bundled case (real dermoscopy / ultrasound / CT images with expert masks) and write "
                    "the mask, trace and overlays. Shows IoU against the bundled mask.",
    )
    p.add_argument("--case", default="ph2_IMD006__skin_lesion",
                   help="bundled case id (default ph2_IMD006__skin_lesion); `--case all` runs every 2D case")
    p.add_argument("--out", "-o", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON result on stdout")
    _add_agent_options(p)
    p.set_defaults(func=cmd_demo)


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list policies, segmenters and prompt templates",
                       description="List the registered policies, segmenter backends and prompt templates.")
    p.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    from ibisagent.policies import list_policies
    from ibisagent.prompts import builtin_prompt_names
    from ibisagent.segmenters import list_segmenters

    print("policies:")
    for k, v in list_policies().items():
        print(f"  {k:<16} {v}")
    print("segmenters:")
    for k, v in list_segmenters().items():
        print(f"  {k:<16} {v}")
    print("prompt templates: " + ", ".join(builtin_prompt_names()))
    return 0


def _check_agent_args(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks of the agent options that need no model: step budget, option names. Returns the parsed
    ``--policy-arg`` / ``--segmenter-arg`` dicts."""
    from ibisagent.policies.base import policy_options
    from ibisagent.segmenters.base import segmenter_options

    _check_min(args.max_steps, "--max-steps", 1)
    policy_kwargs = parse_kv(args.policy_arg, "--policy-arg")
    segmenter_kwargs = parse_kv(args.segmenter_arg, "--segmenter-arg")
    from ibisagent.policies.base import default_policy
    from ibisagent.segmenters.base import default_segmenter

    for flag, kwargs, name, options in (
        ("--policy-arg", policy_kwargs, args.policy or default_policy(), policy_options),
        ("--segmenter-arg", segmenter_kwargs, args.segmenter or default_segmenter(), segmenter_options),
    ):
        valid = options(name) if kwargs else None
        unknown = sorted(k for k in kwargs if valid is not None and k not in valid)
        if unknown:
            what = "policy" if flag == "--policy-arg" else "segmenter"
            raise UserError(f"{flag}: {what} {name!r} has no option {', '.join(unknown)}; valid: "
                            f"{', '.join(valid) if valid else '(it takes none)'}")
    return policy_kwargs, segmenter_kwargs


def _build_agent(args: argparse.Namespace, needs_gt_ok: bool):
    from ibisagent.agent import Agent
    from ibisagent.env import EnvConfig
    from ibisagent.policies.base import create_policy, default_policy
    from ibisagent.segmenters.base import create_segmenter, default_segmenter

    policy_kwargs, segmenter_kwargs = _check_agent_args(args)
    policy = args.policy or default_policy()
    segmenter = args.segmenter or default_segmenter()
    cfg = EnvConfig(max_steps=args.max_steps, history=args.history, prompts=args.prompts or "reference",
                    parser=args.parser, repeat_check=args.repeat_check)
    built: dict[str, Any] = {}
    for flag, what, name, kwargs, create in (
        ("--policy-arg", "policy", policy, policy_kwargs, create_policy),
        ("--segmenter-arg", "segmenter", segmenter, segmenter_kwargs, create_segmenter),
    ):
        try:
            built[what] = create(name, **kwargs)
        except (ValueError, TypeError) as exc:  # a bad option value: say which option of what
            if not kwargs or isinstance(exc, UserError):
                raise
            raise UserError(f"{flag} for {what} {name!r}: {exc}") from exc
    agent = Agent(built["policy"], built["segmenter"], cfg)
    if agent.policy.requires_gt and not needs_gt_ok:
        raise UserError(f"policy {policy!r} needs the ground-truth mask: pass --mask GT, or use a learned policy "
                        "(e.g. --policy compact)")
    return agent


def _progress(quiet: bool):
    def show(rec) -> None:
        if quiet:
            return
        what = rec.action or f"(invalid reply: {rec.error})"
        iou = f"  IoU {rec.iou:.3f}" if rec.iou is not None else ""
        print(f"  step {rec.step:2d}: {what:<44}{iou}  [policy {rec.policy_s:.2f} s, segmenter "
              f"{rec.segmenter_s:.2f} s]", file=sys.stderr)

    return show


#: mask file names the CLI writes besides what Episode.save writes (cleared from a reused --out folder)
_CLI_OUTPUTS = ("mask.png", "mask.nii.gz")


def _where(loaded) -> str:
    """`` (slice 3 of 5, volume 1 of 3)`` for a volume slice, else empty."""
    meta = loaded.meta
    parts = []
    if "n_slices" in meta and "slice_index" in meta:
        parts.append(f"slice {meta['slice_index']} of {meta['n_slices']}")
    if meta.get("n_volumes", 1) > 1:
        parts.append(f"volume {meta.get('volume_index', 0)} of {meta['n_volumes']}")
    return f" ({', '.join(parts)})" if parts else ""


def _save_outputs(agent, ep, loaded, out: Path, *, overlays: bool) -> tuple[Path, list[str]]:
    """Write one episode's files (trace, mask, overlays) to ``out``, first removing those of an earlier run there.
    Returns the mask file and the names removed."""
    from ibisagent.agent import clear_saved
    from ibisagent.io import save_mask

    out.mkdir(parents=True, exist_ok=True)
    stale = clear_saved(out, _CLI_OUTPUTS)
    ep.meta.update({"image": str(loaded.source), "policy": agent.policy.name, "segmenter": agent.segmenter.name})
    if loaded.meta.get("n_volumes", 1) > 1:
        ep.meta["volume_index"] = loaded.meta.get("volume_index", 0)
    ep.save(out, loaded.array, overlays=overlays)
    mask_path = out / ("mask.nii.gz" if loaded.kind.startswith("nifti") else "mask.png")
    save_mask(mask_path, ep.final_mask, like=loaded if loaded.kind.startswith("nifti") else None)
    return mask_path, stale


def _run_one(agent, loaded, gt, query: str, out: Path, *, overlays: bool, quiet: bool,
             t_start: float | None = None) -> dict[str, Any]:
    """Run the agent on one image and write its files to ``out``. ``t_start``: when the command started (the
    wall time reported covers loading, the episode and writing)."""
    t_start = time.perf_counter() if t_start is None else t_start
    if not quiet:
        print(f"segmenting {query!r} in {loaded.source}{_where(loaded)} ({loaded.array.shape[1]}x"
              f"{loaded.array.shape[0]}) with policy={agent.policy.name}, segmenter={agent.segmenter.name}",
              file=sys.stderr)
    ep = agent.segment(loaded.array, query, gt, on_step=_progress(quiet))
    t_write = time.perf_counter()
    mask_path, stale = _save_outputs(agent, ep, loaded, out, overlays=overlays)
    if stale and not quiet:
        shown = ", ".join(stale[:6]) + (f" and {len(stale) - 6} more" if len(stale) > 6 else "")
        print(f"note: removed {len(stale)} file(s) of an earlier run from {out} first ({shown})", file=sys.stderr)
    t_end = time.perf_counter()
    result = {
        "image": str(loaded.source), "query": query, "policy": agent.policy.name, "segmenter": agent.segmenter.name,
        "stop_reason": ep.stop_reason, "steps": len(ep.steps), "interactions": ep.n_interactions,
        "mask_pixels": int(ep.final_mask.sum()), "iou": ep.final_iou, "dice": ep.final_dice,
        "predicted_iou": None if ep.predicted_iou is None else round(ep.predicted_iou, 4),
        "low_confidence": ep.low_confidence,
        "seconds": {"wall": round(t_end - t_start, 3), "episode": round(ep.total_s, 3),
                    "total": round(ep.total_s, 3), "encoder": round(ep.encoder_s, 3),
                    "policy": round(ep.policy_s, 3), "segmenter": round(ep.segmenter_s, 3),
                    "write": round(t_end - t_write, 3)},
        "mask": str(mask_path), "trace": str(out / "trace.json"),
        "overlay": str(out / "final_overlay.png") if overlays else None,
        "removed_stale": stale,
    }
    if loaded.meta.get("n_volumes", 1) > 1:
        result["volume_index"] = loaded.meta.get("volume_index", 0)
    if not quiet:
        iou = f", IoU {ep.final_iou:.3f}, Dice {ep.final_dice:.3f}" if ep.final_iou is not None else ""
        print(f"done: {ep.stop_reason} after {len(ep.steps)} steps ({ep.n_interactions} prompts){iou}; "
              f"{t_end - t_start:.2f} s wall (episode {ep.total_s:.2f} s, encoder {ep.encoder_s:.2f} s, writing "
              f"{t_end - t_write:.2f} s). Mask: {mask_path}", file=sys.stderr)
        if ep.predicted_iou is not None:
            note = "; low confidence: check the mask" if ep.low_confidence else ""
            print(f"predicted IoU (the policy's own estimate, no ground truth): {ep.predicted_iou:.2f}{note}",
                  file=sys.stderr)
    return result


def _check_min(value: int | None, option: str, minimum: int) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{option} must be >= {minimum}, got {value}")


def _check_query(query: str) -> str:
    q = query.strip()
    if not q:
        raise UserError("--query is empty: say what to segment, e.g. --query 'the polyp in this colonoscopy frame'")
    if any(ord(c) < 32 and c not in "\t\n" for c in q):
        raise UserError("--query contains control characters")
    return q


def check_output_dir(out: str | Path, option: str = "--out") -> Path:
    """Make sure ``out`` is a writable folder or can be created as one, before any work, without creating it: the
    folder (or its nearest existing parent) must be a folder where a probe file can be written and deleted.
    Raises :class:`UserError` with one line saying what is wrong."""
    import os
    import tempfile

    if not str(out).strip():  # Path("") would be the current folder
        raise UserError(f"{option} is empty: name an output folder")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {out}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ibisagent_write_check_", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = "" if existing == out else f" (its folder {existing} is not writable)"
        raise UserError(f"{option} {out} is not writable{where} ({reason}); choose another output folder") from exc
    return out


#: library parameter names in io error messages -> the ``segment`` options that set them
_CLI_WORDS = (
    (re.compile(r"\bslice_index[= ]"), "--slice "),
    (re.compile(r"\bvolume_index[= ]"), "--volume-index "),
    (re.compile(r"\bthreshold="), "--mask-threshold "),
    (re.compile(r"\blabel=V\b"), "--mask-label V"),
    (re.compile(r"^axis must be"), "--axis must be"),
)


def _cli_wording(message: str) -> str:
    """An io error message with the library's parameter names replaced by the CLI options."""
    for pattern, repl in _CLI_WORDS:
        message = pattern.sub(repl, message)
    return message



def _check_image_args(args: argparse.Namespace) -> None:
    """The image and mask options of ``segment`` (single and batch): clear one-line errors before any work."""
    if args.axis not in (0, 1, 2):
        raise UserError(f"--axis must be 0, 1 or 2 (a voxel axis of the volume), got {args.axis}")
    _check_min(args.slice, "--slice", 0)
    _check_min(args.volume_index, "--volume-index", 0)
    if args.mask_threshold is not None and not math.isfinite(args.mask_threshold):
        raise UserError(f"--mask-threshold must be a finite number, got {args.mask_threshold}")
    if args.mask_threshold is not None and args.mask_label is not None:
        raise UserError("pass either --mask-threshold or --mask-label, not both")


def _checked_segment_args(args: argparse.Namespace, example: str) -> tuple[str, Path, Any]:
    """The checks every single-image and volume ``segment`` run makes first: the query (``example`` shows one), the
    image and agent options, the output folder; returns the query, the output folder and the parsed window."""
    if args.query is None:
        raise UserError(f"--query is required: say what to segment, e.g. --query '{example}'")
    query = _check_query(args.query)
    _check_image_args(args)
    _check_agent_args(args)
    return query, check_output_dir(args.out), _parse_window(args.window)


def cmd_segment(args: argparse.Namespace) -> int:
    t_start = getattr(args, "t_start", None) or time.perf_counter()
    if args.slice is None and _is_volume_input(args.image):
        return _cmd_segment_volume(args, t_start)
    if args.propagation != "slices":
        raise UserError("--propagation applies to a whole volume (a NIfTI file or a DICOM series folder, no --slice)")
    if _is_batch(args.image):
        return _cmd_segment_batch(args)
    query, out, window = _checked_segment_args(args, "the polyp in this colonoscopy frame")
    from ibisagent.io import load_image, load_mask

    try:
        loaded = load_image(args.image[0], slice_index=args.slice, axis=args.axis, window=window,
                            volume_index=args.volume_index)
    except ValueError as exc:
        raise UserError(_cli_wording(str(exc))) from exc
    from ibisagent.segmenters.base import MIN_IMAGE_SIDE

    h, w = loaded.array.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise UserError(f"{Path(args.image[0]).name} is {w}x{h} pixels; the minimum image size is "
                        f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
    n_vol = loaded.meta.get("n_volumes", 1)
    if n_vol > 1 and args.volume_index is None:
        raise UserError(f"{Path(args.image[0]).name} is a 4D NIfTI file with {n_vol} volumes; pick one with "
                        f"--volume-index 0..{n_vol - 1}")
    gt = None
    if args.mask:
        try:
            gt = load_mask(args.mask, shape=loaded.shape, slice_index=args.slice, axis=args.axis,
                           label=args.mask_label, threshold=args.mask_threshold)
        except ValueError as exc:
            raise UserError(_cli_wording(str(exc))) from exc
        if not gt.any():
            raise UserError(f"the ground-truth mask {args.mask} is empty"
                            + (f" at slice {args.slice}" if args.slice is not None else ""))
    agent = _build_agent(args, needs_gt_ok=gt is not None)
    result = _run_one(agent, loaded, gt, query, out, overlays=not args.no_overlays, quiet=args.quiet,
                      t_start=t_start)
    if args.json:
        print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# segment, a whole volume (the 3D agent)
# ----------------------------------------------------------------------------------------------------------------

def _is_volume_input(inputs: list[str]) -> bool:
    """One NIfTI file, or one folder of DICOM files of one series: a volume for the 3D agent (without --slice)."""
    if len(inputs) != 1:
        return False
    p = Path(inputs[0])
    if p.name.lower().endswith((".nii", ".nii.gz")):
        return True
    if not p.is_dir():
        return False
    from ibisagent.io.images import is_dicom_file

    files = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR"]
    if len(files) < 2 or not all(f.suffix.lower() == ".dcm" or is_dicom_file(f) for f in files):
        return False
    import pydicom

    try:  # one series (a folder of unrelated 2D DICOM images stays batch mode)
        uids = {pydicom.dcmread(f, stop_before_pixels=True).get("SeriesInstanceUID") for f in files}
    except Exception:  # noqa: BLE001 - an unreadable file: let batch mode report it per file
        return False
    return len(uids) == 1 and None not in uids


def _volume_mask(args: argparse.Namespace, volume) -> Any:
    """The --mask label map or DICOM SEG as a bool array of ``volume`` (its stored layout, the same voxel grid)."""
    from ibisagent.io.volume_masks import load_volume_mask

    if args.mask_threshold is not None:
        raise UserError("--mask-threshold applies to 2D mask images; a volume mask is a label map (--mask-label)")
    try:
        return load_volume_mask(args.mask, volume, label=args.mask_label, allow_empty=False)
    except (ValueError, OSError) as exc:
        raise UserError(_cli_wording(str(exc))) from exc


class _SliceProgress:
    """Per-slice progress of a 3D run on stderr: on a terminal one line rewritten as slices are encoded and decoded;
    in a log, a line each time another tenth of the volume's slices has been encoded."""

    def __init__(self, depth: int, *, quiet: bool = False, stream: Any = None) -> None:
        self.depth, self.quiet = depth, quiet
        self.stream = sys.stderr if stream is None else stream
        self.encoded = self.decoded = 0
        self._every = max(1, math.ceil(depth / 10))
        self._live = False

    def __call__(self, phase: str, z: int) -> None:
        if self.quiet:
            return
        if phase == "encode":
            self.encoded += 1
        elif phase == "decode":
            self.decoded += 1
        tty = getattr(self.stream, "isatty", lambda: False)()
        if tty:
            print(f"\r  slices: {self.encoded}/{self.depth} encoded, {self.decoded} decoded (slice {z})",
                  end="", file=self.stream, flush=True)
            self._live = True
        elif phase == "encode" and (self.encoded % self._every == 0 or self.encoded == self.depth):
            print(f"  encoded {self.encoded}/{self.depth} slices", file=self.stream, flush=True)

    def clear(self) -> None:
        """End the rewritten line (before a step line or the summary)."""
        if self._live:
            print("\r\033[K", end="", file=self.stream, flush=True)
            self._live = False


def _cmd_segment_volume(args: argparse.Namespace, t_start: float) -> int:
    query, out, window = _checked_segment_args(args, "the left kidney")
    from ibisagent.io.volumes import load_volume
    from ibisagent.segmenters.base import MIN_IMAGE_SIDE

    src = args.image[0]
    try:
        volume = load_volume(src, volume_index=args.volume_index)
    except (ValueError, OSError) as exc:
        raise UserError(_cli_wording(str(exc))) from exc
    name = Path(src).name
    n_vol = volume.meta.get("n_volumes", 1)
    if n_vol > 1 and args.volume_index is None:
        raise UserError(f"{name} is a 4D NIfTI file with {n_vol} volumes; pick one with --volume-index 0..{n_vol - 1}")
    if volume.array.size == 0 or min(volume.shape) < 1:
        raise UserError(f"{name} is an empty volume (shape {volume.shape})")
    if float(volume.array.max()) == float(volume.array.min()):
        raise UserError(f"{name} is an empty volume: every voxel has the value {float(volume.array.min()):g}")
    side = [volume.shape[a] for a in range(3) if a != args.axis]
    if min(side) < MIN_IMAGE_SIDE:
        raise UserError(f"{name}'s slices along axis {args.axis} are {side[0]}x{side[1]} voxels; the minimum image "
                        f"size is {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
    gt = _volume_mask(args, volume) if args.mask else None
    agent = _build_agent(args, needs_gt_ok=True)
    from ibisagent.agent import DEFAULT_VOLUME_POLICY, VOLUME_POLICY_FOR

    policy = None
    if args.policy is not None and not args.policy.endswith("-3d"):
        policy = VOLUME_POLICY_FOR.get(args.policy, DEFAULT_VOLUME_POLICY)
    depth = volume.shape[args.axis]
    if not args.quiet:
        print(f"segmenting {query!r} in {name} ({volume.shape[0]}x{volume.shape[1]}x{volume.shape[2]} voxels, "
              f"{depth} slices along axis {args.axis}) with the 3D agent", file=sys.stderr)

    slices = _SliceProgress(depth, quiet=args.quiet)

    def show(rec: dict[str, Any]) -> None:
        if args.quiet:
            return
        slices.clear()
        what = rec["action"] or f"(invalid reply: {rec['error']})"
        iou = f"  3D IoU {rec['iou']:.3f}" if rec.get("iou") is not None else ""
        where = f" (slice {rec['slice']}/{depth - 1})" if rec.get("slice") is not None else ""
        print(f"  step {rec['step']:2d}: {what:<44}{where}{iou}  [policy {rec['policy_s']:.2f} s, segmenter "
              f"{rec['segmenter_s']:.2f} s]", file=sys.stderr)

    try:
        episode = agent.segment_volume(volume, query, gt, policy=policy, axis=args.axis, window=window,
                                       propagation=args.propagation, on_step=show, on_slice=slices)
    except ValueError as exc:
        raise UserError(_cli_wording(str(exc))) from exc
    finally:
        slices.clear()
    from ibisagent.agent import clear_saved

    clear_saved(out, ("mask.nii.gz", "mask.dcm", "overlay_montage.png"))
    try:
        episode.save(out, overlays=not args.no_overlays, seg=False)
    except ValueError as exc:
        raise UserError(_cli_wording(str(exc))) from exc
    if volume.kind == "dicom-series":
        try:
            episode.save_seg(out / "mask.dcm")
        except ValueError as exc:  # the NIfTI mask is written; the SEG needs what this series lacks
            print(f"warning: no DICOM SEG written ({' '.join(str(exc).split())}); mask.nii.gz has the series' "
                  "geometry", file=sys.stderr)
    result = {"mask": str(out / "mask.nii.gz"), "trace": str(out / "trace.json"), "voxels": int(episode.mask.sum()),
              "stop_reason": episode.stop_reason, "n_interactions": episode.n_interactions,
              "final_iou": episode.final_iou,
              "predicted_iou": None if episode.predicted_iou is None else round(episode.predicted_iou, 4),
              "low_confidence": episode.low_confidence, "wall_s": round(time.perf_counter() - t_start, 3)}
    if (out / "mask.dcm").is_file():
        result["seg"] = str(out / "mask.dcm")
    if not args.quiet:
        print(f"done: {result['voxels']} voxels in {len(episode.to_json()['slices_with_object'])} slices, "
              f"{episode.n_interactions} interactions, {result['wall_s']:.1f} s -> {out}", file=sys.stderr)
        if episode.predicted_iou is not None:
            note = "; low confidence: check the mask" if episode.low_confidence else ""
            print(f"predicted IoU (the policy's own estimate, no ground truth): {episode.predicted_iou:.2f}{note}",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# segment, batch mode
# ----------------------------------------------------------------------------------------------------------------

#: manifest file suffixes (a positional argument with one of these is a manifest, not an image)
MANIFEST_SUFFIXES = (".csv", ".jsonl")
#: the batch results file written under --out
RESULTS_FILE = "results.jsonl"
_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_batch(inputs: list[str]) -> bool:
    if len(inputs) != 1:
        return True
    p = Path(inputs[0])
    if p.is_dir() or p.name.lower().endswith(MANIFEST_SUFFIXES):
        return True
    return not p.exists() and bool(_GLOB_CHARS.search(inputs[0]))


def _is_image_file(p: Path) -> bool:
    from ibisagent.io import SUPPORTED_SUFFIXES

    return p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SUPPORTED_SUFFIXES)


def _cell(row: dict[str, Any], key: str) -> Any:
    v = row.get(key)
    return None if v is None or (isinstance(v, str) and not v.strip()) else v


def _read_manifest(path: Path, query: str | None) -> list[Any]:
    """The items of a CSV / JSONL manifest (columns ``image``, ``query``, optional ``mask``, ``slice``); relative
    paths are relative to the manifest's folder. Raises :class:`UserError` (or ManifestError for a line that is not
    a JSON object) naming the line of a bad row."""
    import csv

    from ibisagent.agent import BatchItem

    if not path.is_file():
        raise UserError(f"manifest {path} not found")
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"manifest {path}: cannot read it ({exc})") from exc
    if path.name.lower().endswith(".csv"):
        reader = csv.DictReader(text.splitlines())
        if "image" not in (reader.fieldnames or []):
            raise UserError(f"manifest {path}: the first line must name the columns, one of them 'image' "
                            f"(got {', '.join(reader.fieldnames or []) or 'nothing'})")
        rows = [(i + 2, r) for i, r in enumerate(reader)]
    else:
        from ibisagent.io.manifest import parse_jsonl

        rows = list(parse_jsonl(text, path))  # ManifestError (a ValueError: one line, exit 2) naming path:line
    items = []
    for line, r in rows:
        image = _cell(r, "image")
        if image is None:
            raise UserError(f"manifest {path} line {line}: no image")
        q = _cell(r, "query")
        q = str(q) if q is not None else query
        if q is None:
            raise UserError(f"manifest {path} line {line}: no query (give the row a query, or pass --query for all)")
        try:
            q = _check_query(q)
        except UserError as exc:
            raise UserError(f"manifest {path} line {line}: {exc}") from exc
        sl = _cell(r, "slice")
        if sl is not None:
            try:
                sl = int(sl)
            except (TypeError, ValueError) as exc:
                raise UserError(f"manifest {path} line {line}: slice must be an integer, got {sl!r}") from exc
            _check_min(sl, f"manifest {path} line {line}: slice", 0)
        mask = _cell(r, "mask")
        items.append(BatchItem(image=path.parent / str(image), query=q, slice=sl,
                               mask=None if mask is None else path.parent / str(mask)))
    return items


def _batch_items(args: argparse.Namespace) -> list[Any]:
    """Expand the positional arguments (files, folders, globs, manifests) into batch items, in order."""
    import glob

    from ibisagent.agent import BatchItem

    query = None if args.query is None else _check_query(args.query)
    if args.mask:
        raise UserError("--mask names one mask file, but several images are given: put each image's mask in a "
                        "manifest (.csv / .jsonl with columns image, query, mask)")
    items: list[Any] = []
    for arg in args.image:
        p = Path(arg)
        if p.name.lower().endswith(MANIFEST_SUFFIXES):
            items.extend(_read_manifest(p, query))
            continue
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if _is_image_file(f))
            if not files:
                raise UserError(f"folder {p} holds no image files")
        elif p.exists() or not _GLOB_CHARS.search(arg):
            files = [p]  # a missing file is that image's error row
        else:
            files = sorted(Path(f) for f in glob.glob(arg) if _is_image_file(Path(f)))
            if not files:
                raise UserError(f"no image files match {arg!r}")
        if query is None:
            raise UserError("--query is required for images given without a manifest")
        items.extend(BatchItem(image=f, query=query, slice=args.slice) for f in files)
    return items


def _item_key(image: str | Path, slice_index: int | None, query: str) -> str:
    """What identifies one job of a batch (and its row in ``results.jsonl``): the image, the slice and the query (one
    image may be asked for several objects)."""
    return json.dumps([str(Path(image).resolve()), slice_index, query])


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _read_results(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The rows of an earlier ``results.jsonl`` by item key (the last row of a key wins) and the number of lines that
    were not valid rows (a line cut short by a kill)."""
    rows: dict[str, dict[str, Any]] = {}
    bad = 0
    if not path.is_file():
        return rows, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows[_item_key(r["image"], r.get("slice"), r["query"])] = r
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += 1
    return rows, bad


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``rows`` atomically (a crash leaves the old file or the new one, never half of one)."""
    import os

    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _ok_row(res: Any, key_image: str, folder: Path, mask_path: Path, seconds: dict[str, float]) -> dict[str, Any]:
    ep = res.episode
    return {
        "image": key_image, "slice": res.item.slice, "query": res.item.query, "status": "ok", "out": str(folder),
        "mask": str(mask_path), "stop_reason": ep.stop_reason, "steps": len(ep.steps),
        "interactions": ep.n_interactions, "mask_pixels": int(ep.final_mask.sum()),
        "predicted_iou": None if ep.predicted_iou is None else round(ep.predicted_iou, 4),
        "low_confidence": ep.low_confidence, "iou": ep.final_iou, "dice": ep.final_dice,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def _cmd_segment_batch(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    _check_image_args(args)
    items = _batch_items(args)
    if not items:
        raise UserError("no images to segment")
    _check_agent_args(args)
    out = check_output_dir(args.out)
    window = _parse_window(args.window)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    earlier, n_bad = _read_results(results_path)

    # one folder per image: the name of an earlier row is kept, new names are made unique in item order
    keys = [_item_key(it.image, it.slice, it.query) for it in items]
    if len(set(keys)) != len(keys):
        image, slice_index, query = json.loads(next(k for k in keys if keys.count(k) > 1))
        raise UserError(f"{image} is given twice with the query {query!r}"
                        + ("" if slice_index is None else f" (slice {slice_index})"))
    taken = {Path(r["out"]).name for r in earlier.values() if r.get("out")}
    folders: dict[str, Path] = {}
    for it, key in zip(items, keys):
        if earlier.get(key, {}).get("out"):
            folders[key] = Path(earlier[key]["out"])
            continue
        base = _stem(Path(it.image)) + ("" if it.slice is None else f"_slice{it.slice}")
        name, n = base, 2
        while name in taken or name == RESULTS_FILE:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        folders[key] = out / name

    redo = set(keys) if args.overwrite else {k for k in keys if earlier.get(k, {}).get("status") != "ok"}
    todo = [(it, k) for it, k in zip(items, keys) if k in redo]
    kept = [r for k, r in earlier.items() if k not in redo]
    _write_rows(results_path, kept)  # earlier rows minus those redone now and any line cut short by a kill
    if not args.quiet:
        skipped = len(items) - len(todo)
        if skipped:
            print(f"skipping {skipped} image(s) already done in {results_path} (--overwrite redoes them)",
                  file=sys.stderr)
        if n_bad:
            print(f"note: dropped {n_bad} unreadable line(s) of {results_path}", file=sys.stderr)
    if not todo:
        return 0
    agent = _build_agent(args, needs_gt_ok=True)
    by_item = {id(it): k for it, k in todo}
    n_ok = n_err = 0
    bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=args.quiet, dynamic_ncols=True,
               desc="segmenting")
    try:
        with results_path.open("a", encoding="utf-8") as f:
            for res in agent.segment_many((it for it, _ in todo), axis=args.axis, window=window,
                                          volume_index=args.volume_index, mask_label=args.mask_label,
                                          mask_threshold=args.mask_threshold):
                key = by_item[id(res.item)]
                image = str(Path(res.item.image).resolve())
                if res.ok:
                    t_write = time.perf_counter()
                    mask_path, _ = _save_outputs(agent, res.episode, res.loaded, folders[key],
                                                 overlays=not args.no_overlays)
                    ep = res.episode
                    seconds = {"load": res.load_s, "episode": ep.total_s, "encoder": ep.encoder_s,
                               "policy": ep.policy_s, "segmenter": ep.segmenter_s,
                               "write": time.perf_counter() - t_write}
                    row = _ok_row(res, image, folders[key], mask_path, seconds)
                    n_ok += 1
                else:
                    row = {"image": image, "slice": res.item.slice, "query": res.item.query, "status": "error",
                           "error": _cli_wording(res.error or "")}
                    n_err += 1
                    bar.write(f"error: {res.item.image}: {row['error']}", file=sys.stderr)
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
                if args.json:
                    print(json.dumps(row), flush=True)
                bar.update(1)
                bar.set_postfix(errors=n_err, refresh=False)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted after {n_ok + n_err} of {len(todo)} image(s); their rows are in {results_path}: rerun "
              "the same command to do the rest", file=sys.stderr)
        raise
    bar.close()
    if not args.quiet:
        print(f"done: {n_ok} image(s) segmented, {n_err} error(s); results in {results_path}", file=sys.stderr)
    if n_err:
        raise UserError(f"{n_err} of {len(todo)} image(s) failed (rows with status \"error\" in {results_path})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ibisagent.demo import demo_data_dir
    from ibisagent.io import load_case
    from ibisagent.io.manifest import load_manifest

    cases = load_manifest(demo_data_dir())
    chosen = cases if args.case == "all" else [c for c in cases if c.id == args.case]
    if not chosen:
        raise UserError(f"no bundled case {args.case!r}; choose one of: {', '.join(c.id for c in cases)} or 'all'")
    t0 = getattr(args, "t_start", None) or time.perf_counter()
    _check_agent_args(args)
    check_output_dir(args.out)
    agent = _build_agent(args, needs_gt_ok=True)
    results = []
    for case in chosen:
        t_case = time.perf_counter()
        loaded, gt = load_case(case)
        out = Path(args.out) / case.id if len(chosen) > 1 else Path(args.out)
        results.append(_run_one(agent, loaded, gt, case.query, out, overlays=True, quiet=args.json,
                                t_start=t0 if len(chosen) == 1 else t_case))
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0]))
    else:
        print(f"demo finished in {time.perf_counter() - t0:.1f} s; open {Path(args.out) / 'final_overlay.png'} "
              "(green = mask, yellow = expert outline, dots = clicks)" if len(results) == 1 else
              f"demo finished in {time.perf_counter() - t0:.1f} s; results under {args.out}/")
    return 0


def _parse_window(text: str | None):
    if text is None:
        return None
    if "," in text:
        try:
            c, w = (float(v) for v in text.split(","))
        except ValueError as exc:
            raise UserError(f"--window CENTER,WIDTH expects two numbers, got {text!r}") from exc
        return (c, w)
    return text


# ----------------------------------------------------------------------------------------------------------------
# parser + main
# ----------------------------------------------------------------------------------------------------------------

def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``ibisagent`` parser. ``commands=None``: every subcommand fully built (every area module imported);
    otherwise only the area modules of ``commands`` are imported and the other area commands are listed by name and
    help only (enough for ``ibisagent --help``). A missing optional dependency of an area module raises
    :class:`UserError` when one of its commands is asked for; with ``commands=None`` that area is left out."""
    parser = argparse.ArgumentParser(prog="ibisagent", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ibisagent {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_segment(sub)
    _add_demo(sub)
    _add_list(sub)
    wanted = None if commands is None else {AREA_COMMANDS[c][0] for c in commands if c in AREA_COMMANDS}
    for mod in dict.fromkeys(m for m, _ in AREA_COMMANDS.values()):
        if wanted is not None and mod not in wanted:
            for name, (m, help_) in AREA_COMMANDS.items():
                if m == mod:
                    sub.add_parser(name, help=help_, add_help=False)
            continue
        try:
            module = importlib.import_module(mod)
        except ImportError as exc:  # an optional extra is not installed
            if wanted is not None:
                names = ", ".join(n for n, (m, _) in AREA_COMMANDS.items() if m == mod)
                raise UserError(f"{names} needs optional packages that are not installed ({exc})") from exc
            continue
        add = getattr(module, "add_parser", None)
        if add is not None:
            add(sub)
        for extra in getattr(module, "ADD_PARSERS", ()):
            extra(sub)
    return parser


def _command_name(argv: list[str]) -> str | None:
    """The subcommand named on a command line (the first word that is not a top-level option), if any."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def _user_error_types() -> tuple[type[BaseException], ...]:
    base = (ValueError, FileNotFoundError, KeyError, PermissionError, IsADirectoryError)
    seg = sys.modules.get("ibisagent.segmenters.base")  # not imported yet: nothing can have raised its errors
    return base if seg is None else (*base, seg.SegmenterUnavailable)


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    words = sys.argv[1:] if argv is None else list(argv)
    command = _command_name(words)
    try:
        parser = build_parser([command] if command else [])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(words)
    args.t_start = t_start  # commands report wall time from here (command-line parsing and imports included)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - last-resort message instead of a traceback
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
