"""Test helpers that build small real artifacts (no downloads): a tiny random Qwen2.5-VL checkpoint, tiny cases and an
oracle trajectory dataset in the export layout."""

from ibisagent.testing.tiny_data import TinyCase, oracle_sft_dataset, oracle_sft_rows, synthetic_cases
from ibisagent.testing.tiny_qwen import build_tiny_qwen_vl, shared_tiny_qwen_vl

__all__ = ["TinyCase", "build_tiny_qwen_vl", "oracle_sft_dataset", "oracle_sft_rows", "shared_tiny_qwen_vl",
           "synthetic_cases"]
