"""Training: the masked training loop (loop), checkpoint averaging (averaging) and data
parallelism (parallel)."""
