"""The evaluation harness: run a policy + segmenter over a manifest of cases and record per-case results.

>>> from ibisagent.evaluation import EvalConfig, run_eval
>>> result = run_eval(EvalConfig(data="/data", out="runs/oracle", policy="oracle", segmenter="litemedsam"))
>>> result.summary["mean_iou"]

Per case (one row of ``OUT/cases.csv``, appended and flushed as each case finishes, so an interrupted run loses
nothing written and a rerun skips finished cases): IoU, Dice, HD95, NSD of the final mask, steps, clicks,
interactions, stop reason, time split (encoder / segmenter decoder / policy), IoU and Dice after each interaction
(JSON lists) and NoC at 80/85/90 % IoU. The final mask and prompts of each case go to ``OUT/predictions.jsonl``
(RLE) for the report's gallery. ``OUT/summary.json`` aggregates (see :mod:`ibisagent.evaluation.summary`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import random
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.agent import Agent, Episode
from ibisagent.env import EnvConfig
from ibisagent.io import CaseError, load_case_arrays
from ibisagent.io.manifest import SPLIT_BY, Case, load_manifest
from ibisagent.masks import SURFACE_METRICS, dice, iou, rle_encode
from ibisagent.policies.base import Policy, create_policy
from ibisagent.segmenters.base import (
    CLICK_WEIGHTS,
    Segmenter,
    SegmenterError,
    SegmenterUnavailable,
    create_segmenter,
    default_segmenter,
)
from ibisagent.volume.session import PROPAGATIONS

from .challenge import (
    CHALLENGE_CLICKS,
    CHALLENGE_PROTOCOL,
    NSD_TOLERANCE,
    BoxFirstPolicy,
    challenge_metrics,
    challenge_nsd,
)
from .metrics import NOC_THRESHOLDS, group_of, mask_metrics, noc_measured
from .runfiles import CASE_COLUMNS, CASES_CSV, PREDICTIONS, RUN_CONFIG, read_cases, read_predictions
from .volume import VolumeRunner, volume_policy_name

__all__ = [
    "CASE_COLUMNS",
    "PROTOCOLS",
    "EvalConfig",
    "EvalConfigError",
    "EvalResult",
    "Runner",
    "default_segmenter",
    "read_cases",
    "read_predictions",
    "run_eval",
]

#: ``agent``: the policy plays the episode under the reference rules; ``box+5clicks``: the challenge protocol
PROTOCOLS = ("agent", CHALLENGE_PROTOCOL)

#: settings that must match for a rerun into the same folder to resume it
_RESUME_KEYS = ("data", "policy", "segmenter", "policy_args", "segmenter_args", "protocol", "max_steps", "split",
                "split_by", "datasets", "per_dataset", "seed", "nsd_tolerance", "segmenter_weights",
                "surface_metrics", "volumes", "propagation")


class EvalConfigError(ValueError):
    """Evaluation settings that cannot work (unknown protocol, output folder from a different run, ...)."""


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run. ``segmenter=None`` picks :func:`default_segmenter`."""

    data: str
    out: str
    policy: str = "compact"
    segmenter: str | None = None
    policy_args: dict[str, Any] = field(default_factory=dict)
    segmenter_args: dict[str, Any] = field(default_factory=dict)
    protocol: str = "agent"
    max_steps: int = 20
    split: str = "all"
    split_by: str = "group"
    datasets: list[str] | None = None
    limit: int | None = None
    per_dataset: int | None = None
    workers: int = 1
    seed: int = 0
    nsd_tolerance: float = NSD_TOLERANCE
    threads: int | None = None
    retry_errors: bool = False
    overwrite: bool = False
    report: bool = True
    command: str = ""
    #: evaluate the ``is_3d`` rows as volume episodes (:mod:`ibisagent.evaluation.volume`) instead of the 2D rows
    volumes: bool = False
    #: with ``volumes``: how prompts spread through the slices (``slices``: the 2D segmenter slice by slice;
    #: ``sam2-video``: SAM2's video predictor, for a SAM2 / MedSAM2 segmenter)
    propagation: str = "slices"

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise EvalConfigError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.max_steps < 1:
            raise EvalConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.limit is not None and self.limit < 1:
            raise EvalConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.per_dataset is not None and self.per_dataset < 1:
            raise EvalConfigError(f"--per-dataset must be >= 1, got {self.per_dataset}")
        if self.workers < 1:
            raise EvalConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.split not in ("train", "val", "all"):
            raise EvalConfigError(f"--split must be train, val or all, got {self.split!r}")
        if self.split_by not in SPLIT_BY:
            raise EvalConfigError(f"--split-by must be one of {', '.join(SPLIT_BY)}, got {self.split_by!r}")
        if self.nsd_tolerance <= 0:
            raise EvalConfigError(f"NSD tolerance must be positive, got {self.nsd_tolerance}")
        if self.propagation not in PROPAGATIONS:
            raise EvalConfigError(f"--propagation must be one of {', '.join(PROPAGATIONS)}, got {self.propagation!r}")
        if self.propagation != "slices" and not self.volumes:
            raise EvalConfigError("--propagation applies to volume episodes: add --volumes")

    @property
    def max_interactions(self) -> int:
        """The interaction budget used for NoC when the threshold is never reached."""
        return 1 + CHALLENGE_CLICKS if self.protocol == CHALLENGE_PROTOCOL else int(self.max_steps)

    def resolved(self) -> EvalConfig:
        """A copy with the default segmenter filled in and the challenge's default policy."""
        seg = self.segmenter or default_segmenter()
        policy = self.policy or ("challenge" if self.protocol == CHALLENGE_PROTOCOL else "oracle")
        if self.volumes:
            policy = volume_policy_name(policy)
        return EvalConfig(**{**asdict(self), "segmenter": seg, "policy": policy})

    def resume_key(self) -> dict[str, Any]:
        d = asdict(self)
        out = {k: d[k] for k in _RESUME_KEYS if k in d}
        out["data"] = str(Path(self.data).resolve())
        out["segmenter_weights"] = weights_id(self)
        out["surface_metrics"] = SURFACE_METRICS  # a folder of border-pixel NSD rows is not resumed with surfel NSD
        if self.propagation != "slices":  # folders written before the option resume as the default
            out["propagation"] = self.propagation
        return json.loads(json.dumps(out, default=str))


@dataclass
class EvalResult:
    """What :func:`run_eval` returns: the summary (None when interrupted), counts and output paths."""

    out: Path
    summary: dict[str, Any] | None
    n_selected: int
    n_run: int
    n_skipped: int
    n_errors: int
    interrupted: bool = False


# ----------------------------------------------------------------------------------------------------------------
# Running one case
# ----------------------------------------------------------------------------------------------------------------

def _make_policy(name: str, args: dict[str, Any], seed: int) -> Policy:
    try:  # the challenge policy is registered by importing .challenge (done at the top of this module)
        if "seed" not in args:
            try:
                return create_policy(name, seed=seed, **args)
            except TypeError:
                pass  # the policy takes no seed
        return create_policy(name, **args)
    except TypeError as exc:
        raise EvalConfigError(f"policy {name!r} does not accept the arguments {sorted(args)}: {exc}") from exc
    except KeyError as exc:
        raise EvalConfigError(str(exc).strip("'\"")) from exc
    except (ValueError, SegmenterUnavailable) as exc:
        raise EvalConfigError(f"cannot build policy {name!r}: {exc}") from exc


def _make_segmenter(name: str, args: dict[str, Any]) -> Segmenter:
    try:
        return create_segmenter(name, **args)
    except TypeError as exc:
        raise EvalConfigError(f"segmenter {name!r} does not accept the arguments {sorted(args)}: {exc}") from exc
    except KeyError as exc:
        raise EvalConfigError(str(exc).strip("'\"")) from exc
    except (SegmenterUnavailable, ValueError) as exc:
        raise EvalConfigError(str(exc)) from exc


def _r(x: float | None, nd: int = 4) -> float | None:
    if x is None:
        return None
    return x if not math.isfinite(x) else round(float(x), nd)


def _set_torch_threads(n: int) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(int(n))


class Runner:
    """One segmenter + one policy, built once; :meth:`run_case` evaluates a case (never raises for bad cases)."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        if config.threads:
            _set_torch_threads(config.threads)
        self.segmenter = _make_segmenter(config.segmenter or default_segmenter(), dict(config.segmenter_args))
        self.volume_runner: VolumeRunner | None = None
        if config.volumes:
            vpolicy = _make_policy(volume_policy_name(config.policy), dict(config.policy_args), config.seed)
            self.policy = vpolicy
            try:
                self.volume_runner = VolumeRunner(
                    self.segmenter, vpolicy, challenge=config.protocol == CHALLENGE_PROTOCOL,
                    max_steps=config.max_steps, nsd_tolerance=config.nsd_tolerance, propagation=config.propagation)
            except (SegmenterError, SegmenterUnavailable, ValueError) as exc:  # e.g. sam2-video on LiteMedSAM
                raise EvalConfigError(" ".join(str(exc).split())) from exc
            return
        policy = _make_policy(config.policy, dict(config.policy_args), config.seed)
        if config.protocol == CHALLENGE_PROTOCOL:
            steps = 1 + CHALLENGE_CLICKS
            inner_grammar = getattr(policy, "grammar", "reference")
            if config.policy != "challenge":
                policy = BoxFirstPolicy(policy)
            # the Box action needs the extended grammar; the prompts stay those the inner policy was made for
            env_cfg = EnvConfig(max_steps=steps, max_repeats=steps + 1, grammar="extended",
                                prompts="extended" if inner_grammar == "extended" else "reference")
        else:
            env_cfg = EnvConfig(max_steps=config.max_steps)
        self.policy = policy
        self.agent = Agent(policy, self.segmenter, config=env_cfg)

    def run_case(self, case: Case) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The cases.csv row and the prediction record (None for an error row)."""
        cfg = self.config
        row: dict[str, Any] = {
            "case_id": case.id, "source": case.source, "dataset": case.dataset, "modality": case.modality,
            "object": case.object, "group": group_of(case.object), "split": case.split,
            "area_px": case.extra.get("area_px"), "max_interactions": cfg.max_interactions,
        }
        if self.volume_runner is not None:
            return self.volume_runner.run_case(case, row)
        try:
            image, gt = load_case_arrays(case)
        except CaseError as exc:
            return {**row, "status": "error", "error": str(exc)}, None
        row.update(height=gt.shape[0], width=gt.shape[1], area_px=int(gt.sum()))
        try:
            ep = self.agent.segment(image, case.query, gt)
            metrics = self._metrics(ep, gt)
        except Exception as exc:  # noqa: BLE001 - one broken case must not stop a long run
            return {**row, "status": "error", "error": f"{type(exc).__name__}: {exc}"}, None
        row.update(status="ok", error="", **metrics)
        last = ep.steps[-1] if ep.steps else None
        pred = {
            "case_id": case.id, "source": case.source, "mask_rle": rle_encode(ep.final_mask),
            "points": last.points if last else [], "labels": last.labels if last else [],
            "box": last.box if last else None,
        }
        return row, pred

    def _metrics(self, ep: Episode, gt: np.ndarray) -> dict[str, Any]:
        cfg = self.config
        final = ep.final_mask
        inter = [s for s in ep.steps if s.kind in ("positive", "negative", "box") and s.error is None
                 and s.mask is not None]
        iou_curve = [iou(s.mask, gt) for s in inter]
        dice_curve = [dice(s.mask, gt) for s in inter]
        final_metrics = mask_metrics(final, gt, nsd_tolerance=cfg.nsd_tolerance)
        out: dict[str, Any] = {
            "iou": _r(final_metrics["iou"]), "dice": _r(final_metrics["dice"]), "hd95": _r(final_metrics["hd95"], 3),
            "nsd": _r(final_metrics["nsd"]),
            "steps": len(ep.steps), "clicks": ep.n_clicks, "interactions": ep.n_interactions,
            "stop_reason": ep.stop_reason or "",
            "encoder_s": _r(ep.encoder_s), "segmenter_s": _r(ep.segmenter_s), "policy_s": _r(ep.policy_s),
            "total_s": _r(ep.total_s), "predicted_iou": _r(ep.predicted_iou),
            "iou_curve": [_r(v) for v in iou_curve], "dice_curve": [_r(v) for v in dice_curve],
        }
        for t in NOC_THRESHOLDS:
            out[f"noc_{t}"] = noc_measured(iou_curve, t / 100.0, cfg.max_interactions, ep.stop_reason)
        if cfg.protocol == CHALLENGE_PROTOCOL:
            nsd_curve = [challenge_nsd(s.mask, gt, d, tolerance=cfg.nsd_tolerance) for s, d in zip(inter, dice_curve)]
            ch = challenge_metrics(dice_curve, nsd_curve, ep.total_s)
            out.update({k: _r(v) for k, v in ch.items() if not k.endswith("_curve")})
            out["nsd_curve"] = [_r(v) for v in ch["nsd_curve"]]
        return out


# ----------------------------------------------------------------------------------------------------------------
# cases.csv
# ----------------------------------------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


class _CaseWriter:
    """Appends rows to cases.csv and records to predictions.jsonl, flushing after each case."""

    def __init__(self, out: Path) -> None:
        self.csv_path = out / CASES_CSV
        new = not self.csv_path.is_file() or self.csv_path.stat().st_size == 0
        if not new:
            with self.csv_path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != CASE_COLUMNS:
                raise EvalConfigError(f"{self.csv_path} was written by a different version of the harness; "
                                      "use --overwrite or another --out folder")
        self._csv = self.csv_path.open("a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._csv, fieldnames=CASE_COLUMNS, extrasaction="ignore")
        if new:
            self._writer.writeheader()
            self._csv.flush()
        self._pred = (out / PREDICTIONS).open("a", encoding="utf-8")

    def write(self, row: dict[str, Any], pred: dict[str, Any] | None) -> None:
        if pred is not None:
            self._pred.write(json.dumps(pred, separators=(",", ":")) + "\n")
            self._pred.flush()
        self._writer.writerow({k: _cell(row.get(k)) for k in CASE_COLUMNS})
        self._csv.flush()
        os.fsync(self._csv.fileno())

    def close(self) -> None:
        self._csv.close()
        self._pred.close()


# ----------------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------------

_WORKER: Runner | None = None
_WORKER_ERROR: str | None = None


def _init_worker(config: dict[str, Any]) -> None:
    global _WORKER, _WORKER_ERROR
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    if not config.get("threads"):
        _set_torch_threads(1)
    try:
        _WORKER = Runner(EvalConfig(**config))
    except Exception as exc:  # noqa: BLE001 - reported per case instead of respawning workers forever
        _WORKER_ERROR = f"{type(exc).__name__}: {exc}"


def _work(case: Case) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if _WORKER is None:
        return {"case_id": case.id, "source": case.source, "status": "error",
                "error": f"worker failed to start: {_WORKER_ERROR}"}, None
    return _WORKER.run_case(case)


def _results(config: EvalConfig, cases: list[Case], runner: Runner | None) -> Iterator[tuple[dict, dict | None]]:
    if not cases:
        return
    if config.workers == 1 or len(cases) <= 1:
        assert runner is not None
        for case in cases:
            yield runner.run_case(case)
        return
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(min(config.workers, len(cases)), initializer=_init_worker, initargs=(asdict(config),))
    try:
        yield from pool.imap_unordered(_work, cases, chunksize=1)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

def _versions(config: EvalConfig) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import ibisagent

    out: dict[str, Any] = {"ibisagent": ibisagent.__version__, "python": platform.python_version(),
                           "numpy": np.__version__}
    for pkg in ("torch",):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    wid = weights_id(config)
    if wid is not None:
        out["segmenter_weights"] = wid
    return out


def weights_id(config: EvalConfig) -> dict[str, str] | None:
    """File name and short sha1 of the click-tuned LiteMedSAM weights a run uses (None for other segmenters)."""
    if config.segmenter != "litemedsam-click":
        return None
    weights = config.segmenter_args.get("weights")
    path = Path(weights) if weights not in (None, "click") else CLICK_WEIGHTS
    if not path.is_file():
        return None
    return {"file": path.name, "sha1": hashlib.sha1(path.read_bytes()).hexdigest()[:12]}


def run_config_dict(config: EvalConfig) -> dict[str, Any]:
    """The ``config`` object of summary.json: what ran, with which versions, on which machine, when."""
    return {
        "policy": config.policy, "segmenter": config.segmenter, "policy_args": config.policy_args,
        "segmenter_args": config.segmenter_args, "protocol": config.protocol, "max_steps": config.max_steps,
        "max_interactions": config.max_interactions, "split": config.split,
        "split_by": config.split_by, "datasets": config.datasets,
        "limit": config.limit, "per_dataset": config.per_dataset, "seed": config.seed, "workers": config.workers, "nsd_tolerance": config.nsd_tolerance,
        "surface_metrics": SURFACE_METRICS, "data": str(Path(config.data).resolve()), "command": config.command,
        "volumes": config.volumes, "propagation": config.propagation,
        "versions": _versions(config),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()},
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _check_resume(out: Path, config: EvalConfig) -> None:
    path = out / RUN_CONFIG
    key = config.resume_key()
    if config.overwrite:
        for name in (CASES_CSV, PREDICTIONS, RUN_CONFIG, "summary.json", "summary_extra.json", "report.md"):
            (out / name).unlink(missing_ok=True)
    elif path.is_file() and (out / CASES_CSV).is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        diff = [k for k in _RESUME_KEYS if old.get(k) != key.get(k)]
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {key.get(k)!r}" for k in diff)
            raise EvalConfigError(f"{out} holds a run with other settings ({details}); use --overwrite to replace "
                                  "it or choose another --out folder")
    path.write_text(json.dumps(key, indent=1), encoding="utf-8")


def select_cases(config: EvalConfig) -> list[Case]:
    """The cases a run covers: split and dataset filters, 2D only (``volumes``: 3D rows only), then the first
    ``limit``."""
    cases = load_manifest(config.data, split=config.split, datasets=config.datasets,  # type: ignore[arg-type]
                          split_by=config.split_by, include_3d=config.volumes)
    if config.volumes:
        cases = [c for c in cases if c.is_3d]
    if config.datasets:
        known = {c.source for c in load_manifest(config.data, split="all", include_3d=config.volumes)}
        unknown = sorted(set(config.datasets) - known)
        if unknown:
            raise EvalConfigError(f"unknown dataset folder(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if config.per_dataset is not None:
        cases = spread_per_dataset(cases, config.per_dataset)
    if config.limit is not None:
        cases = cases[: config.limit]
    return cases


def spread_per_dataset(cases: list[Case], k: int) -> list[Case]:
    """At most ``k`` cases of each dataset folder, spread over its groups (patients): one case of each group in a
    stable hashed order, then a second of each, ...; independent of where the data lives. Folder order is kept."""
    import hashlib

    def h(s: str) -> str:
        return hashlib.sha1(s.encode()).hexdigest()

    by_src: dict[str, dict[str, list[Case]]] = {}
    for c in cases:
        by_src.setdefault(c.source, {}).setdefault(c.split_key, []).append(c)
    keep: set[tuple[str, str]] = set()
    for groups in by_src.values():
        queues = [sorted(g, key=lambda c: h(c.id)) for _, g in sorted(groups.items(), key=lambda kv: h(kv[0]))]
        picked: list[Case] = []
        depth = 0
        while len(picked) < k and any(len(q) > depth for q in queues):
            picked += [q[depth] for q in queues if len(q) > depth][: k - len(picked)]
            depth += 1
        keep.update((c.source, c.id) for c in picked)
    return [c for c in cases if (c.source, c.id) in keep]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm() -> Any:
    """Treat SIGTERM like Ctrl-C (stop after the rows already written); returns the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


ProgressFn = Callable[[int, int, dict[str, Any]], None]


def run_eval(config: EvalConfig, progress: ProgressFn | None = None) -> EvalResult:
    """Evaluate ``config`` and write cases.csv, predictions.jsonl, summary.json, summary_extra.json and (unless
    ``config.report`` is False) report.md with its plots. Resumes a run already in ``config.out``.

    Raises :class:`EvalConfigError` / ``ManifestError`` (both ValueError) for settings or data that cannot work.
    A KeyboardInterrupt stops after the cases already written; the result then has ``interrupted=True``.
    """
    config = config.resolved()
    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = select_cases(config)
    if not cases:
        raise EvalConfigError(f"no cases selected in {config.data} (split={config.split}, datasets={config.datasets})")
    _check_resume(out, config)
    done = {(r["source"], r["case_id"]) for r in read_cases(out)
            if r["status"] == "ok" or not config.retry_errors}
    todo = [c for c in cases if (c.source, c.id) not in done]
    runner = Runner(config) if todo else None  # built here even with workers: fails fast on bad settings
    if runner is not None and config.workers > 1 and len(todo) > 1:
        runner = None  # workers build their own
    writer = _CaseWriter(out)
    n_run = n_err = 0
    interrupted = False
    old_term = _stop_on_sigterm()
    try:
        for row, pred in _results(config, todo, runner):
            writer.write(row, pred)
            n_run += 1
            n_err += row.get("status") != "ok"
            if progress is not None:
                progress(n_run, len(todo), row)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        writer.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    summary = None
    if not interrupted:
        from .summary import write_summaries

        keys = {(c.source, c.id) for c in cases}
        rows = [r for r in read_cases(out) if (r["source"], r["case_id"]) in keys]
        summary = write_summaries(out, rows, run_config_dict(config))
        if config.report:
            from .report import write_report

            write_report(out)
    return EvalResult(out, summary, len(cases), n_run, len(cases) - len(todo), n_err, interrupted)


def format_progress(i: int, n: int, row: dict[str, Any]) -> str:
    """One progress line for a finished case."""
    if row.get("status") != "ok":
        return f"[{i}/{n}] {row.get('case_id')}: ERROR {row.get('error')}"
    return (f"[{i}/{n}] {row['case_id']}: iou={row['iou']:.3f} dice={row['dice']:.3f} steps={row['steps']} "
            f"({row['stop_reason']}) {row['total_s']:.2f}s")


def print_progress(i: int, n: int, row: dict[str, Any], stream: Any = None) -> None:
    print(format_progress(i, n, row), file=stream or sys.stderr, flush=True)
