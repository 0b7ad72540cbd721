"""One optimizer step of flow matching under any (TP, PP, CP, DP) layout, through megatron's schedules.

    chunks = wrap_data_parallel(build_model_chunks(cfg, parallel))
    optimizer = build_optimizer(chunks, lr=1e-4)
    losses, grad_norm = train_step(chunks, optimizer, microbatches, tokens=..., micro_batch_size=...)

A micro-batch is a dict with the model's inputs already noised: x_t, timestep (Wan units), text,
optional image, and the velocity target (megawan.diffusion.FlowMatching builds them).
"""

from __future__ import annotations

from megawan.diffusion.flow import FlowMatching
from megawan.parallel.pipeline import forward_backward


def flow_forward_step(data_iterator, model):
    """megatron's forward_step contract: (output, loss_fn). Non-last pipeline stages never call loss_fn."""
    batch = next(data_iterator)
    output = model(batch["x_t"], batch["timestep"], batch["text"], image=batch.get("image"))

    def loss_fn(prediction):
        loss = FlowMatching.loss(prediction, batch["target"], batch.get("mask"))
        return loss, {"loss": loss.detach().clone()}

    return output, loss_fn


def train_step(chunks: list, optimizer, microbatches: list, tokens: int, micro_batch_size: int):
    """Forward / backward over the micro-batches, gradient reduction, optimizer step.
    Returns (per-micro-batch losses on the last pipeline stage, else [], gradient norm)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    iterators = [iter(microbatches) for _ in chunks]
    results = forward_backward(chunks, flow_forward_step, iterators, len(microbatches), tokens, micro_batch_size)
    _, grad_norm, _ = optimizer.step()
    return [r["loss"].item() for r in results], grad_norm
