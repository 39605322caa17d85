"""Encoders, aggregators and weight loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from fullslide.errors import ModelError
from fullslide.models import AGGREGATORS, create_aggregator, create_encoder, read_tensors


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregators_give_slide_logits_and_per_tile_scores(name: str) -> None:
    torch.manual_seed(0)
    small = {"gigapath-slide": {"dim": 32, "depth": 1}}  # Prov-GigaPath's is 768-d, 12 layers
    agg = create_aggregator(name, in_dim=12, n_classes=3, **small.get(name, {})).eval()
    feats = torch.randn(17, 12)
    grid = torch.stack([torch.arange(17) % 5, torch.arange(17) // 5], 1).float()  # distinct places on the slide
    spatial = getattr(agg, "uses_positions", False)  # needs where the tiles lie (then: sorts them)
    with torch.no_grad():
        out = agg(feats, grid) if spatial else agg(feats)
    assert out.logits.shape == (3,)
    assert out.attention.shape == (17,)
    if name in ("gma", "abmil", "transformer", "chief", "gigapath-slide"):
        assert torch.all(out.attention >= 0) and abs(float(out.attention.sum()) - 1) < 1e-5
    else:
        assert out.tile_logits is not None and out.tile_logits.shape == (17, 3)
    perm = torch.randperm(17)
    with torch.no_grad():
        shuffled = agg(feats[perm], grid[perm]) if spatial else agg(feats[perm])  # MIL pooling is permutation invariant
    assert torch.allclose(shuffled.logits, out.logits, atol=1e-5)
    assert torch.allclose(shuffled.attention, out.attention[perm], atol=1e-5)


def test_gma_matches_the_paper_shape() -> None:
    agg = create_aggregator("gma", in_dim=768, n_classes=2)
    shapes = {n: tuple(p.shape) for n, p in agg.named_parameters()}
    assert shapes["embed.0.weight"] == (512, 768) and shapes["embed.2.weight"] == (512, 512)
    assert shapes["attn_v.weight"] == (384, 512) and shapes["attn_u.weight"] == (384, 512)
    assert shapes["head.weight"] == (2, 512)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.25 for m in agg.modules())


def test_attention_concentrates_on_the_informative_tile_after_training() -> None:
    torch.manual_seed(0)
    agg = create_aggregator("gma", in_dim=4, n_classes=2, dropout=0.0)
    opt = torch.optim.Adam(agg.parameters(), lr=1e-3)
    for it in range(300):
        label = it % 2
        feats = torch.randn(50, 4)
        if label:
            feats[it % 50, :2] = 4.0  # one positive tile among 50 noisy ones: mean pooling cannot see it
        loss = torch.nn.functional.cross_entropy(agg(feats).logits[None], torch.tensor([label]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for trial in range(10):
        feats = torch.randn(50, 4)
        feats[trial, :2] = 4.0
        with torch.no_grad():
            out = agg(feats)
        assert int(out.attention.argmax()) == trial and int(out.logits.argmax()) == 1


def test_timm_encoder_by_name_with_feature_dim() -> None:
    enc = create_encoder("resnet18", tile_px=32)
    assert enc.feature_dim == 512
    with torch.no_grad():
        out = enc(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 512)


def test_vit_encoder_accepts_non_224_tiles() -> None:
    enc = create_encoder("vit_small_patch16_224", tile_px=32)
    with torch.no_grad():
        assert enc(torch.rand(1, 3, 32, 32)).shape == (1, 384)
    assert tuple(enc.mean.flatten().tolist()) == (0.5, 0.5, 0.5)  # normalisation from timm's config


def test_uint8_and_float_tiles_give_the_same_features() -> None:
    enc = create_encoder("tinycnn").eval()
    tiles = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(enc(tiles), enc(tiles.float() / 255), atol=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_weights_load_from_local_files(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    src = create_encoder("tinycnn")
    state = {f"module.{k}": v for k, v in src.backbone.state_dict().items()}  # DDP-style prefix
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    dst = create_encoder("tinycnn", weights=path)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v)


class _Evil:
    def __reduce__(self):  # would run code on unpickling
        return (print, ("pwned",))


def test_weights_never_unpickle_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Evil()}, fh, protocol=2)
    with pytest.raises(ModelError, match="evil.pth: cannot load weights safely"):
        read_tensors(path)
    # a training checkpoint with its arguments pickled beside the tensors: refused, with the one-time conversion
    import argparse

    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "ckpt.pth")
    with pytest.raises(ModelError, match=r"ckpt.pth: cannot load weights safely .*save its tensors once as "
                                         r"\.safetensors: .*ckpt\.safetensors") as caught:
        read_tensors(tmp_path / "ckpt.pth")
    assert "\x1b" not in str(caught.value)


def test_mismatched_and_missing_weights_are_clear_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError, match="none of its 1 tensors match"):
        create_encoder("tinycnn", weights=tmp_path / "w.safetensors")
    with pytest.raises(ModelError, match="weights file not found"):
        create_encoder("tinycnn", weights=tmp_path / "nope.pth")


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ModelError, match="unknown encoder 'resnet9000'"):
        create_encoder("resnet9000")
    with pytest.raises(ModelError, match="unknown aggregator 'attnmil'"):
        create_aggregator("attnmil", 4, 2)
    with pytest.raises(ModelError, match="cannot import module 'no_such_pkg.mod'"):
        create_encoder("no_such_pkg.mod:build")
