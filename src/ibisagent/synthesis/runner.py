"""Run trajectory synthesis over a dataset: worker processes locally or tasks on a Ray cluster, shards written and
fsynced as cases finish, resume after interruption, a per-run manifest.

Output folder layout::

    DIR/shards/shard-00000.jsonl   one JSON line per kept trajectory (id = "<case id>::<variant>")
    DIR/skipped.jsonl              one JSON line per skipped (case, variant) with its reason
    DIR/manifest.json              configuration, counts (kept, skipped by reason), per-variant statistics, runs

Only the main process writes, so no line is ever written twice. Each run opens a fresh shard file; every line is
flushed and fsynced before the next result is taken. On resume, a half-written last line (a killed run) is cut off,
and every id present in a complete shard line or in ``skipped.jsonl`` is not redone: an interrupted run plus its
resume yields the same set of trajectories as an uninterrupted run (each trajectory's randomness depends only on
the run seed, the case and the variant, never on the worker that ran it).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ibisagent.env import EnvConfig
from ibisagent.io import CaseError, load_case_arrays
from ibisagent.io.manifest import Case, load_manifest
from ibisagent.segmenters.base import Segmenter, SegmenterError, create_segmenter
from ibisagent.synthesis.lookahead import rollout_lookahead
from ibisagent.synthesis.reflective import rollout_box_reflective, rollout_reflective
from ibisagent.synthesis.trajectories import (
    VARIANTS,
    Rollout,
    RolloutConfig,
    UnreachableError,
    rollout_box,
    rollout_oracle,
    rollout_release,
    target_name,
    variant_seed,
)

__all__ = [
    "SynthesisConfig",
    "SynthesisError",
    "SynthesisResult",
    "iter_skipped",
    "iter_trajectories",
    "run_synthesis",
    "synthesize_case",
]

ROLLOUTS: dict[str, Callable[[Rollout], None]] = {
    "oracle": rollout_oracle,
    "box": rollout_box,
    "reflective": rollout_reflective,
    "box-reflective": rollout_box_reflective,
    "lookahead": rollout_lookahead,
    "release": rollout_release,
}
GRAMMAR = {"oracle": "reference", "reflective": "reference", "lookahead": "reference", "box": "extended",
           "box-reflective": "extended", "release": "reference"}
#: config fields that must match between a run and its resume (others, like workers, may change)
_IDENTITY_FIELDS = ("variants", "segmenter", "iou_threshold", "max_steps", "box_jitter", "lookahead_candidates",
                    "reflective_max_error_step", "seed", "keep_unreached")


class SynthesisError(ValueError):
    """Bad synthesis input: unknown variant, an output folder from a different configuration, no cases."""


@dataclass(frozen=True)
class SynthesisConfig:
    """What to synthesize and how. Defaults: the reference oracle on the train split through litemedsam-click."""

    variants: tuple[str, ...] = ("oracle",)
    segmenter: str = "litemedsam-click"
    iou_threshold: float = 0.8
    max_steps: int = 20
    box_jitter: float = 0.1
    lookahead_candidates: int = 8
    reflective_max_error_step: int = 2
    seed: int = 0
    keep_unreached: bool = False
    split: str = "train"
    datasets: tuple[str, ...] = ()
    limit: int | None = None
    workers: int = 1
    ray_address: str | None = None  # "local" starts a local Ray instance; else a cluster address ("auto", ip:port)
    shard_size: int = 1000
    torch_threads: int = 1

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in ROLLOUTS]
        if unknown or not self.variants:
            raise SynthesisError(f"unknown variant(s) {unknown or '(none given)'}; choose from {', '.join(VARIANTS)}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise SynthesisError("iou_threshold must be in (0, 1]")
        if self.max_steps < 2:
            raise SynthesisError("max_steps must be at least 2 (one action and Terminate)")
        if self.workers < 1:
            raise SynthesisError("workers must be >= 1")
        if self.split not in ("train", "val", "all"):
            raise SynthesisError("split must be train, val or all")

    def env_config(self, variant: str) -> EnvConfig:
        """The environment a variant's episodes run in (the stop rules, step budget and grammar of evaluation);
        ``release``: ``max_steps`` clicks plus the Terminate turn, repeats allowed (the release's generator)."""
        if variant == "release":
            return EnvConfig(max_steps=self.max_steps + 1, max_repeats=self.max_steps + 1, grammar="reference")
        return EnvConfig(max_steps=self.max_steps, grammar=GRAMMAR[variant])  # type: ignore[arg-type]

    def rollout_config(self) -> RolloutConfig:
        return RolloutConfig(iou_threshold=self.iou_threshold, box_jitter=self.box_jitter,
                             lookahead_candidates=self.lookahead_candidates,
                             reflective_max_error_step=self.reflective_max_error_step)


@dataclass
class SynthesisResult:
    out: Path
    processed: int = 0  # (case, variant) jobs done in this run
    counts: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------------------------

def _case_fields(case: Case) -> dict[str, Any]:
    return {"image": str(case.image), "mask": str(case.mask) if case.mask else None, "source": case.source,
            "dataset": case.dataset, "modality": case.modality, "object": case.object, "split": case.split}


def _skip(case: Case, variant: str, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"status": "skipped", "id": f"{case.id}::{variant}", "case_id": case.id, "variant": variant,
            "reason": reason, "message": message[:500], **extra}


def synthesize_case(case: Case, variants: Iterable[str], config: SynthesisConfig,
                    segmenter: Segmenter | None = None) -> list[dict[str, Any]]:
    """Roll out one case in each variant. Returns one result per variant: ``{"status": "ok", "record": {...}}`` or
    ``{"status": "skipped", "reason": ..., ...}``. Never raises for a bad case."""
    variants = list(variants)
    try:
        image, gt = load_case_arrays(case)
    except CaseError as exc:
        return [_skip(case, v, exc.reason, str(exc)) for v in variants]
    seg = segmenter or _worker_segmenter(config)
    out: list[dict[str, Any]] = []
    for variant in variants:
        out.append(_one_variant(case, variant, image, gt, config, seg))
    return out


def _one_variant(case: Case, variant: str, image: Any, gt: Any, config: SynthesisConfig,
                 seg: Segmenter) -> dict[str, Any]:
    import random

    seed = variant_seed(case.id, variant, config.seed)
    try:
        ro = Rollout(seg, image, gt, case.query, target_name(case.query, case.object), config.rollout_config(),
                     random.Random(seed), config.env_config(variant))
        ROLLOUTS[variant](ro)
    except UnreachableError as exc:
        reason = "no_reflective_correction" if variant.endswith("reflective") else "unreachable"
        return _skip(case, variant, reason, str(exc))
    except SegmenterError as exc:
        return _skip(case, variant, "segmenter_error", str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken case must not end the whole run
        return _skip(case, variant, f"error:{type(exc).__name__}", f"{exc}\n{traceback.format_exc(limit=3)}")
    traj = ro.trajectory(traj_id=f"{case.id}::{variant}", case_id=case.id, variant=variant,
                         grammar=GRAMMAR[variant], segmenter=config.segmenter,
                         meta={**_case_fields(case), "seed": seed})
    if not traj.reached and not config.keep_unreached:
        return _skip(case, variant, "threshold_not_reached",
                     f"IoU {traj.final_iou:.3f} < {config.iou_threshold} after {len(traj.steps)} turns",
                     final_iou=round(traj.final_iou, 4))
    return {"status": "ok", "record": traj.to_json()}


_SEGMENTER: dict[str, Segmenter] = {}


def _worker_segmenter(config: SynthesisConfig) -> Segmenter:
    if config.segmenter not in _SEGMENTER:
        _SEGMENTER[config.segmenter] = create_segmenter(config.segmenter)
    return _SEGMENTER[config.segmenter]


def _init_worker(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass


def _work(task: tuple[Case, list[str], SynthesisConfig]) -> list[dict[str, Any]]:
    case, variants, config = task
    _init_worker(config.torch_threads)
    return synthesize_case(case, variants, config)


# ------------------------------------------------------------------------------------------------------------------
# Output folder: shards, skipped list, resume scan
# ------------------------------------------------------------------------------------------------------------------

def _complete_lines(path: Path, repair: bool) -> Iterator[dict[str, Any]]:
    """JSON objects of a JSONL file's complete lines; with ``repair`` a broken tail (killed writer) is cut off."""
    data = path.read_bytes()
    good_end = 0
    pos = 0
    rows: list[dict[str, Any]] = []
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no newline: the last line was cut off mid-write
        line = data[pos:nl].strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn line: it and everything after it is discarded
        pos = good_end = nl + 1
    if repair and good_end < len(data):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    yield from rows


def _shards(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("shard-*.jsonl"))


def iter_trajectories(out: str | Path) -> Iterator[dict[str, Any]]:
    """Every kept trajectory record in a synthesis folder (complete lines only)."""
    for shard in _shards(Path(out)):
        yield from _complete_lines(shard, repair=False)


def iter_skipped(out: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(out) / "skipped.jsonl"
    if path.is_file():
        yield from _complete_lines(path, repair=False)


class _Writer:
    """Appends JSON lines to a new shard (rotating every ``shard_size``) and to skipped.jsonl, fsyncing each."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out = out
        self.shard_size = shard_size
        (out / "shards").mkdir(parents=True, exist_ok=True)
        existing = [int(p.stem.split("-")[1]) for p in _shards(out)]
        self.next_index = max(existing, default=-1) + 1
        self._fh: Any = None
        self._count = 0
        self._skip = (out / "skipped.jsonl").open("a", encoding="utf-8")

    def _open(self) -> None:
        path = self.out / "shards" / f"shard-{self.next_index:05d}.jsonl"
        self.next_index += 1
        self._fh = path.open("a", encoding="utf-8")
        self._count = 0

    @staticmethod
    def _write(fh: Any, row: dict[str, Any]) -> None:
        fh.write(json.dumps(row, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

    def kept(self, record: dict[str, Any]) -> None:
        if self._fh is None or self._count >= self.shard_size:
            if self._fh is not None:
                self._fh.close()
            self._open()
        self._write(self._fh, record)
        self._count += 1

    def skipped(self, row: dict[str, Any]) -> None:
        self._write(self._skip, {k: v for k, v in row.items() if k != "status"})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._skip.close()


def _scan(out: Path) -> set[str]:
    """Ids already done (kept or skipped); repairs torn tails first."""
    done: set[str] = set()
    for shard in _shards(out):
        done.update(r["id"] for r in _complete_lines(shard, repair=True) if "id" in r)
    skipped = out / "skipped.jsonl"
    if skipped.is_file():
        done.update(r["id"] for r in _complete_lines(skipped, repair=True) if "id" in r)
    return done


# ------------------------------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------------------------------

def _config_dict(config: SynthesisConfig) -> dict[str, Any]:
    d = asdict(config)
    d["variants"] = list(config.variants)
    d["datasets"] = list(config.datasets)
    return d


def _check_same_config(out: Path, config: SynthesisConfig) -> dict[str, Any]:
    path = out / "manifest.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    prev = old.get("config", {})
    new = _config_dict(config)
    diff = [k for k in _IDENTITY_FIELDS if k in prev and prev[k] != new[k]]
    if diff:
        raise SynthesisError(f"{out} holds a run with a different configuration ({', '.join(diff)}: "
                             f"{[prev[k] for k in diff]} vs {[new[k] for k in diff]}); use another --out folder")
    return old


def _counts(out: Path, jobs_total: int, n_cases: int) -> dict[str, Any]:
    kept = Counter()
    steps: dict[str, list[int]] = defaultdict(list)
    ious: dict[str, list[float]] = defaultdict(list)
    reached = Counter()
    for r in iter_trajectories(out):
        v = r["variant"]
        kept[v] += 1
        steps[v].append(int(r["n_interactions"]))
        ious[v].append(float(r["final_iou"]))
        reached[v] += bool(r["reached"])
    skipped = Counter(r["reason"] for r in iter_skipped(out))
    skipped_by_variant: dict[str, Counter] = defaultdict(Counter)
    for r in iter_skipped(out):
        skipped_by_variant[r["variant"]][r["reason"]] += 1
    n_kept, n_skipped = sum(kept.values()), sum(skipped.values())
    return {
        "cases": n_cases,
        "jobs": jobs_total,
        "kept": n_kept,
        "skipped": n_skipped,
        "pending": max(0, jobs_total - n_kept - n_skipped),
        "kept_by_variant": dict(kept),
        "skipped_by_reason": dict(skipped),
        "skipped_by_variant": {k: dict(v) for k, v in skipped_by_variant.items()},
        "mean_interactions_by_variant": {k: round(sum(v) / len(v), 3) for k, v in steps.items() if v},
        "mean_final_iou_by_variant": {k: round(sum(v) / len(v), 4) for k, v in ious.items() if v},
        "reached_by_variant": dict(reached),
    }


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")


# ------------------------------------------------------------------------------------------------------------------
# Executors
# ------------------------------------------------------------------------------------------------------------------

Task = tuple[Case, list[str], SynthesisConfig]


def _run_inline(tasks: list[Task]) -> Iterator[list[dict[str, Any]]]:
    for task in tasks:
        yield _work(task)


def _run_pool(tasks: list[Task], workers: int) -> Iterator[list[dict[str, Any]]]:
    ctx = get_context("spawn")  # torch and fork do not mix
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: set[Future] = set()
        it = iter(tasks)
        try:
            for task in it:
                pending.add(pool.submit(_work, task))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.add(pool.submit(_work, nxt))
        finally:
            for fut in pending:
                fut.cancel()


def _run_ray(tasks: list[Task], workers: int, address: str) -> Iterator[list[dict[str, Any]]]:
    try:
        import ray
    except ImportError as exc:
        raise SynthesisError("Ray is not installed: pip install 'ibisagent[ray]'") from exc
    started = False
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     object_store_memory=80 * 1024 * 1024)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=2)(_work)
        it = iter(tasks)
        pending = [remote.remote(t) for _, t in zip(range(2 * workers), it)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(remote.remote(nxt))
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------

def select_cases(data: str | Path, config: SynthesisConfig) -> list[Case]:
    cases = load_manifest(data, split=config.split, datasets=list(config.datasets) or None)  # type: ignore[arg-type]
    cases.sort(key=lambda c: c.id)
    if config.limit is not None:
        cases = cases[: config.limit]
    return cases


def run_synthesis(
    data: str | Path | list[Case],
    out: str | Path,
    config: SynthesisConfig = SynthesisConfig(),  # noqa: B008 - frozen dataclass
    *,
    progress: bool | None = None,
) -> SynthesisResult:
    """Synthesize trajectories for every case of ``data`` (a manifest folder or a list of cases) into ``out``.

    Resumes automatically when ``out`` already holds shards of a run with the same configuration.
    ``progress``: show a progress bar (None = when stderr is a terminal).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = list(data) if isinstance(data, list) else select_cases(data, config)
    if not cases:
        raise SynthesisError(f"no cases selected from {data} (split={config.split}, datasets={config.datasets})")
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise SynthesisError(f"duplicate case ids {dup}: ids must be unique for resume to work")
    old = _check_same_config(out, config)
    done = _scan(out)
    tasks: list[Task] = []
    for case in cases:
        todo = [v for v in config.variants if f"{case.id}::{v}" not in done]
        if todo:
            tasks.append((case, todo, config))
    jobs_total = len(cases) * len(config.variants)
    executor = "ray" if config.ray_address else ("processes" if config.workers > 1 and len(tasks) > 1 else "inline")
    run_info = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "executor": executor,
                "workers": config.workers, "ray_address": config.ray_address, "resumed_from": len(done),
                "status": "running"}
    manifest: dict[str, Any] = {
        "tool": "ibisagent synthesize",
        "version": _version(),
        "data": str(data) if not isinstance(data, list) else f"{len(cases)} cases given in code",
        "config": _config_dict(config),
        "runs": [*old.get("runs", []), run_info],
        "status": "running",
    }
    manifest["counts"] = _counts(out, jobs_total, len(cases))
    _write_manifest(out, manifest)
    writer = _Writer(out, config.shard_size)
    result = SynthesisResult(out=out)
    if executor == "ray":
        stream = _run_ray(tasks, config.workers, str(config.ray_address))
    elif executor == "processes":
        stream = _run_pool(tasks, config.workers)
    else:
        stream = _run_inline(tasks)
    bar = _progress(len(tasks), progress)
    kept = skipped = 0
    t0 = time.perf_counter()
    try:
        for results in stream:
            for r in results:
                if r["status"] == "ok":
                    writer.kept(r["record"])
                    kept += 1
                else:
                    writer.skipped(r)
                    skipped += 1
                result.processed += 1
            if bar is not None:
                bar.set_postfix(kept=kept, skipped=skipped)
                bar.update(1)
        run_info["status"] = "complete"
    except KeyboardInterrupt:
        run_info["status"] = "interrupted"
        raise
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        run_info.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        seconds=round(time.perf_counter() - t0, 2), processed=result.processed,
                        kept=kept, skipped=skipped)
        manifest["counts"] = result.counts = _counts(out, jobs_total, len(cases))
        manifest["status"] = "complete" if manifest["counts"]["pending"] == 0 else run_info["status"]
        manifest["shards"] = [p.name for p in _shards(out)]
        _write_manifest(out, manifest)
    return result


class _LineProgress:
    """Progress for logs (no terminal): one line to stderr at most every ``every_s`` seconds, and at the end."""

    def __init__(self, total: int, every_s: float = 30.0) -> None:
        self.total, self.every_s = total, every_s
        self.n, self.postfix = 0, {}
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.n == self.total:
            self.last = now
            self._print(now)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def _print(self, now: float) -> None:
        rate = 60.0 * self.n / max(now - self.t0, 1e-9)
        extra = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        print(f"synthesize: {self.n}/{self.total} cases ({extra}; {rate:.1f} cases/min)", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        pass


def _version() -> str:
    from ibisagent import __version__

    return __version__


def _progress(total: int, enabled: bool | None) -> Any:
    """A tqdm bar on a terminal; periodic log lines otherwise (``enabled=None``); nothing with ``False``."""
    if enabled is False:
        return None
    if enabled is None and not sys.stderr.isatty():
        return _LineProgress(total)
    from tqdm import tqdm

    return tqdm(total=total, unit="case", desc="synthesize", file=sys.stderr)


def with_overrides(config: SynthesisConfig, **kw: Any) -> SynthesisConfig:
    """A copy of ``config`` with some fields replaced (None values are ignored)."""
    return replace(config, **{k: v for k, v in kw.items() if v is not None})
