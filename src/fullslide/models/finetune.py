"""Fine-tuning controls for transformer encoders: train the last N blocks, LoRA adapters, layer-wise lr decay,
activation checkpointing inside the blocks.

All of them act on the encoder's parameters or on how it computes, never on the engine: frozen parameters get no
gradient (the engine skips them), LoRA's dropout draws from the global generator inside the encoder's forward,
so pass 2 of ``recompute`` replays it under the chunk's seed like any other dropout, and block checkpointing
(timm's ``set_grad_checkpointing``) restores the generator state when it recomputes. ``fullslide check-grad``
proves each (``--trainable-blocks``, ``--lora-rank``, ``--grad-checkpointing``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import torch
from torch import nn

from fullslide.errors import ModelError

_EMBEDDING = re.compile(r"(^|\.)(patch_embed|cls_token|pos_embed|reg_token|embeddings|stem|conv1|bn1)(\.|$)")
_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")


def transformer_blocks(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's ``blocks`` (timm ViTs, also inside a recipe's backbone); ModelError naming the encoder if none."""
    for module in encoder.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
            return blocks  # type: ignore[return-value]
    raise ModelError(f"encoder '{getattr(encoder, 'name', type(encoder).__name__)}' has no transformer `blocks`: "
                     "trainable_blocks, layer_decay and LoRA apply to ViT-style encoders")


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings, ``i + 1`` for block ``i``, ``n_blocks + 1`` for what follows the blocks (final norm)."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(2)) + 1
    return 0 if _EMBEDDING.search(name) else n_blocks + 1


def train_last_blocks(encoder: nn.Module, n: int) -> None:
    """Freeze the encoder except its last ``n`` blocks and what follows them (final norm)."""
    n_blocks = len(transformer_blocks(encoder))
    if not 0 <= n <= n_blocks:
        raise ModelError(f"encoder.trainable_blocks must be in [0, {n_blocks}] for this encoder, got {n}")
    for name, p in encoder.named_parameters():
        p.requires_grad_(layer_id(name, n_blocks) > n_blocks - n)


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` with ``base`` frozen, ``A`` random, ``B`` zero (Hu et al. 2021)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_a.t().to(x.dtype) @ self.lora_b.t().to(x.dtype)
        return self.base(x) + self.scale * update


def add_lora(encoder: nn.Module, rank: int, alpha: float, dropout: float, targets: Iterable[str]) -> int:
    """Wrap the Linear layers of the blocks whose name ends with one of ``targets`` (e.g. ``qkv``); freeze every
    other encoder parameter. Returns how many layers were wrapped."""
    if rank < 1:
        raise ModelError(f"encoder.lora_rank must be >= 1, got {rank}")
    blocks = transformer_blocks(encoder)
    encoder.requires_grad_(False)
    wrapped = 0
    targets = tuple(targets)
    for block in blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                setattr(parent, name.split(".")[-1], LoRALinear(module, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise ModelError(f"encoder.lora_targets {list(targets)} match no Linear layer in the encoder's blocks")
    return wrapped


def set_block_checkpointing(encoder: nn.Module, enabled: bool = True) -> None:
    """Activation checkpointing inside the blocks (timm ``set_grad_checkpointing``) of the chunk back-propagated."""
    for module in encoder.modules():
        if callable(getattr(module, "set_grad_checkpointing", None)) and hasattr(module, "blocks"):
            module.set_grad_checkpointing(enabled)
            return
    raise ModelError("encoder.grad_checkpointing: the encoder has no timm set_grad_checkpointing")


def layer_decay_groups(encoder: nn.Module, lr: float, weight_decay: float, decay: float) -> list[dict[str, Any]]:
    """AdamW groups with lr ``lr * decay ** (n_blocks + 1 - layer_id)`` (BEiT-style layer-wise decay); biases and
    norms without weight decay. Only trainable parameters."""
    n_blocks = len(transformer_blocks(encoder))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, n_blocks)
        key = (lid, p.ndim >= 2)
        group = groups.setdefault(key, {"params": [], "lr": lr * decay ** (n_blocks + 1 - lid),
                                        "weight_decay": weight_decay if p.ndim >= 2 else 0.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
