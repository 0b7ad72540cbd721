"""Context-parallel attention (Ulysses, ring, 2D) equals full attention on one rank: outputs and the
gradients of q, k, v, including a token count that CP does not divide (padded, masked)."""

import pytest
import torch
import torch.nn.functional as F

from megawan.parallel import context_parallel_groups
from megawan.parallel.context_parallel import context_parallel_attention, padded_length, split_sequence
from megawan.parallel.launch import spawn_local


def _reference(q, k, v):
    """Plain attention over the whole sequence; q, k, v [S, b, h, d] float64."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).permute(2, 0, 1, 3).flatten(2)


def _worker(rank, data_path, out_dir):
    cp = context_parallel_groups()
    data = torch.load(data_path)
    tokens = data["q"].shape[0]
    local = [split_sequence(data[n], cp.rank, cp.size).clone().requires_grad_() for n in ("q", "k", "v")]
    out = context_parallel_attention(*local, cp, valid_tokens=tokens)
    (out * split_sequence(data["probe"], cp.rank, cp.size)).sum().backward()
    torch.save({"out": out.detach(), "grads": [t.grad for t in local]}, f"{out_dir}/rank{rank}.pt")


LAYOUTS = [
    dict(world=2, context_parallel_mode="ulysses", tokens=12),
    dict(world=2, context_parallel_mode="ring", tokens=12),
    dict(world=2, context_parallel_mode="ring", tokens=11),       # padded: CP does not divide 11
    dict(world=4, context_parallel_mode="ulysses", tokens=13),    # padded
    dict(world=4, context_parallel_mode="ring", tokens=7),        # padded; the last rank holds only padding
    dict(world=4, context_parallel_mode="2d", ulysses_size=2, tokens=14),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l['context_parallel_mode']}-cp{l['world']}-{l['tokens']}tok")
def test_matches_full_attention(layout, tmp_path):
    layout = dict(layout)
    world, tokens = layout.pop("world"), layout.pop("tokens")
    g = torch.Generator().manual_seed(0)
    b, h, d = 2, 4, 8
    data = {n: torch.randn(tokens, b, h, d, generator=g, dtype=torch.float64) for n in ("q", "k", "v")}
    data["probe"] = torch.randn(tokens, b, h * d, generator=g, dtype=torch.float64)
    torch.save(data, tmp_path / "data.pt")

    ref_inputs = [data[n].clone().requires_grad_() for n in ("q", "k", "v")]
    ref = _reference(*ref_inputs)
    (ref * data["probe"]).sum().backward()

    spawn_local(_worker, world_size=world, context_parallel=world, args=(str(tmp_path / "data.pt"), str(tmp_path)), **layout)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    out = torch.cat([r["out"] for r in ranks])[:tokens]
    assert padded_length(tokens, world) == torch.cat([r["out"] for r in ranks]).shape[0]
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    for i, name in enumerate("qkv"):
        grad = torch.cat([r["grads"][i] for r in ranks])
        torch.testing.assert_close(grad[:tokens], ref_inputs[i].grad, rtol=1e-10, atol=1e-10, msg=f"d{name}")
        assert torch.count_nonzero(grad[tokens:]) == 0  # padding receives no gradient


def _fp8_worker(rank, data_path, out_dir):
    from megatron.core.transformer.enums import AttnMaskType

    from megawan.config import dit_preset
    from megawan.models.dit.core_attention import SDPACoreAttention
    from megawan.models.dit.fp8_linear import local_fp8
    from megawan.models.dit.model import megatron_config

    cp = context_parallel_groups()
    data = torch.load(data_path)
    local = [split_sequence(data[n], cp.rank, cp.size).clone().requires_grad_() for n in ("q", "k", "v")]
    # through the model's core attention: it reads train.fp8_attention and hands the choice down as fp8=
    attention = SDPACoreAttention(megatron_config(dit_preset("tiny"), tensor_parallel=1, cp=cp), layer_number=1)
    assert attention.cp is not None
    with local_fp8(attention=True):
        out = attention(*local, None, AttnMaskType.no_mask)
    (out * split_sequence(data["probe"], cp.rank, cp.size)).sum().backward()
    torch.save({"out": out.detach(), "grads": [t.grad for t in local]}, f"{out_dir}/rank{rank}.pt")


def test_ulysses_runs_the_fp8_attention_as_one_rank_does(tmp_path):
    """train.fp8_attention under Ulysses CP2: after the all-to-all each rank quantises whole sequences of its
    heads, so outputs and gradients equal the FP8 kernel on one rank (and differ from bf16 attention)."""
    pytest.importorskip("triton")
    from kernels.fp8_flash_attention import fp8_attention

    tokens, b, h, d = 160, 1, 4, 16
    g = torch.Generator().manual_seed(1)
    data = {n: torch.randn(tokens, b, h, d, generator=g) for n in ("q", "k", "v")}
    data["probe"] = torch.randn(tokens, b, h * d, generator=g)
    torch.save(data, tmp_path / "data.pt")
    spawn_local(_fp8_worker, world_size=2, context_parallel=2, context_parallel_mode="ulysses",
                args=(str(tmp_path / "data.pt"), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    ref_inputs = [data[n].clone().requires_grad_() for n in ("q", "k", "v")]
    ref = fp8_attention(*(t.permute(1, 2, 0, 3) for t in ref_inputs)).permute(2, 0, 1, 3).flatten(2)
    (ref * data["probe"]).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), ref.detach(), rtol=1e-5, atol=1e-6)
    for i in range(3):
        torch.testing.assert_close(torch.cat([r["grads"][i] for r in ranks]), ref_inputs[i].grad, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref, _reference(*(data[n] for n in ("q", "k", "v"))), atol=1e-3)
