"""``SlideModel``: a tile encoder and an aggregator, with BatchNorm frozen by default.

The engine needs the encoder to compute the same function whichever way the tiles of a slide are
chunked or sharded. BatchNorm in training mode normalises with the statistics of each chunk, which breaks
that; so ``train()`` keeps every BatchNorm layer of the encoder in eval mode (running statistics, no update)
unless ``freeze_bn=False``, in which case exactness across chunkings no longer holds and a warning says so.
The affine BatchNorm parameters still train.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fullslide.models.encoders import TileEncoder


class SlideModel(nn.Module):
    """Encoder (tiles -> ``[K, D]``) followed by aggregator (``[K, D]`` -> AggregatorOutput)."""

    def __init__(self, encoder: TileEncoder | nn.Module, aggregator: nn.Module, freeze_bn: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator
        self.freeze_bn = freeze_bn
        self._warned = False

    def _batchnorms(self) -> list[nn.Module]:
        return [m for m in self.encoder.modules() if isinstance(m, _BatchNorm)]

    def train(self, mode: bool = True) -> "SlideModel":
        super().train(mode)
        if mode and self.freeze_bn:
            for bn in self._batchnorms():
                bn.eval()
        elif mode and not self._warned and self._batchnorms():
            warnings.warn(
                "encoder BatchNorm layers are in training mode (freeze_bn=False): their statistics depend on "
                "how tiles are chunked and sharded, so gradients are no longer exactly those of one full pass",
                stacklevel=2,
            )
            self._warned = True
        return self

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.encoder, "feature_dim"))
