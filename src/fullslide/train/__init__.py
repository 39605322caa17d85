"""Training, evaluation and their bookkeeping: config, trainer loop, checkpoints, losses, metrics, logs."""
