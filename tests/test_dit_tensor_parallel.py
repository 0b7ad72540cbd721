"""Tensor parallelism on CPU over gloo: TP=2 and TP=4 compute diffusers' output (fp32), and TP=2
gradients equal the single-rank gradients (gathered).

Gradients are compared in float64: some fp32 gradients are ill-conditioned sums (the gradient of a key
bias is zero up to the k RMSNorm, by softmax's shift invariance, and an I2V model attends to 512 text
tokens), so in fp32 their difference measures summation order, not correctness. In float64 any error of
the parallel maths stands out by orders of magnitude.

Each TP size is one spawn of N processes running every variant, to keep the suite fast on 2 cores.
"""

import dataclasses

import pytest
import torch

from megawan.config import DiTConfig, dit_preset
from megawan.convert import convert_state_dict
from megawan.convert.dit_keys import TP_AXIS
from megawan.convert.tensor_parallel import tp_axis
from megawan.models.dit import WanDiT
from megawan.parallel.launch import spawn_local
from wan_reference import diffusers_dit, diffusers_forward, random_inputs, relative_error

TOL = 1e-5
# 4 heads so that TP=4 divides them; non-square latents, odd frame count, batch 2.
VARIANTS = {
    "t2v": (dict(preset="tiny", num_heads=4), dict(frames=3, height=4, width=6)),
    "i2v": (dict(preset="tiny-i2v", num_heads=4, text_len=512), dict(frames=3, height=4, width=6)),
    "ti2v": (dict(preset="tiny-ti2v", num_heads=4), dict(frames=3, height=4, width=6, per_token=True)),
}


def _forward_backward(model, inputs, probe):
    latents, timestep, text, image = inputs
    out = model(latents, timestep, text, image=image)
    (out * probe).sum().backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _tp_worker(rank, case_path, out_dir):
    from megatron.core import parallel_state

    cases = torch.load(case_path, weights_only=False)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    results = {}
    for name, case in cases.items():
        cfg = DiTConfig(**case["config"])
        model = WanDiT(cfg)
        model.load_state_dict(convert_state_dict(case["state_dict"], "megawan", "megawan", cfg, tp_size=tp_size)[tp_rank])
        results[name] = _forward_backward(model, case["inputs"], case["probe"])
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per variant: config, weights (from a random diffusers model), inputs, diffusers' output, and the
    single-rank output and gradients."""
    cases, references = {}, {}
    for name, (cfg_args, input_args) in VARIANTS.items():
        args = dict(cfg_args)
        cfg = dit_preset(args.pop("preset"), **args)
        ref = diffusers_dit(cfg)
        inputs = random_inputs(cfg, **input_args)
        with torch.no_grad():
            expected = diffusers_forward(ref, *inputs[:3], image=inputs[3], text_len=cfg.text_len)
        state_dict = convert_state_dict(ref.state_dict(), "diffusers", "megawan", cfg)
        probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7))
        cases[name] = dict(config=dataclasses.asdict(cfg), state_dict=state_dict, inputs=inputs, probe=probe)
        references[name] = dict(expected=expected)
        # the same case in float64, for gradients
        cfg64 = dataclasses.replace(cfg, params_dtype="float64")
        case64 = dict(config=dataclasses.asdict(cfg64), state_dict={k: v.double() for k, v in state_dict.items()},
                      inputs=tuple(None if t is None else t.double() for t in inputs), probe=probe.double())
        single = WanDiT(cfg64)
        single.load_state_dict(case64["state_dict"])
        _, grads = _forward_backward(single, case64["inputs"], case64["probe"])
        cases[f"{name}-fp64"] = case64
        references[f"{name}-fp64"] = dict(grads=grads)
    path = tmp_path_factory.mktemp("tp") / "cases.pt"
    torch.save(cases, path)
    return path, references


def _run(case_path, tmp_path, tp):
    spawn_local(_tp_worker, world_size=tp, tensor_parallel=tp, args=(str(case_path), str(tmp_path)))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(tp)]


def _gather_grad(name, per_rank):
    axis = tp_axis(name, TP_AXIS)
    if axis is None:  # replicated: every TP rank must hold the full, equal gradient
        for g in per_rank[1:]:
            torch.testing.assert_close(g, per_rank[0], rtol=1e-6, atol=1e-7)
        return per_rank[0]
    return torch.cat(per_rank, dim=axis)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_diffusers_and_single_rank(cases, tmp_path, tp):
    case_path, references = cases
    ranks = _run(case_path, tmp_path, tp)
    for name, ref in references.items():
        if "expected" in ref:
            for r, result in enumerate(ranks):
                err = relative_error(result[name][0], ref["expected"])
                assert err <= TOL, f"TP={tp} rank {r} {name}: output vs diffusers max|d|/max|ref| = {err:.2e}"
        if "grads" not in ref or tp != 2:
            continue
        # gradients of every parameter, gathered over TP ranks, equal the single-rank ones
        for pname, g1 in ref["grads"].items():
            g2 = _gather_grad(pname, [result[name][1][pname] for result in ranks])
            assert g2.shape == g1.shape, pname
            scale = g1.abs().max().clamp_min(1e-30)
            rel = ((g2 - g1).abs().max() / scale).item()
            assert rel <= TOL, f"TP=2 {name} grad {pname}: relative error {rel:.2e}"
