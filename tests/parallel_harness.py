"""Shared harness of the multi-rank DiT tests: build cases from random diffusers models, run them on
spawned gloo ranks under a layout, and reassemble outputs and gradients as the trainer's reductions would.

Outputs are compared with diffusers in fp32; gradients with a single-rank run in float64 (some fp32
gradients are ill-conditioned sums, e.g. a key bias's gradient is zero up to the k RMSNorm by softmax's
shift invariance, so in fp32 their difference measures summation order, not correctness).
"""

from __future__ import annotations

import dataclasses

import torch

from megawan.config import DiTConfig, dit_preset
from megawan.convert import convert_state_dict
from megawan.convert.dit_keys import TP_AXIS
from megawan.convert.tensor_parallel import tp_axis
from megawan.models.dit import WanDiT
from megawan.parallel.cpu_compat import megatron_cpu_mode
from megawan.parallel.launch import spawn_local
from wan_reference import diffusers_dit, diffusers_forward, random_inputs, relative_error


def forward_backward(model, inputs, probe):
    latents, timestep, text, image = inputs
    out = model(latents, timestep, text, image=image)
    (out * probe).sum().backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def build_cases(variants: dict):
    """variants: name -> (dit_preset args incl. 'preset', random_inputs args). Returns (cases, references):
    an fp32 case per variant (reference: diffusers' output) and an fp64 one (reference: one-rank grads)."""
    cases, refs = {}, {}
    for name, (cfg_args, input_args) in variants.items():
        args = dict(cfg_args)
        cfg = dit_preset(args.pop("preset"), **args)
        ref = diffusers_dit(cfg)
        inputs = random_inputs(cfg, **input_args)
        with torch.no_grad():
            expected = diffusers_forward(ref, *inputs[:3], image=inputs[3], text_len=cfg.text_len)
        state_dict = convert_state_dict(ref.state_dict(), "diffusers", "megawan", cfg)
        probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7))
        cases[name] = dict(config=dataclasses.asdict(cfg), state_dict=state_dict, inputs=inputs, probe=probe)
        refs[name] = dict(expected=expected)
        cfg64 = dataclasses.replace(cfg, params_dtype="float64")
        case64 = dict(config=dataclasses.asdict(cfg64), state_dict={k: v.double() for k, v in state_dict.items()},
                      inputs=tuple(None if t is None else t.double() for t in inputs), probe=probe.double())
        single = WanDiT(cfg64)
        single.load_state_dict(case64["state_dict"])
        cases[f"{name}-fp64"] = case64
        refs[f"{name}-fp64"] = dict(grads=forward_backward(single, case64["inputs"], case64["probe"])[1])
    return cases, refs


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
        with megatron_cpu_mode():  # sequence parallelism runs megatron's collectives
            results[name] = forward_backward(model, case["inputs"], case["probe"])
    marked = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
    torch.save({"tp_rank": tp_rank, "results": results, "sequence_parallel_params": marked}, f"{out_dir}/rank{rank}.pt")


def run_layout(cases: dict, tmp_path, world: int, **parallel) -> list:
    torch.save(cases, tmp_path / "cases.pt")
    spawn_local(_worker, world_size=world, args=(str(tmp_path / "cases.pt"), str(tmp_path)), **parallel)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def check_layout(ranks: list, refs: dict, tp: int, label: str, tol: float = 1e-5) -> None:
    """Every rank's output equals diffusers'; gradients summed over CP (and, for `sequence_parallel`
    parameters, over TP) and concatenated over TP splits equal the one-rank float64 gradients."""
    marked = ranks[0]["sequence_parallel_params"]
    for name, ref in refs.items():
        if "expected" in ref:
            for r, rank in enumerate(ranks):
                err = relative_error(rank["results"][name][0], ref["expected"])
                assert err <= tol, f"{label} rank {r} {name}: output vs diffusers max|d|/max|ref| = {err:.2e}"
            continue
        for pname, g1 in ref["grads"].items():
            per_tp = [sum(r["results"][name][1][pname] for r in ranks if r["tp_rank"] == t) for t in range(tp)]
            axis = tp_axis(pname, TP_AXIS)
            if axis is not None:
                g = torch.cat(per_tp, dim=axis)
            elif pname in marked:
                g = sum(per_tp)
            else:
                for other in per_tp[1:]:  # replicated: every TP rank holds the same gradient
                    torch.testing.assert_close(other, per_tp[0], rtol=1e-9, atol=1e-12)
                g = per_tp[0]
            rel = ((g - g1).abs().max() / g1.abs().max().clamp_min(1e-30)).item()
            assert rel <= tol, f"{label} {name} grad {pname}: relative error {rel:.2e}"


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it at once, as a node failure would: torchrun starts its
    workers in sessions of their own, so killing its process group would leave them running."""
    import signal

    import psutil

    root = psutil.Process(pid)
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
