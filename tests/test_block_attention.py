"""The kernels ring attention is built on: attention over key blocks, merged through their log-sum-exps,
equals attention over all keys; and each block's backward, given the merged output and LSE, yields that
block's share of the gradients (dq summed over blocks, dk / dv block by block)."""

import pytest
import torch
import torch.nn.functional as F

from megawan.parallel import block_attention as ba


def _kernels(kind):
    """(forward, backward) for the CPU fused kernel, or the torch fallback with tiles small enough that a
    block spans several of them in both directions."""
    if kind == "cpu":
        return ba.attention_with_lse, ba.attention_with_lse_backward
    return (lambda q, k, v, s: ba.tiled_attention_with_lse(q, k, v, s, q_tile=7, k_tile=5),
            lambda *a: ba.tiled_attention_with_lse_backward(*a, q_tile=7, k_tile=5))


@pytest.mark.parametrize("kind", ["cpu", "tiled"])
def test_blocks_merged_by_lse_equal_full_attention(kind):
    forward, backward = _kernels(kind)
    g = torch.Generator().manual_seed(0)
    b, h, lq, lk, d, scale = 2, 3, 19, 23, 8, 0.3
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, lk, d, generator=g, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_inputs, scale=scale)
    ref.backward(grad_out)

    blocks = [slice(0, 9), slice(9, 10), slice(10, lk)]  # uneven, one of a single key
    out = lse = None
    for cols in blocks:
        out, lse = ba.merge_attention(out, lse, *forward(q, k[..., cols, :], v[..., cols, :], scale))
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    full_lse = (q @ k.transpose(-1, -2) * scale).logsumexp(-1)
    torch.testing.assert_close(lse, full_lse, rtol=1e-12, atol=1e-12)

    shares = [backward(grad_out, q, k[..., cols, :], v[..., cols, :], out, lse, scale) for cols in blocks]
    torch.testing.assert_close(sum(s[0] for s in shares), ref_inputs[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([s[1] for s in shares], dim=-2), ref_inputs[1].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([s[2] for s in shares], dim=-2), ref_inputs[2].grad, rtol=1e-12, atol=1e-12)


def test_kernel_choice():
    """CPU tensors take torch's fused CPU kernel in >= fp32; the torch fallback is for what flash cannot do."""
    assert ba.kernel_for(torch.zeros(1, 1, 4, 8)) == "cpu"
    assert ba.compute_dtype(torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)) == torch.float32
    assert ba.compute_dtype(torch.zeros(1, 1, 4, 8, dtype=torch.float64)) == torch.float64
    assert ba.kernel_for(torch.zeros(1, 1, 4, 8, device="meta")) == "tiled"


def test_flash_calls_fit_the_aten_schemas(monkeypatch):
    """The CUDA flash path, run on meta tensors (no GPU here): the ops accept the arguments and give the
    shapes and dtypes the ring relies on (lse fp32 [b, h, Lq]; a key block shorter than the queries)."""
    monkeypatch.setattr(ba, "kernel_for", lambda q: "flash")
    q = torch.empty(1, 2, 40, 64, dtype=torch.bfloat16, device="meta")
    k, v = (torch.empty(1, 2, 24, 64, dtype=torch.bfloat16, device="meta") for _ in range(2))
    out, lse = ba.attention_with_lse(q, k, v, 0.125)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, torch.bfloat16, (1, 2, 40), torch.float32)
    dq, dk, dv = ba.attention_with_lse_backward(out, q, k, v, out, lse, 0.125)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
