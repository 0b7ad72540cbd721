"""The fused FP8 cast-and-transpose (kernels/fp8_transpose.py) writes the bytes of its torch reference
(kernels.reference.cast_transpose_fp8), row-major and transposed, on odd shapes whose tiles end in masked tails;
on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py for the kernel tests)."""

import os

import pytest
import torch

from kernels import reference

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1", allow_module_level=True)


def _bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cast_transpose_writes_the_reference_bytes(fp8, dtype):
    from kernels.fp8_transpose import cast_transpose

    g = torch.Generator().manual_seed(7)
    # 37 x 70: one 64 x 64 tile and masked tails in both dims; a wide dynamic range reaches the subnormals,
    # and a scale that pushes the largest values past the format's max exercises the saturation
    t = (torch.randn(37, 70, generator=g) * torch.logspace(-6, 1, 70)).to(DEVICE, dtype)
    top = torch.finfo(fp8).max
    scale = (top / t.float().abs().amax() * 4).to(DEVICE)
    t[0, 0], t[1, 1] = 0.0, -1e-30  # a zero and a negative underflow (-0)
    amax = torch.zeros((), device=DEVICE)
    q, q_t = cast_transpose(t, scale, fp8, amax=amax)
    ref_q, ref_t = reference.cast_transpose_fp8(t, scale, fp8)
    assert q.shape == (37, 70) and q_t.shape == (70, 37) and q_t.is_contiguous()
    assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(_bits(q_t), _bits(ref_t))
    assert (ref_q.float().abs() == top).any() and (ref_q.float() == 0).any()  # saturated and underflowed values
    assert amax.item() == t.float().abs().amax().item()


def test_cast_transpose_rounds_ties_to_even_and_takes_a_strided_view():
    from kernels.fp8_transpose import cast_transpose

    # E4M3 around 1: step 1/8; 1 + 1/16 ties to 1, 1 + 3/16 ties to 1.25; subnormal step 2^-9: 1.5 · 2^-9 -> 2^-8
    row = torch.tensor([1 + 1 / 16, 1 + 3 / 16, -(1 + 3 / 16), 1.5 * 2 ** -9, 2.5 * 2 ** -9, 500.0, -500.0])
    t = torch.stack([row, row * 2]).to(DEVICE)
    wide = torch.zeros(2, 11, device=DEVICE)
    wide[:, :7] = t
    q, q_t = cast_transpose(wide[:, :7], torch.ones((), device=DEVICE), torch.float8_e4m3fn)
    expected = torch.tensor([1.0, 1.25, -1.25, 2 ** -8, 2 * 2 ** -9, 448.0, -448.0])
    assert torch.equal(q[0].float().cpu(), expected) and torch.equal(q_t[:, 0].float().cpu(), expected)
    assert torch.equal(_bits(q), _bits(reference.cast_transpose_fp8(t, torch.ones(()), torch.float8_e4m3fn)[0]))
