"""Policies: scripted (oracle, baselines), learned (compact CPU policy) and multimodal-LLM (hf, openai)."""

from ibisagent.policies.base import BasePolicy, Policy, PolicyError, create_policy, list_policies, register_policy

__all__ = ["BasePolicy", "Policy", "PolicyError", "create_policy", "list_policies", "register_policy"]
