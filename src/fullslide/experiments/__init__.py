"""Experiments that reproduce the paper's findings with the tool itself (clients of train/ and eval)."""
