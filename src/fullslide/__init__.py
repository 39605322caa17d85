"""fullslide: exact end-to-end training of tile encoders and MIL aggregators on whole slides.

``import fullslide as fs`` gives the jobs as functions (``fs.train``, ``fs.tile``, ``fs.extract``, ``fs.plan``,
``fs.synth``, ``fs.open_slide``) and ``fs.Run`` (evaluate, predict, heatmaps, model): see :mod:`fullslide.api`.
Subpackages (``fs.engine``, ``fs.models``, ``fs.slides``, ``fs.data``, ``fs.train``, ``fs.proof``) load on first
use. Importing the package is cheap on purpose: no torch, no slide libraries, no network until a job needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = ("Run", "extract", "load_config", "open_slide", "plan", "synth", "tile", "train")
_SUBPACKAGES = ("api", "data", "engine", "experiments", "models", "proof", "slides", "train", "viz")
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name == "train":  # the package fullslide.train is callable: fs.train(config) is fullslide.api.train
        return importlib.import_module("fullslide.train")
    if name in _API:
        return getattr(importlib.import_module("fullslide.api"), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"fullslide.{name}")
    raise AttributeError(f"module 'fullslide' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBPACKAGES])
