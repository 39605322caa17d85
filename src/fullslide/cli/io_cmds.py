"""Subcommands: placeholder until this area lands."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Attach this module's subcommands to the top-level parser."""
