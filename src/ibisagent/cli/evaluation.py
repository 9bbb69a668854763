"""The ``eval`` and ``compare`` subcommands (:mod:`ibisagent.evaluation`). ``add_parser(subparsers)`` adds both;
``add_eval_parser`` / ``add_compare_parser`` add one each."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from ibisagent.cli.util import parse_kv

__all__ = ["add_compare_parser", "add_eval_parser", "add_parser", "run_compare", "run_eval_command"]

EVAL_DESCRIPTION = """\
Evaluate a policy + segmenter on a folder with index.jsonl (the ../shared/data layout) or a folder of such folders.
Writes OUT/cases.csv (one row per case as it finishes; rerunning the same command resumes and skips finished
cases), OUT/summary.json (cases, mean_iou, mean_dice, mean_steps, mean_seconds, noc, iou_at, by_dataset, config),
OUT/summary_extra.json (HD95/NSD, time split, modality and thin-structure groups, challenge metrics, errors) and
OUT/report.md with PNG plots. Policies: every registered policy (oracle, oracle-box, gt-box, center-click, ...).
The oracle stops at IoU >= 0.8 by default: add --no-stop (= --policy-arg iou_threshold=1.01) for NoC@85/90 and
full IoU-vs-clicks curves. --protocol box+5clicks runs the CVPR 2025 interactive-segmentation challenge protocol
(ground-truth box, then 5 clicks at the centre of the largest error; reports DSC_AUC, NSD_AUC, DSC_Final,
NSD_Final, time per interaction); its default policy is the challenge clicker."""

EVAL_EXAMPLES = """\
examples:
  ibisagent eval ../shared/data --split val --policy oracle --no-stop --segmenter litemedsam --out runs/oracle
  ibisagent eval my_data --policy gt-box --out runs/gtbox --workers 2
  ibisagent eval my_data --protocol box+5clicks --out runs/challenge
  ibisagent compare runs/oracle runs/gtbox"""


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a policy + segmenter on a dataset folder (IoU, Dice, NoC, ...)",
                              description=EVAL_DESCRIPTION, epilog=EVAL_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="folder with index.jsonl, or a folder of such folders")
    p.add_argument("--out", required=True, help="output folder (created; an existing run there is resumed)")
    p.add_argument("--policy", default=None,
                   help="policy name (default: compact, the learned agent that needs no ground truth; challenge for "
                        "--protocol box+5clicks; oracle for the simulated annotator)")
    p.add_argument("--segmenter", default=None,
                   help="segmenter name (default: litemedsam-click when its weights are installed, else litemedsam)")
    p.add_argument("--max-steps", type=int, default=20, help="policy turns per episode, Terminate included (20)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first K selected cases")
    p.add_argument("--per-dataset", type=int, default=None, metavar="K",
                   help="at most K cases of each dataset folder, spread over its patients (a stable choice)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (each builds its own segmenter)")
    p.add_argument("--split", choices=("train", "val", "all"), default="all",
                   help="deterministic split of the manifest (default all; our benchmarks use val)")
    p.add_argument("--split-by", choices=("group", "image"), default="group",
                   help="what the split hashes: group (default: the row's patient / volume / video, so a patient "
                        "is never on both sides) or image (the split before 0.2, to reproduce older figures)")
    p.add_argument("--datasets", default=None, help="comma-separated dataset folder names to keep")
    p.add_argument("--policy-arg", action="append", metavar="K=V", help="policy option (repeatable), e.g. "
                   "iou_threshold=0.9 or box_jitter=0.1")
    p.add_argument("--segmenter-arg", action="append", metavar="K=V", help="segmenter option (repeatable)")
    p.add_argument("--no-stop", action="store_true",
                   help="keep the oracle clicking to --max-steps (sets policy arg iou_threshold=1.01)")
    p.add_argument("--cache-dir", default=None,
                   help="on-disk image-embedding cache for LiteMedSAM backends (segmenter arg cache_dir)")
    p.add_argument("--volumes", action="store_true",
                   help="evaluate the is_3d rows as volume episodes (3D Dice, NSD/HD95 in mm, s/volume, peak memory; "
                        "compact/oracle/challenge become compact-3d/oracle-3d/challenge-3d)")
    p.add_argument("--propagation", choices=("slices", "sam2-video"), default="slices",
                   help="with --volumes: how prompts spread through the slices: slices (default: the 2D segmenter "
                        "slice by slice) or sam2-video (SAM2's video predictor; needs --segmenter sam2 with a SAM2 / "
                        "MedSAM2 checkpoint)")
    p.add_argument("--protocol", choices=("agent", "box+5clicks"), default="agent",
                   help="agent: the policy plays the episode (default); box+5clicks: the challenge protocol")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: torch's choice; workers use 1 each)")
    p.add_argument("--seed", type=int, default=0, help="random seed (policies that take one, numpy, random)")
    p.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in pixels (2D images carry no pixel spacing; default 2, as the challenge). "
                   "HD95 and NSD are surfel-area weighted (ibisagent.masks)")
    p.add_argument("--retry-errors", action="store_true", help="rerun cases recorded with an error")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in --out instead of resuming")
    p.add_argument("--no-report", action="store_true", help="skip report.md and its plots")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild summary.json and report.md from an existing OUT/cases.csv without running")
    p.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    p.set_defaults(func=run_eval_command)
    return p


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="side-by-side table of several evaluation runs",
                              description="Print a table with one column per `ibisagent eval` output folder.")
    p.add_argument("runs", nargs="+", help="output folders of `ibisagent eval`")
    p.add_argument("--by-dataset", action="store_true", help="add per-dataset mean IoU rows")
    p.add_argument("--format", choices=("md", "csv"), default="md", help="markdown (default) or CSV")
    p.add_argument("--paired", action="store_true",
                   help="also print per-case differences of each run against the first one (mean IoU and steps "
                        "difference with standard error and 95%% interval, cases better / worse): whether a "
                        "difference between two policies is more than noise")
    p.set_defaults(func=run_compare)
    return p


def add_parser(subparsers: Any) -> None:
    """Add the ``eval`` and ``compare`` subcommands."""
    add_eval_parser(subparsers)
    add_compare_parser(subparsers)


def _err(msg: str) -> int:
    print(f"ibisagent: error: {msg}", file=sys.stderr)
    return 2


def _report_only(out: Path) -> int:
    from ibisagent.evaluation.report import write_report
    from ibisagent.evaluation.runfiles import read_cases
    from ibisagent.evaluation.summary import write_summaries

    f = out / "summary.json"
    if not f.is_file() or not (out / "cases.csv").is_file():
        return _err(f"{out} has no cases.csv/summary.json to rebuild a report from")
    cfg = json.loads(f.read_text(encoding="utf-8")).get("config", {})
    write_summaries(out, read_cases(out), cfg)
    print(write_report(out))
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    from ibisagent.evaluation.harness import EvalConfig, EvalConfigError, print_progress, run_eval
    from ibisagent.io.manifest import ManifestError

    if args.report_only:
        return _report_only(Path(args.out))
    try:
        policy_args = parse_kv(args.policy_arg, "--policy-arg")
        segmenter_args = parse_kv(args.segmenter_arg, "--segmenter-arg")
    except ValueError as exc:
        return _err(str(exc))
    if args.no_stop:
        policy_args.setdefault("iou_threshold", 1.01)
    if args.cache_dir:
        segmenter_args.setdefault("cache_dir", args.cache_dir)
    policy = args.policy or ("challenge" if args.protocol == "box+5clicks" else "compact")
    config = EvalConfig(
        data=args.data, out=args.out, policy=policy, segmenter=args.segmenter, policy_args=policy_args,
        segmenter_args=segmenter_args, protocol=args.protocol, max_steps=args.max_steps, split=args.split,
        split_by=args.split_by,
        datasets=[d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None,
        limit=args.limit, per_dataset=args.per_dataset, workers=args.workers, seed=args.seed, nsd_tolerance=args.nsd_tolerance,
        threads=args.threads, volumes=args.volumes, propagation=args.propagation,
        retry_errors=args.retry_errors, overwrite=args.overwrite, report=not args.no_report,
        command=shlex.join(["ibisagent", *sys.argv[sys.argv.index("eval"):]]) if "eval" in sys.argv else "",
    )
    try:
        result = run_eval(config, progress=None if args.quiet else print_progress)
    except (EvalConfigError, ManifestError) as exc:
        return _err(str(exc))
    if result.interrupted:
        print(f"interrupted: {result.n_run} case(s) written to {result.out / 'cases.csv'}; rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    s = result.summary or {}
    noc85 = s.get("noc", {}).get("85")
    print(f"{s.get('cases', 0)} cases ({result.n_skipped} already done, {result.n_errors} errors this run): "
          f"mean IoU {s.get('mean_iou')}, Dice {s.get('mean_dice')}, "
          f"NoC@85 {noc85 if noc85 is not None else 'not measurable'}, "
          f"steps {s.get('mean_steps')} -> {result.out / 'summary.json'}")
    extra = result.out / "summary_extra.json"
    if s.get("cases") and any(v is None for v in s.get("noc", {}).values()) and extra.is_file():
        counts = json.loads(extra.read_text(encoding="utf-8"))["overall"].get("noc_not_measurable", {})
        shown = ", ".join(f"NoC@{t}: {n} of {s['cases']} cases" for t, n in counts.items() if n)
        print(f"note: NoC not measurable where the policy stopped below the threshold before its budget ({shown}); "
              "reported as null. Measure it with a policy that keeps clicking (oracle: --no-stop)", file=sys.stderr)
    return 1 if s.get("cases", 0) == 0 else 0


def run_compare(args: argparse.Namespace) -> int:
    from ibisagent.evaluation.compare import CompareError, compare_runs, paired_differences

    try:
        print(compare_runs(args.runs, by_dataset=args.by_dataset, fmt=args.format), end="")
        if args.paired:
            print("\n" + paired_differences(args.runs), end="")
    except CompareError as exc:
        return _err(str(exc))
    return 0
