"""Multi-task training on Ray Train: placement, the worker loop, checkpoints, the launcher."""
