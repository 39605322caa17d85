"""Aggregators that see where each tile lies, and a slide encoder trained with the tile encoder.

The engine's exactness with positions (streamed and whole-slide, context rows on the grid, every mode and layout)
is in the check-grad suite (``positions-gma``, ``alibi``, ``chief``: tests/test_engine_controls.py). Here: the
tiles' positions that training and inference hand the aggregator are the tiles' places on the slide, ALiBi's bias
is the published formula, and CHIEF's released layout loads strictly and gives the card's slide embedding.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fullslide.errors import ModelError
from fullslide.models import create_model
from fullslide.models.aggregators import alibi_2d


def test_alibi_bias_is_minus_slope_times_euclidean_distance() -> None:
    positions = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    bias = alibi_2d(positions, heads=4)
    assert bias.shape == (4, 4, 4) and torch.all(bias[:, 0] == 0) and torch.all(bias[:, :, 0] == 0)
    for h in range(4):
        slope = 2.0 ** (-8.0 * (h + 1) / 4)  # Press et al. 2022: 2^(-8/n), 2^(-16/n), ...
        assert bias[h, 1, 2] == pytest.approx(-slope * 5.0) and bias[h, 1, 3] == pytest.approx(-slope * 1.0)
        assert bias[h, 2, 3] == pytest.approx(-slope * math.hypot(2.0, 4.0))


def test_spatial_aggregators_depend_on_the_positions_and_refuse_to_run_without() -> None:
    torch.manual_seed(0)
    feats = torch.randn(12, 16)
    grid = torch.stack([torch.arange(12) % 4, torch.arange(12) // 4], 1).float()
    for name, kwargs in (("transformer", {"alibi": True}), ("gma", {"positional": True})):
        agg = create_model("tinycnn", name, 2, aggregator_kwargs=kwargs, encoder_kwargs={"width": 4}).aggregator.eval()
        with torch.no_grad():
            shuffled = grid[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
            a, b = agg(feats, grid).logits, agg(feats, shuffled).logits  # the same tiles, placed elsewhere
        assert float((a - b).abs().max()) > 1e-4, name  # moving the tiles changes the prediction
        with pytest.raises(ValueError, match="needs the tiles' positions"):
            from fullslide.models.aggregators import run_aggregator

            run_aggregator(agg, feats)


# ---- CHIEF: the released file's layout, written here from CHIEF's published model --------------------------
class _CardGated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(512, 256), nn.Tanh(), nn.Dropout(0.25))
        self.attention_b = nn.Sequential(nn.Linear(512, 256), nn.Sigmoid(), nn.Dropout(0.25))
        self.attention_c = nn.Linear(256, 1)


def _chief_card() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """CHIEF as its repository builds it (size 'small': 768 -> 512 -> 256), with the pretraining heads and the
    text parts its file carries besides the slide encoder."""
    torch.manual_seed(3)
    card = nn.Module()
    card.attention_net = nn.Sequential(nn.Linear(768, 512), nn.ReLU(), nn.Dropout(0.25), _CardGated())
    card.classifiers = nn.Linear(512, 2)
    card.instance_classifiers = nn.ModuleList([nn.Linear(512, 2) for _ in range(2)])
    card.att_head = nn.Module()
    card.att_head.fc1, card.att_head.fc2 = nn.Linear(512, 256), nn.Linear(256, 1)
    card.text_to_vision = nn.Sequential(nn.Linear(768, 512), nn.ReLU(), nn.Dropout(0.25))
    state = dict(card.state_dict())
    state["organ_embedding"] = torch.randn(19, 768)
    return card.eval(), state


def _card_embedding(card: nn.Module, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The card's forward: h = fc(features); A = attention_c(tanh(a(h)) * sigmoid(b(h))); softmax over tiles;
    ``WSI_feature`` = A @ features, and the transformed one A @ h."""
    net = card.attention_net
    h = net[2](net[1](net[0](feats)))
    gated = net[3]
    a = gated.attention_c(gated.attention_a(h) * gated.attention_b(h)).t()  # [1, K]
    w = torch.softmax(a, dim=1)
    return (w @ feats)[0], (w @ h)[0]


def test_chief_loads_its_released_file_strictly_and_gives_the_cards_slide_embedding(tmp_path: Path) -> None:
    card, state = _chief_card()
    weights = tmp_path / "CHIEF_pretraining.pth"
    torch.save(state, weights)
    model = create_model("tinycnn", "chief", 3, encoder_kwargs={"width": 192}, aggregator_weights=weights)
    agg = model.aggregator.eval()
    feats = torch.randn(37, 768, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want_raw, want_h = _card_embedding(card, feats)
        h, a = agg.tile_stage(feats)
        ours_h = torch.softmax(a, 0) @ h
        ours_raw = agg.slide_embedding(feats)
        logits = agg(feats).logits
    torch.testing.assert_close(ours_raw, want_raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_h, want_h, rtol=1e-5, atol=1e-5)
    assert logits.shape == (3,)  # a new head for the task: CHIEF's 2-class `classifiers` is not it
    assert float(want_raw.std()) > 0.1  # the attention is not uniform noise: the features matter
    del state["attention_net.3.attention_c.weight"]
    torch.save(state, weights)
    with pytest.raises(ModelError, match=r"missing from the file \(attention_net\.3\.attention_c\.weight\)"):
        create_model("tinycnn", "chief", 3, encoder_kwargs={"width": 192}, aggregator_weights=weights)


# ---- the pipeline hands the aggregator the tiles' true places ------------------------------------------------
def test_training_and_prediction_give_each_tile_its_place_on_the_slide(split_cohort: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every position the ALiBi transformer receives is a tile's level-0 origin divided by the tile's level-0
    side, and the positions of one call are those of the slide whose features they come with: with K = 8 sampled
    tiles plus the cached rows of the other tiles (``train.context: cache``) each call holds every tile of one
    slide once, and over the epoch each training and validation slide is seen once. At prediction: every tile, in the coordinates' order."""
    from collections import Counter

    from fullslide.slides import read_coords
    from fullslide.train.config import config_from_dict
    from fullslide.train.evaluate import predict_new
    from fullslide.train.trainer import Trainer

    config = config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "data": {"cohort": str(split_cohort), "target_mpp": 2.0, "tile_px": 32, "split_method": "column"},
        "encoder": {"name": "tinycnn"}, "aggregator": {"name": "transformer", "kwargs": {"alibi": True}},
        "train": {"epochs": 1, "tiles_per_slide": 8, "slides_per_step": 1, "loader_workers": 0, "mode": "recompute",
                  "context": "cache", "chunk_tiles": 4},
        "eval": {"bootstrap": 0},
    })
    trainer = Trainer(config, progress=False)
    seen: list[tuple[int, torch.Tensor]] = []
    original = trainer._setup

    def setup() -> None:
        original()
        trainer.model.aggregator.register_forward_pre_hook(
            lambda m, args: seen.append((int(args[0].shape[0]), args[1].detach().cpu().clone())))

    trainer._setup = setup
    run = trainer.run()
    grids = {}
    for s in trainer.data.split_sources("train") + trainer.data.split_sources("val"):
        coords, geometry = read_coords(s.coords_h5)
        grids[s.slide_id] = [tuple(xy) for xy in (coords / geometry.level0_px).tolist()]
    owners = []
    for k, pos in seen:
        assert pos.shape == (k, 2) and torch.equal(pos, pos.round())  # grid units: whole tiles apart
        cells = sorted(tuple(p) for p in pos.tolist())
        match = [sid for sid, grid in grids.items() if cells == sorted(grid)]
        assert len(match) == 1, "a call's positions are not exactly one slide's tiles"
        owners.append(match[0])
    assert Counter(owners) == Counter(list(grids)), owners  # each slide once, with its own positions
    # prediction (a model loaded from the checkpoint): every tile of the slide, in the coordinates file's order
    from fullslide.models.aggregators import TransformerMIL

    seen.clear()
    forward = TransformerMIL.forward

    def recording(self, feats, positions=None):
        seen.append((int(feats.shape[0]), positions.detach().cpu().clone()))
        return forward(self, feats, positions)

    monkeypatch.setattr(TransformerMIL, "forward", recording)
    slide = Path(next(csv.DictReader(open(split_cohort)))["path"])
    predict_new(run, [slide], tmp_path / "pred")
    coords, geometry = read_coords(tmp_path / "pred" / "tiles" / "patches" / f"{slide.stem}.h5")
    (k, pos), = [(k, p) for k, p in seen if k == len(coords)]
    assert torch.equal(pos, torch.from_numpy(np.asarray(coords / geometry.level0_px, dtype=np.float32)))
