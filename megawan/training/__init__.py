"""Training: the flow-matching step (more to come: the loop, optimizer, EMA, checkpoints, curriculum)."""

from megawan.training.step import flow_matching_loss

__all__ = ["flow_matching_loss"]
