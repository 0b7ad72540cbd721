"""Memory estimates of a Wan DiT training step under a parallel layout (per GPU, bytes): weights, fp32 grads,
optimizer state and the EMA (fp32, both sharded over DP x CP by the distributed optimizer), activations.

Activations are counted from what our block saves for its backward (checked against tensors actually
saved on tiny CPU runs in tests/test_plan_parallel.py). Per video token and block, with p the parameter
dtype's bytes (2 for bf16) and 4 for the fp32 upcasts Wan's numerics need:

    replicated over TP (split by SP):   d * (6*4 + 4*p)     LayerNorm inputs / outputs, linear inputs, gating
    split over TP:                       d/tp * (3*4 + 9*p)  q, k, v, attention out, q/k norm inputs, RoPE
    MLP:                                 f/tp * 2*p          fc1 output before and after GELU
    per-token statistics:                9*4 + 2*4*h/tp      LayerNorm / RMSNorm stats, attention log-sum-exp
and per text token and block: d * p (replicated) + d/tp * (4 + 3*p) + 4. The attention core is flash-style (no
s x s scores), as torch SDPA and TE provide, and so is megawan's ring attention (megawan.parallel.ring_attention):
per block it saves the output and an fp32 log-sum-exp only (the 4 bytes per head and token above), and its
transients (K/V in flight, fp32 accumulators: ~14 d bytes per local token and head forward, ~36 d backward in
bf16) live for one block's attention, never all blocks' at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from megawan.config import DiTConfig, ParallelConfig
from megawan.convert.dit_keys import dit_param_shapes

FP32 = 4


def activation_bytes_per_block(cfg: DiTConfig, tokens: int, text_len: int, tp: int = 1, sp: bool = False,
                               param_bytes: int = 2) -> int:
    """Bytes one block saves for backward, for `tokens` video tokens held by this rank (after CP) and one
    sample. With sequence parallelism the replicated activations are split over TP as well."""
    d, f, h, p = cfg.dim, cfg.ffn_dim, cfg.num_heads, param_bytes
    replicated_split = tp if sp else 1
    video = tokens * (
        d * (6 * FP32 + 4 * p) / replicated_split
        + d / tp * (3 * FP32 + 9 * p)
        + f / tp * 2 * p
        + 9 * FP32 / replicated_split
        + 2 * FP32 * h / tp
    )
    text = text_len * (d * p + d / tp * (FP32 + 3 * p) + FP32)
    return int(video + text)


@dataclass
class MemoryEstimate:
    params_per_gpu: int
    weights: int  # bytes: model weights in the parameter dtype
    grads: int  # fp32 gradient buffer
    optimizer: int  # fp32 main weights + Adam moments, sharded by the distributed optimizer
    activations: int
    host_activations: int = 0  # offloaded to pinned host memory (parallel.offload_blocks): not on the GPU
    ema: int = 0  # fp32 average of the main weights (train.ema_decay > 0), sharded like them

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.ema + self.activations


def estimate_memory(cfg: DiTConfig, parallel: ParallelConfig, world_size: int, tokens: int, micro_batch: int = 1,
                    text_len: int | None = None, param_bytes: int = 2, distributed_optimizer: bool = True,
                    ema: bool = False) -> MemoryEstimate:
    """Per-GPU memory of one training step (the first pipeline stage, which holds the most activations);
    ema: the run keeps an EMA of the weights (megawan.training.ema)."""
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    dp = parallel.data_parallel(world_size)
    shapes = dit_param_shapes(cfg)
    block_params = sum(_numel(s) for k, s in shapes.items() if k.startswith("blocks."))
    other_params = sum(_numel(s) for k, s in shapes.items() if not k.startswith("blocks."))
    params = block_params // (tp * pp) + other_params  # embeddings / head are small and replicated
    weights = params * param_bytes
    grads = params * FP32
    optimizer_shards = dp * cp if distributed_optimizer else 1  # the group the main weights are sharded over
    optimizer = params * 3 * FP32 // optimizer_shards
    ema_bytes = params * FP32 // optimizer_shards if ema else 0

    text_len = cfg.text_len if text_len is None else text_len
    local_tokens = -(-tokens // cp)
    layers = cfg.num_layers // pp
    per_block = activation_bytes_per_block(cfg, local_tokens, text_len, tp, parallel.sequence_parallel, param_bytes)
    block_input = local_tokens * cfg.dim * param_bytes // (tp if parallel.sequence_parallel else 1)
    offloaded = min(parallel.offload_blocks, layers)
    if parallel.recompute == "full":
        # inputs of every block, one block's activations at a time; offloaded blocks send their input to the host
        kept, host = block_input * (layers - offloaded) + per_block, block_input * offloaded
    else:
        kept, host = per_block * (layers - offloaded), per_block * offloaded
    in_flight = pp if pp > 1 else 1  # 1F1B: the first stage holds pp micro-batches
    return MemoryEstimate(params, weights, grads, optimizer, kept * micro_batch * in_flight,
                          host * micro_batch * in_flight, ema_bytes)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
