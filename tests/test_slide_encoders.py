"""Prov-GigaPath's slide encoder: the released layout loads strictly and gives the card's slide embedding.

The card is written here from the released code's computation (github.com/prov-gigapath/prov-gigapath,
``gigapath/slide_encoder.py`` and its torchscale LongNet), in another form than fullslide's: dilated attention
as one dense softmax per head whose keys are counted once per (segment, dilation) branch that holds them, with
the zero keys of each padded segment added to the denominator; the position table is MAE's numpy formula over
the whole grid, indexed as ``floor(x/256) * grid + floor(y/256) + 1``. Weights are random but amplified, so the
attention is far from uniform and a wrong key set or position shows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fullslide.errors import ModelError
from fullslide.models import create_model


# ---- the card ---------------------------------------------------------------------------------------------
def _mae_table(dim: int, grid: int, rows: int | None = None) -> np.ndarray:
    """MAE's ``get_2d_sincos_pos_embed(dim, grid, cls_token=True)``: a zero row, then the grid row-major (its
    first ``rows`` rows: the 1000 x 1000 table at 768-d would be 6 GB)."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(rows or grid, dtype=np.float32))  # w first
    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def _visibility(length: int, heads: int, segments: list[int], ratios: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """count[h, i, j]: in how many branches head h of token i sees token j; pads[h, i]: how many zero (padding)
    keys it sees. Segment by segment, head by head: the released code's gathering, spelt out."""
    count = torch.zeros(heads, length, length, dtype=torch.float64)
    pads = torch.zeros(heads, length, dtype=torch.float64)
    for w, r in zip(segments, ratios):
        s = min(w, length)
        padded = math.ceil(s / r) * r
        for start in range(0, length, s):
            for h in range(heads):
                group = h // (heads // r)
                members = [start + o for o in range(group, padded, r)]
                real = [t for t in members if t - start < s and t < length]
                for i in real:
                    count[h, i, real] += 1
                    pads[h, i] += len(members) - len(real)
    return count, pads


def _ln(x: torch.Tensor, state: dict, name: str, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)


def _lin(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return x @ state[name + ".weight"].t() + state[name + ".bias"]


def _card(state: dict, feats: torch.Tensor, coords: torch.Tensor, *, heads: int, segments: list[int],
          ratios: list[int], grid: int, all_layers: bool = False, hidden: bool = False, rows: int | None = None,
          global_pool: bool = False):
    """``LongNetViT.forward(x, coords, all_layer_embed)`` in float64 (``coords``: level-0 pixels); ``hidden``:
    the raw hidden states (input embedding, then after each layer)."""
    state = {k: v.double() for k, v in state.items()}
    dim = state["cls_token"].shape[-1]
    table = torch.from_numpy(_mae_table(dim, grid, rows)).float().double()  # float32 buffer, as released
    cell = torch.floor(coords / 256.0)
    pos = (cell[:, 0] * grid + cell[:, 1]).long() + 1
    x = _lin(feats.double(), state, "patch_embed.proj") + table[pos]
    x = torch.cat([state["cls_token"][0] + table[:1], x])
    length, d = x.shape[0], dim // heads
    count, pads = _visibility(length, heads, segments, ratios)
    states = [x]
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    for i in range(depth):
        p = f"encoder.layers.{i}."
        h = _ln(x, state, p + "self_attn_layer_norm")
        q, k, v = (_lin(h, state, p + f"self_attn.{n}_proj").view(length, heads, d).transpose(0, 1)
                   for n in ("q", "k", "v"))
        scores = q @ k.transpose(1, 2) / math.sqrt(d)  # [H, L, L]
        top = torch.maximum(scores.amax(-1, keepdim=True), torch.zeros(()))
        num = (count * torch.exp(scores - top)) @ v
        den = (count * torch.exp(scores - top)).sum(-1, keepdim=True) + pads.unsqueeze(-1) * torch.exp(-top)
        attn = (num / den).transpose(0, 1).reshape(length, dim)
        x = x + _lin(_ln(attn, state, p + "self_attn.inner_attn_ln"), state, p + "self_attn.out_proj")
        f = F.gelu(_lin(_ln(x, state, p + "final_layer_norm"), state, p + "ffn.fc1"))
        x = x + _lin(_ln(f, state, p + "ffn.ffn_layernorm"), state, p + "ffn.fc2")
        states.append(x)
    if hidden:
        return states
    if all_layers:
        return [_ln(s, state, "norm", 1e-6)[0] for s in states]
    x = _ln(x, state, "encoder.layer_norm")
    if global_pool:
        return _ln(x[1:].mean(0), state, "norm", 1e-6)
    return _ln(x, state, "norm", 1e-6)[0]


def _card_state(in_dim: int, dim: int, depth: int, gain: float = 3.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the released file's names (amplified: peaked attention, LayerNorms not identity)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"patch_embed.proj.weight": w(dim, in_dim, scale=gain / math.sqrt(in_dim)),
             "patch_embed.proj.bias": w(dim, scale=0.1), "cls_token": w(1, 1, dim),
             "norm.weight": 1 + w(dim, scale=0.2), "norm.bias": w(dim, scale=0.1),
             "encoder.layer_norm.weight": 1 + w(dim, scale=0.2), "encoder.layer_norm.bias": w(dim, scale=0.1)}
    for i in range(depth):
        p = f"encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            state[p + f"self_attn.{n}_proj.weight"] = w(dim, dim, scale=gain / math.sqrt(dim))
            state[p + f"self_attn.{n}_proj.bias"] = w(dim, scale=0.1)
        for n, width in (("self_attn.inner_attn_ln", dim), ("self_attn_layer_norm", dim), ("final_layer_norm", dim),
                         ("ffn.ffn_layernorm", 4 * dim)):
            state[p + n + ".weight"] = 1 + w(width, scale=0.2)
            state[p + n + ".bias"] = w(width, scale=0.1)
        state[p + "ffn.fc1.weight"] = w(4 * dim, dim, scale=1 / math.sqrt(dim))
        state[p + "ffn.fc1.bias"] = w(4 * dim, scale=0.1)
        state[p + "ffn.fc2.weight"] = w(dim, 4 * dim, scale=1 / math.sqrt(4 * dim))
        state[p + "ffn.fc2.bias"] = w(dim, scale=0.1)
    return state


def _tiles(n: int, in_dim: int, side: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n tiles at distinct places of a side x side tile grid, in scrambled order: features and positions."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(side * side, generator=g)[:n]
    positions = torch.stack([cells // side, cells % side], 1).float()
    return torch.randn(n, in_dim, generator=g), positions


_SMALL = dict(dim=32, depth=2, heads=8, segment_length=[4, 8, 64], dilated_ratio=[1, 2, 4], slide_ngrids=64,
              tile_level0_px=448.0, sort_tiles=False, dropout=0.0)


def _small(tmp_path: Path, **overrides):
    state = _card_state(32, 32, 2)
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": state}, path)
    kwargs = {**_SMALL, **overrides}
    model = create_model("tinycnn", "gigapath-slide", 3, encoder_kwargs={"width": 8}, aggregator_kwargs=kwargs,
                         aggregator_weights=path)
    return model.aggregator.eval(), state


def test_the_visibility_the_card_is_checked_with_is_longnets() -> None:
    """The reference's key sets, on a case small enough to list: 6 tokens, segment 4 with ratio 1 and segment 4
    (padded to 4) with ratio 2, 2 heads."""
    count, pads = _visibility(6, 2, [4, 4], [1, 2])
    # ratio 1: segments {0..3} and {4, 5 + two zero keys}; ratio 2: head 0 takes offsets 0, 2, head 1 offsets 1, 3
    assert count[0, 0].tolist() == [2, 1, 2, 1, 0, 0] and count[1, 1].tolist() == [1, 2, 1, 2, 0, 0]
    assert count[0, 1].tolist() == [1, 1, 1, 1, 0, 0]  # token 1 is not in head 0's ratio-2 set
    # token 5 sees 2 zero keys in the ratio-1 segment and 1 (offset 3 of the padded ratio-2 segment)
    assert count[1, 5].tolist() == [0, 0, 0, 0, 1, 2] and pads[1, 5] == 2 + 1
    assert count[0, 4].tolist() == [0, 0, 0, 0, 2, 1] and pads[0, 4] == 2 + 1


def test_gigapath_slide_encoder_loads_strictly_and_gives_the_cards_embedding(tmp_path: Path) -> None:
    """Several segments, padded segments, a segment longer than the slide (whole sequence, padded to the ratio),
    head groups, positions of 448-px tiles (fullslide's tile units -> GigaPath's 256-px cells), tiles in a
    scrambled order (``sort_tiles: false``: the card's order)."""
    agg, state = _small(tmp_path)
    feats, positions = _tiles(37, 32, 30)
    with torch.no_grad():
        ours = agg.slide_embedding(feats, positions)
    want = _card(state, feats, positions * 448.0, heads=8, segments=[4, 8, 64], ratios=[1, 2, 4], grid=64)
    torch.testing.assert_close(ours.double(), want, rtol=2e-5, atol=2e-5)
    # the positions and the key sets matter here: moved tiles or plain attention give another embedding
    moved = _card(state, feats, positions * 512.0, heads=8, segments=[4, 8, 64], ratios=[1, 2, 4], grid=64)
    plain = _card(state, feats, positions * 448.0, heads=8, segments=[64], ratios=[1], grid=64)
    assert float((moved - want).abs().max()) > 1e-2 and float((plain - want).abs().max()) > 1e-2
    # and the gradient is that of the card's forward (the released merge is under no_grad; this one is exact)
    feats_a, feats_b = feats.clone().requires_grad_(), feats.double().clone().requires_grad_()
    probe = torch.randn(32, generator=torch.Generator().manual_seed(5))
    (agg.slide_embedding(feats_a, positions) @ probe).backward()
    (_card(state, feats_b, positions * 448.0, heads=8, segments=[4, 8, 64], ratios=[1, 2, 4], grid=64)
     @ probe.double()).backward()
    scale = float(feats_b.grad.abs().max())  # float32 rounding of gradients up to ~18
    torch.testing.assert_close(feats_a.grad.double(), feats_b.grad, rtol=1e-4, atol=2e-5 * scale)


def test_gigapath_slide_encoder_at_the_cards_size() -> None:
    """768-d, 16 heads, the card's segment lengths and ratios (every branch spans the 61 tokens: the dilated
    sets over the whole slide), the 1000 x 1000 grid, 512-px tiles; two of the 12 layers to keep CI short."""
    from fullslide.models.slide_encoders import GigaPathSlideEncoder, longnet_segment_lengths

    assert longnet_segment_lengths() == [1024, 5792, 32768, 185363, 1048576]  # max_wsi_size 262144, 256-px tiles
    state = _card_state(1536, 768, 2, gain=2.0)
    agg = GigaPathSlideEncoder(1536, 2, depth=2, dropout=0.0, sort_tiles=False).eval()
    agg.load_state_dict(state, strict=False)
    feats, positions = _tiles(60, 1536, 15, seed=4)  # cells up to (28, 28)
    with torch.no_grad():
        ours = agg.slide_embedding(feats, positions)
    want = _card(state, feats, positions * 512.0, heads=16, segments=longnet_segment_lengths(),
                 ratios=[1, 2, 4, 8, 16], grid=1000, rows=30)
    torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-4)


def test_gigapath_fine_tuning_layers_global_pool_and_sorted_tiles(tmp_path: Path) -> None:
    """``layers: [1]`` is the released fine-tuning's ``--feat_layer`` (hidden state after layer 1, ``norm``, no
    ``encoder.layer_norm``; the file's later layers are skipped, not reported); ``global_pool`` the mean of the tile
    tokens; sorted tiles: the embedding does not depend on their order and the heatmap comes back in the input order."""
    agg, state = _small(tmp_path, layers=[1])
    assert len(agg.encoder.layers) == 1 and agg.encoder.layer_norm is None
    feats, positions = _tiles(37, 32, 30)
    with torch.no_grad():
        ours = agg.embed(feats, positions)[0]
    want = _card(state, feats, positions * 448.0, heads=8, segments=[4, 8, 64], ratios=[1, 2, 4], grid=64,
                 all_layers=True)[1]
    torch.testing.assert_close(ours.double(), want, rtol=2e-5, atol=2e-5)

    pooled, _ = _small(tmp_path, global_pool=True)
    with torch.no_grad():
        ours = pooled.slide_embedding(feats, positions)
    want = _card(state, feats, positions * 448.0, heads=8, segments=[4, 8, 64], ratios=[1, 2, 4], grid=64,
                 global_pool=True)
    torch.testing.assert_close(ours.double(), want, rtol=2e-5, atol=2e-5)

    full, _ = _small(tmp_path)
    sorted_agg, _ = _small(tmp_path, sort_tiles=True)
    with torch.no_grad():
        out = full(feats, positions)
        perm = torch.randperm(37, generator=torch.Generator().manual_seed(2))
        a, b = sorted_agg(feats, positions), sorted_agg(feats[perm], positions[perm])
    assert out.logits.shape == (3,) and out.attention.shape == (37,)
    assert float(out.attention.sum()) == pytest.approx(1.0, abs=1e-5) and float(out.attention.max()) > 3 / 37
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)  # sorted: the sampling order does not matter
    torch.testing.assert_close(a.attention[perm], b.attention, rtol=1e-5, atol=1e-6)


def test_gigapath_heatmap_is_the_class_tokens_affinity_from_the_card(tmp_path: Path) -> None:
    """The heatmap score: the class token's last-layer attention scores softmaxed over all tiles (head mean), not
    its dilated weights (those would draw the stride of the tile sequence)."""
    agg, state = _small(tmp_path)
    feats, positions = _tiles(37, 32, 30)
    with torch.no_grad():
        got = agg(feats, positions).attention
        # the card's last-layer attention row of token 0, from the same dense form
        s = {k: v.double() for k, v in state.items()}
        x = _card(state, feats, positions * 448.0, heads=8, segments=[4, 8, 64], ratios=[1, 2, 4], grid=64,
                  hidden=True)[1]
        p = "encoder.layers.1."
        h = _ln(x, s, p + "self_attn_layer_norm")
        q, k = (_lin(h, s, p + f"self_attn.{n}_proj").view(38, 8, 4).transpose(0, 1) for n in ("q", "k"))
        scores = q @ k.transpose(1, 2) / 2.0  # head width 4
        want = torch.softmax(scores[:, 0], dim=-1).mean(0)[1:]  # over every token, not the dilated sets
    torch.testing.assert_close(got.double(), want / want.sum(), rtol=1e-5, atol=1e-6)


def test_gigapath_slide_file_errors_name_the_key(tmp_path: Path) -> None:
    state = _card_state(32, 32, 2)
    del state["encoder.layers.1.self_attn.inner_attn_ln.weight"]
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": state}, path)
    missing = r"missing from the file \(encoder\.layers\.1\.self_attn\.inner_attn_ln\.weight\)"
    with pytest.raises(ModelError, match=missing):
        create_model("tinycnn", "gigapath-slide", 3, encoder_kwargs={"width": 8}, aggregator_kwargs=_SMALL,
                     aggregator_weights=path)
    with pytest.raises(ModelError, match="patch_embed.proj.weight' has shape"):  # 1536-d tile features expected
        create_model("tinycnn", "gigapath-slide", 3, encoder_kwargs={"width": 16}, aggregator_kwargs=_SMALL,
                     aggregator_weights=path)
    agg = create_model("tinycnn", "gigapath-slide", 2, encoder_kwargs={"width": 8},
                       aggregator_kwargs={**_SMALL, "slide_ngrids": 4}).aggregator
    with pytest.raises(ValueError, match="beyond GigaPath's 4 x 4 grid"):
        agg(*_tiles(5, 32, 40))


def _saved_bytes(agg, rows: int) -> int:
    """What autograd keeps for the backward of one forward over ``rows`` tiles (saved-tensor hooks)."""
    from fullslide.engine.memory import SavedTensorMeter

    side = int(rows**0.5) + 2
    cells = torch.randperm(side * side, generator=torch.Generator().manual_seed(rows))[:rows]
    positions = torch.stack([cells // side, cells % side], 1).float()
    meter = SavedTensorMeter()
    with meter:
        out = agg(torch.zeros(rows, 96, requires_grad=True), positions)  # held: its graph keeps what is saved
    held = meter.current_bytes
    del out
    return held


def test_gigapath_activation_model_matches_autograd_and_feeds_the_memory_plan() -> None:
    """``activation_bytes`` (what ``mode: auto`` and ``fullslide plan`` budget for the slide encoder) against the
    bytes autograd saves: every layer's graph, and checkpointed layers = their inputs + one layer re-run in the
    backward; the engine's probe takes the slide encoder's own model, which grows faster than its rows."""
    from fullslide.engine.budget import probe_encoder
    from fullslide.models.slide_encoders import GigaPathSlideEncoder

    small = dict(dim=64, heads=8, segment_length=[16, 64, 4096], dilated_ratio=[1, 2, 4], dropout=0.0)
    for kwargs in ({}, small):  # the card's 768-d, 16 heads, 5 branches; and a narrow one with segments < rows
        make = lambda depth, ck: GigaPathSlideEncoder(96, 2, depth=depth, checkpoint_layers=ck,  # noqa: E731
                                                      **{"dropout": 0.0, **kwargs}).train()
        two, one, checkpointed = make(2, False), make(1, False), make(2, True)
        for rows in (60, 400):
            kept = _saved_bytes(two, rows)
            assert 1.0 <= two.activation_bytes(rows) / kept <= 1.25, (kwargs, rows)
            rerun = kept - _saved_bytes(one, rows)  # one layer's graph
            truth = _saved_bytes(checkpointed, rows) + rerun
            assert 1.0 <= checkpointed.activation_bytes(rows) / truth <= 1.3, (kwargs, rows)
    model = create_model("tinycnn", "gigapath-slide", 2, encoder_kwargs={"width": 24}, aggregator_kwargs=small)
    probe = probe_encoder(model.encoder, torch.zeros(4, 3, 16, 16, dtype=torch.uint8), device=torch.device("cpu"),
                          amp_dtype=None, aggregator=model.aggregator)
    assert probe.aggregator_bytes(3000) == model.aggregator.activation_bytes(3000)
    assert probe.aggregator_bytes(3000) > 1.5 * 3000 * probe.aggregator_bytes_per_tile  # not linear in the rows
