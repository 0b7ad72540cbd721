"""An exponential moving average of the weights, sharded like the distributed optimizer's fp32 main weights:
each data-parallel rank averages exactly the ranges of the parameters its optimizer shard owns (1 / (DP x CP)
of the model), and saves it under megawan.checkpoint's EMA prefix as whole tensors with the model's own
sharding metadata, so it reshards to any TP / PP / CP / DP layout.

    ema = EMA(chunks, decay=0.9999, optimizer=optimizer)   # after build_optimizer(wrap_data_parallel(chunks))
    ...optimizer.step(); ema.update()                      # one fused lerp toward the fp32 main weights
    ema.apply(); validate(); ema.restore()                 # sample with the average, then back (exactly)

apply() writes each rank's average (cast to the parameter dtype) into its own ranges of the parameters and
all-gathers the parameters over DP, as the distributed optimizer does after a step; restore() does the same
with the main weights, which apply() left untouched, so no full copy of the weights is kept. Where the main
weights are the parameters themselves (fp32 training) only this rank's ranges are backed up. Without an
optimizer, or with one that is not distributed, each parameter is one whole range (megawan.training.ema_shards).
"""

from __future__ import annotations

import dataclasses

import torch

from megawan.checkpoint import EMA_PREFIX
from megawan.parallel.cpu_compat import megatron_cpu_mode
from megawan.training.ema_shards import find_shards


class EMA:
    def __init__(self, chunks: list, decay: float, optimizer=None, skip_frozen: bool = False):
        """chunks: the model chunks (DDP-wrapped or not; the same parameters); optimizer: megatron's optimizer
        over them (a DistributedOptimizer, a ChainedOptimizer of them, ...) or None for plain modules.
        skip_frozen: average only the parameters that train (a LoRA run: its adapters, not the frozen base)."""
        self.chunks, self.decay = chunks, decay
        self.shards = find_shards(chunks, optimizer, skip_frozen)
        self.averages = [s.ema for s in self.shards.slots]  # this rank's fp32 averages, one flat range each
        self._by_param = {s.param: s for s in self.shards.slots}
        self._backup = None
        self.reset()

    @property
    def numel(self) -> int:
        """Elements this rank averages (about the model's / (DP x CP) with the distributed optimizer)."""
        return sum(a.numel() for a in self.averages)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current main weights (a new run, or a warm start's loaded weights)."""
        for slot in self.shards.slots:
            slot.ema.copy_(slot.main)

    @torch.no_grad()
    def update(self) -> None:
        """After a successful optimizer step: ema += (1 - decay) * (main - ema), one fused kernel."""
        if not self.averages:
            return
        targets = [s.main if s.main.dtype == torch.float32 else s.main.float() for s in self.shards.slots]
        torch._foreach_lerp_(self.averages, targets, 1.0 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        """Put the average into the model (collective over DP); `restore()` brings the trained weights back."""
        if self._backup is not None:
            raise RuntimeError("EMA.apply() called twice without restore()")
        with megatron_cpu_mode():
            self.shards.finish_param_gathers()  # an all-gather still in flight must not carry our writes
            self._backup = [s.main.clone() if s.aliased else None for s in self.shards.slots]
            for slot in self.shards.slots:
                slot.model_range().copy_(slot.ema)
            self.shards.gather_params()

    @torch.no_grad()
    def restore(self) -> None:
        """The trained weights back, bit for bit: the main weights (or the kept ranges) cast as after a step."""
        if self._backup is None:
            raise RuntimeError("EMA.restore() without apply()")
        with megatron_cpu_mode():
            self.shards.finish_param_gathers()
            for slot, kept in zip(self.shards.slots, self._backup):
                slot.model_range().copy_(slot.main if kept is None else kept)
            self._backup = None
            self.shards.gather_params()

    # ------------------------------------------------------------------------------------------
    # Checkpoints: whole tensors under `ema.<model key>`

    def sharded_state_dict(self, model_sharded: list, is_loading: bool = False) -> dict:
        """The EMA as whole fp32 tensors with the metadata (global shape, TP offsets, replica ids) of the model's
        own entries. Saving all-gathers the ranges over DP (collective); loading hands out empty tensors that
        `load_loaded` then cuts this rank's ranges from. model_sharded: [chunk.sharded_state_dict() ...]."""
        whole = self.shards.whole_tensors(gather=not is_loading)
        out, self._key_to_param = {}, []
        for i, (chunk, sharded) in enumerate(zip(self.chunks, model_sharded)):
            by_id = {id(p): p for p in chunk.parameters()}
            part, params = {}, {}
            for key, entry in sharded.items():
                param = by_id.get(id(getattr(entry, "data", None)))
                if param is not None and param in whole:  # not a frozen parameter (a LoRA run's base)
                    data = whole[param]
                    part[key] = dataclasses.replace(entry, key=EMA_PREFIX + entry.key, data=data, dtype=data.dtype)
                    params[key] = param
            out[f"chunk{i}"] = part
            self._key_to_param.append(params)
        return out

    @torch.no_grad()
    def load_loaded(self, loaded: dict) -> None:
        """Keep this rank's ranges of what dist_checkpointing loaded for the dict sharded_state_dict() returned."""
        for i, params in enumerate(self._key_to_param):
            for key, tensor in loaded[f"chunk{i}"].items():
                slot = self._by_param.get(params[key])
                if slot is not None:  # a parameter this rank's optimizer shard owns (part of)
                    slot.ema.copy_(tensor.reshape(-1)[slot.start:slot.end])
