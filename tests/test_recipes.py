"""Foundation-model recipes: each loads a file in its model card's layout through a YAML config and gives the
features the card's own pipeline gives. The expected pipeline is written here from the model cards (timm or
transformers directly, the card's mean/std and embedding): it imports nothing from fullslide.models.recipes.
Depth is reduced (random weights, no download); widths are the real ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from fullslide.errors import ModelError
from fullslide.models._timm_compat import import_timm
from fullslide.train.config import load_config
from fullslide.train.setup import build_model

timm = import_timm()
from timm.layers import SwiGLUPacked  # noqa: E402  (after the torchvision shim)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


def cls(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 0]


def cls_and_mean(first_patch: int):
    return lambda tokens: torch.cat([tokens[:, 0], tokens[:, first_patch:].mean(1)], dim=-1)


# name: (timm architecture, card kwargs, (mean, std), embedding, file name, key prefix in the file, input px)
CARDS = {
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
            IMAGENET, cls, "pytorch_model.bin", "", 224),
    "uni2-h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
               embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
               reg_tokens=8, dynamic_img_size=True), IMAGENET, cls, "pytorch_model.bin", "", 224),
    "conch": ("vit_base_patch16_224", dict(img_size=448), CLIP, cls, "pytorch_model.bin", "visual.trunk.", 448),
    "virchow": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, mlp_layer=SwiGLUPacked,
                act_layer=nn.SiLU, dynamic_img_size=True), IMAGENET, cls_and_mean(1), "pytorch_model.bin", "", 224),
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, mlp_layer=SwiGLUPacked,
                 act_layer=nn.SiLU, reg_tokens=4, dynamic_img_size=True), IMAGENET, cls_and_mean(5),
                 "pytorch_model.bin", "", 224),
    "prov-gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, patch_size=16, init_values=1e-5,
                      mlp_ratio=5.33334, embed_dim=1536, depth=40, num_heads=24), IMAGENET, cls,
                      "pytorch_model.bin", "", 224),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=False),
                    HOPTIMUS, cls, "model.safetensors", "", 224),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=False),
                    HOPTIMUS, cls, "model.safetensors", "", 224),
}
WIDTHS = {"uni": 1024, "uni2-h": 1536, "conch": 768, "virchow": 2560, "virchow2": 2560, "prov-gigapath": 1536,
          "h-optimus-0": 1536, "h-optimus-1": 1536}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _fullslide_encoder(tmp_path: Path, name: str, weights: Path, tile_px: int, kwargs: dict, **encoder):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"tile_px": tile_px},
                                      "encoder": {"name": name, "weights": str(weights), "kwargs": kwargs, **encoder}}))
    return build_model(load_config(config), 2).encoder.eval()


def _card_features(model: nn.Module, tiles: torch.Tensor, norm, embed) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    with torch.no_grad():
        return embed(model.forward_features((tiles.float() / 255 - mean) / std))


def _make_input_matter(model: nn.Module) -> nn.Module:
    """Random ViTs with LayerScale 1e-5 barely look at their input: open the residual branches and strengthen the
    patch embedding so that the features depend on the pixels (checked below)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif name == "patch_embed.proj.weight":
                p.mul_(20.0)
    return model


def _tiles(px: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, px, px), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("name", list(CARDS))
def test_recipe_features_equal_the_model_card_pipeline(name: str, tmp_path: Path) -> None:
    arch, kwargs, norm, embed, file_name, prefix, px = CARDS[name]
    torch.manual_seed(1)
    card = _make_input_matter(timm.create_model(arch, pretrained=False, num_classes=0, **{**kwargs, "depth": 1}))
    card.eval()
    state = {prefix + k: v for k, v in card.state_dict().items()}
    if name == "conch":  # the card's file holds the whole CoCa model: text tower and poolers are not the trunk
        state["text.token_embedding.weight"] = torch.randn(10, 4)
        state["visual.attn_pool_contrast.attn.in_proj_weight"] = torch.randn(12, 4)
    weights = _save(state, tmp_path / name / file_name)
    encoder = _fullslide_encoder(tmp_path, name, weights, px, {"depth": 1})
    tiles = _tiles(px)
    with torch.no_grad():
        ours = encoder(tiles)
    want = _card_features(card, tiles, norm, embed)
    assert ours.shape == (2, WIDTHS[name]) == want.shape
    assert torch.allclose(ours, want, rtol=1e-5, atol=1e-5), float((ours - want).abs().max())
    # the input matters: the two tiles differ, and another normalisation (timm's 0.5 default for some of these
    # architectures) gives other features, by far more than the tolerance
    assert float((want[0] - want[1]).abs().max()) > 1e-1
    other = _card_features(card, tiles, ((0.5,) * 3, (0.5,) * 3), embed)
    assert float((other - want).abs().max()) > 1e-2


def test_tiles_of_another_size_are_resized_to_a_fixed_size_model(tmp_path: Path) -> None:
    arch, kwargs, norm, embed, file_name, _, _ = CARDS["h-optimus-0"]
    torch.manual_seed(1)
    card = _make_input_matter(timm.create_model(arch, pretrained=False, num_classes=0, **{**kwargs, "depth": 1}))
    card.eval()
    weights = _save(card.state_dict(), tmp_path / file_name)
    encoder = _fullslide_encoder(tmp_path, "h-optimus-0", weights, 256, {"depth": 1})
    tiles = _tiles(256)
    with torch.no_grad():
        ours = encoder(tiles)
    resized = torch.nn.functional.interpolate(tiles.float(), size=(224, 224), mode="bilinear", antialias=True)
    assert torch.allclose(ours, _card_features(card, resized, norm, embed), rtol=1e-4, atol=1e-4)


def _uni_state(**overrides) -> dict[str, torch.Tensor]:
    arch, kwargs, *_ = CARDS["uni"]
    torch.manual_seed(2)
    return timm.create_model(arch, pretrained=False, num_classes=0, **{**kwargs, "depth": 1, **overrides}).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module.", "teacher.backbone.", "model.backbone.", "student"])
def test_wrapped_and_prefixed_files_load(tmp_path: Path, wrap: str) -> None:
    state = _uni_state()
    if wrap == "state_dict":
        payload = {"state_dict": state, "epoch": 3}
    elif wrap == "student":  # a DINO checkpoint: the teacher's copy is the one to load
        payload = {**{f"teacher.backbone.{k}": v for k, v in state.items()},
                   **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in state.items()},
                   "teacher.head.mlp.0.weight": torch.randn(3, 3)}
    elif wrap == "plain":
        payload = state
    else:
        payload = {wrap + k: v for k, v in state.items()}
    weights = _save(payload, tmp_path / "uni.pth")
    encoder = _fullslide_encoder(tmp_path, "uni", weights, 224, {"depth": 1})
    loaded = encoder.backbone.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_file_without_layerscale_is_refused_with_a_hint(tmp_path: Path) -> None:
    weights = _save(_uni_state(init_values=None), tmp_path / "uni_no_ls.bin")
    with pytest.raises(ModelError, match=r"uni_no_ls\.bin: \d+ encoder tensors missing from the file \(.*ls1\.gamma"):
        _fullslide_encoder(tmp_path, "uni", weights, 224, {"depth": 1})
    # and a model built without LayerScale refuses a file that has it, saying which argument fixes it
    weights = _save(_uni_state(), tmp_path / "uni.bin")
    with pytest.raises(ModelError, match="hint: the file has LayerScale tensors .* init_values"):
        _fullslide_encoder(tmp_path, "vit_large_patch16_224", weights, 224, {"depth": 1})
    # opting out loads what matches and warns
    encoder = _fullslide_encoder(tmp_path, "uni", tmp_path / "uni_no_ls.bin", 224, {"depth": 1}, strict=False)
    assert encoder.feature_dim == 1024


def test_a_missing_weights_file_says_fullslide_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="never downloads weights"):
        _fullslide_encoder(tmp_path, "uni", tmp_path / "nope.bin", 224, {"depth": 1})


def test_hf_hub_name_with_a_local_file_makes_no_network_call(tmp_path: Path, monkeypatch) -> None:
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network call")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    state = _uni_state()
    weights = _save(state, tmp_path / "snap" / "pytorch_model.bin")
    (tmp_path / "snap" / "config.json").write_text(
        '{"architecture": "vit_large_patch16_224", "model_args": {"img_size": 224, "init_values": 1e-5, "depth": 1}}')
    encoder = _fullslide_encoder(tmp_path, "hf-hub:MahmoodLab/UNI", weights, 224, {})
    assert torch.equal(encoder.backbone.state_dict()["blocks.0.ls1.gamma"], state["blocks.0.ls1.gamma"])
    (tmp_path / "snap" / "config.json").unlink()
    with pytest.raises(ModelError, match="makes no network call, so it needs the card's config.json"):
        _fullslide_encoder(tmp_path, "hf-hub:MahmoodLab/UNI", weights, 224, {})


# ---- transformers layouts (Phikon, Phikon-v2): compared with transformers' own forward ---------------------
def _v4_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers v5 key names -> the v4 names the model cards' files carry (written from the v4 layout)."""
    out = {}
    for k, v in state.items():
        k = k.replace("layers.", "encoder.layer.", 1) if k.startswith("layers.") else k
        for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense")):
            k = k.replace(new, old)
        if ".layernorm_before." in k or ".layernorm_after." in k:  # ViT v4 names its MLP intermediate/output
            pass
        k = k.replace("encoder.layer.", "encoder.layer.")
        out[k] = v
    if any(".layernorm_before." in k for k in out):  # ViT
        out = {k.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense."): v
               for k, v in out.items()}
    return out


@pytest.mark.parametrize("name", ["phikon", "phikon-v2"])
@pytest.mark.parametrize("names", ["v4", "v5"])
def test_transformers_layouts_equal_transformers_forward(name: str, names: str, tmp_path: Path) -> None:
    import transformers  # a test dependency (pyproject [test]); imported after the torchvision shim
    torch.manual_seed(3)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=224,
                  patch_size=16)
    if name == "phikon":
        hf = transformers.ViTModel(transformers.ViTConfig(layer_norm_eps=1e-12, **common))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=4, layerscale_value=0.5, **{
            k: v for k, v in common.items() if k != "intermediate_size"}))
    hf.eval()
    state = hf.state_dict()
    weights = _save(_v4_names(state) if names == "v4" else state, tmp_path / "pytorch_model.bin")
    encoder = _fullslide_encoder(tmp_path, name, weights, 224, {"embed_dim": 64, "depth": 2, "num_heads": 4})
    tiles = _tiles(224)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    with torch.no_grad():
        want = hf(pixel_values=(tiles.float() / 255 - mean) / std).last_hidden_state[:, 0]
        ours = encoder(tiles)
    assert float((want[0] - want[1]).abs().max()) > 1e-2  # the input matters
    assert torch.allclose(ours, want, rtol=1e-4, atol=1e-5), float((ours - want).abs().max())


def test_layer_classes_can_be_named_in_yaml_for_any_timm_model(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("encoder:\n  name: vit_huge_patch14_224\n  kwargs: {depth: 1, img_size: 28, embed_dim: 32,"
                      " num_heads: 2, mlp_layer: SwiGLUPacked, act_layer: SiLU}\ndata:\n  tile_px: 28\n")
    encoder = build_model(load_config(config), 2).encoder
    assert any(type(m).__name__ == "GluMlp" for m in encoder.modules())  # SwiGLUPacked is a GluMlp partial
    assert encoder(torch.zeros(1, 3, 28, 28, dtype=torch.uint8)).shape == (1, 32)
