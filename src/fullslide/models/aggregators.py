"""MIL aggregators: the features of all tiles of one slide ``[K, D]`` -> slide logits ``[C]``.

Every aggregator returns an :class:`AggregatorOutput` with the slide logits, a per-tile score for heatmaps
(attention weights that sum to one, or raw scores for max pooling) and, where the aggregator classifies
tiles, the per-tile logits. One slide at a time: slides of a step have different K and are never padded.

Spatial aggregators (``uses_positions = True``) also receive each tile's position ``[K, 2]``: its level-0 (x, y)
divided by the tile's level-0 side, i.e. in tiles on the slide's tile grid (neighbours are 1 apart whatever the
magnification). They take it as ``forward(feats, positions)`` or, for attention pooling, ``tile_stage(feats,
positions)``; :func:`run_aggregator` and :func:`run_tile_stage` call either kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AggregatorOutput:
    """What an aggregator returns for one slide."""

    logits: torch.Tensor  # [C]
    attention: torch.Tensor  # [K] attention weights (sum to 1) or per-tile scores
    tile_logits: torch.Tensor | None = None  # [K, C] where the aggregator classifies tiles


def run_aggregator(aggregator: nn.Module, feats: torch.Tensor, positions: torch.Tensor | None = None) -> "AggregatorOutput":
    """``aggregator(feats)``, with the tiles' positions for a spatial aggregator (an error if they are missing)."""
    if getattr(aggregator, "uses_positions", False):
        if positions is None:
            raise ValueError(f"{type(aggregator).__name__} needs the tiles' positions")
        return aggregator(feats, positions)
    return aggregator(feats)


def run_tile_stage(aggregator: nn.Module, feats: torch.Tensor,
                   positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``aggregator.tile_stage(feats)`` of attention pooling, with positions for a spatial one."""
    if getattr(aggregator, "uses_positions", False):
        if positions is None:
            raise ValueError(f"{type(aggregator).__name__} needs the tiles' positions")
        return aggregator.tile_stage(feats, positions)
    return aggregator.tile_stage(feats)


def sincos_2d(positions: torch.Tensor, dim: int, scale: float = 10_000.0) -> torch.Tensor:
    """Fixed 2-D sine/cosine encoding ``[K, dim]`` of positions ``[K, 2]`` (Vaswani et al. 2017, per axis: the
    first half of the channels encodes x, the second y; ``dim`` divisible by 4)."""
    quarter = dim // 4
    freq = scale ** (-torch.arange(quarter, device=positions.device, dtype=torch.float32) / max(1, quarter))
    parts = []
    for axis in range(2):
        angle = positions[:, axis : axis + 1].float() * freq  # [K, dim/4]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1)


class AttentionPooling(nn.Module):
    """Attention-pooling MIL split into a per-tile stage and a pooled head.

    ``tile_stage(feats [k, D]) -> (h [k, H], a [k])`` works on each tile independently; the slide embedding is
    ``z = softmax(a) @ h`` and the logits are ``pool_head(z)``. The split lets the engine stream the tile stage
    chunk by chunk (``recompute`` mode keeps only the K attention scores, not K x H activations).
    """

    tile_logits_are_h = False  # mean pooling: h are per-tile logits
    uses_positions = False  # spatial: tile_stage(feats, positions)

    def tile_stage(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pool_head(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tile_scores(self, h: torch.Tensor) -> torch.Tensor | None:
        """The per-tile heatmap score ``[k]`` when it is not the attention weight (mean pooling: the last-class
        tile logit), else None. The engine's streamed path calls this too, so every mode reports the same."""
        return h[:, -1] if self.tile_logits_are_h else None

    def output(self, logits: torch.Tensor, weights: torch.Tensor, h: torch.Tensor) -> AggregatorOutput:
        """Package pooled logits with the heatmap score (:meth:`tile_scores`, or the attention weights)."""
        scores = self.tile_scores(h)
        if scores is not None:
            return AggregatorOutput(logits=logits, attention=scores, tile_logits=h if self.tile_logits_are_h else None)
        return AggregatorOutput(logits=logits, attention=weights)

    def forward(self, feats: torch.Tensor, positions: torch.Tensor | None = None) -> AggregatorOutput:
        h, a = run_tile_stage(self, feats, positions)  # [K, H], [K]
        weights = torch.softmax(a, dim=0)  # [K]
        return self.output(self.pool_head(weights @ h), weights, h)


class GatedAttentionMIL(AttentionPooling):
    """Gated attention MIL ("GMA") as Campanella et al. 2024 use it.

    Linear D->512, ReLU, Linear 512->512, ReLU, dropout 0.25; gated attention
    ``w^T (tanh(V h) * sigmoid(U h))`` with 384 hidden units; softmax over tiles; attention-weighted sum;
    linear head. The gated form is Ilse et al. 2018 ("Attention-based deep multiple instance learning").
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 512, attn_hidden: int = 384, dropout: float = 0.25,
        positional: bool = False, pos_dim: int = 64,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout)
        )
        self.attn_v = nn.Linear(hidden, attn_hidden)
        self.attn_u = nn.Linear(hidden, attn_hidden)
        self.attn_w = nn.Linear(attn_hidden, 1)
        self.head = nn.Linear(hidden, n_classes)
        # positional: each tile's 2-D sine/cosine position, projected, is added to its embedding before attention
        # (a per-tile layer, so the slide is still pooled chunk by chunk in recompute mode)
        self.uses_positions = bool(positional)
        self.pos_dim = int(pos_dim)
        self.pos = nn.Linear(self.pos_dim, hidden) if positional else None

    def tile_stage(self, feats: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(feats)  # [k, H]
        if self.pos is not None:
            h = h + self.pos(sincos_2d(positions, self.pos_dim).to(h.dtype))
        a = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)  # [k]
        return h, a

    def pool_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)


class AttentionMIL(AttentionPooling):
    """ABMIL (Ilse et al. 2018): embedding, then (non-gated by default) tanh attention pooling, linear head."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 256,
        attn_hidden: int = 128,
        dropout: float = 0.25,
        gated: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attn_hidden)
        self.attn_u = nn.Linear(hidden, attn_hidden) if gated else None
        self.attn_w = nn.Linear(attn_hidden, 1)
        self.head = nn.Linear(hidden, n_classes)

    def tile_stage(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(feats)  # [k, H]
        z = torch.tanh(self.attn_v(h))  # [k, A]
        if self.attn_u is not None:
            z = z * torch.sigmoid(self.attn_u(h))
        return h, self.attn_w(z).squeeze(-1)

    def pool_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)


def _tile_mlp(in_dim: int, n_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    """The per-tile classifier of mean and max pooling."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))


class MeanMIL(AttentionPooling):
    """Mean of per-tile logits (attention pooling with uniform weights); heatmap score: last-class tile logit."""

    tile_logits_are_h = True

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        self.mlp = _tile_mlp(in_dim, n_classes, hidden, dropout)

    def tile_stage(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.mlp(feats)  # [k, C]
        return t, t.new_zeros(t.shape[0])

    def pool_head(self, z: torch.Tensor) -> torch.Tensor:
        return z


class MaxMIL(nn.Module):
    """Per-class max of per-tile logits; the heatmap score is each tile's logit for the last class."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        self.mlp = _tile_mlp(in_dim, n_classes, hidden, dropout)

    def forward(self, feats: torch.Tensor) -> AggregatorOutput:
        t = self.mlp(feats)  # [K, C]
        return AggregatorOutput(logits=t.max(0).values, attention=t[:, -1], tile_logits=t)


class _GatedScores(nn.Module):
    """CLAM-style gated attention scores: ``attention_c(tanh-branch * sigmoid-branch)`` (parameter names as in
    CLAM's and CHIEF's checkpoints: ``attention_a.0``, ``attention_b.0``, ``attention_c``)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)  # [k]


class CHIEFSlideEncoder(AttentionPooling):
    """CHIEF's slide encoder as an aggregator (Wang et al. 2024, "A pathology foundation model for cancer
    diagnosis and prognosis prediction", Nature 634: 970-978; github.com/hms-dbmi/CHIEF): CTransPath tile features
    (768) -> Linear 512, ReLU, dropout 0.25 -> gated attention (512 -> 256 -> 1); the slide is pooled as
    ``softmax(A) @ h`` (512-d) and a new linear head gives the task's logits. Parameter names follow
    ``CHIEF_pretraining.pth`` (``attention_net.0``, ``attention_net.3.attention_{a,b,c}``), so
    ``aggregator.weights`` loads the released slide encoder strictly; the file's pretraining heads
    (``classifiers``, ``instance_classifiers``, ``att_head``, ``text_to_vision``, text/organ embeddings) are not
    part of the slide encoder and are left out. :meth:`slide_embedding` is the card's ``WSI_feature``: the
    attention-weighted mean of the input tile features (768-d)."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, attn_hidden: int = 256,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.attention_net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                           _GatedScores(hidden, attn_hidden, dropout))
        self.head = nn.Linear(hidden, n_classes)

    def tile_stage(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.attention_net[2](self.attention_net[1](self.attention_net[0](feats)))  # [k, 512]
        return h, self.attention_net[3](h)

    def pool_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def slide_embedding(self, feats: torch.Tensor) -> torch.Tensor:
        """CHIEF's ``WSI_feature``: ``softmax(A) @ feats`` ``[in_dim]``."""
        _, a = self.tile_stage(feats)
        return torch.softmax(a, dim=0) @ feats


class _Block(nn.Module):
    """Pre-norm transformer block over the tile tokens (memory-efficient attention, no K x K matrix kept unless
    an attention bias is given)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        return qkv[0], qkv[1], qkv[2]  # each [heads, N, d]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [heads, N, d]
        x = x + self.drop(self.proj(y.transpose(0, 1).reshape(x.shape)))
        return x + self.mlp(self.norm2(x))

    def cls_attention(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the class token (row 0) over all tokens, averaged over heads: ``[N]``."""
        q, k, _ = self._qkv(x)
        scores = (q[:, :1] @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])  # [heads, 1, N]
        if bias is not None:
            scores = scores + bias[:, :1]
        return torch.softmax(scores, dim=-1).mean(0)[0]


def alibi_2d(positions: torch.Tensor, heads: int) -> torch.Tensor:
    """2-D ALiBi attention bias ``[heads, 1 + K, 1 + K]`` for a class token followed by K tiles: head h adds
    ``-m_h * ||p_i - p_j||`` (Euclidean distance on the tile grid) between tiles i and j, and nothing to or from
    the class token; the slopes ``m_h = 2^(-8 (h + 1) / heads)`` are ALiBi's (Press et al. 2022), the Euclidean
    form the 2-D extension TITAN uses (Ding et al. 2024)."""
    slopes = torch.pow(2.0, -8.0 * torch.arange(1, heads + 1, device=positions.device, dtype=torch.float32) / heads)
    p = positions.float()
    dist = torch.cdist(p, p)  # [K, K]
    bias = torch.zeros((heads, p.shape[0] + 1, p.shape[0] + 1), device=positions.device)
    bias[:, 1:, 1:] = -slopes[:, None, None] * dist
    return bias


class TransformerMIL(nn.Module):
    """A small transformer aggregator: project tiles, prepend a class token, ``depth`` blocks, linear head.

    The heatmap score is the class token's attention over the tiles in the last block (mean over heads,
    renormalised over tiles). Permutation invariant (no positional encoding), unless ``alibi``: then every block's
    attention carries the 2-D ALiBi bias of the tiles' distances on the slide (:func:`alibi_2d`; K x K per head,
    so memory grows as K^2: for slides of tens of thousands of tiles use attention pooling).
    """

    def __init__(
        self, in_dim: int, n_classes: int, dim: int = 256, depth: int = 2, heads: int = 4, dropout: float = 0.1,
        alibi: bool = False,
    ) -> None:
        super().__init__()
        self.uses_positions = bool(alibi)
        self.heads = heads
        if dim % heads:
            raise ValueError(f"transformer aggregator: dim {dim} is not divisible by heads {heads}")
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls = nn.Parameter(torch.zeros(1, dim))
        nn.init.normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList([_Block(dim, heads, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, feats: torch.Tensor, positions: torch.Tensor | None = None) -> AggregatorOutput:
        x = torch.cat([self.cls, self.proj(feats)], dim=0)  # [1 + K, dim]
        bias = alibi_2d(positions, self.heads).to(x.dtype) if self.uses_positions else None
        for block in self.blocks[:-1]:
            x = block(x, bias)
        last = self.blocks[-1]
        attn = last.cls_attention(x, bias)[1:]  # [K]
        x = last(x, bias)
        return AggregatorOutput(logits=self.head(self.norm(x[0])), attention=attn / attn.sum().clamp_min(1e-12))


class WrappedAggregator(nn.Module):
    """Adapts a user aggregator that returns bare logits (or a (logits, attention) tuple)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, feats: torch.Tensor) -> AggregatorOutput:
        out = self.inner(feats)
        if isinstance(out, AggregatorOutput):
            return out
        if isinstance(out, (tuple, list)):
            logits, attention = out[0], out[1]
        else:
            logits, attention = out, torch.full((feats.shape[0],), 1.0 / feats.shape[0], device=feats.device)
        return AggregatorOutput(logits=logits.reshape(-1), attention=attention.reshape(-1))
