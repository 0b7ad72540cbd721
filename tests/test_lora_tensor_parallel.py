"""LoRA adapters split over tensor-parallel ranks compute what one rank computes: TP=2 with sequence parallelism
(the case where the column adapters gather their input and the row adapters' B sees only its rank's tokens),
on the I2V model (its image-branch key / value linears adapted too), float64. Outputs equal; each rank's adapter
gradients are its shards of the one-rank gradients (B of a row-parallel linear summed over TP, as megatron's
finalize does for `sequence_parallel` parameters). The trainer's layouts (TP2, PP2, CP2) are covered by
tests/test_lora_training.py."""

import dataclasses

import torch

from megawan.config import DiTConfig, dit_preset
from megawan.convert import convert_state_dict
from megawan.lora import adapters, apply_lora
from megawan.models.dit import WanDiT
from megawan.parallel.cpu_compat import megatron_cpu_mode
from megawan.parallel.launch import spawn_local
from wan_reference import random_inputs

RANK, ALPHA, SEED = 3, 6.0, 5


def _shard(tensor, mode, which, tp, r):
    """This TP rank's part of a whole adapter tensor: a column adapter's B split by rows, a row adapter's A by
    columns."""
    if (mode, which) == ("column", "B"):
        return tensor.chunk(tp, 0)[r]
    if (mode, which) == ("row", "A"):
        return tensor.chunk(tp, 1)[r]
    return tensor


def _one_rank_case():
    torch.manual_seed(0)
    cfg = dit_preset("tiny-i2v", num_heads=4, text_len=512, params_dtype="float64")
    model = WanDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # non-zero everywhere (the head starts at zero), so every gradient is
            p.normal_(0.0, 0.2)
    base = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    apply_lora(model, rank=RANK, alpha=ALPHA, seed=SEED)
    g = torch.Generator().manual_seed(3)
    for _, a in adapters(model):  # B is zero after init: give it values so that A has gradients too
        with torch.no_grad():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g, dtype=torch.float64) * 0.3)
    lora = {name: (a.lora_A.detach().clone(), a.lora_B.detach().clone()) for name, a in adapters(model)}
    inputs = tuple(None if t is None else t.double() for t in random_inputs(cfg, frames=3, height=4, width=6))
    out = model(inputs[0], inputs[1], inputs[2], image=inputs[3])
    probe = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * probe).sum().backward()
    grads = {name: (a.lora_A.grad.clone(), a.lora_B.grad.clone()) for name, a in adapters(model)}
    return dict(config=dataclasses.asdict(cfg), base=base, lora=lora, inputs=inputs, probe=probe,
                out=out.detach(), grads=grads)


def _worker(rank, case_path, out_dir):
    from megatron.core import parallel_state as ps

    case = torch.load(case_path, weights_only=False)
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cfg = DiTConfig(**case["config"])
    model = WanDiT(cfg)
    model.load_state_dict(convert_state_dict(case["base"], "megawan", "megawan", cfg, tp_size=tp)[r])
    apply_lora(model, rank=RANK, alpha=ALPHA, seed=SEED)
    with torch.no_grad():
        for name, a in adapters(model):
            A, B = case["lora"][name]
            a.lora_A.copy_(_shard(A, a.mode, "A", tp, r))
            a.lora_B.copy_(_shard(B, a.mode, "B", tp, r))
    x = case["inputs"]
    with megatron_cpu_mode():  # sequence parallelism runs megatron's collectives
        out = model(x[0], x[1], x[2], image=x[3])
        (out * case["probe"]).sum().backward()
    errors = {"output": ((out.detach() - case["out"]).abs().max() / case["out"].abs().max()).item()}
    for name, a in adapters(model):
        grad_b = a.lora_B.grad.clone()
        if getattr(a.lora_B, "sequence_parallel", False):
            torch.distributed.all_reduce(grad_b, group=a.tp_group)
        for which, got, whole in (("A", a.lora_A.grad, case["grads"][name][0]), ("B", grad_b, case["grads"][name][1])):
            want = _shard(whole, a.mode, which, tp, r)
            errors[f"{name}.lora_{which}"] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    torch.save({"errors": errors, "sequence_parallel": model.config.sequence_parallel}, f"{out_dir}/rank{rank}.pt")


def test_lora_under_tensor_and_sequence_parallel_equals_one_rank(tmp_path):
    torch.save(_one_rank_case(), tmp_path / "case.pt")
    spawn_local(_worker, world_size=2, args=(str(tmp_path / "case.pt"), str(tmp_path)), tensor_parallel=2,
                sequence_parallel=True)
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert result["sequence_parallel"]
        assert len(result["errors"]) == 1 + 2 * 2 * 12  # output + A and B of 12 linears in each of 2 blocks
        worst = max(result["errors"], key=result["errors"].get)
        error = result["errors"][worst]
        assert error < 1e-10, f"rank {r}: {worst} differs from one rank by {error:.1e}"
