"""Flow matching (rectified flow) for training and, later, the samplers."""

from megawan.diffusion.flow import FlowMatching, shift_timesteps

__all__ = ["FlowMatching", "shift_timesteps"]
