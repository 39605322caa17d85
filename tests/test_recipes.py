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

from torchvision import transforms as T  # noqa: E402  (the card transforms, as the cards write them)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HALF = ((0.5,) * 3, (0.5,) * 3)
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
BICUBIC, BILINEAR = T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR


def cls(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 0]


def cls_and_mean(first_patch: int):
    return lambda tokens: torch.cat([tokens[:, 0], tokens[:, first_patch:].mean(1)], dim=-1)


def resize(px: int, kernel=BILINEAR, crop: int | None = None) -> list:
    """The card's ``Resize(px)`` (+ ``CenterCrop(crop)``) on tensors, antialiased as on PIL images."""
    return [T.Resize(px, interpolation=kernel, antialias=True)] + ([T.CenterCrop(crop)] if crop else [])


# name: (timm architecture, card kwargs, (mean, std), embedding, file name, key prefix in the file, card input px,
#        the card's resize/crop). Written from the model cards (and TRIDENT's transforms where cards defer to it).
CARDS = {
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
            IMAGENET, cls, "pytorch_model.bin", "", 224, resize(224, crop=224)),
    "uni2-h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
               embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
               reg_tokens=8, dynamic_img_size=True), IMAGENET, cls, "pytorch_model.bin", "", 224,
               resize(224, crop=224)),
    "virchow": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, mlp_layer=SwiGLUPacked,
                act_layer=nn.SiLU, dynamic_img_size=True), IMAGENET, cls_and_mean(1), "pytorch_model.bin", "", 224,
                resize(224, BICUBIC)),
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, mlp_layer=SwiGLUPacked,
                 act_layer=nn.SiLU, reg_tokens=4, dynamic_img_size=True), IMAGENET, cls_and_mean(5),
                 "pytorch_model.bin", "", 224, resize(224, BICUBIC)),
    "prov-gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, patch_size=16, init_values=1e-5,
                      mlp_ratio=5.33334, embed_dim=1536, depth=40, num_heads=24), IMAGENET, cls,
                      "pytorch_model.bin", "", 224, resize(256, BICUBIC, crop=224)),
    "gigapath-flash": (None, dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                       mlp_ratio=2048 / 384.0, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, init_values=1e-5,
                       class_token=True, reg_tokens=0, dynamic_img_size=True), IMAGENET, cls, "pytorch_model.bin",
                       "", 224, resize(256, BICUBIC, crop=224)),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=False),
                    HOPTIMUS, cls, "model.safetensors", "", 224, resize(224)),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=False),
                    HOPTIMUS, cls, "model.safetensors", "", 224, resize(224)),
    "digepath": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
                 IMAGENET, cls, "model.safetensors", "", 224, resize(224)),
    "kaiko-vits16": ("vit_small_patch16_224", dict(img_size=224, dynamic_img_size=True), HALF, cls,
                     "model.safetensors", "", 224, resize((224, 224), crop=224)),
    "kaiko-vits8": ("vit_small_patch8_224", dict(img_size=224, dynamic_img_size=True), HALF, cls,
                    "model.safetensors", "", 224, resize((224, 224), crop=224)),
    "kaiko-vitb16": ("vit_base_patch16_224", dict(img_size=224, dynamic_img_size=True), HALF, cls,
                     "model.safetensors", "", 224, resize((224, 224), crop=224)),
    "kaiko-vitb8": ("vit_base_patch8_224", dict(img_size=224, dynamic_img_size=True), HALF, cls,
                    "model.safetensors", "", 224, resize((224, 224), crop=224)),
    "kaiko-vitl14": ("vit_large_patch14_reg4_dinov2", dict(img_size=518, dynamic_img_size=True), HALF, cls,
                     "model.safetensors", "", 224, resize((224, 224), crop=224)),
    "lunit-vits8": ("vit_small_patch8_224", dict(img_size=224, dynamic_img_size=True), LUNIT, cls,
                    "model.safetensors", "", 224, resize(224, BICUBIC)),
    "gpfm": ("vit_large_patch14_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=True), IMAGENET, cls,
             "GPFM.pth", "", 224, resize((224, 224), BICUBIC)),
}
WIDTHS = {"uni": 1024, "uni2-h": 1536, "virchow": 2560, "virchow2": 2560, "prov-gigapath": 1536, "gigapath-flash": 384,
          "h-optimus-0": 1536, "h-optimus-1": 1536, "digepath": 1024, "kaiko-vits16": 384, "kaiko-vits8": 384,
          "kaiko-vitb16": 768, "kaiko-vitb8": 768, "kaiko-vitl14": 1024, "lunit-vits8": 384, "gpfm": 1024}


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


def _card_input(tiles: torch.Tensor, norm, steps: list) -> torch.Tensor:
    """ToTensor -> the card's Resize/CenterCrop -> Normalize, on a batch."""
    x = tiles.float() / 255
    for step in steps:
        x = step(x)
    return T.Normalize(*norm)(x)


def _card_features(model: nn.Module, tiles: torch.Tensor, norm, embed, steps: list | None = None) -> torch.Tensor:
    with torch.no_grad():
        return embed(model.forward_features(_card_input(tiles, norm, steps or [])))


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
    """Smooth random tiles (a resize of them is a meaningful test of the kernel) with noise on top."""
    g = torch.Generator().manual_seed(px)
    coarse = torch.rand((n, 3, 9, 9), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(px, px), mode="bicubic", align_corners=False)
    noise = torch.rand((n, 3, px, px), generator=g) * 0.25
    return ((smooth * 0.75 + noise).clamp(0, 1) * 255).round().to(torch.uint8)


def _card_network(name: str) -> nn.Module:
    arch, kwargs = CARDS[name][0], {**CARDS[name][1], "depth": 1}
    if arch is None:  # Prov-GigaPath-flash: the VisionTransformer class with the card's arguments
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(num_classes=0, global_pool="token", **kwargs)
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


@pytest.mark.parametrize("name", list(CARDS))
def test_recipe_features_equal_the_model_card_pipeline(name: str, tmp_path: Path) -> None:
    """At the card's input size and at another tile size (resized as the card's transform does)."""
    _, _, norm, embed, file_name, prefix, px, steps = CARDS[name]
    torch.manual_seed(1)
    card = _make_input_matter(_card_network(name)).eval()
    weights = _save({prefix + k: v for k, v in card.state_dict().items()}, tmp_path / name / file_name)
    encoder = _fullslide_encoder(tmp_path, name, weights, px, {"depth": 1})  # takes tiles of any size
    for tile_px in (px, px + 32):
        tiles = _tiles(tile_px)
        with torch.no_grad():
            ours = encoder(tiles)
        want = _card_features(card, tiles, norm, embed, steps)
        assert ours.shape == (2, WIDTHS[name]) == want.shape
        assert torch.allclose(ours, want, rtol=1e-4, atol=1e-4), (tile_px, float((ours - want).abs().max()))
        # the input matters: the two tiles differ, and another normalisation (timm's 0.5 default for some of
        # these architectures) gives other features, by far more than the tolerance
        assert float((want[0] - want[1]).abs().max()) > 1e-1
        other = _card_features(card, tiles, ((0.45,) * 3, (0.3,) * 3), embed, steps)
        assert float((other - want).abs().max()) > 1e-2
    # and the card's resize matters at the other size: a plain bilinear squash to the input gives other features
    squashed = _card_features(card, tiles, norm, embed, [T.Resize((px, px), antialias=True)])
    first = steps[0]
    if first.interpolation == BICUBIC or first.size not in ([px], (px, px), [px, px], px):
        assert float((squashed - want).abs().max()) > 1e-3, "the card's resize is not what this test checks"


def _conch_card(tmp_path: Path) -> tuple[nn.Module, nn.Module, nn.Module, Path]:
    """CONCH as the card builds its image embedding (written here from the CONCH repository's vision tower):
    trunk tokens -> LayerNorm (ln_k); one learned query -> LayerNorm (ln_q); sequence-first multi-head attention
    (8 heads, 512-d, keys/values 768-d); the single query's output -> ln_contrast. The file holds the whole
    CoCa model: trunk, both poolers, the projection and the text tower."""
    torch.manual_seed(4)
    trunk = _make_input_matter(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                                 global_pool="", img_size=448, depth=1)).eval()
    pool = nn.Module()
    pool.query = nn.Parameter(torch.randn(1, 512))
    pool.attn = nn.MultiheadAttention(512, 8, kdim=768, vdim=768)
    pool.ln_q, pool.ln_k = nn.LayerNorm(512), nn.LayerNorm(768)
    ln_contrast = nn.LayerNorm(512)
    with torch.no_grad():
        for p in list(pool.parameters()) + list(ln_contrast.parameters()):
            p.add_(torch.randn_like(p) * 0.5)
    state = {**{f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()},
             **{f"visual.attn_pool_contrast.{k}": v for k, v in pool.state_dict().items()},
             **{f"visual.ln_contrast.{k}": v for k, v in ln_contrast.state_dict().items()},
             "visual.proj_contrast": torch.randn(512, 512), "visual.attn_pool_caption.query": torch.randn(4, 768),
             "visual.ln_caption.weight": torch.ones(768), "text.token_embedding.weight": torch.randn(10, 4),
             "logit_scale": torch.tensor(1.0)}
    return trunk, pool, ln_contrast, _save(state, tmp_path / "conch" / "pytorch_model.bin")


def test_conch_gives_the_cards_512_d_image_embedding(tmp_path: Path) -> None:
    trunk, pool, ln_contrast, weights = _conch_card(tmp_path)
    for tile_px in (448, 512):
        encoder = _fullslide_encoder(tmp_path, "conch", weights, tile_px, {"depth": 1})
        tiles = _tiles(tile_px)
        with torch.no_grad():
            tokens = trunk(_card_input(tiles, CLIP, resize(448, BICUBIC, crop=448)))  # [N, T, 768]
            keys = pool.ln_k(tokens).permute(1, 0, 2)
            query = pool.ln_q(pool.query).unsqueeze(1).expand(-1, tokens.shape[0], -1)
            want = ln_contrast(pool.attn(query, keys, keys, need_weights=False)[0].permute(1, 0, 2)[:, 0])
            ours = encoder(tiles)
        assert ours.shape == (2, 512) and float((want[0] - want[1]).abs().max()) > 1e-1
        assert torch.allclose(ours, want, rtol=1e-4, atol=1e-4), (tile_px, float((ours - want).abs().max()))


def _conch_v15_card(tmp_path: Path):
    """CONCH v1.5's vision tower as the card builds it (written here from TRIDENT's ``conchv1_5.py``, its facts):
    a ViT-L/16 with LayerScale for 224 px whose file position embedding (here a 28 x 28 grid) is resampled
    bilinearly to 14 x 14 at load; at 448 px the patch part is interpolated bicubic with scale (28 + 0.1) / 14;
    trunk norm; one query -> ln_q -> to_q, tokens -> ln_k -> to_kv, 8 heads, to_out, ln_contrast."""
    torch.manual_seed(6)
    trunk = _make_input_matter(timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0,
                                                 global_pool="", img_size=224, init_values=1.0, depth=1)).eval()
    pool = nn.ModuleDict({"ln_q": nn.LayerNorm(768), "ln_k": nn.LayerNorm(1024),
                          "to_q": nn.Linear(768, 768, bias=False), "to_kv": nn.Linear(1024, 1536, bias=False),
                          "to_out": nn.Linear(768, 768, bias=False)})
    query, ln_contrast = nn.Parameter(torch.randn(1, 768)), nn.LayerNorm(768)
    with torch.no_grad():
        for p in list(pool.parameters()) + list(ln_contrast.parameters()):
            p.add_(torch.randn_like(p) * 0.3)
    file_pos = torch.randn(1, 1 + 28 * 28, 1024)  # the file's own grid
    with torch.no_grad():  # the card's load: bilinear, no antialias, to the 14 x 14 grid it builds
        grid = nn.functional.interpolate(file_pos[:, 1:].reshape(1, 28, 28, 1024).permute(0, 3, 1, 2), size=(14, 14),
                                         mode="bilinear", antialias=False)
        trunk.pos_embed.copy_(torch.cat([file_pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 196, 1024)], 1))
    state = {**{f"trunk.{k}": v for k, v in trunk.state_dict().items()}, "trunk.pos_embed": file_pos,
             **{f"attn_pool_contrast.{k}": v for k, v in pool.state_dict().items()},
             "attn_pool_contrast.query": query.detach(),
             **{f"ln_contrast.{k}": v for k, v in ln_contrast.state_dict().items()}}

    def card(x: torch.Tensor) -> torch.Tensor:
        b, _, w, h = x.shape
        t = torch.cat([trunk.cls_token.expand(b, -1, -1), trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1)
        pos = trunk.pos_embed
        patch = nn.functional.interpolate(pos[:, 1:].reshape(1, 14, 14, 1024).permute(0, 3, 1, 2), mode="bicubic",
                                          scale_factor=((w // 16 + 0.1) / 14, (h // 16 + 0.1) / 14))
        t = t + torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, 1024)], 1)
        for block in trunk.blocks:
            t = block(t)
        kv = pool["to_kv"](pool["ln_k"](trunk.norm(t)))
        q = pool["to_q"](pool["ln_q"](query))  # [1, 768]
        heads = lambda z: z.reshape(*z.shape[:-1], 8, 96).transpose(-2, -3)  # noqa: E731
        k, v = heads(kv[..., :768]), heads(kv[..., 768:])  # [B, 8, T, 96]
        attn = torch.softmax((heads(q)[None] * 96**-0.5) @ k.transpose(-1, -2), dim=-1)  # [B, 8, 1, T]
        out = pool["to_out"]((attn @ v).transpose(1, 2).reshape(b, 1, 768))[:, 0]
        return ln_contrast(out)

    return card, _save(state, tmp_path / "conchv1_5" / "pytorch_model_vision.bin")


def test_conch_v15_gives_the_cards_768_d_embedding(tmp_path: Path) -> None:
    card, weights = _conch_v15_card(tmp_path)
    for tile_px in (448, 512):  # TITAN's 512-px tiles are resized to 448
        encoder = _fullslide_encoder(tmp_path, "conch-v1.5", weights, tile_px, {"depth": 1})
        tiles = _tiles(tile_px)
        with torch.no_grad():
            want = card(_card_input(tiles, IMAGENET, resize(448, BILINEAR, crop=448)))
            ours = encoder(tiles)
        assert ours.shape == (2, 768) and float((want[0] - want[1]).abs().max()) > 1e-1
        assert torch.allclose(ours, want, rtol=1e-4, atol=1e-4), (tile_px, float((ours - want).abs().max()))


def test_h0_mini_is_built_from_its_hub_config_as_the_card_does(tmp_path: Path) -> None:
    """H0-mini's card: ``timm.create_model("hf-hub:bioptimus/H0-mini", mlp_layer=SwiGLUPacked, act_layer=SiLU)`` and
    ``create_transform(**resolve_data_config(model.pretrained_cfg, model=model))``, class token. Here the hub config
    is written with a crop_pct below 1 and a mean/std of its own (not the record's), so the resize, the crop and
    the normalisation that fullslide takes from it are checked; the card's transform is timm's own (on tensors)."""
    import json

    from timm.data import create_transform, resolve_data_config

    config = {"architecture": "vit_base_patch14_reg4_dinov2",
              "model_args": {"img_size": 224, "num_classes": 0, "global_pool": "", "mlp_ratio": 3.0},
              "pretrained_cfg": {"mean": [0.6, 0.5, 0.65], "std": [0.25, 0.2, 0.15], "interpolation": "bicubic",
                                 "crop_pct": 0.875, "crop_mode": "center", "input_size": [3, 224, 224]}}
    torch.manual_seed(7)
    args = {k: v for k, v in config["model_args"].items() if k != "num_classes"}
    card = _make_input_matter(timm.create_model(config["architecture"], pretrained=False, num_classes=0, depth=1,
                                                mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, **args)).eval()
    card.pretrained_cfg = {**card.pretrained_cfg, **config["pretrained_cfg"]}
    steps = [t for t in create_transform(**resolve_data_config(card.pretrained_cfg, model=card)).transforms
             if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
    assert [type(t).__name__ for t in steps] == ["Resize", "CenterCrop"] and steps[0].size in (256, [256])
    weights = _save(card.state_dict(), tmp_path / "H0-mini" / "model.safetensors")
    (weights.parent / "config.json").write_text(json.dumps(config))
    for tile_px in (224, 288):
        encoder = _fullslide_encoder(tmp_path, "h0-mini", weights, tile_px, {"depth": 1})
        tiles = _tiles(tile_px)
        with torch.no_grad():
            ours = encoder(tiles)
            norm = (config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"])
            want = card(_card_input(tiles, norm, steps))[:, 0]  # timm's Resize + CenterCrop, on tensors
        assert ours.shape == (2, 768) and float((want[0] - want[1]).abs().max()) > 1e-1
        assert torch.allclose(ours, want, rtol=1e-4, atol=1e-4), (tile_px, float((ours - want).abs().max()))
    (weights.parent / "config.json").unlink()
    with pytest.raises(ModelError, match="needs the card's config.json beside the file"):
        _fullslide_encoder(tmp_path, "h0-mini", weights, 224, {"depth": 1})


def test_clam_truncated_resnet50_is_layer3_average_pooled(tmp_path: Path) -> None:
    """CLAM's baseline: the full ResNet-50 file (layer4 and fc included, as timm/torchvision ship it) loads; the
    features are timm's own layer3 map of the card's 224 px input, averaged."""
    torch.manual_seed(5)
    full = timm.create_model("resnet50", pretrained=False).eval()
    weights = _save(full.state_dict(), tmp_path / "model.safetensors")
    truncated = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,)).eval()
    truncated.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("layer4", "fc"))})
    for tile_px in (224, 256):
        encoder = _fullslide_encoder(tmp_path, "resnet50-trunc", weights, tile_px, {})
        tiles = _tiles(tile_px)
        with torch.no_grad():
            want = truncated(_card_input(tiles, IMAGENET, resize((224, 224), crop=224)))[0].mean(dim=(2, 3))
            ours = encoder(tiles)
        assert ours.shape == (2, 1024) and float((want[0] - want[1]).abs().max()) > 1e-3
        assert torch.allclose(ours, want, rtol=1e-4, atol=1e-5), float((ours - want).abs().max())


def test_every_recipe_has_a_card_check_and_its_stated_size() -> None:
    """Each recipe is checked against its card above; the table's parameter counts are the built networks'."""
    from fullslide.models.recipes import RECIPES
    from fullslide.models.registry import recipe_parameter_count

    checked = set(CARDS) | {"conch", "conch-v1.5", "h0-mini", "resnet50-trunc", "phikon", "phikon-v2", "ctranspath"}
    assert set(RECIPES) == checked, set(RECIPES) ^ checked
    assert len(RECIPES) >= 20
    for recipe in RECIPES.values():
        assert abs(recipe_parameter_count(recipe) / 1e6 - recipe.params_m) < 0.1, recipe.name


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


def test_hf_hub_config_json_gives_the_cards_mean_std_and_its_model_args(tmp_path: Path) -> None:
    """A local ``config.json`` in timm's hub layout: its ``pretrained_cfg`` mean/std are used (UNI's are
    ImageNet's, not the architecture's 0.5 default), ``model_args`` that repeat ``num_classes`` (Prov-GigaPath's)
    build, and both spellings of the prefix work."""
    import json

    state = _uni_state()
    weights = _save(state, tmp_path / "uni" / "pytorch_model.bin")
    (tmp_path / "uni" / "config.json").write_text(json.dumps({
        "architecture": "vit_large_patch16_224", "num_classes": 0,
        "model_args": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "depth": 1,
                       "dynamic_img_size": True},
        "pretrained_cfg": {"mean": list(IMAGENET[0]), "std": list(IMAGENET[1]), "interpolation": "bicubic"}}))
    card = _make_input_matter(timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0,
                                                init_values=1e-5, depth=1))
    card.load_state_dict(state)
    card.eval()
    _save(card.state_dict(), weights)
    tiles = _tiles(224)
    want = _card_features(card, tiles, IMAGENET, cls)
    for spelling in ("hf-hub:", "hf_hub:"):
        encoder = _fullslide_encoder(tmp_path, f"{spelling}MahmoodLab/UNI", weights, 224, {})
        with torch.no_grad():
            ours = encoder(tiles)
        assert torch.allclose(ours, want, rtol=1e-4, atol=1e-4), float((ours - want).abs().max())
    giga = tmp_path / "giga"
    _save(timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, patch_size=16,
                            embed_dim=1536, depth=1, num_heads=24, init_values=1e-5, mlp_ratio=5.33334).state_dict(),
          giga / "pytorch_model.bin")
    (giga / "config.json").write_text(json.dumps({  # Prov-GigaPath's config.json, as its card ships it
        "architecture": "vit_giant_patch14_dinov2", "num_classes": 0, "num_features": 1536, "global_pool": "token",
        "model_args": {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                       "num_heads": 24, "init_values": 1e-05, "mlp_ratio": 5.33334, "num_classes": 0}}))
    encoder = _fullslide_encoder(tmp_path, "hf_hub:prov-gigapath/prov-gigapath", giga / "pytorch_model.bin", 224,
                                 {"depth": 1})
    assert encoder.feature_dim == 1536


def test_weight_errors_name_the_files_keys_and_give_consistent_hints(tmp_path: Path) -> None:
    # an unknown wrapper prefix: one prefix hint, no LayerScale advice (every key is both missing and unexpected)
    weights = _save({f"mystery.{k}": v for k, v in _uni_state().items()}, tmp_path / "prefixed.bin")
    with pytest.raises(ModelError) as info:
        _fullslide_encoder(tmp_path, "uni", weights, 224, {"depth": 1})
    message = str(info.value)
    assert "starts with 'mystery.'" in message and "LayerScale" not in message and "init_values" not in message
    # a transformers-layout file with a tensor of the wrong shape: the error names the file's keys
    import transformers

    hf = transformers.ViTModel(transformers.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                      intermediate_size=256, image_size=224, patch_size=16))
    state = _v4_names(dict(hf.state_dict()))  # the names Phikon's file carries
    assert "encoder.layer.0.attention.attention.query.weight" in state
    for part in ("query", "key", "value"):  # another model's width
        state[f"encoder.layer.0.attention.attention.{part}.weight"] = torch.randn(32, 64)
    weights = _save(state, tmp_path / "phikon.bin")
    with pytest.raises(ModelError, match=r"'encoder\.layer\.0\.attention\.attention\.query\.weight \+ .*"
                                         r"\(as blocks\.0\.attn\.qkv\.weight\)' has shape"):
        _fullslide_encoder(tmp_path, "phikon", weights, 224, {"embed_dim": 64, "depth": 1, "num_heads": 4})


def test_the_encoders_table_prints_without_torch_or_timm() -> None:
    import subprocess
    import sys

    code = ("import sys; from fullslide.cli import main; main(['encoders']); "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'heavy import'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "resize 256 bicubic -> centre crop 224" in out.stdout and "attentional pooler" in out.stdout
    assert sum(1 for line in out.stdout.splitlines() if "https://" in line) >= 20


def test_ctranspath_equals_its_timm_0_5_swin_with_the_conv_stem(tmp_path: Path) -> None:
    """CTransPath as TRIDENT and CHIEF build it: timm 0.5.4's Swin-T (the ``timm_ctp`` package the card names) with
    the convolutional stem (written here from the TransPath repository), its head removed; the file is that
    network's state dict under ``model``, without the attention masks (as CHIEF_CTransPath.pth ships)."""
    timm_ctp = pytest.importorskip("timm_ctp", reason="test extra: pip install -e '.[test]'")

    class CardConvStem(nn.Module):
        def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=768, norm_layer=None, flatten=True):
            super().__init__()
            self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
            self.grid_size = (img_size // patch_size, img_size // patch_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            self.flatten = flatten
            stem, c_in, c_out = [], 3, embed_dim // 8
            for _ in range(2):
                stem += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in, c_out = c_out, c_out * 2
            self.proj = nn.Sequential(*stem, nn.Conv2d(c_in, embed_dim, 1))
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def forward(self, x):
            x = self.proj(x)
            return self.norm(x.flatten(2).transpose(1, 2) if self.flatten else x)

    torch.manual_seed(6)
    card = timm_ctp.create_model("swin_tiny_patch4_window7_224", embed_layer=CardConvStem, pretrained=False,
                                 img_size=224)
    card.head = nn.Identity()
    with torch.no_grad():  # BatchNorm statistics and weights that make the input matter
        for name, b in card.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.2)
    card.eval()
    state = {k: v for k, v in card.state_dict().items() if not k.endswith("attn_mask")}
    weights = _save({"model": state}, tmp_path / "CHIEF_CTransPath.pth")
    encoder = _fullslide_encoder(tmp_path, "ctranspath", weights, 224, {})
    for tile_px in (224, 256):
        tiles = _tiles(tile_px)
        with torch.no_grad():
            want = card(_card_input(tiles, IMAGENET, resize((224, 224))))
            ours = encoder(tiles)
        assert ours.shape == (2, 768) == want.shape and float((want[0] - want[1]).abs().max()) > 1e-2
        assert torch.allclose(ours, want, rtol=1e-4, atol=1e-4), (tile_px, float((ours - want).abs().max()))
