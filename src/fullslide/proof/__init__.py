"""The proof of the engine: an independent single-graph reference, probe parameters, and check-grad."""
