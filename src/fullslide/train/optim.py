"""The run's optimizer (AdamW, parameter groups per part and per layer) and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from fullslide.train.config import Config


def make_optimizer(config: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with encoder and aggregator groups (their own lr, the encoder's decayed per layer when
    ``encoder.layer_decay`` < 1); no weight decay on biases and norm weights; frozen parameters left out."""
    from fullslide.models.finetune import layer_decay_groups

    wd = config.train.weight_decay
    groups = []
    if config.encoder.layer_decay < 1:
        groups += [dict(g, part="encoder") for g in
                   layer_decay_groups(model.encoder, config.encoder.lr, wd, config.encoder.layer_decay)]
    parts = [(model.aggregator, config.aggregator.lr, "aggregator")]
    if config.encoder.layer_decay >= 1:
        parts.insert(0, (model.encoder, config.encoder.lr, "encoder"))
    for module, lr, part in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": wd, "part": part},
                   {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0, "part": part}]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Linear warm-up over ``warmup_epochs``, then cosine decay to ``min_lr_ratio`` of the peak, per step."""
    total = max(1, config.train.epochs * steps_per_epoch)
    warm = max(0, round(config.train.warmup_epochs * steps_per_epoch))
    floor = config.train.min_lr_ratio

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        progress = min(1.0, (i - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
