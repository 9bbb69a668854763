"""Tiny stand-ins shared by several test files: an encoder-shaped module and a policy that replays fixed replies."""

from __future__ import annotations

import torch
from torch import nn


class ToyEncoder(nn.Module):
    """Encoder-shaped: 1x3x32x32 -> 1x8x8x8 (conv, layer norm, linear, GELU): exports to ONNX and quantizes fast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        y = nn.functional.gelu(self.fc(self.norm(y)))
        return y.permute(0, 3, 1, 2)


class ScriptedReplies:
    """A policy that answers turn k of every episode with ``replies[k]``."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies

    def begin_episode(self, **_: object) -> None:
        self.k = 0

    def act(self, obs: object) -> str:
        self.k += 1
        return self.replies[self.k - 1]
