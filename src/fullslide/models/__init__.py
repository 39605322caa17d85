"""Tile encoders, MIL aggregators and the ``SlideModel`` that joins them (no distributed code here)."""

from fullslide.models.aggregators import AggregatorOutput
from fullslide.models.encoders import TileEncoder, TinyCNN, load_state_dict_file, load_weights
from fullslide.models.registry import AGGREGATORS, create_aggregator, create_encoder, create_model, resolve_factory
from fullslide.models.slide_model import SlideModel

__all__ = [
    "AGGREGATORS",
    "AggregatorOutput",
    "SlideModel",
    "TileEncoder",
    "TinyCNN",
    "create_aggregator",
    "create_encoder",
    "create_model",
    "load_state_dict_file",
    "load_weights",
    "resolve_factory",
]
