"""User-factory models for engine tests (imported by name, as a user's own module would be)."""

from __future__ import annotations

import torch
from torch import nn


class _DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's residual branch with probability p (global RNG)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class ResidualDropPathNet(nn.Module):
    """A tiny residual conv net with drop-path and dropout, exposing ``feature_dim``."""

    def __init__(self, drop_path_rate: float = 0.2, drop_rate: float = 0.2, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.block = nn.Sequential(nn.GroupNorm(4, width), nn.Conv2d(width, width, 3, padding=1), nn.GELU())
        self.drop_path = _DropPath(drop_path_rate)
        self.drop = nn.Dropout(drop_rate)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.drop_path(self.block(h))
        return self.drop(h.mean(dim=(2, 3)))


def residual_droppath(drop_path_rate: float = 0.2, drop_rate: float = 0.2) -> nn.Module:
    return ResidualDropPathNet(drop_path_rate=max(drop_path_rate, 0.2), drop_rate=max(drop_rate, 0.2))


class BareLogits(nn.Module):
    """An aggregator that returns bare logits (wrapped by fullslide)."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats.mean(0))


def bare_logits(in_dim: int, n_classes: int) -> nn.Module:
    return BareLogits(in_dim, n_classes)


class WithBatchNorm(nn.Module):
    """A conv net with BatchNorm, to test that BN is frozen by default."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.feature_dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


def with_batchnorm() -> nn.Module:
    return WithBatchNorm()


class NanAfterFirst(nn.Module):
    """An aggregator whose logits turn NaN after the first training step of 2 slides (to test the non-finite-loss
    stop): 3 training calls are fine - mode auto's memory probe calls it once before the first step."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, n_classes)
        self.calls = 0

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        logits = self.fc(feats.mean(0))
        return logits * float("nan") if self.calls > 3 else logits


def nan_after_first(in_dim: int, n_classes: int) -> nn.Module:
    return NanAfterFirst(in_dim, n_classes)
