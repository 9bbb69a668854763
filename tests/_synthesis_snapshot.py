"""Synthesized trajectories for a few fixed cases, as JSON (not a test module).

``python tests/_synthesis_snapshot.py DATA_DIR`` prints every :func:`ibisagent.synthesis.synthesize_case` result
(kept records with their actions, replies, states and masks, or the skip reason) for the blob cases of DATA_DIR
(``_synth_data.make_blobs``) under a few configurations, with whichever ``ibisagent`` is on the import path.
tests/test_synthesis_parity.py runs it with the package as of the commit before synthesis moved onto the episode
driver (extracted with ``git archive``) and compares with the current package.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

VARIANTS = ("oracle", "box", "reflective", "box-reflective", "lookahead")
#: configurations that reach the threshold, run out of turns (records kept) and use another seed and box jitter
CONFIGS: tuple[dict[str, Any], ...] = (
    {},
    {"max_steps": 4, "keep_unreached": True},
    {"max_steps": 3, "iou_threshold": 0.95, "keep_unreached": True, "seed": 7},
    {"seed": 3, "box_jitter": 0.25, "iou_threshold": 0.9, "lookahead_candidates": 4, "reflective_max_error_step": 1},
)


def snapshot(data: str | Path) -> list[dict[str, Any]]:
    from ibisagent.segmenters.base import create_segmenter
    from ibisagent.synthesis.runner import SynthesisConfig, select_cases, synthesize_case

    out: list[dict[str, Any]] = []
    for kw in CONFIGS:
        config = SynthesisConfig(variants=VARIANTS, segmenter="fake", split="all", **kw)
        seg = create_segmenter("fake")
        for case in select_cases(data, config):
            for res in synthesize_case(case, VARIANTS, config, segmenter=seg):
                if res["reason" if res["status"] == "skipped" else "status"].startswith("error:"):
                    res.pop("message")  # a traceback names the package's file paths
                out.append({"config": kw, **res})
    return out


if __name__ == "__main__":
    json.dump(snapshot(sys.argv[1]), sys.stdout, sort_keys=True)
