"""Pathology foundation models as data: one frozen record per model, the few real behaviours named functions.

A recipe says how the model card builds the network (timm architecture + keyword arguments, layer classes by
name, or a named builder for the few that are not plain timm ViTs), how it preprocesses tiles (mean/std, the
resize and centre crop of the card's transform and its interpolation), which embedding it uses (class token;
class token + mean of the patch tokens, registers excluded; an attentional pooler; a pooled feature map), the
feature width, the recommended mpp, the weight files the card ships and their key layout. Facts come from each
model card (the ``source`` of the record; TRIDENT's encoder list for the transforms where cards defer to it); no
code is copied. fullslide never downloads weights: the user fetches the (often gated) files and passes their path.

This module imports neither torch nor timm: ``fullslide encoders`` prints the table from the records alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # kaiko.ai's models
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))


def _frozen(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kwargs))


@dataclass(frozen=True)
class Recipe:
    """One foundation model: architecture, preprocessing, embedding, weights."""

    name: str
    arch: str  # timm model name
    kwargs: Mapping[str, Any]  # timm keyword arguments; layer classes by name (see LAYERS)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_px: int  # the size the card's transform gives the network
    dynamic_size: bool  # accepts other input sizes (timm dynamic_img_size)
    pooling: str  # a key of POOLINGS, or "module" (the builder's module pools)
    width: int  # feature width D
    mpp: float  # recommended micrometres per pixel
    files: tuple[str, ...]  # file names as the card ships them
    layout: str = "timm"  # key layout of those files: a key of fullslide.models.weights.CONVERTERS
    source: str = ""  # the model card
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())
    resize_px: int | None = None  # the card resizes to this, then centre-crops input_px (None: resize to input_px)
    interpolation: str = "bilinear"  # the card's resize kernel: bilinear or bicubic (antialiased, as on PIL images)
    builder: str = "timm"  # "timm" (timm.create_model), "hub_config" (timm, from the card's config.json beside the
    # weights: architecture, model_args, pretrained_cfg), or a key of fullslide.models.recipe_modules.BUILDERS
    params_m: float = 0.0  # parameters in millions (checked against the built network by the tests)

    def timm_kwargs(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (layer names resolved), recipe first, then overrides."""
        merged = {**self.kwargs, **(overrides or {})}
        out = {k: resolve_layer(v) if k in ("mlp_layer", "act_layer", "norm_layer") else v for k, v in merged.items()}
        eps = out.pop("norm_eps", None)
        if eps is not None:  # e.g. transformers' ViT uses LayerNorm eps 1e-12, timm 1e-6
            import torch

            out["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=float(eps))
        return out

    def input_size(self, overrides: Mapping[str, Any] | None = None) -> int:
        """The tile side the network sees: the card's, unless ``encoder.kwargs`` sets ``img_size``."""
        return int((overrides or {}).get("img_size", self.input_px))

    def transform(self) -> str:
        """The card's resize, in words."""
        crop = f" -> centre crop {self.input_px}" if self.resize_px else ""
        return f"resize {self.resize_px or self.input_px} {self.interpolation}{crop}"


def _swiglu_packed() -> type:
    from fullslide.models._timm_compat import import_timm

    import_timm()
    from timm.layers import SwiGLUPacked

    return SwiGLUPacked


def _torch_layer(name: str) -> Callable[[], Any]:
    def get() -> Any:
        import torch

        return getattr(torch.nn, name)

    return get


#: Layer classes a recipe (or ``encoder.kwargs`` in YAML) may name.
LAYERS: dict[str, Callable[[], Any]] = {
    "SwiGLUPacked": _swiglu_packed,
    "SiLU": _torch_layer("SiLU"),
    "GELU": _torch_layer("GELU"),
    "LayerNorm": _torch_layer("LayerNorm"),
}


def resolve_layer(value: Any) -> Any:
    """A layer class named by a string (``"SwiGLUPacked"``), or the value unchanged."""
    if isinstance(value, str):
        if value not in LAYERS:
            from fullslide.errors import ModelError

            raise ModelError(f"unknown layer class '{value}' (known: {', '.join(LAYERS)})")
        return LAYERS[value]()
    return value


def pool_class_token(tokens: Any, prefix_tokens: int) -> Any:
    """``[N, T, D]`` -> the class token ``[N, D]``."""
    return tokens[:, 0]


def pool_class_and_patch_mean(tokens: Any, prefix_tokens: int) -> Any:
    """``[N, T, D]`` -> class token concatenated with the mean of the patch tokens, registers excluded ``[N, 2D]``
    (Virchow, Virchow2, Midnight)."""
    import torch

    return torch.cat([tokens[:, 0], tokens[:, prefix_tokens:].mean(1)], dim=-1)


def pool_map_mean(tokens: Any, prefix_tokens: int) -> Any:
    """A channels-last feature map ``[N, H, W, D]`` -> its spatial mean ``[N, D]`` (Swin: CTransPath)."""
    return tokens.mean(dim=(1, 2))


POOLINGS: dict[str, Callable[[Any, int], Any]] = {
    "class_token": pool_class_token,
    "class_token+patch_mean": pool_class_and_patch_mean,
    "map_mean": pool_map_mean,
}

_UNI_NOTE = "ImageNet mean/std, not timm's 0.5 default for this architecture"
_SWIGLU = dict(mlp_layer="SwiGLUPacked", act_layer="SiLU")
_TRIDENT = "transform as TRIDENT's encoder list gives it (github.com/mahmoodlab/TRIDENT)"


def _kaiko(name: str, arch: str, width: int, params: float, **kwargs: Any) -> Recipe:
    # kaiko.ai, "Towards Large-Scale Training of Pathology Foundation Models" (arXiv 2404.15217): timm ViTs,
    # mean/std 0.5, class token; eval transform Resize(224) + CenterCrop(224), bilinear
    return Recipe(name, arch, _frozen(dynamic_img_size=True, **kwargs), *HALF, 224, True, "class_token", width, 0.5,
                  ("model.safetensors",), source=f"https://huggingface.co/1aurent/{arch}.kaiko_ai_towards_large_"
                  "pathology_fms", notes=_TRIDENT, params_m=params)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    # https://huggingface.co/MahmoodLab/UNI (timm.create_model arguments; Resize(224) + CenterCrop(224))
    Recipe("uni", "vit_large_patch16_224", _frozen(img_size=224, patch_size=16, init_values=1e-5,
           dynamic_img_size=True), *IMAGENET, 224, True, "class_token", 1024, 0.5, ("pytorch_model.bin",),
           source="https://huggingface.co/MahmoodLab/UNI", notes=_UNI_NOTE, params_m=303.4),
    # https://huggingface.co/MahmoodLab/UNI2-h (timm_kwargs of the card)
    Recipe("uni2-h", "vit_giant_patch14_224", _frozen(img_size=224, patch_size=14, depth=24, num_heads=24,
           init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8,
           dynamic_img_size=True, **_SWIGLU), *IMAGENET, 224, True, "class_token", 1536, 0.5,
           ("pytorch_model.bin",), source="https://huggingface.co/MahmoodLab/UNI2-h", params_m=681.4),
    # https://huggingface.co/MahmoodLab/CONCH: ViT-B/16 trunk at 448 px (Resize(448, bicubic) + CenterCrop(448),
    # OpenAI CLIP mean/std); the embedding is encode_image(proj_contrast=False, normalize=False): the contrastive
    # attentional pooler (1 query, 8 heads, 512-d) + ln_contrast over the trunk's tokens
    Recipe("conch", "vit_base_patch16_224", _frozen(img_size=448, dynamic_img_size=True), *OPENAI_CLIP, 448, True,
           "module", 512, 0.5, ("pytorch_model.bin",), layout="conch", interpolation="bicubic", builder="conch",
           source="https://huggingface.co/MahmoodLab/CONCH", params_m=87.6,
           notes="512-d image embedding before the contrastive projection (as the card and TRIDENT extract it)"),
    # https://huggingface.co/MahmoodLab/conchv1_5 (TITAN's tile encoder; vision tower as TRIDENT builds it): ViT-L/16
    # with LayerScale built for 224 px, file position embedding resampled to 14 x 14, DINO-style bicubic
    # interpolation to the 448 px input (Resize(448, bilinear) + CenterCrop(448), ImageNet mean/std); embedding:
    # attentional pooler (1 query, 8 heads, 768-d, to_q/to_kv/to_out) + ln_contrast. TITAN: 512-px tiles at 20x
    Recipe("conch-v1.5", "vit_large_patch16_224", _frozen(img_size=224, init_values=1.0), *IMAGENET, 448, True,
           "module", 768, 0.5, ("pytorch_model_vision.bin",), layout="conch_v15", builder="conch_v15",
           source="https://huggingface.co/MahmoodLab/conchv1_5", aliases=("conch_v15", "conchv1_5"), params_m=306.1,
           notes="TITAN's tile encoder (TITAN takes 512-px tiles at 20x); 768-d pooled image embedding"),
    # https://huggingface.co/paige-ai/Virchow: class token + mean of the 256 patch tokens = 2560; timm transform
    # of the card's config: bicubic
    Recipe("virchow", "vit_huge_patch14_224", _frozen(img_size=224, init_values=1e-5, mlp_ratio=5.3375,
           dynamic_img_size=True, **_SWIGLU), *IMAGENET, 224, True, "class_token+patch_mean", 2560, 0.5,
           ("pytorch_model.bin", "model.safetensors"), interpolation="bicubic",
           source="https://huggingface.co/paige-ai/Virchow", params_m=631.2),
    # https://huggingface.co/paige-ai/Virchow2: 4 register tokens, excluded from the patch mean; bicubic
    Recipe("virchow2", "vit_huge_patch14_224", _frozen(img_size=224, init_values=1e-5, mlp_ratio=5.3375,
           reg_tokens=4, dynamic_img_size=True, **_SWIGLU), *IMAGENET, 224, True, "class_token+patch_mean", 2560,
           0.5, ("pytorch_model.bin", "model.safetensors"), interpolation="bicubic",
           source="https://huggingface.co/paige-ai/Virchow2", params_m=631.2),
    # https://huggingface.co/prov-gigapath/prov-gigapath (config.json model_args: giant DINOv2 with 16 px patches;
    # transform Resize(256, bicubic) + CenterCrop(224))
    Recipe("prov-gigapath", "vit_giant_patch14_dinov2", _frozen(img_size=224, patch_size=16, init_values=1e-5,
           mlp_ratio=5.33334, embed_dim=1536, depth=40, num_heads=24), *IMAGENET, 224, False, "class_token", 1536,
           0.5, ("pytorch_model.bin",), source="https://huggingface.co/prov-gigapath/prov-gigapath",
           aliases=("gigapath",), resize_px=256, interpolation="bicubic", params_m=1135.0),
    # https://huggingface.co/prov-gigapath/prov-gigapath-flash: DINOv2-small ViT-S/16 with SwiGLU, same transform
    Recipe("gigapath-flash", "vit_small_patch16_224", _frozen(img_size=224, patch_size=16, embed_dim=384, depth=12,
           num_heads=6, mlp_ratio=2048 / 384, init_values=1e-5, dynamic_img_size=True, **_SWIGLU), *IMAGENET, 224,
           True, "class_token", 384, 0.5, ("pytorch_model.bin",), resize_px=256, interpolation="bicubic",
           source="https://huggingface.co/prov-gigapath/prov-gigapath-flash", notes=_TRIDENT, params_m=21.7),
    # https://huggingface.co/bioptimus/H-optimus-0: fixed 224 px input, its own mean/std
    Recipe("h-optimus-0", "vit_giant_patch14_reg4_dinov2", _frozen(img_size=224, init_values=1e-5,
           dynamic_img_size=False), *HOPTIMUS, 224, False, "class_token", 1536, 0.5,
           ("pytorch_model.bin", "model.safetensors"), source="https://huggingface.co/bioptimus/H-optimus-0",
           params_m=1134.8),
    # https://huggingface.co/bioptimus/H-optimus-1: same architecture and mean/std as H-optimus-0
    Recipe("h-optimus-1", "vit_giant_patch14_reg4_dinov2", _frozen(img_size=224, init_values=1e-5,
           dynamic_img_size=False), *HOPTIMUS, 224, False, "class_token", 1536, 0.5,
           ("pytorch_model.bin", "model.safetensors"), source="https://huggingface.co/bioptimus/H-optimus-1",
           params_m=1134.8),
    # https://huggingface.co/bioptimus/H0-mini: ViT-B/14 with 4 registers distilled from H-optimus-0; the card calls
    # timm.create_model("hf-hub:bioptimus/H0-mini", mlp_layer=SwiGLUPacked, act_layer=SiLU) and timm's transform of
    # the hub config (its output: 1 + 4 + 256 tokens at 224 px). Built from that config.json beside the weights
    # (architecture, model_args, pretrained_cfg mean/std/resize); this record is its shape without one
    Recipe("h0-mini", "vit_base_patch14_reg4_dinov2", _frozen(img_size=224, **_SWIGLU), *HOPTIMUS, 224, True,
           "class_token", 768, 0.5, ("pytorch_model.bin", "model.safetensors"), builder="hub_config",
           interpolation="bicubic", source="https://huggingface.co/bioptimus/H0-mini", params_m=71.6,
           notes="built from the card's config.json beside the weights; class token (as TRIDENT extracts it)"),
    # https://huggingface.co/owkin/phikon: transformers ViTModel (ViT-B/16), last_hidden_state[:, 0]
    Recipe("phikon", "vit_base_patch16_224", _frozen(img_size=224, norm_eps=1e-12), *IMAGENET, 224, False,
           "class_token", 768, 0.5, ("pytorch_model.bin", "model.safetensors"), layout="hf_vit",
           source="https://huggingface.co/owkin/phikon", params_m=85.8),
    # https://huggingface.co/owkin/phikon-v2: transformers Dinov2Model (ViT-L/16, LayerScale), class token
    Recipe("phikon-v2", "vit_large_patch16_224", _frozen(img_size=224, init_values=1e-5), *IMAGENET, 224, False,
           "class_token", 1024, 0.5, ("model.safetensors",), layout="hf_dinov2",
           source="https://huggingface.co/owkin/phikon-v2", params_m=303.4),
    # https://huggingface.co/xtxx/Digepath: UNI-style ViT-L/16 for gastrointestinal pathology, Resize(224)
    Recipe("digepath", "vit_large_patch16_224", _frozen(img_size=224, patch_size=16, init_values=1e-5,
           dynamic_img_size=True), *IMAGENET, 224, True, "class_token", 1024, 0.5, ("model.safetensors",),
           source="https://huggingface.co/xtxx/Digepath", notes=_TRIDENT, params_m=303.4),
    _kaiko("kaiko-vits16", "vit_small_patch16_224", 384, 21.7, img_size=224),
    _kaiko("kaiko-vits8", "vit_small_patch8_224", 384, 21.7, img_size=224),
    _kaiko("kaiko-vitb16", "vit_base_patch16_224", 768, 85.8, img_size=224),
    _kaiko("kaiko-vitb8", "vit_base_patch8_224", 768, 85.8, img_size=224),
    # ViT-L/14 with 4 registers, built at 518 px and fed 224 px (positional embedding interpolated)
    _kaiko("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", 1024, 304.4, img_size=518),
    # https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino (Kang et al. 2023, "Benchmarking
    # self-supervised learning on diverse pathology datasets", CVPR): DINO ViT-S/8, Lunit's mean/std, bicubic
    Recipe("lunit-vits8", "vit_small_patch8_224", _frozen(img_size=224, dynamic_img_size=True), *LUNIT, 224, True,
           "class_token", 384, 0.5, ("model.safetensors",), interpolation="bicubic",
           source="https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino", params_m=21.7,
           notes="224 px tiles are used whole (the hub config's centre-crop fraction is not applied)"),
    # https://huggingface.co/majiabo/GPFM (Ma et al. 2024, "Towards a generalizable pathology foundation model via
    # unified knowledge distillation"): DINOv2 ViT-L/14 at 224, Resize(224, bicubic)
    Recipe("gpfm", "vit_large_patch14_dinov2", _frozen(img_size=224, init_values=1e-5, dynamic_img_size=True),
           *IMAGENET, 224, True, "class_token", 1024, 0.5, ("GPFM.pth",), interpolation="bicubic",
           source="https://huggingface.co/majiabo/GPFM", notes=_TRIDENT, params_m=303.2),
    # CTransPath (Wang et al. 2022, Med. Image Anal.): Swin-T with a convolutional stem, ImageNet mean/std,
    # Resize(224) bilinear; the file TRIDENT and CHIEF use (CHIEF_CTransPath.pth, key layout of timm 0.5.4)
    Recipe("ctranspath", "swin_tiny_patch4_window7_224", _frozen(img_size=224), *IMAGENET, 224, False, "map_mean", 768,
           0.5, ("CHIEF_CTransPath.pth", "ctranspath.pth"), layout="ctranspath", builder="ctranspath",
           source="https://github.com/Xiyue-Wang/TransPath", params_m=27.5,
           notes=_TRIDENT + "; no magnification is stated with the weights: 0.5 um/px as for the others"),
    # CLAM's baseline (Lu et al. 2021, Nat. Biomed. Eng.): ImageNet ResNet-50 truncated after layer3 (1024
    # channels), average-pooled; torchvision's weights as timm ships them (layer4 and fc are not used)
    Recipe("resnet50-trunc", "resnet50", _frozen(), *IMAGENET, 224, True, "module", 1024, 0.5,
           ("model.safetensors", "pytorch_model.bin"), layout="resnet_trunc", builder="resnet50_trunc",
           source="https://huggingface.co/timm/resnet50.tv_in1k", notes=_TRIDENT, aliases=("clam-resnet50",),
           params_m=8.5),
)}
_ALIASES = {alias: r.name for r in RECIPES.values() for alias in r.aliases}


def get_recipe(name: str) -> Recipe | None:
    """The recipe called ``name`` (case-insensitive, aliases allowed), or None."""
    key = name.lower()
    return RECIPES.get(_ALIASES.get(key, key))
