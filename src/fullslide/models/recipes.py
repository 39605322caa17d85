"""Pathology foundation models as data: one frozen record per model, the few real behaviours named functions.

A recipe says how the model card builds the network (timm architecture + keyword arguments, layer classes by
name), how it preprocesses tiles (mean/std, native input size, whether other sizes are accepted), which
embedding it uses (class token; class token + mean of the patch tokens, registers excluded), the feature
width, the recommended mpp, the weight files the card ships and their key layout. Facts come from each model
card (the ``source`` of the record); no code is copied. fullslide never downloads weights: the user fetches the
(often gated) files and passes their path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


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
    input_px: int  # the size the model was trained at
    dynamic_size: bool  # accepts other tile sizes (timm dynamic_img_size); otherwise tiles are resized to input_px
    pooling: str  # a key of POOLINGS
    width: int  # feature width D
    mpp: float  # recommended micrometres per pixel
    files: tuple[str, ...]  # file names as the card ships them
    layout: str = "timm"  # key layout of those files: a key of fullslide.models.weights.CONVERTERS
    source: str = ""  # the model card
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    def timm_kwargs(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (layer names resolved), recipe first, then overrides."""
        merged = {**self.kwargs, **(overrides or {})}
        out = {k: resolve_layer(v) if k in ("mlp_layer", "act_layer", "norm_layer") else v for k, v in merged.items()}
        eps = out.pop("norm_eps", None)
        if eps is not None:  # e.g. transformers' ViT uses LayerNorm eps 1e-12, timm 1e-6
            out["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=float(eps))
        return out

    def input_size(self, overrides: Mapping[str, Any] | None = None) -> int:
        """The tile side the network sees (tiles of another size are resized to it, as the card's transform does)."""
        return int({**self.kwargs, **(overrides or {})}.get("img_size", self.input_px))


def _swiglu_packed() -> type:
    from fullslide.models._timm_compat import import_timm

    import_timm()
    from timm.layers import SwiGLUPacked

    return SwiGLUPacked


#: Layer classes a recipe (or ``encoder.kwargs`` in YAML) may name.
LAYERS: dict[str, Callable[[], Any]] = {
    "SwiGLUPacked": _swiglu_packed,
    "SiLU": lambda: torch.nn.SiLU,
    "GELU": lambda: torch.nn.GELU,
    "LayerNorm": lambda: torch.nn.LayerNorm,
}


def resolve_layer(value: Any) -> Any:
    """A layer class named by a string (``"SwiGLUPacked"``), or the value unchanged."""
    if isinstance(value, str):
        if value not in LAYERS:
            from fullslide.errors import ModelError

            raise ModelError(f"unknown layer class '{value}' (known: {', '.join(LAYERS)})")
        return LAYERS[value]()
    return value


def pool_class_token(tokens: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """``[N, T, D]`` -> the class token ``[N, D]``."""
    return tokens[:, 0]


def pool_class_and_patch_mean(tokens: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """``[N, T, D]`` -> class token concatenated with the mean of the patch tokens, registers excluded ``[N, 2D]``
    (Virchow, Virchow2)."""
    return torch.cat([tokens[:, 0], tokens[:, prefix_tokens:].mean(1)], dim=-1)


POOLINGS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "class_token": pool_class_token,
    "class_token+patch_mean": pool_class_and_patch_mean,
}

_UNI_NOTE = "ImageNet mean/std, not timm's 0.5 default for this architecture"

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    # https://huggingface.co/MahmoodLab/UNI (model card, timm.create_model arguments and transform)
    Recipe("uni", "vit_large_patch16_224", _frozen(img_size=224, patch_size=16, init_values=1e-5,
           dynamic_img_size=True), *IMAGENET, 224, True, "class_token", 1024, 0.5, ("pytorch_model.bin",),
           source="https://huggingface.co/MahmoodLab/UNI", notes=_UNI_NOTE),
    # https://huggingface.co/MahmoodLab/UNI2-h (timm_kwargs of the card)
    Recipe("uni2-h", "vit_giant_patch14_224", _frozen(img_size=224, patch_size=14, depth=24, num_heads=24,
           init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer="SwiGLUPacked",
           act_layer="SiLU", reg_tokens=8, dynamic_img_size=True), *IMAGENET, 224, True, "class_token", 1536, 0.5,
           ("pytorch_model.bin",), source="https://huggingface.co/MahmoodLab/UNI2-h"),
    # https://huggingface.co/MahmoodLab/CONCH: ViT-B/16 vision trunk at 448 px, OpenAI CLIP mean/std
    Recipe("conch", "vit_base_patch16_224", _frozen(img_size=448, dynamic_img_size=True), *OPENAI_CLIP, 448, True,
           "class_token", 768, 0.5, ("pytorch_model.bin",), layout="conch",
           source="https://huggingface.co/MahmoodLab/CONCH",
           notes="the vision trunk's class token (768); CONCH's contrastive attentional pooler is not built"),
    # https://huggingface.co/paige-ai/Virchow: class token + mean of the 256 patch tokens = 2560
    Recipe("virchow", "vit_huge_patch14_224", _frozen(img_size=224, init_values=1e-5, mlp_ratio=5.3375,
           mlp_layer="SwiGLUPacked", act_layer="SiLU", dynamic_img_size=True), *IMAGENET, 224, True,
           "class_token+patch_mean", 2560, 0.5, ("pytorch_model.bin", "model.safetensors"),
           source="https://huggingface.co/paige-ai/Virchow"),
    # https://huggingface.co/paige-ai/Virchow2: 4 register tokens, excluded from the patch mean
    Recipe("virchow2", "vit_huge_patch14_224", _frozen(img_size=224, init_values=1e-5, mlp_ratio=5.3375,
           mlp_layer="SwiGLUPacked", act_layer="SiLU", reg_tokens=4, dynamic_img_size=True), *IMAGENET, 224, True,
           "class_token+patch_mean", 2560, 0.5, ("pytorch_model.bin", "model.safetensors"),
           source="https://huggingface.co/paige-ai/Virchow2"),
    # https://huggingface.co/prov-gigapath/prov-gigapath (config.json model_args: giant DINOv2 with 16 px patches)
    Recipe("prov-gigapath", "vit_giant_patch14_dinov2", _frozen(img_size=224, patch_size=16, init_values=1e-5,
           mlp_ratio=5.33334, embed_dim=1536, depth=40, num_heads=24), *IMAGENET, 224, False, "class_token", 1536,
           0.5, ("pytorch_model.bin",), source="https://huggingface.co/prov-gigapath/prov-gigapath",
           aliases=("gigapath",)),
    # https://huggingface.co/bioptimus/H-optimus-0: fixed 224 px input, its own mean/std
    Recipe("h-optimus-0", "vit_giant_patch14_reg4_dinov2", _frozen(img_size=224, init_values=1e-5,
           dynamic_img_size=False), (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 224, False,
           "class_token", 1536, 0.5, ("pytorch_model.bin", "model.safetensors"),
           source="https://huggingface.co/bioptimus/H-optimus-0"),
    # https://huggingface.co/bioptimus/H-optimus-1: same architecture and mean/std as H-optimus-0
    Recipe("h-optimus-1", "vit_giant_patch14_reg4_dinov2", _frozen(img_size=224, init_values=1e-5,
           dynamic_img_size=False), (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 224, False,
           "class_token", 1536, 0.5, ("pytorch_model.bin", "model.safetensors"),
           source="https://huggingface.co/bioptimus/H-optimus-1"),
    # https://huggingface.co/owkin/phikon: transformers ViTModel (ViT-B/16), last_hidden_state[:, 0]
    Recipe("phikon", "vit_base_patch16_224", _frozen(img_size=224, norm_eps=1e-12), *IMAGENET, 224, False,
           "class_token", 768, 0.5, ("pytorch_model.bin", "model.safetensors"), layout="hf_vit",
           source="https://huggingface.co/owkin/phikon"),
    # https://huggingface.co/owkin/phikon-v2: transformers Dinov2Model (ViT-L/16, LayerScale), class token
    Recipe("phikon-v2", "vit_large_patch16_224", _frozen(img_size=224, init_values=1e-5), *IMAGENET, 224, False,
           "class_token", 1024, 0.5, ("model.safetensors",), layout="hf_dinov2",
           source="https://huggingface.co/owkin/phikon-v2"),
)}
_ALIASES = {alias: r.name for r in RECIPES.values() for alias in r.aliases}


def get_recipe(name: str) -> Recipe | None:
    """The recipe called ``name`` (case-insensitive, aliases allowed), or None."""
    key = name.lower()
    return RECIPES.get(_ALIASES.get(key, key))
