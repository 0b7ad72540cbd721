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

LoRA (megawan.lora; `lora=` a LoRAConfig with rank > 0): the base weights stay frozen in the parameter dtype
with no gradient buffer, fp32 main copy or Adam state (megatron's DDP and distributed optimizer only hold
parameters that require grad); the adapters (rank r on each adapted linear: r·(in + out) parameters, split over
TP as megawan.lora.adapters splits them) have all three, sharded like full training's. With every block linear
adapted (the default targets) a frozen block saves less: the modulation, gate and q/k-norm weights want no
gradient, so the fp32 LayerNorm outputs scaled by the modulation, the fp32 residual branches multiplied by the
gates and the normalised q / k (the text's k) are not saved:

    replicated over TP:  d * (2*4 + 4*p)     split over TP:  d/tp * (3*4 + 6*p)     text:  d/tp * (4 + 2*p)
plus each adapter's r-wide hidden A·x (r*p per token) and, under sequence parallelism, the input a column
adapter gathers (d*p per gathered token each; the base linear re-gathers its own in backward). Counted with
every linear's input saved, as a full block saves them: with fewer targets a frozen linear keeps no input of
its own, so the estimate is an upper bound there (tests/test_finetune_recipes.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

from megawan.config import DiTConfig, LoRAConfig, ParallelConfig
from megawan.convert.dit_keys import TP_AXIS, dit_param_shapes
from megawan.lora.targets import select_linears

FP32 = 4


def adapted_linears(cfg: DiTConfig, lora: LoRAConfig) -> list:
    """(name in a block, in_features, out_features, TP split: column | row) of each linear `lora` adapts."""
    shapes = dit_param_shapes(cfg)
    rows = []
    for name in select_linears(lora.targets, image_branch=cfg.image_dim is not None):
        out_features, in_features = shapes[f"blocks.0.{name}.weight"]
        axis = next(a for k, a in TP_AXIS.items() if f"{name}.weight".endswith(k))
        rows.append((name, in_features, out_features, "row" if axis == 1 else "column"))
    return rows


def lora_params_per_block(cfg: DiTConfig, lora: LoRAConfig, tp: int = 1) -> int:
    """Adapter parameters of one block on one TP rank: A [r, in] and B [out, r], the one on the split side of
    the linear cut over TP (column: B's rows, row: A's columns), the other whole (megawan.lora.adapters)."""
    r = lora.rank
    return sum(r * (i + o // tp) if mode == "column" else r * (i // tp + o)
               for _, i, o, mode in adapted_linears(cfg, lora))


def activation_bytes_per_block(cfg: DiTConfig, tokens: int, text_len: int, tp: int = 1, sp: bool = False,
                               param_bytes: int = 2, lora: Optional[LoRAConfig] = None) -> int:
    """Bytes one block saves for backward, for `tokens` video tokens held by this rank (after CP) and one
    sample. With sequence parallelism the replicated activations are split over TP as well. lora: the block's
    weights are frozen and its linears carry adapters (see the module's docstring)."""
    d, f, h, p = cfg.dim, cfg.ffn_dim, cfg.num_heads, param_bytes
    replicated_split = tp if sp else 1
    frozen = lora is not None and lora.enabled
    video = tokens * (
        d * ((2 if frozen else 6) * FP32 + 4 * p) / replicated_split
        + d / tp * (3 * FP32 + (6 if frozen else 9) * p)
        + f / tp * 2 * p
        + 9 * FP32 / replicated_split
        + 2 * FP32 * h / tp
    )
    text = text_len * (d * p + d / tp * (FP32 + (2 if frozen else 3) * p) + FP32)
    if frozen:
        for name, _, _, mode in adapted_linears(cfg, lora):
            on_text = name.startswith("cross_attention.linear_") and name.endswith(("_k", "_v"))
            if name.endswith("_img"):
                continue  # 257 CLIP tokens: too few to count, as the base's image branch is not counted
            if on_text:
                text += text_len * lora.rank * p
                continue
            split = replicated_split if mode == "row" else 1  # a row adapter's A·x is scattered like the output
            video += tokens * lora.rank * p / split
            if sp and tp > 1 and mode == "column":
                video += tokens * d * p  # the adapter's own gathered input
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
    trainable_params: Optional[int] = None  # per GPU: every parameter, or the LoRA adapters' alone

    def __post_init__(self):
        if self.trainable_params is None:
            self.trainable_params = self.params_per_gpu

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.ema + self.activations


def estimate_memory(cfg: DiTConfig, parallel: ParallelConfig, world_size: int, tokens: int, micro_batch: int = 1,
                    text_len: int | None = None, param_bytes: int = 2, distributed_optimizer: bool = True,
                    ema: bool = False, lora: Optional[LoRAConfig] = None) -> MemoryEstimate:
    """Per-GPU memory of one training step (the first pipeline stage, which holds the most activations);
    ema: the run keeps an EMA of the weights (megawan.training.ema); lora: the run's `lora:` section (rank > 0:
    only the adapters train, the base is frozen in the parameter dtype)."""
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    dp = parallel.data_parallel(world_size)
    lora = lora if lora is not None and lora.enabled else None
    shapes = dit_param_shapes(cfg)
    block_params = sum(_numel(s) for k, s in shapes.items() if k.startswith("blocks."))
    other_params = sum(_numel(s) for k, s in shapes.items() if not k.startswith("blocks."))
    base = block_params // (tp * pp) + other_params  # embeddings / head are small and replicated
    layers = cfg.num_layers // pp
    trainable = layers * lora_params_per_block(cfg, lora, tp) if lora else base
    params = base + trainable if lora else base
    weights = params * param_bytes
    grads = trainable * FP32  # megatron's gradient buffer (grad_reduce_in_fp32), trainable parameters only
    optimizer_shards = dp * cp if distributed_optimizer else 1  # the group the main weights are sharded over
    optimizer = trainable * 3 * FP32 // optimizer_shards
    ema_bytes = trainable * FP32 // optimizer_shards if ema else 0

    text_len = cfg.text_len if text_len is None else text_len
    local_tokens = -(-tokens // cp)
    per_block = activation_bytes_per_block(cfg, local_tokens, text_len, tp, parallel.sequence_parallel, param_bytes,
                                           lora)
    block_input = local_tokens * cfg.dim * param_bytes // (tp if parallel.sequence_parallel else 1)
    offloaded = min(parallel.offload_blocks, layers)
    if parallel.recompute == "full":
        # inputs of every block, one block's activations at a time; offloaded blocks send their input to the host
        kept, host = block_input * (layers - offloaded) + per_block, block_input * offloaded
    else:
        kept, host = per_block * (layers - offloaded), per_block * offloaded
    in_flight = pp if pp > 1 else 1  # 1F1B: the first stage holds pp micro-batches
    return MemoryEstimate(params, weights, grads, optimizer, kept * micro_batch * in_flight,
                          host * micro_batch * in_flight, ema_bytes, trainable)


def estimate_run_memory(run, world_size: int, tokens: int) -> MemoryEstimate:
    """estimate_memory for a RunConfig: its model, layout, micro batch, precision, EMA and `lora:` section."""
    return estimate_memory(run.model, run.parallel, world_size, tokens, run.data.micro_batch_size,
                           text_len=run.model.text_len, param_bytes=2 if run.train.precision == "bf16" else 4,
                           ema=run.train.ema_decay > 0, lora=run.lora)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
