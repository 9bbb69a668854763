"""Preflight for verl GRPO: score rows of an `ibisagent export --format verl` parquet with the reward verl will call.

For each row it scores the oracle's own action (written as a well-formed reply) and a malformed reply through
``ibisagent.rewards.verl.compute_score`` exactly as verl's reward manager does, and checks that every score is a
finite number and that the oracle's replies outscore the malformed ones. Exit code 0 = ready to launch.

    python configs/verl/check_reward.py exports/verl/train.parquet --rows 8
"""

from __future__ import annotations

import argparse
import math
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parquet", help="train.parquet written by `ibisagent export --format verl`")
    ap.add_argument("--rows", type=int, default=4, help="rows to score (default 4)")
    ap.add_argument("--segmenter", default=None, help="override the rows' segmenter (e.g. fake for a dry run)")
    args = ap.parse_args(argv)

    import pandas as pd

    from ibisagent.protocol import format_reply, parse_action
    from ibisagent.rewards.verl import compute_score

    try:
        df = pd.read_parquet(args.parquet)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.parquet}: {exc}", file=sys.stderr)
        return 2
    missing = {"data_source", "prompt", "images", "reward_model", "extra_info"} - set(df.columns)
    if missing:
        print(f"error: {args.parquet} lacks columns {sorted(missing)}", file=sys.stderr)
        return 2
    good, bad = [], []
    for _, row in df.head(args.rows).iterrows():
        info = dict(row["extra_info"])
        if args.segmenter:
            info["segmenter"] = args.segmenter
        action = parse_action(str(info.get("oracle_action") or "Terminate"))
        reply = format_reply(action, "Preflight: the oracle's action.",
                             "Done." if action.kind.value == "terminate" else None)
        gt = row["reward_model"]["ground_truth"]
        g = compute_score(row["data_source"], reply, gt, info)
        b = compute_score(row["data_source"], "no action here", gt, info)
        good.append(g["score"])
        bad.append(b["score"])
        print(f"{info.get('case_id', '?'):>12} step {info.get('step', '?'):>2} {action.text():<40} "
              f"oracle {g['score']:+.3f}  malformed {b['score']:+.3f}")
    if not good:
        print("error: no rows to score", file=sys.stderr)
        return 2
    if not all(math.isfinite(v) for v in good + bad):
        print("error: non-finite reward", file=sys.stderr)
        return 1
    if sum(good) <= sum(bad):
        print("error: the oracle's replies do not outscore malformed ones; check the segmenter", file=sys.stderr)
        return 1
    print(f"ok: {len(good)} rows, mean oracle reward {sum(good) / len(good):.3f}, "
          f"mean malformed {sum(bad) / len(bad):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
