"""Training: the loop (trainer), megatron's schedules and the gradient reduction (schedule), DDP and the
distributed optimizer (optimizer), FP8 (precision), the EMA, metrics sinks, checkpoints, validation and the
per-GPU memory estimate (memory). Submodules are imported by name; nothing is re-exported here."""
