"""Attention of a block of queries over a block of keys that also returns its log-sum-exp, and the backward
of one such block given the *merged* output and log-sum-exp: the two kernels ring attention is built on.

Why the LSE: partial attentions over disjoint key blocks merge exactly through it (out = sum_i
exp(lse_i - lse) out_i, lse = logsumexp_i lse_i), and the softmax gradient of one block needs only the
final out and lse (P_block = exp(S_block - lse), delta = rowsum(dO * out)). So no [L, L_block] score
matrix has to exist outside a kernel's own bounded tiles.

Kernels, chosen by device and dtype (`kernel_for`):
- "cpu": aten._scaled_dot_product_flash_attention_for_cpu and its backward (score tiles of <= 256 queries
  x 512 keys per thread; every float dtype, fp32 and fp64 exact to rounding);
- "flash": CUDA FlashAttention-2 through aten._scaled_dot_product_flash_attention (bf16 / fp16);
- "tiled": anything else (fp32 / fp64 on a GPU, a head size flash does not take): an online softmax in
  torch over tiles of QUERY_TILE x KEY_TILE scores, so memory stays bounded there too.

Tensors are [b, h, L, d]; the key block must be non-empty (an all-padding block is skipped by the caller).
"""

from __future__ import annotations

import torch

QUERY_TILE = 1024  # the tiled kernel's score tile: [b, h, QUERY_TILE, KEY_TILE] in fp32 / fp64
KEY_TILE = 512


def kernel_for(q: torch.Tensor) -> str:
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type == "cuda" and q.shape[-1] % 8 == 0:  # SDPA pads other head sizes; the bare op does not
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        # torch's own test: dtype, head size, GPU generation, and flash not switched off (sdpa_kernel)
        if can_use_flash_attention(SDPAParams(q, q, q, None, 0.0, False, False)):
            return "flash"
    return "tiled"


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype q, k, v enter the kernel in: flash's own (it accumulates in fp32 inside); otherwise >= fp32,
    the ring's convention for CPU runs and the torch fallback."""
    return q.dtype if kernel_for(q) == "flash" else torch.promote_types(q.dtype, torch.float32)


def attention_with_lse(q, k, v, scale: float):
    """(out [b, h, Lq, d] in q's dtype, lse [b, h, Lq] in >= fp32) of softmax(q k^T * scale) v."""
    kind = kernel_for(q)
    if kind == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse
    if kind == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        return out, lse
    return tiled_attention_with_lse(q, k, v, scale)


def attention_with_lse_backward(grad_out, q, k, v, out, lse, scale: float):
    """(dq, dk, dv) of this key block's share of an attention whose full output is `out` with log-sum-exp
    `lse` (both merged over every key block): the block's probabilities are exp(q k^T * scale - lse)."""
    kind = kernel_for(q)
    if kind == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, scale=scale)
    if kind == "flash":
        # dense (not varlen): no cumulative lengths; no dropout, so the RNG state is never read
        no_rng = torch.empty(0, dtype=torch.uint64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, None, None, q.shape[-2], k.shape[-2], 0.0, False, no_rng, no_rng,
            scale=scale)
    return tiled_attention_with_lse_backward(grad_out, q, k, v, out, lse, scale)


def merge_attention(out, lse, block_out, block_lse):
    """Fold one key block's (out, lse) into the running (out, lse) of the same queries, in block_lse's dtype
    (>= fp32); out is updated in place. Pass out = lse = None for the first block."""
    if out is None:  # the first block with real keys (an earlier one may have been all padding)
        return block_out.to(block_lse.dtype), block_lse
    merged = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - merged).unsqueeze(-1)).addcmul_(block_out, torch.exp(block_lse - merged).unsqueeze(-1))
    return out, merged


# ----------------------------------------------------------------------------------------------
# the torch fallback: the flash algorithm in tiles


def tiled_attention_with_lse(q, k, v, scale: float, q_tile: int = QUERY_TILE, k_tile: int = KEY_TILE):
    outs, lses = [], []
    for qs in range(0, q.shape[-2], q_tile):
        qc = q[..., qs:qs + q_tile, :]
        m = l = acc = None
        for ks in range(0, k.shape[-2], k_tile):
            s = torch.matmul(qc, k[..., ks:ks + k_tile, :].transpose(-1, -2)) * scale
            m_tile = s.amax(dim=-1, keepdim=True)
            if m is None:  # first tile: nothing to rescale (keys are never empty here, so m stays finite)
                m = m_tile
                p = torch.exp(s - m)
                l, acc = p.sum(dim=-1, keepdim=True), torch.matmul(p, v[..., ks:ks + k_tile, :])
                continue
            m_new = torch.maximum(m, m_tile)
            p = torch.exp(s - m_new)
            alpha = torch.exp(m - m_new)
            l = l * alpha + p.sum(dim=-1, keepdim=True)
            acc = acc * alpha + torch.matmul(p, v[..., ks:ks + k_tile, :])
            m = m_new
        outs.append(acc / l)
        lses.append((m + torch.log(l)).squeeze(-1))
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def tiled_attention_with_lse_backward(grad_out, q, k, v, out, lse, scale: float,
                                      q_tile: int = QUERY_TILE, k_tile: int = KEY_TILE):
    delta = (grad_out * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O): the softmax Jacobian's shift
    lse = lse.unsqueeze(-1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs in range(0, q.shape[-2], q_tile):
        rows = slice(qs, qs + q_tile)
        qc, do = q[..., rows, :], grad_out[..., rows, :]
        for ks in range(0, k.shape[-2], k_tile):
            cols = slice(ks, ks + k_tile)
            kt, vt = k[..., cols, :], v[..., cols, :]
            p = torch.exp(torch.matmul(qc, kt.transpose(-1, -2)) * scale - lse[..., rows, :])
            dv[..., cols, :] += torch.matmul(p.transpose(-1, -2), do)
            ds = p * (torch.matmul(do, vt.transpose(-1, -2)) - delta[..., rows, :])
            dq[..., rows, :] += torch.matmul(ds, kt) * scale
            dk[..., cols, :] += torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq, dk, dv
