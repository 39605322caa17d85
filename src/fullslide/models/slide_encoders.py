"""Published slide encoders whose architecture is plain PyTorch, as aggregators fine-tuned with the tile encoder.

``gigapath-slide``: Prov-GigaPath's slide encoder (Xu et al. 2024, "A whole-slide foundation model for digital
pathology from real-world data", Nature 630: 181-188; github.com/prov-gigapath/prov-gigapath,
``gigapath/slide_encoder.py``, architecture ``gigapath_slide_enc12l768d``): a LongNet (Ding et al. 2023,
"LongNet: Scaling Transformers to 1,000,000,000 Tokens") over the tile features in their order, written here
without flash-attn or torchscale. What the released code computes, and so what this module computes:

- input: each tile's 1536-d GigaPath feature, ``patch_embed.proj`` (Linear 1536 -> 768), plus a fixed 2-D sine/cosine
  embedding (MAE's: half the channels for one grid axis, half for the other, frequencies ``10000^(-i/(D/4))``)
  of the tile's cell on a 1000 x 1000 grid of 256 level-0 pixels: cell ``(floor(x/256), floor(y/256))``, index
  ``floor(x/256) * 1000 + floor(y/256)``; the class token (position embedding zero) goes first;
- 12 pre-norm layers (torchscale's encoder with ``subln``): ``x + out_proj(inner_attn_ln(DilatedAttention(ln(x))))``,
  then ``x + fc2(ffn_layernorm(gelu(fc1(ln(x)))))``; 16 heads; ``encoder.layer_norm`` on the output;
- dilated attention: for each (segment length w, dilation r) in zip(segment_length, [1, 2, 4, 8, 16]) the
  sequence (zero-padded) is cut into segments of ``min(w, L)`` tokens; in each segment, the heads are split into
  r groups and group g attends among the segment's tokens at offsets ``= g (mod r)`` (the segment zero-padded to
  a multiple of r: padded keys are zero vectors and take part in the softmax, as in the released code). The
  branches are merged by their log-sum-exp weights, which is attention over the union of each query's keys,
  counting a key once per branch that holds it;
- segment lengths from ``max_wsi_size`` and ``tile_size`` (card: 262144 and 256): ``2^linspace(10, floor(log2(
  (max_wsi_size // tile_size)^2)), 5)`` truncated to integers -> [1024, 5792, 32768, 185363, 1048576];
- the slide embedding (the card's ``slide_encoder(tile_embed, coordinates)``): ``norm`` (LayerNorm, eps 1e-6) of
  the class token (``global_pool: true``: of the mean of the tile tokens).

One difference, deliberate: the released code merges the branches with weights computed under ``no_grad``, so its
gradient is not the gradient of its forward; here the merge is differentiated (the exact gradient of the same
function; the forward values are identical).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from fullslide.models.aggregators import AggregatorOutput

#: GigaPath divides level-0 coordinates by 256 whatever the tile size (``LongNetViT.coords_to_pos``).
GIGAPATH_CELL_PX = 256.0


def longnet_segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256, branches: int = 5) -> list[int]:
    """GigaPath's ``get_optimal_segment_length``: ``branches`` lengths from 1024 up to the longest sequence a
    ``max_wsi_size``-pixel slide of ``tile_size`` tiles can give, evenly spaced in log2, truncated to integers."""
    longest = (int(max_wsi_size) // int(tile_size)) ** 2
    if longest < 2:
        raise ValueError(f"max_wsi_size {max_wsi_size} holds fewer than 2 tiles of {tile_size} px")
    exponents = np.linspace(np.log2(1024), int(np.log2(longest)), branches)
    return [int(v) for v in np.power(2, exponents).astype(int)]


def sincos_grid_embedding(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE's 2-D sine/cosine embedding ``[N, dim]`` of grid cells (row, col): ``[1-D(col), 1-D(row)]``, each
    1-D part ``[sin(p w), cos(p w)]`` with ``w_i = 10000^(-i / (dim/4))``; computed in float64 as the released
    table is, returned in float32."""
    if dim % 4:
        raise ValueError(f"the sine/cosine grid embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=rows.device) / quarter)
    parts = []
    for axis in (cols, rows):
        angle = axis.to(torch.float64)[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()


class DilatedSelfAttention(nn.Module):
    """LongNet's dilated self-attention over one sequence ``[L, D]`` (module docstring), with torchscale's
    parameter names (``q_proj``, ``k_proj``, ``v_proj``, ``inner_attn_ln``, ``out_proj``)."""

    def __init__(self, dim: int, heads: int, segment_length: Sequence[int], dilated_ratio: Sequence[int],
                 eps: float = 1e-5) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dilated attention: width {dim} is not divisible by {heads} heads")
        if len(segment_length) != len(dilated_ratio) or not segment_length:
            raise ValueError(f"dilated attention: {len(segment_length)} segment lengths for {len(dilated_ratio)} "
                             "dilation ratios")
        bad = [r for r in dilated_ratio if r < 1 or heads % r]
        if bad or 1 not in dilated_ratio:
            raise ValueError(f"dilated attention: every ratio must divide the {heads} heads and one must be 1 "
                             f"(so every token sees its neighbours), got {list(dilated_ratio)}")
        self.heads, self.head_dim = heads, dim // heads
        self.segments = [int(s) for s in segment_length]
        self.ratios = [int(r) for r in dilated_ratio]
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.inner_attn_ln = nn.LayerNorm(dim, eps=eps)
        self.out_proj = nn.Linear(dim, dim)

    def _branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: int, ratio: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One (segment, ratio) branch: outputs ``[L, H, d]`` and log-sum-exps ``[L, H]`` (-inf where a head
        does not cover a token in this branch)."""
        length, heads, d = q.shape
        s = min(segment, length)
        n = -(-length // s)
        m = -(-s // ratio)
        groups = heads // ratio

        def sparse(x: torch.Tensor) -> torch.Tensor:  # [L, H, d] -> [n, ratio, groups, m, d]
            x = F.pad(x, (0, 0, 0, 0, 0, n * s - length)).view(n, s, heads, d)
            x = F.pad(x, (0, 0, 0, 0, 0, m * ratio - s)).view(n, m, ratio, ratio, groups, d)
            # offset (dim 2) and head group (dim 3) must agree: group g takes the tokens at offsets = g (mod r)
            return torch.diagonal(x, dim1=2, dim2=3).permute(0, 4, 2, 1, 3)

        qs, ks, vs = sparse(q), sparse(k), sparse(v)
        scores = (qs * self.head_dim ** -0.5) @ ks.transpose(-1, -2)  # [n, r, g, m, m]
        lse = torch.logsumexp(scores, dim=-1)  # [n, r, g, m]
        out = torch.exp(scores - lse.unsqueeze(-1)) @ vs  # [n, r, g, m, d]
        dense = out.new_zeros(n, m, ratio, heads, d)
        dense_lse = lse.new_full((n, m, ratio, heads), float("-inf"))
        for g in range(ratio):
            dense[:, :, g, g * groups:(g + 1) * groups] = out[:, g].permute(0, 2, 1, 3)
            dense_lse[:, :, g, g * groups:(g + 1) * groups] = lse[:, g].transpose(1, 2)
        dense = dense.view(n, m * ratio, heads, d)[:, :s].reshape(n * s, heads, d)[:length]
        dense_lse = dense_lse.view(n, m * ratio, heads)[:, :s].reshape(n * s, heads)[:length]
        return dense, dense_lse

    def saved_floats(self, length: int) -> float:
        """Floats autograd saves for one forward of this attention over ``length`` tokens (float32), branch by
        branch: the scaled queries and the output at the padded length (and the padded keys and values where the
        sequence is padded), two per score (the scores and their softmax), the log-sum-exps; the shared keys and
        values and the merge weights once."""
        width = self.heads * self.head_dim
        floats = 2.0 * length * width + 3.0 * len(self.segments) * length * self.heads
        for segment, ratio in zip(self.segments, self.ratios):
            s = min(segment, length)
            n, m = -(-length // s), -(-s // ratio)
            padded = n * m * ratio  # the branch's tokens after padding
            floats += (2 + 2 * (padded > length)) * padded * width  # queries, output (+ padded keys, values)
            floats += 2.0 * n * self.heads * m * m + n * self.heads * m  # scores, softmax; log-sum-exps
        return floats

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (x.shape[0], self.heads, self.head_dim)
        return self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        outs, lses = zip(*(self._branch(q, k, v, s, r) for s, r in zip(self.segments, self.ratios)))
        lse = torch.stack(lses).float()  # [B, L, H]
        weights = torch.exp(lse - lse.amax(0, keepdim=True))  # every token is covered by the ratio-1 branch
        weights = weights / weights.sum(0, keepdim=True)
        attn = sum(o * w.unsqueeze(-1).to(o.dtype) for o, w in zip(outs, weights))  # [L, H, d]
        return self.out_proj(self.inner_attn_ln(attn.reshape(x.shape)))

    @torch.no_grad()
    def first_token_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """Token 0's (the class token's) attention scores over all tokens, softmaxed over all of them, mean over
        heads ``[L]``: the heatmap score. (Its actual weights cover only the tokens at multiples of each dilation
        ratio below the segment length, counted once per branch, so as a map they would show the stride of the
        tile sequence rather than the tiles' content.)"""
        q, k, _ = self._qkv(x)
        scores = torch.einsum("hd,lhd->hl", q[0] * self.head_dim ** -0.5, k).float()  # [H, L]
        return torch.softmax(scores, dim=1).mean(0)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth for one sequence: the whole residual branch is kept (scaled by 1/(1-p)) or dropped."""
    if p <= 0.0 or not training:
        return x
    keep = torch.bernoulli(x.new_full((1,) * x.dim(), 1.0 - p))
    return x * keep / (1.0 - p)


class _FeedForward(nn.Module):
    """torchscale's FFN with ``subln``: fc1, GELU, LayerNorm, fc2, dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x).float()).to(x.dtype))))


class LongNetLayer(nn.Module):
    """One pre-norm LongNet encoder layer (torchscale's ``EncoderLayer`` names)."""

    def __init__(self, dim: int, heads: int, hidden: int, segment_length: Sequence[int],
                 dilated_ratio: Sequence[int], dropout: float, drop_path: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.self_attn = DilatedSelfAttention(dim, heads, segment_length, dilated_ratio, eps)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = _FeedForward(dim, hidden, dropout, eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = float(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.self_attn(self.self_attn_layer_norm(x)))
        x = x + _drop_path(y, self.drop_path, self.training)
        return x + _drop_path(self.ffn(self.final_layer_norm(x)), self.drop_path, self.training)


class _LongNetEncoder(nn.Module):
    def __init__(self, layers: list[LongNetLayer], dim: int, final_norm: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(dim, eps=eps) if final_norm else None


class _PatchEmbed(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)


class GigaPathSlideEncoder(nn.Module):
    """Prov-GigaPath's slide encoder (module docstring) as a whole-slide aggregator, with a new linear head.

    Parameter names follow the released ``slide_encoder.pth`` (``patch_embed.proj``, ``cls_token``,
    ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``...inner_attn_ln``, ``...ffn.{fc1,fc2,ffn_layernorm}``,
    ``encoder.layer_norm``, ``norm``), so ``aggregator.weights`` loads it strictly.

    ``tile_level0_px``: the tiles' side in level-0 pixels; fullslide's positions are in tiles, GigaPath's in
    units of 256 level-0 px (256-px tiles at 0.5 mpp on a 0.25-mpp scan: 512, the default). GigaPath's own
    pipeline uses each slide's level-0 pixels, so a cohort of mixed scanners gets the card's embedding for the
    scans whose level-0 tile side is ``tile_level0_px`` and a consistent grid for all.
    ``layers``: None gives the card's embedding (all layers, ``encoder.layer_norm``, ``norm``, class token);
    a list (e.g. ``[11]``, GigaPath's fine-tuning default ``--feat_layer 11``) takes those hidden states (0 = the
    input embedding, i = after layer i; without ``encoder.layer_norm``, as ``all_layer_embed=True`` does), each
    through ``norm``, concatenated; layers after the last listed one are not built (their file tensors are
    skipped). ``checkpoint_layers``: keep only each layer's input for the backward and re-run the layer there (its
    attention scores are the memory: ~21 L scores per token for L <= 1024 tokens, ~53 thousand per token at
    10,000), so one layer's scores are held at a time instead of all of them. ``sort_tiles``: order the tiles by
    GigaPath's position index before the encoder (dilated attention depends on the order; sorting makes the
    slide's embedding independent of how its tiles were sampled or sharded); the heatmap comes back in the input
    order.
    """

    uses_positions = True

    def __init__(
        self, in_dim: int, n_classes: int, dim: int = 768, depth: int = 12, heads: int = 16, mlp_ratio: float = 4.0,
        dropout: float = 0.1, drop_path: float = 0.0, max_wsi_size: int = 262144, tile_size: int = 256,
        segment_length: Sequence[int] | None = None, dilated_ratio: Sequence[int] = (1, 2, 4, 8, 16),
        slide_ngrids: int = 1000, tile_level0_px: float = 512.0, global_pool: bool = False,
        layers: Sequence[int] | None = None, sort_tiles: bool = True, checkpoint_layers: bool = True,
    ) -> None:
        super().__init__()
        segments = list(segment_length) if segment_length is not None else longnet_segment_lengths(
            max_wsi_size, tile_size, len(dilated_ratio))
        self.layers_out = sorted({int(i) for i in layers}) if layers is not None else None
        if self.layers_out is not None and (not self.layers_out or self.layers_out[0] < 0
                                            or self.layers_out[-1] > depth):
            raise ValueError(f"gigapath-slide: layers must be in 0..{depth}, got {layers}")
        built = depth if self.layers_out is None else self.layers_out[-1]
        self.depth = int(depth)
        self.dim, self.grid, self.global_pool = dim, int(slide_ngrids), bool(global_pool)
        self.sort_tiles, self.checkpoint_layers = bool(sort_tiles), bool(checkpoint_layers)
        self.scale = float(tile_level0_px) / GIGAPATH_CELL_PX
        self.patch_embed = _PatchEmbed(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        rates = np.linspace(0, drop_path, depth) if drop_path > 0 else np.zeros(depth)
        self.encoder = _LongNetEncoder(
            [LongNetLayer(dim, heads, int(dim * mlp_ratio), segments, dilated_ratio, dropout, float(rates[i]))
             for i in range(built)], dim, final_norm=self.layers_out is None)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.embed_dropout = nn.Dropout(dropout)
        width = dim * (1 if self.layers_out is None else len(self.layers_out))
        self.head = nn.Linear(width, n_classes)

    def activation_bytes(self, rows: int) -> float:
        """Bytes of float32 activations autograd holds for one slide of ``rows`` tiles (the engine's ``auto``
        budget and ``fullslide plan`` use it): per layer the attention's (:meth:`DilatedSelfAttention.saved_floats`)
        plus 19 L x dim floats (norms, projections, the FFN's three 4 x dim tensors); with ``checkpoint_layers``
        every layer's input and one layer re-run in the backward, else every layer. Checked against autograd's
        saved tensors (tests/test_slide_encoders.py)."""
        length = int(rows) + 1
        built = len(self.encoder.layers)
        layer = (self.encoder.layers[0].self_attn.saved_floats(length) + 19.0 * length * self.dim) if built else 0.0
        embed = length * (self.patch_embed.proj.in_features + self.dim)
        floats = embed + (built * length * self.dim + layer if self.checkpoint_layers else built * layer)
        return 4.0 * floats

    def unused_file_prefixes(self) -> tuple[str, ...]:
        """The released file's tensors this configuration does not use (layers after the last in ``layers``)."""
        if self.layers_out is None:
            return ()
        unbuilt = range(len(self.encoder.layers), self.depth)
        return tuple(f"encoder.layers.{i}." for i in unbuilt) + ("encoder.layer_norm.",)

    def cells(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GigaPath's grid cell (row = floor(x/256), col = floor(y/256)) of each tile ``[K]``, ``[K]`` from
        fullslide's positions (level-0 x, y in tiles); an error beyond the 1000 x 1000 grid."""
        cell = torch.floor(positions.double() * self.scale + 1e-6).long()
        index = cell[:, 0] * self.grid + cell[:, 1]
        if index.numel() and (bool((cell < 0).any()) or int(index.max()) >= self.grid * self.grid):
            raise ValueError(f"gigapath-slide: tile positions beyond GigaPath's {self.grid} x {self.grid} grid of "
                             f"{GIGAPATH_CELL_PX:.0f}-px cells (is tile_level0_px right?)")
        return index // self.grid, index % self.grid  # as the released table is indexed by `index`

    def _tokens(self, feats: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(feats) + sincos_grid_embedding(rows, cols, self.dim).to(feats.dtype)
        return self.embed_dropout(torch.cat([self.cls_token[0].to(x.dtype), x], dim=0))  # [1 + K, D]

    def embed(self, feats: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slide embedding (``[dim]``, or the listed layers' concatenated) and the heatmap score of each tile
        ``[K]`` (in the order given): the class token's last-layer attention affinity
        (:meth:`DilatedSelfAttention.first_token_affinity`), renormalised over the tiles."""
        order = None
        rows, cols = self.cells(positions)
        if self.sort_tiles:
            order = torch.argsort(rows * self.grid + cols, stable=True)
            feats, rows, cols = feats[order], rows[order], cols[order]
        x = self._tokens(feats, rows, cols)
        states = [x]
        attention = None
        for i, layer in enumerate(self.encoder.layers):
            if i == len(self.encoder.layers) - 1:
                attention = layer.self_attn.first_token_affinity(layer.self_attn_layer_norm(x))[1:]
            if self.checkpoint_layers and torch.is_grad_enabled() and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)  # same dropout when re-run
            else:
                x = layer(x)
            states.append(x)
        if self.layers_out is None:
            picked = [self.encoder.layer_norm(x)]
        else:
            picked = [states[i] for i in self.layers_out]
        pooled = [self.norm(s[1:].mean(0)) if self.global_pool else self.norm(s)[0] for s in picked]
        if attention is None:  # no layer built (layers: [0])
            attention = feats.new_full((feats.shape[0],), 1.0 / feats.shape[0])
        attention = attention / attention.sum().clamp_min(1e-12)
        if order is not None:
            attention = torch.empty_like(attention).scatter_(0, order, attention)
        return torch.cat(pooled), attention

    def slide_embedding(self, feats: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The card's ``slide_encoder(tile_embed, coordinates)`` (with ``layers: null``)."""
        return self.embed(feats, positions)[0]

    def forward(self, feats: torch.Tensor, positions: torch.Tensor) -> AggregatorOutput:
        z, attention = self.embed(feats, positions)
        return AggregatorOutput(logits=self.head(z), attention=attention.to(z.dtype))


__all__ = ["DilatedSelfAttention", "GigaPathSlideEncoder", "longnet_segment_lengths", "sincos_grid_embedding"]
