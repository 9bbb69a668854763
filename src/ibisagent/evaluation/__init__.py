"""Evaluation: the harness every benchmark reports with (``ibisagent eval``), run comparison (``ibisagent compare``)
and the medical interactive-segmentation challenge protocol (``--protocol box+5clicks``)."""

from ibisagent.evaluation.challenge import BoxFirstPolicy, ChallengeClicker, challenge_click, challenge_metrics
from ibisagent.evaluation.compare import CompareError, compare_runs, paired_differences
from ibisagent.evaluation.harness import (
    CASE_COLUMNS,
    EvalConfig,
    EvalConfigError,
    EvalResult,
    Runner,
    read_cases,
    run_eval,
)
from ibisagent.evaluation.metrics import curve_auc, iou_at, noc, noc_measured
from ibisagent.evaluation.summary import SUMMARY_KEYS, summarize

__all__ = [
    "CASE_COLUMNS",
    "SUMMARY_KEYS",
    "BoxFirstPolicy",
    "ChallengeClicker",
    "CompareError",
    "EvalConfig",
    "EvalConfigError",
    "EvalResult",
    "Runner",
    "challenge_click",
    "challenge_metrics",
    "compare_runs",
    "curve_auc",
    "iou_at",
    "noc",
    "noc_measured",
    "paired_differences",
    "read_cases",
    "run_eval",
    "summarize",
]
