"""The proof of the engine: an independent single-graph reference, probe parameters, and check-grad."""

#: Memory modes check-grad runs; ``auto`` at three budgets: every chunk graph fits, about half fits, none fits.
CHECK_MODES = ("full", "checkpoint", "recompute", "auto-all", "auto-half", "auto-none")
