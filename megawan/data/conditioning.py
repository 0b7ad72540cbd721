"""Image conditioning as the official Wan pipelines build it at sampling time, for precompute to store.

    video = conditioning_video(clip, "i2v")                 # [3, F, H, W]: the clip's first frame, then zeros
    mean, _ = vae.encode(video[None])                       # -> the stored `cond_latents` (raw, like `latents`)
    frame_mask("i2v", frames=F, temporal_stride=4)          # uint8 [4, T']: which frames are given
    clip_images(clip, "flf2v")                              # [2, 3, H, W]: what the CLIP encoder sees

Kinds: "i2v" (Wan2.1 I2V-14B, Wan2.2 I2V-A14B: the first frame given) and "flf2v" (Wan2.1 FLF2V-14B: the
first and the last). The model's input is [noisy latents, mask, normalised conditioning latents] along the
channels: 16 + 4 + 16 = 36 for the Wan2.1 VAE. The mask has one channel per frame of a latent frame's
temporal chunk (the VAE's temporal stride): the causal VAE's first latent frame holds pixel frame 0 alone,
so pixel frame 0 counts `stride` times (all channels of latent frame 0 are 1) and pixel frame F-1 is channel
stride-1 of the last latent frame (FLF2V: that one channel is 1, the other three 0) — Wan's `msk`.
"""

from __future__ import annotations

import torch

KINDS = ("i2v", "flf2v")


def check_kind(kind: str, field: str = "conditioning") -> str:
    if kind not in KINDS:
        raise ValueError(f"{field}: {kind!r} is not one of {' | '.join(KINDS)}")
    return kind


def given_frames(kind: str, frames: int) -> list:
    """The pixel frames a conditioning of `kind` gives: [0] (i2v) or [0, frames - 1] (flf2v)."""
    check_kind(kind)
    if frames < 2:
        raise ValueError(f"{kind} conditioning needs a video (at least 2 frames), not {frames} frame(s)")
    return [0] if kind == "i2v" else [0, frames - 1]


def conditioning_video(video: torch.Tensor, kind: str) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> the video Wan encodes as the condition: the given frames where they are, zero
    (mid-grey) frames elsewhere. Same device and dtype as `video`."""
    out = torch.zeros_like(video)
    for f in given_frames(kind, video.shape[1]):
        out[:, f] = video[:, f]
    return out


def clip_images(video: torch.Tensor, kind: str) -> torch.Tensor:
    """[n, 3, H, W]: the frames the CLIP image encoder sees, in the order their tokens are concatenated (FLF2V:
    the first frame's tokens, then the last frame's, along the token axis, as the official FLF2V)."""
    return torch.stack([video[:, f] for f in given_frames(kind, video.shape[1])])


def frame_mask(kind: str, frames: int, temporal_stride: int) -> torch.Tensor:
    """uint8 [temporal_stride, T'] with T' = (frames - 1) / temporal_stride + 1: 1 where a pixel frame is given
    (see the module docstring for the layout)."""
    if (frames - 1) % temporal_stride:
        raise ValueError(f"{frames} frames is not {temporal_stride} n + 1 (the causal VAE's frame counts)")
    given = torch.zeros(frames, dtype=torch.uint8)
    given[given_frames(kind, frames)] = 1
    per_frame = torch.cat([given[:1].repeat(temporal_stride), given[1:]])  # frame 0 fills latent frame 0 alone
    return per_frame.view(-1, temporal_stride).t().contiguous()


def expand_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[..., stride, T'] -> float [..., stride, T', H', W']: the mask as the model's input channels."""
    return mask.float()[..., None, None].expand(*mask.shape, height, width)


__all__ = ["KINDS", "check_kind", "given_frames", "conditioning_video", "clip_images", "frame_mask", "expand_mask"]
