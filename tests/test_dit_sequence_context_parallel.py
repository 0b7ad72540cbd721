"""The DiT under context parallelism (alone and with TP) computes diffusers' output (fp32, <= 1e-5) and the
single-rank gradients (float64), including token counts that CP does not divide.

Gradients are assembled as the trainer's reductions would: summed over CP ranks (the data-parallel x CP
reduction), parameters marked `sequence_parallel` summed over TP ranks (GPU only), TP-split ones
concatenated."""

import dataclasses

import pytest
import torch

from megawan.capabilities import cuda_available
from megawan.config import DiTConfig, dit_preset
from megawan.convert import convert_state_dict
from megawan.convert.dit_keys import TP_AXIS
from megawan.convert.tensor_parallel import tp_axis
from megawan.models.dit import WanDiT
from megawan.parallel.launch import spawn_local
from wan_reference import diffusers_dit, diffusers_forward, random_inputs, relative_error


def _forward_backward(model, inputs, probe):
    latents, timestep, text, image = inputs
    out = model(latents, timestep, text, image=image)
    (out * probe).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, case_path, out_dir):
    from megatron.core import parallel_state as ps

    cases = torch.load(case_path, weights_only=False)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    results = {}
    for name, case in cases.items():
        cfg = DiTConfig(**case["config"])
        model = WanDiT(cfg)
        shards = convert_state_dict(case["state_dict"], "megawan", "megawan", cfg, tp_size=tp) if tp > 1 else [case["state_dict"]]
        model.load_state_dict(shards[tp_rank])
        results[name] = _forward_backward(model, case["inputs"], case["probe"])
    marked = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
    torch.save({"tp_rank": tp_rank, "cp_rank": ps.get_context_parallel_rank(), "results": results,
                "sequence_parallel_params": marked}, f"{out_dir}/rank{rank}.pt")


def _cases(input_args):
    """t2v and ti2v (per-token t) cases: fp32 for outputs, fp64 for gradients; references on one rank."""
    cases, refs = {}, {}
    for name, preset, per_token in (("t2v", "tiny", False), ("ti2v", "tiny-ti2v", True)):
        cfg = dit_preset(preset, num_heads=4)
        ref = diffusers_dit(cfg)
        inputs = random_inputs(cfg, per_token=per_token, **input_args)
        with torch.no_grad():
            expected = diffusers_forward(ref, *inputs[:3], text_len=cfg.text_len)
        sd = convert_state_dict(ref.state_dict(), "diffusers", "megawan", cfg)
        probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
        cases[name] = dict(config=dataclasses.asdict(cfg), state_dict=sd, inputs=inputs, probe=probe)
        refs[name] = dict(expected=expected)
        cfg64 = dataclasses.replace(cfg, params_dtype="float64")
        case64 = dict(config=dataclasses.asdict(cfg64), state_dict={k: v.double() for k, v in sd.items()},
                      inputs=tuple(None if t is None else t.double() for t in inputs), probe=probe.double())
        single = WanDiT(cfg64)
        single.load_state_dict(case64["state_dict"])
        cases[f"{name}-fp64"] = case64
        refs[f"{name}-fp64"] = dict(grads=_forward_backward(single, case64["inputs"], case64["probe"])[1])
    return cases, refs


LAYOUTS = {
    # id: (world, parallel layout, latent size (frames, height, width) -> tokens)
    "cp2-ulysses": (2, dict(context_parallel=2), dict(frames=3, height=4, width=6)),          # 18 tokens
    "cp2-ring-padded": (2, dict(context_parallel=2, context_parallel_mode="ring"), dict(frames=3, height=6, width=6)),  # 27
    "tp2-cp2-ulysses": (4, dict(tensor_parallel=2, context_parallel=2), dict(frames=3, height=4, width=6)),
    "cp4-2d-padded": (4, dict(context_parallel=4, context_parallel_mode="2d", ulysses_size=2), dict(frames=3, height=4, width=6)),  # 18
}


def _sequence_parallel_worker(rank):
    with pytest.raises(ValueError, match="sequence_parallel needs CUDA"):
        WanDiT(dit_preset("tiny", num_heads=4))


@pytest.mark.skipif(cuda_available(), reason="checks the CPU refusal")
def test_sequence_parallel_is_refused_clearly_on_cpu():
    """megatron-core's sequence-parallel collectives allocate CUDA buffers: on CPU the model says so."""
    spawn_local(_sequence_parallel_worker, world_size=2, tensor_parallel=2, sequence_parallel=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_matches_diffusers_and_single_rank(layout, tmp_path):
    world, parallel, input_args = LAYOUTS[layout]

    cases, refs = _cases(input_args)
    torch.save(cases, tmp_path / "cases.pt")
    spawn_local(_worker, world_size=world, args=(str(tmp_path / "cases.pt"), str(tmp_path)), **parallel)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    tp = parallel.get("tensor_parallel", 1)
    marked = ranks[0]["sequence_parallel_params"]
    assert not marked
    for name, ref in refs.items():
        if "expected" in ref:
            for r in ranks:
                err = relative_error(r["results"][name][0], ref["expected"])
                assert err <= 1e-5, f"{layout} {name}: output vs diffusers {err:.2e}"
            continue
        for pname, g1 in ref["grads"].items():
            per_tp = []
            for t in range(tp):  # sum over the CP ranks of this TP rank
                per_tp.append(sum(r["results"][name][1][pname] for r in ranks if r["tp_rank"] == t))
            axis = tp_axis(pname, TP_AXIS)
            if axis is not None:
                g = torch.cat(per_tp, dim=axis)
            elif pname.replace("high_noise.", "") in marked:
                g = sum(per_tp)
            else:
                g = per_tp[0]
            rel = ((g - g1).abs().max() / g1.abs().max().clamp_min(1e-30)).item()
            assert rel <= 1e-5, f"{layout} {name} grad {pname}: relative error {rel:.2e}"
