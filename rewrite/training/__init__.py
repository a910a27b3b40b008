"""Training a rewritten graph: the loop, data and batches, losses, checkpoints, several devices, and the
speed pipeline."""
