"""Networks of the recipes that are not a plain timm ViT with a token pooling: their parameter names follow the
released checkpoints' keys (so the files load strictly), their structure the model papers and cards.

- ``conch``: CONCH's vision tower as ``encode_image(proj_contrast=False, normalize=False)`` computes it (Lu et al.
  2024, Nat. Med.; CoCa's attentional pooling, Yu et al. 2022): the ViT-B/16 trunk's tokens (after its final
  norm), one learned query attending over them (8 heads, 512-d queries, 768-d keys/values; LayerNorms on the
  query and on the tokens), then ``ln_contrast``: ``[N, 512]``.
- ``conch_v15``: CONCH v1.5, TITAN's tile encoder (Ding et al. 2024, "Multimodal whole slide foundation model for
  pathology"; the card's vision tower, as TRIDENT builds it from ``pytorch_model_vision.bin``): a ViT-L/16 trunk
  built for 224 px (LayerScale, final norm), its position embedding resampled to the 14 x 14 grid when loaded
  (bilinear) and, for the card's 448 px input, interpolated as DINO/iBOT do (bicubic with scale factors
  ``(28 + 0.1) / 14``); then one learned 768-d query attends over the 1024-d tokens (8 heads; LayerNorms on the
  query and the tokens; bias-free ``to_q``, ``to_kv``, ``to_out``) and ``ln_contrast``: ``[N, 768]``.
- ``resnet50_trunc``: CLAM's ImageNet baseline (Lu et al. 2021): ResNet-50 up to layer3 (1024 channels), the map
  averaged over space.
- ``ctranspath``: CTransPath (Wang et al. 2022, Med. Image Anal. 81: 102559): timm's Swin-T with a convolutional
  stem in place of the patch embedding; the final-norm map averaged over space (768).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


class AttentionalPool(nn.Module):
    """``queries`` learned queries of width ``dim`` attend over tokens of width ``context_dim``: ``[N, T, C]`` ->
    ``[N, queries, dim]``; LayerNorm on the queries (``ln_q``) and on the tokens (``ln_k``)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim)  # sequence-first
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(tokens).transpose(0, 1)  # [T, N, C]
        queries = self.ln_q(self.query).unsqueeze(1).expand(-1, tokens.shape[0], -1)  # [Q, N, D]
        out, _ = self.attn(queries, keys, keys, need_weights=False)
        return out.transpose(0, 1)  # [N, Q, D]


class ConchVisual(nn.Module):
    """CONCH's trunk + contrastive attentional pooler + ``ln_contrast`` (keys as in the card's file, less
    ``visual.``); ``pool_cls`` is the pooler's layout (CONCH's ``nn.MultiheadAttention``, v1.5's separate
    projections)."""

    def __init__(self, trunk: nn.Module, dim: int = 512, heads: int = 8, pool_cls: type = AttentionalPool) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = pool_cls(dim, int(trunk.num_features), heads, 1)
        self.ln_contrast = nn.LayerNorm(dim)
        self.num_features = dim
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)  # [N, T, 768], after the trunk's final norm

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # [N, dim]


class QueryPool(nn.Module):
    """Attentional pooling with separate projections (CONCH v1.5's ``attn_pool_contrast``): ``queries`` learned
    queries of width ``dim`` over tokens of width ``context_dim``; ``to_q`` (dim -> dim), ``to_kv`` (context ->
    2 dim), ``to_out`` (dim -> dim), no biases; ``[N, T, C]`` -> ``[N, queries, dim]``."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim) * dim**-0.5)
        self.ln_q, self.ln_k = nn.LayerNorm(dim), nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)  # [N, T, dim] each
        q = self.to_q(self.ln_q(self.query)).expand(n, -1, -1)  # [N, Q, dim]
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [N, heads, *, d]
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # scale d^-0.5
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchV15Visual(ConchVisual):
    """CONCH v1.5's vision tower (module docstring; keys as in ``pytorch_model_vision.bin``)."""

    def __init__(self, trunk: nn.Module, dim: int = 768, heads: int = 8) -> None:
        super().__init__(trunk, dim, heads, pool_cls=QueryPool)

    def _pos_embed(self, height: int, width: int) -> torch.Tensor:
        """The trunk's position embedding for an input of ``height x width`` px, as the card's iBOT ViT computes
        it: unchanged at the built size, else the patch part interpolated bicubic by ``(grid + 0.1) / built``."""
        pos = self.trunk.pos_embed  # [1, 1 + G^2, D]
        built = int(round((pos.shape[1] - 1) ** 0.5))
        patch = self.trunk.patch_embed.patch_size[0]
        rows, cols = height // patch, width // patch
        if rows * cols == built * built and height == width:
            return pos
        grid = pos[:, 1:].reshape(1, built, built, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / built, (cols + 0.1) / built), mode="bicubic")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        tokens = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [N, G^2, 1024] (no patch norm)
        tokens = torch.cat([trunk.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = trunk.norm_pre(trunk.patch_drop(trunk.pos_drop(tokens + self._pos_embed(x.shape[2], x.shape[3]))))
        checkpointed = getattr(trunk, "grad_checkpointing", False) and torch.is_grad_enabled()
        for block in trunk.blocks:  # block checkpointing (encoder.grad_checkpointing) as timm's forward does it
            tokens = (torch.utils.checkpoint.checkpoint(block, tokens, use_reentrant=False) if checkpointed
                      else block(tokens))
        return trunk.norm(tokens)  # [N, T, 1024]


class TruncatedResNet(nn.Module):
    """A timm ResNet's stem and first three stages (parameter names as in the full network's file)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, name, getattr(resnet, name))
        self.num_features = int(self.layer3[-1].conv3.out_channels if hasattr(self.layer3[-1], "conv3")
                                else self.layer3[-1].conv2.out_channels)
        self.num_prefix_tokens = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))  # [N, 1024, H/16, W/16]

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3))


class ConvStem(nn.Module):
    """CTransPath's stem: two 3x3 stride-2 convolutions with BatchNorm and ReLU (3 -> D/8 -> D/4 channels), a 1x1
    convolution to D, then the patch norm; gives timm's Swin the ``[N, H/4, W/4, D]`` map its patch embedding
    would (parameter names as in the released file: ``proj.0`` ... ``proj.6``, ``norm``)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 4, in_chans: int = 3,
                 embed_dim: int = 96, norm_layer: Any = None, **_: Any) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size, self.patch_size = size, (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        channels, out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels, out = out, out * 2
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # [N, H/4, W/4, D]


def _ctranspath(timm: Any, arch: str, kwargs: dict[str, Any], drop_path_rate: float) -> nn.Module:
    return timm.create_model(arch, pretrained=False, num_classes=0, embed_layer=ConvStem,
                             drop_path_rate=drop_path_rate, **kwargs)


def _conch(timm: Any, arch: str, kwargs: dict[str, Any], drop_path_rate: float) -> nn.Module:
    trunk = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", drop_path_rate=drop_path_rate,
                              **kwargs)
    return ConchVisual(trunk)


def _conch_v15(timm: Any, arch: str, kwargs: dict[str, Any], drop_path_rate: float) -> nn.Module:
    trunk = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", drop_path_rate=drop_path_rate,
                              **kwargs)
    return ConchV15Visual(trunk)


def _resnet50_trunc(timm: Any, arch: str, kwargs: dict[str, Any], drop_path_rate: float) -> nn.Module:
    return TruncatedResNet(timm.create_model(arch, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                                             **kwargs))


#: Recipe ``builder`` -> (timm module, timm architecture, kwargs, drop_path_rate) -> network.
BUILDERS: dict[str, Callable[[Any, str, dict[str, Any], float], nn.Module]] = {
    "conch": _conch,
    "conch_v15": _conch_v15,
    "resnet50_trunc": _resnet50_trunc,
    "ctranspath": _ctranspath,
}
