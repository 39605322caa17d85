"""Tile encoders: a backbone that maps tiles to feature vectors, with input normalisation inside.

``TileEncoder`` takes uint8 tiles (0-255) or float tiles (0-1), ``[B, 3, H, W]``, normalises them with the
backbone's mean/std and returns ``[B, D]`` features. Backbones come from timm by name, from a user factory
(``package.module:callable``) or from the small built-in CNN used by tests and the CPU demo.
Weights load from local files only, never by unpickling arbitrary objects.
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


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor mapping in a loaded checkpoint (plain, or under 'state_dict'/'model'/...)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "teacher", "student", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap_state_dict(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ModelError(f"{path}: no tensors found (expected a state dict of parameter tensors)")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` or a torch file (``.pth/.pt/.bin``) without unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except Exception as exc:  # unsafe pickles and corrupt files both land here
        raise ModelError(f"{path}: cannot load weights safely ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    return _unwrap_state_dict(obj, path)


_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "trunk.")


def load_weights(module: nn.Module, path: str | Path, strict: bool = False) -> None:
    """Load ``path`` into ``module``, stripping common wrapper prefixes; fail loudly if nothing matches.

    Classification heads absent from the module (``head.*``, ``fc.*``) are ignored; any other missing or
    unexpected key is logged, or raised when ``strict``.
    """
    state = load_state_dict_file(path)
    own = module.state_dict()
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key
        while k not in own and k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        cleaned[k] = value
    matched = [k for k in cleaned if k in own]
    if not matched:
        raise ModelError(f"{path}: none of its {len(state)} tensors match the encoder's parameter names")
    for k in matched:
        if tuple(cleaned[k].shape) != tuple(own[k].shape):
            raise ModelError(
                f"{path}: tensor '{k}' has shape {tuple(cleaned[k].shape)}, encoder expects {tuple(own[k].shape)}"
            )
    missing = [k for k in own if k not in cleaned]
    unexpected = [k for k in cleaned if k not in own and not k.startswith(("head", "fc.", "classifier"))]
    if strict and (missing or unexpected):
        raise ModelError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    if missing:
        log.warning("%s: %d encoder tensors not in the file (kept at init), e.g. %s", path, len(missing), missing[:3])
    if unexpected:
        log.warning("%s: %d tensors ignored, e.g. %s", path, len(unexpected), unexpected[:3])
    module.load_state_dict({k: cleaned[k] for k in matched}, strict=False)
