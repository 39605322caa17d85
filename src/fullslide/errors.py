"""Exceptions fullslide raises for bad input.

Every message is one line that names the file or field at fault and the cause, so a long batch
job can log it beside the slide and move on.
"""

from __future__ import annotations

from pathlib import Path


class FullslideError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""


class SlideError(FullslideError):
    """A slide file cannot be opened or read; ``path`` names it."""

    def __init__(self, path: str | Path, cause: str) -> None:
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class ConfigError(FullslideError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class CohortError(FullslideError):
    """A cohort CSV is invalid; the message names the file, row and column."""


class ModelError(FullslideError):
    """An encoder or aggregator cannot be built or its weights cannot be loaded."""
