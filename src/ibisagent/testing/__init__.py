"""Test helpers that build small real artifacts (no downloads): a tiny random Qwen2.5-VL checkpoint."""

from ibisagent.testing.tiny_qwen import build_tiny_qwen_vl

__all__ = ["build_tiny_qwen_vl"]
