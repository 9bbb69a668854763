"""The ``ibisagent`` command line: one subcommand per job, each calling one public function.

Exit codes: 0 success, 2 bad input (a message says what to fix), 1 an unexpected failure (``--debug`` shows the
traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from ibisagent import __version__
from ibisagent.segmenters.base import default_segmenter

__all__ = ["main", "build_parser", "parse_kv", "default_policy", "default_segmenter", "UserError"]

#: modules that add subcommands through ``add_parser(subparsers)``; missing optional dependencies hide them
_AREA_MODULES = [
    "ibisagent.evaluation.cli",
    "ibisagent.synthesis.cli",
    "ibisagent.exports.cli",
    "ibisagent.training.segmenter",
    "ibisagent.training.policy",
    "ibisagent.training.llm_cli",
    "ibisagent.server",
    "ibisagent.ui.app",
    "ibisagent.segmenters.onnx_encoder",
]

DESCRIPTION = """\
IBISAgent: text-prompted interactive medical image segmentation.

A policy looks at the image, your query and the current mask, and places one click (positive/negative) or a box
per turn; a promptable segmenter (LiteMedSAM fine-tuned for clicks, by default) turns the prompts into a mask;
repeat until the policy says Terminate.

Common jobs:
  ibisagent demo                                   run the agent on a bundled case, write overlays to ./demo_out
  ibisagent segment IMG --query "the polyp" --out DIR
                                                   segment one image (PNG/JPEG/TIFF/BMP/DICOM/NIfTI slice)
  ibisagent eval DATA --policy oracle --out DIR    score a policy + segmenter on a dataset folder
  ibisagent list                                   show the available policies, segmenters and prompt templates
"""


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


def parse_kv(items: list[str] | None, what: str = "option") -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values are JSON when they parse (numbers, true/false, null, lists), else strings.
    Dashes in keys become underscores. ``what`` names the option in the error message."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"{what} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def default_policy() -> str:
    """The learned ``compact`` policy when its weights are installed, else ``oracle`` (which needs ``--mask``)."""
    from importlib import resources

    from ibisagent.policies import list_policies

    weights = resources.files("ibisagent").joinpath("weights/compact_policy.safetensors")
    return "compact" if weights.is_file() and "compact" in list_policies() else "oracle"


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
    p.add_argument("--max-steps", type=int, default=20, help="maximum policy turns per episode (default 20)")
    p.add_argument("--history", action="store_true", help="send the whole conversation each turn (default: off)")
    p.add_argument("--prompts", default=None,
                   help="prompt template name (reference, extended) or a JSON file with your own wording")


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment", help="segment one image from a text query",
        description="Run the agent on one image: it clicks until it decides to stop, then writes the mask "
                    "(PNG, or NIfTI for a volume slice), the trace (JSON) and overlays.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  ibisagent segment scan.png --query 'the polyp in this colonoscopy frame' --out out/\n"
               "  ibisagent segment ct.nii.gz --slice 15 --window ct-abdomen --query 'the liver' --out out/",
    )
    p.add_argument("image", help="image file: PNG/JPEG/TIFF/BMP, DICOM (.dcm) or NIfTI (.nii/.nii.gz, needs --slice)")
    p.add_argument("--query", "-q", required=True, help="what to segment, e.g. 'the tumor in this breast ultrasound'")
    p.add_argument("--mask", default=None, help="ground-truth mask (for IoU reporting, and required by oracle policies)")
    p.add_argument("--mask-label", type=int, default=None, help="label value in a multi-label mask file")
    p.add_argument("--slice", type=int, default=None, help="slice index for a volume (NIfTI/multi-frame DICOM)")
    p.add_argument("--axis", type=int, default=2, help="slicing axis for NIfTI volumes (default 2 = axial)")
    p.add_argument("--window", default=None,
                   help="intensity window: a preset (ct-abdomen, ct-lung, ct-bone, ct-brain, ...), 'percentile', "
                        "or CENTER,WIDTH")
    p.add_argument("--out", "-o", default="ibisagent_out", help="output folder (default ./ibisagent_out)")
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


def _build_agent(args: argparse.Namespace, needs_gt_ok: bool):
    from ibisagent.agent import Agent
    from ibisagent.env import EnvConfig

    policy = args.policy or default_policy()
    segmenter = args.segmenter or default_segmenter()
    cfg = EnvConfig(max_steps=args.max_steps, history=args.history, prompts=args.prompts or "reference")
    agent = Agent(policy, segmenter, cfg, policy_kwargs=parse_kv(args.policy_arg, "--policy-arg"),
                  segmenter_kwargs=parse_kv(args.segmenter_arg, "--segmenter-arg"))
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


def _run_one(agent, loaded, gt, query: str, out: Path, *, overlays: bool, quiet: bool) -> dict[str, Any]:
    from ibisagent.io import save_mask

    if not quiet:
        print(f"segmenting {query!r} in {loaded.source} ({loaded.array.shape[1]}x{loaded.array.shape[0]}) with "
              f"policy={agent.policy.name}, segmenter={agent.segmenter.name}", file=sys.stderr)
    ep = agent.segment(loaded.array, query, gt, on_step=_progress(quiet))
    out.mkdir(parents=True, exist_ok=True)
    ep.meta.update({"image": str(loaded.source), "policy": agent.policy.name, "segmenter": agent.segmenter.name})
    ep.save(out, loaded.array, overlays=overlays)
    mask_path = out / ("mask.nii.gz" if loaded.kind.startswith("nifti") else "mask.png")
    save_mask(mask_path, ep.final_mask, like=loaded if loaded.kind.startswith("nifti") else None)
    result = {
        "image": str(loaded.source), "query": query, "policy": agent.policy.name, "segmenter": agent.segmenter.name,
        "stop_reason": ep.stop_reason, "steps": len(ep.steps), "interactions": ep.n_interactions,
        "mask_pixels": int(ep.final_mask.sum()), "iou": ep.final_iou, "dice": ep.final_dice,
        "predicted_iou": None if ep.predicted_iou is None else round(ep.predicted_iou, 4),
        "low_confidence": ep.low_confidence,
        "seconds": {"total": round(ep.total_s, 3), "encoder": round(ep.encoder_s, 3),
                    "policy": round(ep.policy_s, 3), "segmenter": round(ep.segmenter_s, 3)},
        "mask": str(mask_path), "trace": str(out / "trace.json"),
        "overlay": str(out / "final_overlay.png") if overlays else None,
    }
    if not quiet:
        iou = f", IoU {ep.final_iou:.3f}, Dice {ep.final_dice:.3f}" if ep.final_iou is not None else ""
        print(f"done: {ep.stop_reason} after {len(ep.steps)} steps ({ep.n_interactions} prompts){iou}; "
              f"{ep.total_s:.2f} s (encoder {ep.encoder_s:.2f} s). Mask: {mask_path}", file=sys.stderr)
        if ep.predicted_iou is not None:
            note = "; low confidence: check the mask" if ep.low_confidence else ""
            print(f"predicted IoU (the policy's own estimate, no ground truth): {ep.predicted_iou:.2f}{note}",
                  file=sys.stderr)
    return result


def cmd_segment(args: argparse.Namespace) -> int:
    from ibisagent.io import load_image, load_mask

    window = _parse_window(args.window)
    loaded = load_image(args.image, slice_index=args.slice, axis=args.axis, window=window)
    gt = None
    if args.mask:
        gt = load_mask(args.mask, shape=loaded.shape, slice_index=args.slice, axis=args.axis, label=args.mask_label)
        if not gt.any():
            raise UserError(f"the ground-truth mask {args.mask} is empty"
                            + (f" at slice {args.slice}" if args.slice is not None else ""))
    agent = _build_agent(args, needs_gt_ok=gt is not None)
    result = _run_one(agent, loaded, gt, args.query, Path(args.out), overlays=not args.no_overlays, quiet=args.quiet)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ibisagent.demo import demo_data_dir
    from ibisagent.io import load_case
    from ibisagent.io.manifest import load_manifest

    cases = load_manifest(demo_data_dir())
    chosen = cases if args.case == "all" else [c for c in cases if c.id == args.case]
    if not chosen:
        raise UserError(f"no bundled case {args.case!r}; choose one of: {', '.join(c.id for c in cases)} or 'all'")
    agent = _build_agent(args, needs_gt_ok=True)
    results = []
    t0 = time.perf_counter()
    for case in chosen:
        loaded, gt = load_case(case)
        out = Path(args.out) / case.id if len(chosen) > 1 else Path(args.out)
        results.append(_run_one(agent, loaded, gt, case.query, out, overlays=True, quiet=args.json))
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

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ibisagent", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ibisagent {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_segment(sub)
    _add_demo(sub)
    _add_list(sub)
    for mod in _AREA_MODULES:
        try:
            module = importlib.import_module(mod)
        except ImportError as exc:  # an optional extra is not installed, or the area is not built
            if exc.name and exc.name.startswith("ibisagent"):
                continue
            _MISSING[mod] = str(exc)
            continue
        add = getattr(module, "add_parser", None)
        if add is not None:
            add(sub)
        for extra in getattr(module, "ADD_PARSERS", ()):
            extra(sub)
    return parser


_MISSING: dict[str, str] = {}


def _user_error_types() -> tuple[type[BaseException], ...]:
    from ibisagent.segmenters.base import SegmenterUnavailable

    return (ValueError, FileNotFoundError, KeyError, SegmenterUnavailable, PermissionError, IsADirectoryError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        if _MISSING:
            print("\nsome commands are unavailable (missing optional packages): "
                  + "; ".join(f"{k}: {v}" for k, v in _MISSING.items()), file=sys.stderr)
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
