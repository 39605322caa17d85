"""Tile encoders, MIL aggregators and the ``SlideModel`` that joins them (no distributed code here).

The names below are imported lazily, so that ``fullslide.models.recipes`` (the recipe table) stays importable
without torch or timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AggregatorOutput": "fullslide.models.aggregators",
    "TileEncoder": "fullslide.models.encoders",
    "TinyCNN": "fullslide.models.encoders",
    "RECIPES": "fullslide.models.recipes",
    "Recipe": "fullslide.models.recipes",
    "get_recipe": "fullslide.models.recipes",
    "load_encoder_weights": "fullslide.models.weights",
    "read_tensors": "fullslide.models.weights",
    "AGGREGATORS": "fullslide.models.registry",
    "create_aggregator": "fullslide.models.registry",
    "create_encoder": "fullslide.models.registry",
    "create_model": "fullslide.models.registry",
    "resolve_factory": "fullslide.models.registry",
    "SlideModel": "fullslide.models.slide_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fullslide.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
