"""Tile encoders, MIL aggregators and the ``SlideModel`` that joins them (no distributed code here).

The names below are imported lazily, so that ``fullslide.models.recipes`` (the recipe table) stays importable
without torch or timm.
"""

from __future__ import annotations

from fullslide._lazy import lazy_exports


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


__getattr__, __dir__ = lazy_exports('fullslide.models', _EXPORTS, globals())
