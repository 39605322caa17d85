"""Single-process engine tests: the three memory modes give the reference gradient, memory stays bounded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fullslide.engine import Bag, NonFiniteLossError, encode_tiles, infer, step
from fullslide.engine.aggregate import AGGREGATOR_CHUNK_TILES
from fullslide.engine.memory import SavedTensorMeter
from fullslide.models import create_model
from fullslide.models.encoders import TileEncoder
from fullslide.proof.checkgrad import max_rel_error
from fullslide.proof.probes import add_probes
from fullslide.proof.reference import reference_step

TOL = 1e-5


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Tolerances here are float32 rounding between two orders of the same sums; oneDNN picks its blocking by
    thread count (a conv-bias gradient moved 1.5e-5 between 1 and 2 threads), so pin one thread, as check-grad
    does, and CI's thread count cannot decide a test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(encoder: str = "tinycnn", aggregator: str = "gma", drop: float = 0.3, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(encoder, aggregator, 2, tile_px=16, drop_rate=drop, drop_path_rate=drop).train()


def _slides(ks: list[int], px: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (k, 3, px, px), generator=gen, dtype=torch.uint8) for k in ks]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _ref_grads(model, slides, y, chunk, seed=7, agg_chunk=AGGREGATOR_CHUNK_TILES) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    reference_step(model, slides, y, F.cross_entropy, chunk_tiles=chunk, aggregator_chunk_tiles=agg_chunk, step_seed=seed)
    out = _grads(model)
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode", ["full", "checkpoint", "recompute"])
@pytest.mark.parametrize("aggregator", ["gma", "abmil", "mean", "max", "transformer"])
def test_modes_match_reference_with_dropout_and_unequal_k(mode: str, aggregator: str) -> None:
    # With the probes: a parameter tied between encoder and aggregator, a frozen one, an unused one, drop-path.
    # The aggregator streams over chunks of 8 tiles, fewer than the 13 and 21 of two slides.
    model = add_probes(_model(aggregator=aggregator), drop_path_rate=0.3)
    slides, y = _slides([13, 5, 21]), torch.tensor([0, 1, 1])
    ref = _ref_grads(model, slides, y, chunk=4, agg_chunk=8)
    result = step(model, slides, y, F.cross_entropy, mode=mode, chunk_tiles=4, aggregator_chunk_tiles=8, step_seed=7)
    got = _grads(model)
    assert set(got) == set(ref)
    assert "aggregator.unused" not in got and "encoder.frozen" not in got and "encoder.shared" in got
    assert max_rel_error(got, ref, "encoder.") < TOL
    assert max_rel_error(got, ref, "aggregator.") < TOL
    assert result.logits.shape == (3, 2)
    assert [result.attention[i].shape[0] for i in range(3)] == [13, 5, 21]
    assert result.tiles_encoded == 39


def test_dropout_is_active_so_the_equality_is_not_trivial() -> None:
    model = _model(drop=0.5)
    slides, y = _slides([12]), torch.tensor([1])
    a = _ref_grads(model, slides, y, chunk=4, seed=1)
    b = _ref_grads(model, slides, y, chunk=4, seed=2)  # other seed -> other masks -> other gradient
    assert max_rel_error(a, b, "encoder.") > 1e-3
    step(model, slides, y, F.cross_entropy, chunk_tiles=4, step_seed=2)
    assert max_rel_error(_grads(model), b, "encoder.") < TOL


def test_user_factory_encoder_with_drop_path_and_bare_aggregator() -> None:
    torch.manual_seed(0)
    model = create_model("engine_factories:residual_droppath", "engine_factories:bare_logits", 2, tile_px=16).train()
    slides, y = _slides([10, 7]), torch.tensor([1, 0])
    ref = _ref_grads(model, slides, y, chunk=3)
    step(model, slides, y, F.cross_entropy, chunk_tiles=3, step_seed=7)
    assert max_rel_error(_grads(model), ref, "") < TOL


class _Metered(torch.nn.Module):
    """Counts the activations the wrapped backbone saves for backward, and how long they stay alive."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.meter = SavedTensorMeter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.meter:
            return self.inner(x)


def test_recompute_keeps_one_chunk_graph_alive() -> None:
    """Peak encoder activation bytes held for backward: recompute ~ one chunk, full ~ all chunks."""
    model = _model(drop=0.0)
    model.encoder.backbone = _Metered(model.encoder.backbone)
    chunk, n_chunks = 4, 8
    y = torch.tensor([1])

    def peak(mode: str, k: int) -> int:
        model.zero_grad(set_to_none=True)
        meter = model.encoder.backbone.meter = SavedTensorMeter()
        step(model, _slides([k]), y, F.cross_entropy, mode=mode, chunk_tiles=chunk)
        assert meter.current_bytes == 0  # every graph was freed by the end of the step
        return meter.peak_bytes

    one_chunk_graph = peak("full", chunk)
    assert peak("full", chunk * n_chunks) > 0.8 * n_chunks * one_chunk_graph  # the probe sees graphs grow
    assert peak("recompute", chunk * n_chunks) < 1.5 * one_chunk_graph
    assert peak("recompute", chunk * n_chunks) <= 1.05 * peak("recompute", chunk * 2)


def test_recompute_streams_the_attention_aggregator() -> None:
    """GMA's per-tile MLP activations (K x 512) are not kept for all tiles at once in recompute mode."""
    model = _model(drop=0.0)
    model.aggregator.embed = _Metered(model.aggregator.embed)
    y = torch.tensor([1])

    def peak(mode: str, k: int) -> int:
        model.zero_grad(set_to_none=True)
        meter = model.aggregator.embed.meter = SavedTensorMeter()
        step(model, _slides([k]), y, F.cross_entropy, mode=mode, chunk_tiles=256)
        assert meter.current_bytes == 0
        return meter.peak_bytes

    chunk = AGGREGATOR_CHUNK_TILES  # tile-stage chunk
    assert peak("full", 4 * chunk) > 3.5 * peak("full", chunk)
    assert peak("recompute", 4 * chunk) <= 1.05 * peak("recompute", chunk)


def test_existing_grads_are_accumulated_not_overwritten() -> None:
    model = _model(drop=0.0)
    slides, y = _slides([9, 6]), torch.tensor([0, 1])
    step(model, slides, y, F.cross_entropy, chunk_tiles=4)
    once = _grads(model)
    step(model, slides, y, F.cross_entropy, chunk_tiles=4)
    twice = _grads(model)
    assert max_rel_error(twice, {n: 2 * g for n, g in once.items()}, "") < TOL


def test_non_finite_loss_raises_and_leaves_grads_untouched() -> None:
    model = _model(drop=0.0)
    slides, y = _slides([6]), torch.tensor([1])
    step(model, slides, y, F.cross_entropy, chunk_tiles=4)
    before = _grads(model)
    with pytest.raises(NonFiniteLossError, match="nan"):
        step(model, slides, y, lambda z, t: F.cross_entropy(z, t) * float("nan"), chunk_tiles=4)
    assert max_rel_error(_grads(model), before, "") == 0.0


def test_precomputed_features_train_only_the_aggregator() -> None:
    model = _model(drop=0.0)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    slides, y = _slides([11, 4]), torch.tensor([1, 0])
    ref = _ref_grads(model, slides, y, chunk=4)
    feats = [encode_tiles(model.encoder, s, chunk_tiles=4) for s in slides]
    step(model, [Bag(index=i, features=f) for i, f in enumerate(feats)], y, F.cross_entropy, chunk_tiles=4, step_seed=7)
    got = _grads(model)
    assert not any(n.startswith("encoder.") for n in got)
    assert max_rel_error(got, ref, "aggregator.") < TOL


def test_wrong_share_size_is_a_clear_error() -> None:
    model = _model(drop=0.0)
    with pytest.raises(ValueError, match="k_total=10"):
        step(model, [Bag(index=0, tiles=_slides([7])[0], k_total=10)], torch.tensor([0]), F.cross_entropy)


def test_infer_streams_chunks_and_matches_one_shot() -> None:
    model = _model(drop=0.0).eval()
    tiles = _slides([23])[0]
    whole = infer(model, tiles, chunk_tiles=5, return_features=True)
    streamed = infer(model, iter(tiles.split(7)), chunk_tiles=5)
    with torch.no_grad():
        direct = model.aggregator(model.encoder(tiles))
    assert torch.allclose(whole.logits, direct.logits, atol=1e-5)
    assert torch.allclose(streamed.logits, whole.logits, atol=1e-5)
    assert whole.attention.shape == (23,) and abs(float(whole.attention.sum()) - 1) < 1e-5
    assert whole.features.shape == (23, model.feature_dim)


def test_batchnorm_is_frozen_by_default_and_warns_when_unfrozen() -> None:
    torch.manual_seed(0)
    model = create_model("engine_factories:with_batchnorm", "gma", 2, tile_px=16)
    model.train()
    bn = model.encoder.backbone.net[1]
    assert not bn.training and model.aggregator.training
    stats = bn.running_mean.clone()
    step(model, _slides([8]), torch.tensor([1]), F.cross_entropy, chunk_tiles=4)
    assert torch.equal(bn.running_mean, stats)  # frozen: running statistics untouched
    model.freeze_bn = False
    with pytest.warns(UserWarning, match="no longer exactly"):
        model.train()
    assert bn.training


def test_streamed_softmax_rescales_when_a_later_chunk_holds_the_highest_score() -> None:
    """The online softmax must rescale its running sums when the maximum moves to a later chunk."""
    model = _model(drop=0.0, seed=3).eval()  # no dropout: the scores below are the ones the step sees
    slides, y = _slides([40], seed=5), torch.tensor([1])
    with torch.no_grad():
        scores = model.aggregator.tile_stage(model.encoder(slides[0]))[1]
    assert int(scores.argmax()) >= 8 and float(scores[:8].max()) < float(scores.max()) - 1e-3  # the case under test
    ref = _ref_grads(model, slides, y, chunk=4, agg_chunk=8)
    result = step(model, slides, y, F.cross_entropy, mode="recompute", chunk_tiles=4, aggregator_chunk_tiles=8,
                  step_seed=7)
    assert max_rel_error(_grads(model), ref, "") < TOL
    assert torch.allclose(result.attention[0], torch.softmax(scores, 0), atol=1e-6)


def test_dropout_masks_differ_between_slides_of_a_step() -> None:
    """Two identical slides in one step draw different dropout masks (the seed depends on the slide)."""
    model = _model(drop=0.5)
    tiles = _slides([12])[0]
    result = step(model, [tiles, tiles.clone()], torch.tensor([0, 0]), F.cross_entropy, chunk_tiles=4, step_seed=3)
    assert not torch.allclose(result.attention[0], result.attention[1])
    assert not torch.allclose(result.logits[0], result.logits[1])


@pytest.mark.parametrize("aggregator", ["gma", "abmil", "mean", "max", "transformer"])
def test_attention_is_the_same_in_every_mode(aggregator: str) -> None:
    model = _model(aggregator=aggregator, drop=0.2)
    slides, y = _slides([13, 21]), torch.tensor([0, 1])
    att = {mode: step(model, slides, y, F.cross_entropy, mode=mode, chunk_tiles=4, aggregator_chunk_tiles=8,
                      step_seed=1).attention for mode in ("full", "checkpoint", "recompute")}
    for mode in ("checkpoint", "recompute"):
        for i in (0, 1):
            assert torch.allclose(att[mode][i], att["full"][i], atol=1e-5), (mode, i)


def test_precomputed_features_of_the_caller_are_left_untouched() -> None:
    model = _model(drop=0.0)
    feats = [torch.randn(9, model.feature_dim), torch.randn(4, model.feature_dim)]
    step(model, [Bag(index=i, features=f) for i, f in enumerate(feats)], torch.tensor([1, 0]), F.cross_entropy)
    assert all(not f.requires_grad and f.grad is None for f in feats)


class _TupleBackbone(torch.nn.Module):
    """Returns (tokens [N, T, D], extras) like several transformer backbones."""

    def __init__(self, tokens: int = 5, dim: int = 6) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, dim)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = x.float().mean((2, 3))  # [N, 3]
        steps = torch.arange(1, self.tokens + 1, dtype=x.dtype)[None, :, None]  # tokens differ from each other
        return self.proj(pooled)[:, None, :] * steps, pooled


def test_tile_encoder_pools_tokens_over_tokens_and_takes_the_first_of_a_tuple() -> None:
    enc = TileEncoder(_TupleBackbone(), feature_dim=6, mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.rand(4, 3, 8, 8)
    want = enc.backbone.proj(x.mean((2, 3))) * 3.0  # mean over tokens of t * v, t = 1..5
    assert torch.allclose(enc(x), want, atol=1e-5)
    nhwc = TileEncoder(torch.nn.Identity(), feature_dim=3, mean=(0, 0, 0), std=(1, 1, 1))
    assert nhwc(torch.rand(2, 3, 5, 5)).shape == (2, 3)  # NCHW map with D channels


def test_engine_names_an_encoder_output_it_cannot_use() -> None:
    model = _model(drop=0.0)
    model.encoder = _TupleBackbone()
    model.encoder.feature_dim = 6
    with pytest.raises(TypeError, match="encoder returned tuple for 6 tiles"):
        step(model, _slides([6]), torch.tensor([1]), F.cross_entropy, chunk_tiles=8)


def _auto_budgets(model, slides, y, chunk: int, agg_chunk: int) -> dict[str, int]:
    """Budgets at which auto keeps every chunk, none, and about half (from the plan's own predictions)."""
    model.zero_grad(set_to_none=True)
    everything = step(model, slides, y, F.cross_entropy, mode="auto", memory_budget=10**12, chunk_tiles=chunk,
                      aggregator_chunk_tiles=agg_chunk, step_seed=7).plan
    nothing = step(model, slides, y, F.cross_entropy, mode="auto", memory_budget=1, chunk_tiles=chunk,
                   aggregator_chunk_tiles=agg_chunk, step_seed=7).plan
    model.zero_grad(set_to_none=True)
    assert nothing.kept_chunks == 0 and everything.recomputed_chunks == 0
    return {"all fit": everything.predicted_peak_bytes, "none fit": 1,
            "half fit": (everything.predicted_peak_bytes + nothing.predicted_peak_bytes) // 2}


@pytest.mark.parametrize("aggregator", ["gma", "mean", "transformer"])
def test_auto_matches_reference_whatever_it_keeps(aggregator: str) -> None:
    model = add_probes(_model(aggregator=aggregator), drop_path_rate=0.3)
    slides, y = _slides([13, 5, 21]), torch.tensor([0, 1, 1])
    ref = _ref_grads(model, slides, y, chunk=4, agg_chunk=8)
    kept = {}
    for name, budget in _auto_budgets(model, slides, y, 4, 8).items():
        model.zero_grad(set_to_none=True)
        result = step(model, slides, y, F.cross_entropy, mode="auto", memory_budget=budget, chunk_tiles=4,
                      aggregator_chunk_tiles=8, step_seed=7)
        got = _grads(model)
        assert set(got) == set(ref), name
        assert max_rel_error(got, ref, "encoder.") < TOL, name
        assert max_rel_error(got, ref, "aggregator.") < TOL, name
        kept[name] = (result.plan.kept_chunks, result.plan.recomputed_chunks)
    assert kept["all fit"] == (12, 0) and kept["none fit"] == (0, 12)
    assert 0 < kept["half fit"][0] < 12  # a real split: some graphs kept, some chunks recomputed


def test_auto_peak_is_predicted_and_within_the_budget() -> None:
    """The activations autograd holds during an auto step (an outer saved-tensor meter) are what the plan
    predicted (within 15%) and stay within the budget; the probe leaves no trace on the step."""
    model = _model(drop=0.0)
    slides, y = _slides([40, 24]), torch.tensor([0, 1])
    peaks = {}
    for name, budget in _auto_budgets(model, slides, y, 4, 16).items():
        model.zero_grad(set_to_none=True)
        with SavedTensorMeter() as meter:
            result = step(model, slides, y, F.cross_entropy, mode="auto", memory_budget=budget, chunk_tiles=4,
                          aggregator_chunk_tiles=16, step_seed=7)
        predicted = result.plan.predicted_activation_bytes
        assert abs(meter.peak_bytes - predicted) <= 0.15 * predicted, (name, meter.peak_bytes, predicted)
        if name != "none fit":
            assert meter.peak_bytes <= 1.10 * budget, name
        peaks[name] = meter.peak_bytes
    with SavedTensorMeter() as full:
        step(model, slides, y, F.cross_entropy, mode="full", chunk_tiles=4, step_seed=7)
    with SavedTensorMeter() as recompute:
        step(model, slides, y, F.cross_entropy, mode="recompute", chunk_tiles=4, aggregator_chunk_tiles=16, step_seed=7)
    assert peaks["all fit"] == full.peak_bytes and peaks["none fit"] == recompute.peak_bytes
    assert recompute.peak_bytes < 0.8 * peaks["half fit"] < 0.8 * full.peak_bytes


def test_auto_probe_changes_no_draw_and_no_buffer() -> None:
    """The probe's forward runs under a forked RNG and restores buffers: dropout draws and BatchNorm
    statistics are what they would have been without it."""
    torch.manual_seed(0)
    model = create_model("resnet18", "gma", 2, tile_px=16, freeze_bn=False, drop_rate=0.5).train()  # draws
    slides, y = _slides([9]), torch.tensor([1])
    bn = dict(model.encoder.named_buffers())
    before = {k: v.clone() for k, v in bn.items()}
    state = torch.get_rng_state()
    from fullslide.engine.budget import probe_encoder

    probe_encoder(model.encoder, slides[0], device=torch.device("cpu"), amp_dtype=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in bn.items())
