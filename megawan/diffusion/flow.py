"""Flow matching as Wan trains it (rectified flow).

    t ~ p(t) on (0, 1), then Wan's shift  t' = s t / (1 + (s - 1) t)   (s > 1 favours noisier t)
    x_t = (1 - t') x0 + t' noise              the model sees x_t and 1000 t'
    target = noise - x0                       the velocity; loss = MSE(model(x_t), target)

Wan2.2 TI2V is one model for text-to-video and image-to-video. An image-to-video sample keeps its first latent
frame clean: its tokens get t = 0, the frame stays x0, and it is left out of the loss; a text-to-video sample is
noised whole. Training draws the mode per sample (`trains_image_to_video`, probability `train.i2v_ratio`); an
image (one latent frame) is always text-to-image, since a clean only frame would leave nothing to learn.

    fm = FlowMatching(shift=5.0, distribution="logit_normal")
    t = fm.sample_timesteps(batch, generator=g)
    x_t, target = fm.noised(x0, noise, t)
    prediction = model(x_t, fm.model_timesteps(t), text)
    loss = fm.loss(prediction, target)                        # one number for the batch
    per_sample = fm.per_sample_loss(prediction, target)       # [B]: what the trainer weighs, validation sums
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NUM_TRAIN_TIMESTEPS = 1000  # Wan's model takes t in [0, 1000]


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: t' = s t / (1 + (s - 1) t); s = 1 leaves t unchanged."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class FlowMatching:
    shift: float = 1.0
    distribution: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.distribution not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep distribution {self.distribution!r} is not uniform or logit_normal")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def sample_timesteps(self, batch: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """[batch] flow times in (0, 1), shifted."""
        if self.distribution == "uniform":
            t = torch.rand(batch, generator=generator, device=device)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, generator=generator, device=device))
        return shift_timesteps(t, self.shift)

    @staticmethod
    def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """x_t and the velocity target. t: [B] (one per sample) or broadcastable to x0."""
        t = t.view(-1, *([1] * (x0.dim() - 1))) if t.dim() == 1 else t
        t = t.to(x0.dtype)
        return (1 - t) * x0 + t * noise, noise - x0

    @staticmethod
    def model_timesteps(t: torch.Tensor) -> torch.Tensor:
        """Flow time (0-1) -> the model's timestep units (0-1000)."""
        return t * NUM_TRAIN_TIMESTEPS

    @staticmethod
    def clean_first_frame(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, patch_size=(1, 2, 2),
                          clean: Optional[torch.Tensor] = None):
        """Image-conditioned flow (Wan2.2 TI2V): the first latent frame of the samples `clean` selects ([B] bool;
        default: every sample) stays clean; the other samples are noised whole, as text-to-video.

        Returns x_t [B, C, T, H, W], target, per-token model timesteps [B, L] (0 on a clean first frame's
        tokens, the sample's t elsewhere: what diffusers' `expand_timesteps` passes the TI2V transformer, so a
        micro-batch may mix both modes), and the loss mask [B, 1, T, H, W] (0 on clean first frames).
        """
        b, _, frames, h, w = x0.shape
        keep = torch.ones(b, 1, frames, h, w, dtype=x0.dtype, device=x0.device)
        if clean is None:
            keep[:, :, 0] = 0
        else:
            keep[clean.to(device=x0.device, dtype=torch.bool), :, 0] = 0
        t_map = t.view(-1, 1, 1, 1, 1).to(x0.dtype) * keep
        x_t, target = FlowMatching.noised(x0, noise, t_map)
        pt, ph, pw = patch_size
        token_t = t_map[:, 0, ::pt, ::ph, ::pw].flatten(1) * NUM_TRAIN_TIMESTEPS
        return x_t, target, token_t, keep

    @staticmethod
    def clean_first_frame_sampling(first: torch.Tensor, latent_shape: tuple, patch_size=(1, 2, 2)) -> tuple:
        """Sampling the TI2V image-to-video way: (pin, velocity timesteps). `first` [B or 1, C, 1, H', W'] is the
        clean first latent frame (normalised); pin(x) puts it back into x [B, C, T', H', W'] (sample()'s `pin`),
        and timesteps(t) turns the sampler's [N] model timesteps into per-token ones [N, L], 0 on the first
        frame's tokens, as clean_first_frame gives training."""
        frames, h, w = latent_shape
        pt, ph, pw = patch_size
        factor = torch.ones(frames // pt, h // ph, w // pw, device=first.device)
        factor[0] = 0.0
        factor = factor.flatten()

        def pin(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([first.expand(x.shape[0], -1, -1, -1, -1), x[:, :, 1:]], dim=2)

        def timesteps(t: torch.Tensor) -> torch.Tensor:
            return factor[None] * t.to(factor.device)[:, None]

        return pin, timesteps

    @staticmethod
    def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B] mean squared error of each sample, in fp32; with a mask, each sample's mean over its masked-in
        elements (a sample with none counts 0). The trainer weighs these (padded copies weigh 0) and
        validation sums them, so both measure exactly the same thing."""
        err = (prediction.float() - target.float()).pow(2)
        if mask is None:
            return err.flatten(1).mean(1)
        mask = mask.float().expand_as(err)
        return (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)

    @staticmethod
    def loss(prediction: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean squared error over the whole batch, in fp32; with a mask, the mean over masked-in elements (unlike
        the mean of per_sample_loss, every element counts alike, whichever sample holds it)."""
        err = (prediction.float() - target.float()).pow(2)
        if mask is None:
            return err.mean()
        mask = mask.float().expand_as(err)
        return (err * mask).sum() / mask.sum().clamp_min(1)


def trains_image_to_video(generator: torch.Generator, i2v_ratio: float, latent_frames: int) -> bool:
    """Wan2.2 TI2V training: whether one sample trains as image-to-video (first latent frame clean) rather than
    text-to-video. One number is drawn from the sample's own generator (the trainer's, seeded by seed, step and
    the sample's index in the global batch, so every layout and a resume draw alike), whatever the outcome;
    the sample is image-to-video when it is below i2v_ratio (0: never, 1: always). An image (one latent
    frame) is always text-to-image: with its only frame clean there would be nothing to learn."""
    draw = torch.rand(1, generator=generator).item()
    return latent_frames > 1 and draw < i2v_ratio
