"""Tile encoders: a backbone that maps tiles to feature vectors, with input normalisation inside.

``TileEncoder`` takes uint8 tiles (0-255) or float tiles (0-1), ``[B, 3, H, W]``, normalises them with the
backbone's mean/std and returns ``[B, D]`` features. Backbones come from timm by name, from a user factory
(``package.module:callable``) or from the small built-in CNN used by tests and the CPU demo.
Weights load from local files only, never by unpickling arbitrary objects (:mod:`fullslide.models.weights`).
Foundation models (:mod:`fullslide.models.recipes`) run inside a :class:`RecipeBackbone`: the card's input size
and embedding.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fullslide.errors import ModelError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TileEncoder(nn.Module):
    """Normalise tiles and run the backbone: ``[B, 3, H, W]`` uint8/float -> ``[B, feature_dim]``."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        name: str = "custom",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std as one fused multiply-add: x * scale + shift
        scale = 1.0 / (self.std * 255.0) if tiles.dtype == torch.uint8 else 1.0 / self.std
        x = torch.addcmul(-self.mean / self.std, tiles.float(), scale)  # [B, 3, H, W]
        return pool_features(self.backbone(x), self.feature_dim)  # [B, D]


def pool_features(out: Any, feature_dim: int) -> torch.Tensor:
    """A backbone's output as ``[B, D]`` features.

    A tuple or list (``(features, extras)``, as several backbones return) gives its first element. Token sequences
    ``[B, T, D]`` are averaged over the tokens, feature maps over space, ``[B, D, H, W]`` (NCHW) or
    ``[B, H, W, D]`` (NHWC): the axis of width ``feature_dim`` is kept, never averaged away.
    """
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the encoder backbone returned {type(out).__name__}; expected a tensor of features")
    if out.ndim == 3 and out.shape[2] == feature_dim:
        out = out.mean(1)  # [B, T, D]: mean over tokens
    elif out.ndim == 4 and out.shape[1] == feature_dim:
        out = out.mean((2, 3))  # [B, D, H, W]
    elif out.ndim == 4 and out.shape[3] == feature_dim:
        out = out.mean((1, 2))  # [B, H, W, D]
    if out.ndim != 2 or out.shape[1] != feature_dim:
        raise ModelError(
            f"the encoder backbone returned features of shape {tuple(out.shape)}; expected [B, {feature_dim}] "
            f"(or tokens [B, T, {feature_dim}] / maps with {feature_dim} channels, which are pooled)"
        )
    return out


class TinyCNN(nn.Module):
    """A small conv net (no BatchNorm) for tests and CPU demos: tiles of 16-128 px -> ``width * 4`` features.

    It uses GroupNorm so that results do not depend on how tiles are chunked, ends with a LayerNorm so that
    its features are centred and scaled (as a pretrained encoder's are; raw pooled ReLU outputs share a large
    common offset that stalls attention MIL for many epochs), and has optional dropout before the output so
    that tests can exercise stochastic layers.
    """

    def __init__(self, width: int = 16, drop_rate: float = 0.0, in_chans: int = 3) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        chans = [in_chans, w, 2 * w, 4 * w]
        for i in range(3):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(8, chans[i + 1]), chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(4 * w)
        self.drop = nn.Dropout(drop_rate)
        self.num_features = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.features(x).mean(dim=(2, 3)))  # [B, 4w]
        return self.drop(h)


class RecipeBackbone(nn.Module):
    """A network as a foundation-model card uses it: normalised tiles -> the card's resize (and centre crop) ->
    tokens (or a feature map) -> the card's embedding ``[N, D]`` (class token, class token + patch-token mean
    without registers, or the network's own pooling, ``pooling="module"``)."""

    def __init__(self, model: nn.Module, pooling: str, input_px: int, *, resize_px: int | None = None,
                 interpolation: str = "bilinear") -> None:
        super().__init__()
        from fullslide.models.recipes import POOLINGS

        self.model = model
        self.pooling = pooling
        self.input_px = int(input_px)
        self.resize_px = int(resize_px) if resize_px else None
        self.interpolation = interpolation
        self._pool = None if pooling == "module" else POOLINGS[pooling]
        self.num_features = int(model.num_features) * (2 if pooling == "class_token+patch_mean" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = card_resize(x, self.input_px, self.resize_px, self.interpolation)
        features = self.model.forward_features(x)  # [N, T, D] after the final norm (or [N, C, H, W])
        if self._pool is None:
            return self.model.pool(features)
        return self._pool(features, int(getattr(self.model, "num_prefix_tokens", 1)))  # [N, D']


def card_resize(x: torch.Tensor, input_px: int, resize_px: int | None = None,
                interpolation: str = "bilinear") -> torch.Tensor:
    """A model card's ``Resize(resize_px or input_px)`` (+ ``CenterCrop(input_px)`` when ``resize_px`` is set) on
    square ``[N, C, H, W]`` tiles, on their device, antialiased as torchvision resizes tensors and PIL images."""
    target = resize_px or input_px
    if x.shape[-2:] != (target, target):
        x = torch.nn.functional.interpolate(x, size=(target, target), mode=interpolation, align_corners=False,
                                            antialias=True)
    if target != input_px:
        top = int(round((target - input_px) / 2.0))  # torchvision's centre crop offset
        x = x[..., top:top + input_px, top:top + input_px]
    return x
