"""Training: the pure step, the optimizer, the one runtime builder, checkpoints, guards and the loop."""
