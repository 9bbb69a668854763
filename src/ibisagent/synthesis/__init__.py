"""Trajectory synthesis: oracle, reflective, lookahead and box-first rollouts through a real segmenter, written
as resumable JSONL shards (``ibisagent synthesize``)."""
