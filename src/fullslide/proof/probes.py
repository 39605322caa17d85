"""Probe parameters that check-grad adds around any model, so the proof covers the corners where bugs hide.

- a parameter **tied** between the encoder and the aggregator (a shared projection), whose gradient has an
  encoder-side part (every rank, its own tiles) and an aggregator-side part (replicated on every rank of a group);
- a **drop-path** residual branch on the encoder (per-tile random draws, replayed in pass 2);
- a **frozen** encoder parameter (no gradient, never updated);
- an **unused** aggregator parameter (``.grad`` must stay None, as in one process, so an optimizer with weight
  decay leaves it alone in every layout).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ProbeEncoder(nn.Module):
    """``f + drop_path(f @ shared^T + frozen)`` around an encoder's features ``f`` ``[k, D]``."""

    def __init__(self, inner: nn.Module, drop_path_rate: float) -> None:
        super().__init__()
        self.inner = inner
        self.feature_dim = int(getattr(inner, "feature_dim"))
        d = self.feature_dim
        self.shared = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.frozen = nn.Parameter(0.1 * torch.randn(d), requires_grad=False)
        self.drop_path_rate = drop_path_rate

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        f = self.inner(tiles)  # [k, D]
        branch = f @ self.shared.t().to(f.dtype) + self.frozen.to(f.dtype)
        if self.training and self.drop_path_rate > 0:
            keep = torch.empty(f.shape[0], 1, device=f.device).bernoulli_(1 - self.drop_path_rate)
            branch = branch * keep.to(f.dtype) / (1 - self.drop_path_rate)
        return f + branch


class ProbeAggregator(nn.Module):
    """Applies the tied projection ``f + 0.5 f @ shared`` before the wrapped aggregator; holds an unused parameter."""

    def __init__(self, inner: nn.Module, shared: nn.Parameter) -> None:
        super().__init__()
        self.inner = inner
        self.shared = shared  # the very Parameter the encoder holds: tied, not copied
        self.unused = nn.Parameter(torch.ones(4))

    @property
    def uses_positions(self) -> bool:
        return bool(getattr(self.inner, "uses_positions", False))

    def tied(self, feats: torch.Tensor) -> torch.Tensor:
        return feats + 0.5 * feats @ self.shared

    def forward(self, feats: torch.Tensor, positions: torch.Tensor | None = None):  # -> AggregatorOutput
        return self.inner(self.tied(feats), positions) if self.uses_positions else self.inner(self.tied(feats))


class ProbePooling(ProbeAggregator):
    """The same around an attention-pooling aggregator, keeping its ``tile_stage`` / ``pool_head`` split;
    ``attention_scale`` sharpens the attention scores (a trained, peaked attention: most weights far below 1e-3)."""

    attention_scale: float = 1.0

    def tile_stage(self, feats: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, a = (self.inner.tile_stage(self.tied(feats), positions) if self.uses_positions
                else self.inner.tile_stage(self.tied(feats)))
        return h, (a * self.attention_scale if self.attention_scale != 1.0 else a)

    def pool_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.pool_head(z)

    def tile_scores(self, h: torch.Tensor) -> torch.Tensor | None:
        own = getattr(self.inner, "tile_scores", None)
        return own(h) if callable(own) else None

    def output(self, logits: torch.Tensor, weights: torch.Tensor, h: torch.Tensor):  # -> AggregatorOutput
        return self.inner.output(logits, weights, h)


def add_probes(model: nn.Module, drop_path_rate: float = 0.1, attention_scale: float = 1.0) -> nn.Module:
    """Wrap ``model.encoder`` and ``model.aggregator`` in place with the probes above; returns ``model``."""
    model.encoder = ProbeEncoder(model.encoder, drop_path_rate)
    pooling = callable(getattr(model.aggregator, "tile_stage", None)) and callable(
        getattr(model.aggregator, "pool_head", None))
    model.aggregator = (ProbePooling if pooling else ProbeAggregator)(model.aggregator, model.encoder.shared)
    if pooling:
        model.aggregator.attention_scale = attention_scale
    return model
