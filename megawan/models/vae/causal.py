"""Causal 3D convolution over a stream of video chunks.

A video is encoded (decoded) as a stream: the first frame alone, then chunks of 4 frames (one latent
frame at a time). Every causal conv pads time only in front (kernel_t - 1 frames): zeros at the start of the
stream, the previous chunk's last frames afterwards, kept in a `StreamCache`. A whole video in one call and
the same video in chunks therefore give the same result, and memory holds one chunk of activations.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class StreamCache:
    """Per-module state of one stream (one encode or decode call): the last input frames of each causal conv
    and the 'stream has started' marks of the modules that treat the first frame specially."""

    def __init__(self):
        self._state: dict = {}

    def get(self, module):
        return self._state.get(id(module))

    def put(self, module, value) -> None:
        self._state[id(module)] = value

    def first_call(self, module) -> bool:
        """True the first time `module` asks in this stream (and marks it as started)."""
        key = ("started", id(module))
        if key in self._state:
            return False
        self._state[key] = True
        return True


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class CausalConv3d(nn.Conv3d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = _triple(padding)
        self.time_padding = 2 * pt  # all of it in front: causal
        self.spatial_padding = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        front = self.time_padding
        if cache is not None and front > 0:
            previous = cache.get(self)
            stream = x if previous is None else torch.cat([previous, x], dim=2)
            cache.put(self, stream[:, :, -front:].clone())
            if previous is not None:
                x, front = stream, front - previous.shape[2]
        return super().forward(F.pad(x, self.spatial_padding + (front, 0)))
