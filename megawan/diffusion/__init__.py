"""Flow matching (rectified flow) for training, and Wan's samplers."""

from megawan.diffusion.flow import FlowMatching, shift_timesteps
from megawan.diffusion.samplers import EulerSampler, UniPCSampler, make_sampler, sample, wan_sigmas

__all__ = ["FlowMatching", "shift_timesteps", "EulerSampler", "UniPCSampler", "make_sampler", "sample", "wan_sigmas"]
