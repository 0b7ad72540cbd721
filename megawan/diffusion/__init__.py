"""Flow matching (rectified flow) for training (with the one per-sample loss), Wan's samplers, and the official
sampling defaults per model (`defaults`)."""

from megawan.diffusion.flow import FlowMatching, shift_timesteps, trains_image_to_video
from megawan.diffusion.samplers import EulerSampler, UniPCSampler, make_sampler, sample, wan_sigmas

__all__ = ["FlowMatching", "shift_timesteps", "trains_image_to_video", "EulerSampler", "UniPCSampler", "make_sampler",
           "sample", "wan_sigmas"]
