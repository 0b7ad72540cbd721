"""An exponential moving average of the weights, kept in fp32 beside each rank's own shards and saved in the
checkpoint sharded exactly like them (under megawan.checkpoint's EMA prefix), so it reshards with the model.

    ema = EMA(chunks, decay=0.9999)
    ...optimizer.step(); ema.update()
    ema.apply(); validate(); ema.restore()   # sample with the averaged weights, then back (a kept copy: exact)
"""

from __future__ import annotations

import dataclasses

import torch

from megawan.checkpoint import EMA_PREFIX


class EMA:
    def __init__(self, chunks: list, decay: float):
        self.chunks, self.decay = chunks, decay
        self.shadow = [{name: p.detach().float().clone() for name, p in chunk.named_parameters()} for chunk in chunks]

    @torch.no_grad()
    def update(self) -> None:
        for chunk, shadow in zip(self.chunks, self.shadow):
            for name, p in chunk.named_parameters():
                shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange model weights and the average (call again to undo)."""
        for chunk, shadow in zip(self.chunks, self.shadow):
            for name, p in chunk.named_parameters():
                current = p.detach().float().clone()
                p.copy_(shadow[name].to(p.dtype))
                shadow[name].copy_(current)

    @torch.no_grad()
    def apply(self) -> None:
        """Put the average into the model (e.g. to validate with it); `restore()` brings the weights back
        exactly (a copy is kept, so bf16 weights do not round the average)."""
        self._backup = [{name: p.detach().clone() for name, p in chunk.named_parameters()} for chunk in self.chunks]
        for chunk, shadow in zip(self.chunks, self.shadow):
            for name, p in chunk.named_parameters():
                p.copy_(shadow[name].to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for chunk, backup in zip(self.chunks, self._backup):
            for name, p in chunk.named_parameters():
                p.copy_(backup[name])
        self._backup = None

    def load_loaded(self, loaded: dict) -> None:
        """Copy what dist_checkpointing loaded for the dict sharded_state_dict() last returned."""
        for i, shadow in enumerate(self.shadow):
            for key, tensor in loaded[f"chunk{i}"].items():
                shadow[self.key_to_name[i][key]].copy_(tensor)

    def sharded_state_dict(self, model_sharded: list) -> dict:
        """The EMA tensors with the metadata (global shape, TP offsets, replica ids) of the model's own entries.
        model_sharded: [chunk.sharded_state_dict() for chunk in chunks] (local-module parameter names)."""
        out, self.key_to_name = {}, []
        for i, (chunk, shadow, sharded) in enumerate(zip(self.chunks, self.shadow, model_sharded)):
            by_param = {id(p): name for name, p in chunk.named_parameters()}
            part, names = {}, {}
            for key, entry in sharded.items():
                name = by_param.get(id(getattr(entry, "data", None)))
                if name is not None:
                    # fp32 beside bf16 weights: the entry's dtype is the shadow's
                    part[key] = dataclasses.replace(entry, key=EMA_PREFIX + entry.key, data=shadow[name],
                                                    dtype=shadow[name].dtype)
                    names[key] = name
            out[f"chunk{i}"] = part
            self.key_to_name.append(names)
        return out
