"""The policy contract and registry.

A policy turns an :class:`~ibisagent.env.Observation` into ONE reply string in the protocol grammar
(``act(obs) -> str``); parsing is the environment's job, so scripted, learned and LLM policies share one contract.
Policies that need privileged information (the ground truth: oracle and click-free baselines) declare
``requires_gt = True`` and receive it in ``begin_episode``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ibisagent.env import Observation
from ibisagent.options import check_options, keyword_options
from ibisagent.protocol import GrammarMode

__all__ = ["Policy", "PolicyError", "create_policy", "default_policy", "list_policies", "policy_options", "register_policy"]


class PolicyError(ValueError):
    """A policy that cannot act (e.g. an oracle without ground truth, a model that failed to load)."""


@runtime_checkable
class Policy(Protocol):
    name: str
    requires_gt: bool
    grammar: GrammarMode

    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None: ...

    def act(self, obs: Observation) -> str: ...


class BasePolicy:
    """Convenience base: stores the episode's inputs; subclasses implement ``act``."""

    name = "base"
    requires_gt = False
    grammar: GrammarMode = "reference"

    def __init__(self) -> None:
        self.gt: np.ndarray | None = None
        self.query = ""

    def begin_episode(self, *, image: np.ndarray, query: str, gt: np.ndarray | None = None) -> None:
        if self.requires_gt and gt is None:
            raise PolicyError(f"policy {self.name!r} needs a ground-truth mask (--mask); "
                              "use a learned policy to segment without one")
        self.gt = None if gt is None else np.asarray(gt).astype(bool)
        self.query = query

    def act(self, obs: Observation) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def predicted_iou(self, mask: np.ndarray) -> float | None:
        """The policy's own estimate of the IoU of ``mask`` (the episode's final mask) with the target, or None when
        the policy has no estimate (scripted policies)."""
        return None


_REGISTRY: dict[str, tuple[Callable[..., Policy], str]] = {}
#: names of the policies that play volume episodes (``ibisagent.volume``), not 2D images
_VOLUME: set[str] = set()


def register_policy(name: str, description: str = "", *, volume: bool = False) -> Callable:
    """Register a policy factory under ``name``; ``volume=True`` marks a policy of 3D volume episodes."""
    def deco(factory: Callable[..., Policy]) -> Callable[..., Policy]:
        _REGISTRY[name] = (factory, description or (factory.__doc__ or "").strip().split("\n")[0])
        if volume:
            _VOLUME.add(name)
        return factory

    return deco


def _load_builtin() -> None:
    import importlib

    for mod in ("oracle", "baselines", "compact", "volume", "hf", "openai"):
        try:
            importlib.import_module(f"ibisagent.policies.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("ibisagent"):
                continue
            raise


def list_policies(volume: bool | None = None) -> dict[str, str]:
    """Registered policies and their descriptions: all (``volume=None``), only 2D (False) or only volume (True) ones."""
    _load_builtin()
    return {k: v[1] for k, v in sorted(_REGISTRY.items()) if volume is None or (k in _VOLUME) == volume}


def default_policy() -> str:
    """The learned ``compact`` policy when its weights are installed, else ``oracle`` (which needs a ground-truth
    mask). The one place the default policy of the CLI and the app is decided."""
    from importlib import resources

    weights = resources.files("ibisagent").joinpath("weights/compact_policy.safetensors")
    return "compact" if weights.is_file() and "compact" in list_policies() else "oracle"


def _factory(name: str) -> Callable[..., Any]:
    """The registered factory of ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0]


def create_policy(name: str, **cfg: Any) -> Policy:
    factory = _factory(name)
    check_options(f"policy {name!r}", factory, cfg)  # UnknownOptionError (a TypeError) listing the valid ones
    return factory(**cfg)


def policy_options(name: str) -> tuple[str, ...] | None:
    """The keyword options ``create_policy(name, ...)`` accepts (None when it takes any)."""
    return keyword_options(_factory(name))
