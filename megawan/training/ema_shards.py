"""Which ranges of which parameters this rank's EMA averages, and toward which fp32 main weights: read from
megatron-core's optimizers (0.16), so that the EMA is sharded exactly like the distributed optimizer.

DistributedOptimizer: every DDP bucket (a flat run of parameters, padded to a multiple of DP) is split into
DP equal pieces; rank r's optimizer owns piece r, i.e. a range of each parameter overlapping it (the "param"
range of `_get_model_param_range_map`; "gbuf_local" is where that range sits inside the piece). Its main
weights are fp32 copies of those ranges (`shard_fp32_from_float16_groups`) or, for fp32 parameters, views
of the parameters themselves (`shard_fp32_groups`). The EMA keeps one fp32 piece per bucket laid out like the
grad / param buffer's, so that a whole bucket's average is one all-gather (as the parameters are after a
step) and each parameter's average is a view into it.

Float16OptimizerWithFloat16Params (not distributed): whole fp32 copies of the bf16 / fp16 parameters.
Any other parameter (fp32 without the distributed optimizer, no optimizer at all): the whole parameter is
its own main weight. With skip_frozen, a frozen parameter (requires_grad False: a LoRA run's base) is not averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Slot:
    """One range of one parameter that this rank averages."""
    param: torch.nn.Parameter
    start: int  # the range, in the flattened parameter
    end: int
    main: torch.Tensor  # the weights the optimizer updates for the range (flat; fp32 unless a plain module's)
    ema: torch.Tensor  # the fp32 average of the range (flat)
    aliased: bool  # main is the parameter's own memory: applying the average overwrites it

    def model_range(self) -> torch.Tensor:
        return self.param.detach().view(-1)[self.start:self.end]


@dataclass
class _Bucket:
    """This rank's fp32 piece of one DDP bucket, and where each of the bucket's parameters lies in it."""
    local: torch.Tensor
    numel: int  # the whole bucket's
    group: object  # the data-parallel group the bucket is split over
    members: dict = field(default_factory=dict)  # param -> (start, end) in the whole bucket


class Shards:
    def __init__(self, slots: list, buckets: list, ddp_chunks: list):
        self.slots, self._buckets, self._ddp_chunks = slots, buckets, ddp_chunks

    def whole_tensors(self, gather: bool) -> dict:
        """param -> a whole fp32 tensor shaped like it: the average, all-gathered over DP (gather=True), or
        uninitialised room to load one into."""
        out = {}
        for bucket in self._buckets:
            whole = torch.empty(bucket.numel, dtype=torch.float32, device=bucket.local.device)
            if gather:
                dist.all_gather_into_tensor(whole, bucket.local, group=bucket.group)
            for param, (start, end) in bucket.members.items():
                out[param] = whole[start:end].view(param.shape)
        for slot in self.slots:
            if slot.param not in out:  # not sharded: the slot is the whole parameter
                out[slot.param] = slot.ema.view(slot.param.shape)
        return out

    def finish_param_gathers(self) -> None:
        """Wait for a parameter all-gather still in flight (DDP's overlap_param_gather)."""
        for chunk in self._ddp_chunks:
            for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
                if group.param_gather_handle is not None:
                    group.param_gather_handle.wait()
                    group.param_gather_handle = None

    def gather_params(self) -> None:
        """Every rank's ranges of the parameters to every rank of its DP group, as after an optimizer step."""
        for chunk in self._ddp_chunks:
            chunk.start_param_sync(force_sync=True)


def _optimizers(optimizer) -> list:
    if optimizer is None:
        return []
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _distributed(opt, slots: list, buckets: list) -> set:
    """Slots and buckets of one DistributedOptimizer; returns the parameters its buffers hold."""
    if opt.ddp_config.use_megatron_fsdp or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        raise ValueError("the EMA reads the distributed optimizer's fp32 main weights: megatron FSDP and the "
                         "precision-aware optimizer keep them elsewhere")
    mains = {}
    for models, shards, aliased in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups, False),
                                    (opt.model_fp32_groups, opt.shard_fp32_groups, True)):
        for model_group, shard_group in zip(models, shards):
            for param, main in zip(model_group, shard_group):
                mains[param] = (main.detach().view(-1), aliased)
    held = set()
    for buffer, ranges in zip(opt.buffers, opt.gbuf_ranges):
        group = buffer.data_parallel_group
        for per_bucket in ranges.values():
            for index, bucket_ranges in enumerate(per_bucket):
                bucket = buffer.buckets[index]
                numel = bucket.grad_data.numel()
                local = torch.zeros(numel // group.size(), dtype=torch.float32, device=bucket.grad_data.device)
                members = {param: (start - bucket.offset, end - bucket.offset)
                           for param, (start, end, bucket_id) in buffer.param_index_map.items() if bucket_id == index}
                buckets.append(_Bucket(local, numel, group, members))
                held.update(members)
                for param, r in bucket_ranges["param_map"].items():
                    main, aliased = mains[param]
                    where, own = r["gbuf_local"], r["param"]
                    slots.append(Slot(param, own.start, own.end, main, local[where.start:where.end], aliased))
    return held


def find_shards(chunks: list, optimizer=None, skip_frozen: bool = False) -> Shards:
    """The ranges of the chunks' parameters this rank averages: its distributed optimizers' shards, whole
    parameters elsewhere (toward a non-distributed optimizer's fp32 copy when there is one); skip_frozen: none of
    the parameters that do not train (a LoRA run's base)."""
    slots, buckets, ddp_chunks, held = [], [], [], set()
    fp32_copies = {}
    for opt in _optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False):
            continue  # a rank with nothing to optimise
        if hasattr(opt, "gbuf_ranges"):
            held |= _distributed(opt, slots, buckets)
            ddp_chunks += [c for c in opt.model_chunks if all(c is not d for d in ddp_chunks)]
        elif hasattr(opt, "fp32_from_float16_groups"):
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                fp32_copies.update((p, m.detach().view(-1)) for p, m in zip(model_group, main_group))
    for chunk in chunks:
        for param in chunk.parameters():
            if param in held or (skip_frozen and not param.requires_grad):  # in a distributed optimizer's
                continue  # buffers, shared by two chunks, or frozen (a LoRA run's base: nothing to average)
            main = fp32_copies.get(param)
            aliased = main is None
            if aliased:
                main = param.detach().view(-1)
            slots.append(Slot(param, 0, param.numel(), main,
                              torch.empty(param.numel(), dtype=torch.float32, device=param.device), aliased))
            held.add(param)
    return Shards(slots, buckets, ddp_chunks)
