"""Tile encoders, MIL aggregators and the ``SlideModel`` that joins them (no distributed code here)."""

from fullslide.models.aggregators import AggregatorOutput
from fullslide.models.encoders import TileEncoder, TinyCNN
from fullslide.models.recipes import RECIPES, Recipe, get_recipe
from fullslide.models.weights import load_encoder_weights, read_tensors
from fullslide.models.registry import AGGREGATORS, create_aggregator, create_encoder, create_model, resolve_factory
from fullslide.models.slide_model import SlideModel

__all__ = [
    "AGGREGATORS",
    "AggregatorOutput",
    "RECIPES",
    "Recipe",
    "SlideModel",
    "TileEncoder",
    "TinyCNN",
    "create_aggregator",
    "create_encoder",
    "create_model",
    "get_recipe",
    "load_encoder_weights",
    "read_tensors",
    "resolve_factory",
]
