"""Synthesis plays its episodes through the one episode driver (ibisagent.episode.drive with the scripted oracle)
since issue 18; the trajectories it writes must be the ones its own rollout loop wrote before.

The 'before' is computed on the fly, not read from a stored file: the package as of BEFORE (the last commit with the
old loop, ``synthesis/trajectories.Rollout.finish``) is extracted with ``git archive`` and run in a subprocess on the
same cases (tests/_synthesis_snapshot.py), so the comparison can always be regenerated and cannot go stale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from _synth_data import make_blobs
from _synthesis_snapshot import snapshot

REPO = Path(__file__).resolve().parents[1]
#: main before synthesis moved onto the episode driver
BEFORE = "3eaff665c6437f51609bcc6103b60a85677b8ca4"


def _old_package(dest: Path) -> Path:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("needs the project's git history (the old synthesis loop is read from it)")
    probe = subprocess.run([git, "-C", str(REPO), "cat-file", "-e", f"{BEFORE}^{{commit}}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"commit {BEFORE[:10]} is not in this clone's history")
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "old.tar"
    with archive.open("wb") as fh:
        subprocess.run([git, "-C", str(REPO), "archive", BEFORE, "src/ibisagent"], stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def test_synthesized_trajectories_are_the_same_as_before_the_move(tmp_path: Path) -> None:
    data = make_blobs(tmp_path / "blobs", 8, bad=True)
    old_src = _old_package(tmp_path / "old")
    env = {**os.environ, "PYTHONPATH": str(old_src)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_synthesis_snapshot.py"), str(data)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = json.loads(proc.stdout)
    after = json.loads(json.dumps(snapshot(data), sort_keys=True))
    # the cases cover threshold reached (Terminate), the step budget spent (kept unreached), no click left
    # (bad_unreachable), and every variant's search (reflective errors and corrections, lookahead, box fixes)
    assert {r["status"] for r in before} == {"ok", "skipped"}
    kinds = {s["kind"] for r in before if r["status"] == "ok" for s in r["record"]["steps"]}
    assert kinds == {"positive", "negative", "box", "terminate"}
    assert any(r["status"] == "ok" and not r["record"]["reached"] for r in before)
    assert len(after) == len(before)
    for old, new in zip(before, after):
        assert new == old, f"{old.get('id')} ({old['config']}) differs"
