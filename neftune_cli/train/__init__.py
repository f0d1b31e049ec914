"""Training: the fine-tuning recipe, its step (noise and loss), parallelism, checkpoints, metrics."""
