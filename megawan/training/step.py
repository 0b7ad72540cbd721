"""One flow-matching training step's loss, the unit every parallel layout and the trainer call.

    loss = flow_matching_loss(model, x0, text, FlowMatching(shift=5.0), generator=g)
    loss.backward()
"""

from __future__ import annotations

from typing import Optional

import torch

from megawan.diffusion.flow import FlowMatching


def flow_matching_loss(model, x0: torch.Tensor, text: torch.Tensor, flow: FlowMatching,
                       generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
                       t: Optional[torch.Tensor] = None, image: Optional[torch.Tensor] = None,
                       condition: Optional[torch.Tensor] = None, clean_first_frame: bool = False) -> torch.Tensor:
    """MSE between the model's velocity at (x_t, t) and noise - x0.

    x0: clean latents [B, C, T, H, W]; text: umT5 states; noise / t: drawn from `generator` unless given
    (t in 0-1, already shifted when given). condition: extra input channels concatenated after x_t
    (I2V: mask + image latents, in_dim 36). clean_first_frame: Wan2.2 TI2V's image-to-video mode, where
    the first latent frame stays clean, gets t = 0 and is left out of the loss.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    if t is None:
        t = flow.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
    mask = None
    if clean_first_frame:
        patch = getattr(getattr(model, "dit_config", None), "patch_size", (1, 2, 2))
        x_t, target, timestep, mask = flow.clean_first_frame(x0, noise, t, patch)
    else:
        x_t, target = flow.noised(x0, noise, t)
        timestep = flow.model_timesteps(t)
    inputs = x_t if condition is None else torch.cat([x_t, condition.to(x_t.dtype)], dim=1)
    prediction = model(inputs, timestep, text, image=image)
    return flow.loss(prediction, target, mask)
