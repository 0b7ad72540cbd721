"""The te backend is held to Transformer Engine's interface on CPU, where TE cannot be installed.

- megatron's TE wrappers (TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention): every shipped
  config (examples/configs/**, the model shrunk, its TP / SP / CP layout kept where 8 ranks hold it) builds and
  runs forward and backward on gloo ranks with the te spec on our local classes, each call bound to the
  wrapper's signature read with ast from megatron-core's source (tests/te_contract.py);
- TE itself (precision.py's recipes and autocast): megawan's calls, read with ast, bind to the signatures
  recorded from TE's source for each supported release (tests/data/te_api.json, tools/te_api_table.py);
- renaming an argument on either side is caught.
"""

import ast
import dataclasses
import glob
import json
import math
import os
import pathlib
from unittest import mock

import pytest
import torch

import megawan.capabilities as capabilities
from megawan.config import DiTConfig, ParallelConfig, dit_preset, load_config
from megawan.config.te_limits import te_token_multiple
from megawan.lora import adapters, apply_lora
from megawan.models.dit import WanDiT
from megawan.models.dit.parallelize import apply_activation_recompute
from megawan.parallel.launch import spawn_local
from te_contract import ContractError, contract_spec, wrapper_signatures, wrapper_source

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in glob.glob(str(ROOT / "examples" / "configs" / "**" / "*.yaml"), recursive=True)
                 if os.sep + "vae" + os.sep not in p  # examples/configs/vae: `megawan train-vae`'s (no DiT)
                 and os.path.basename(p) != "curate.yaml")  # tools/curate.py's (no DiT)
WORLD = 8
CASES_PER_WORLD = 10
TE_API = json.loads((ROOT / "tests" / "data" / "te_api.json").read_text())


# ----------------------------------------------------------------------------------------------
# megatron's TE wrappers


def test_the_wrapper_signatures_are_megatron_cores():
    sigs = wrapper_signatures(wrapper_source())
    attention = sigs["TEDotProductAttention"]
    assert list(attention["forward"].parameters)[:5] == ["query", "key", "value", "attention_mask", "attn_mask_type"]
    assert attention["forward"].parameters["attn_mask_type"].default is attention["forward"].parameters["query"].empty
    assert "cp_comm_type" in attention["__init__"].parameters
    assert list(sigs["TEColumnParallelLinear"]["forward"].parameters) == ["x"]  # TELinear.forward, inherited
    assert "input_is_parallel" in sigs["TERowParallelLinear"]["__init__"].parameters


def _shrunk_layout(p: ParallelConfig) -> dict:
    """The config's layout on at most WORLD ranks: TP, SP, CP and its mode kept, sizes cut where needed."""
    tp, cp, mode, u = p.tensor_parallel, p.context_parallel, p.context_parallel_mode, p.ulysses_size
    if tp * cp > WORLD:
        tp = min(tp, 2)
        if mode == "2d":
            u = min(u, 2)
            cp = u * min(cp // p.ulysses_size, 2)
        else:
            cp = min(cp, WORLD // tp)
    return dict(tensor_parallel=tp, sequence_parallel=p.sequence_parallel, context_parallel=cp,
                context_parallel_mode=mode, ulysses_size=u if mode == "2d" and cp > 1 else None)


def _contract_case(path: str) -> dict:
    cfg = load_config(path)
    layout = _shrunk_layout(cfg.parallel)
    parallel = ParallelConfig(**layout).validate(WORLD)
    # 8 heads of dim 8: any TP x all-to-all split of these layouts divides them, and TE's CP wants head dim % 8;
    # one block: every block of a model makes the same calls (the first block of two was no different)
    dit = dataclasses.replace(cfg.model, dim=64, ffn_dim=128, num_heads=8, num_layers=1, freq_dim=16, text_dim=24,
                              text_len=16, rope_max_len=64, backend="te", params_dtype="float32")
    m = te_token_multiple(parallel)
    latents = [(2, 8, 2 * max(1, m // math.gcd(m, 8)))]  # 2 x 4 x w tokens: a multiple of m, nothing to mask
    if parallel.context_parallel == 1 and parallel.sequence_parallel:
        latents.append((1, 6, 6))  # 9 tokens: sequence parallelism pads them, TE's padding mask masks them
    lora = dict(rank=min(cfg.lora.rank, 4), targets=cfg.lora.targets) if cfg.lora.enabled else None
    return dict(name=os.path.relpath(path, ROOT), layout=layout, dit=dataclasses.asdict(dit),
                recompute=cfg.parallel.recompute, latents=latents, lora=lora)


def _contract_worker(rank, cases_path, out_dir):
    from megatron.core import parallel_state

    import torch.distributed as dist

    from megawan.parallel.cpu_compat import megatron_cpu_mode
    from megawan.parallel.initialize import initialize
    from megawan.training.precision import amax_reduction_group

    cases = torch.load(cases_path)
    signatures = wrapper_signatures(wrapper_source())
    results = {}
    with mock.patch.object(capabilities, "transformer_engine_available", lambda: True):  # selects the te branch
        for case in cases:
            parallel_state.destroy_model_parallel()
            initialize(ParallelConfig(**case["layout"]), seed=0)
            assert dist.get_world_size(amax_reduction_group()) == WORLD  # TE's FP8 amaxes: over TP x DP x CP
            calls = []
            model = WanDiT(DiTConfig(**case["dit"]), block_spec=contract_spec(signatures, calls))
            assert model.backend == "te"
            if case["lora"]:  # the adapters' hooks on TE's linears; the base is frozen
                apply_lora(model, rank=case["lora"]["rank"], targets=case["lora"]["targets"])
                for _, adapter in adapters(model):
                    with torch.no_grad():  # B is zero after init: give it values so that A's gradient is non-zero
                        adapter.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
            apply_activation_recompute(model, case["recompute"])
            with torch.no_grad():  # a non-zero head, so that gradients reach every block
                model.head.linear.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
            for t, h, w in case["latents"]:
                g = torch.Generator().manual_seed(2)
                latents = torch.randn(2, model.dit_config.in_dim, t, h, w, generator=g)
                text = torch.randn(2, 5, model.dit_config.text_dim, generator=g)
                dit = model.dit_config  # Wan2.1 I2V: CLIP image tokens too
                image = torch.randn(2, dit.image_pos_len or 4, dit.image_dim, generator=g) if dit.image_dim else None
                with megatron_cpu_mode():
                    out = model(latents, torch.tensor([300.0, 700.0]), text, image=image)
                    (out * torch.randn(out.shape, generator=g)).sum().backward()
                assert torch.isfinite(out).all()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            q = "blocks.0.self_attention.linear_q" + ("_lora.lora_A" if case["lora"] else ".weight")
            results[case["name"]] = dict(
                calls=calls, grads_finite=all(g is not None and torch.isfinite(g).all() for g in grads.values()),
                attention_grad=float(grads[q].abs().sum()))
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _what_runs(case: dict) -> str:
    """A case but its name: configs that shrink to the same case (the tiny curriculum's stages share a model and
    layout) make the same calls, so one run stands for all of them."""
    return json.dumps({k: v for k, v in case.items() if k != "name"}, sort_keys=True)


def test_every_shipped_config_runs_the_te_spec_within_tes_signatures(tmp_path):
    """One 8-rank gloo world runs every shipped config in turn (megatron's groups re-initialised per layout)."""
    cases = [_contract_case(path) for path in CONFIGS]
    assert len(cases) >= 13 and any(c["layout"]["context_parallel_mode"] == "2d" and c["layout"]["sequence_parallel"]
                                    for c in cases)
    runs = list({_what_runs(c): c for c in reversed(cases)}.values())  # the first config of each distinct case
    run_of = {_what_runs(c): c["name"] for c in runs}
    # megatron's groups are re-made per case and gloo keeps each one's connections and threads until the process
    # ends: a world runs at most CASES_PER_WORLD cases (about 20 would exhaust them and hang in new_group)
    results_of_rank = [{} for _ in range(WORLD)]
    for start in range(0, len(runs), CASES_PER_WORLD):
        folder = tmp_path / f"cases{start}"
        folder.mkdir()
        torch.save(runs[start:start + CASES_PER_WORLD], folder / "cases.pt")
        spawn_local(_contract_worker, world_size=WORLD, args=(str(folder / "cases.pt"), str(folder)),
                    preload=(__name__,))
        for rank in range(WORLD):
            results_of_rank[rank].update(torch.load(folder / f"rank{rank}.pt", weights_only=False))
    for rank in range(WORLD):
        results = results_of_rank[rank]
        for case in cases:  # every config, by the run of its case
            r = results[run_of[_what_runs(case)]]
            made = {(name, method) for name, method, *_ in r["calls"]}
            assert made == {(n, m) for n in ("TEColumnParallelLinear", "TERowParallelLinear", "TEDotProductAttention")
                            for m in ("__init__", "forward")}, case["name"]
            assert r["grads_finite"] and r["attention_grad"] > 0, case["name"]
            padded = [c for c in r["calls"] if c[:2] == ("TEDotProductAttention", "forward") and c[3]]
            assert bool(padded) == (len(case["latents"]) > 1), case["name"]  # the padding mask reached TE's call


def _renamed(source: str, cls: str, method: str, old: str, new: str) -> str:
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    arg = next(a for a in fn.args.args + fn.args.kwonlyargs if a.arg == old)
    arg.arg = new
    return ast.unparse(tree)


@pytest.mark.parametrize("cls,method,old,new", [
    ("TEColumnParallelLinear", "__init__", "tp_comm_buffer_name", "ub_name"),
    ("TERowParallelLinear", "__init__", "input_is_parallel", "input_parallel"),
    ("TEDotProductAttention", "__init__", "cp_comm_type", "cp_comm"),
    ("TEDotProductAttention", "forward", "attn_mask_type", "mask_type"),
])
def test_a_renamed_wrapper_argument_fails_the_contract(cls, method, old, new):
    source = _renamed(wrapper_source(), cls, method, old, new)
    calls = []
    cfg = dit_preset("tiny", num_layers=1, backend="te")
    with mock.patch.object(capabilities, "transformer_engine_available", lambda: True):
        with pytest.raises(ContractError, match=f"{cls}.{method}"):
            model = WanDiT(cfg, block_spec=contract_spec(wrapper_signatures(source), calls))
            model(torch.randn(1, cfg.in_dim, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, cfg.text_dim))


# ----------------------------------------------------------------------------------------------
# Transformer Engine itself


def te_api_problems(refs: list, table: dict) -> list:
    """Each of megawan's references to transformer_engine that some recorded TE release would not take."""
    from te_api_table import signature

    problems = []
    for ref, version in table["versions"].items():
        entry_points = version["entry_points"]
        for use in refs:
            where = f"{use['file']}:{use['line']} {use['name']} (TE {ref})"
            if use["use"] == "import":
                if use["name"] not in version["modules"]:
                    problems.append(f"{where}: no such module")
                continue
            entry = max((e for e in entry_points if use["name"] == e or use["name"].startswith(e + ".")),
                        key=len, default=None)
            if entry is None:
                if use["use"] == "attribute" and any(m.startswith(use["name"]) for m in version["modules"]):
                    continue  # a module, by attribute (transformer_engine.pytorch)
                problems.append(f"{where}: not in the recorded TE API (tools/te_api_table.py records it)")
                continue
            described, rest = entry_points[entry], use["name"][len(entry) + 1:]
            if rest:
                if described["kind"] != "enum" or rest not in described["members"]:
                    problems.append(f"{where}: {rest!r} is not a member of {entry}")
            elif use["use"] == "call":
                if use["unpacked"]:
                    problems.append(f"{where}: *args / **kwargs cannot be checked")
                    continue
                try:
                    signature(described["params"]).bind(*[None] * use["positional"], **dict.fromkeys(use["keywords"]))
                except TypeError as e:
                    problems.append(f"{where}: {e}")
    return problems


def test_megawans_calls_into_transformer_engine_bind_to_every_recorded_release():
    from te_api_table import megawan_sources, te_references

    refs = te_references(megawan_sources())
    calls = {r["name"] for r in refs if r["use"] == "call"}
    assert {"transformer_engine.pytorch.autocast", "transformer_engine.common.recipe.DelayedScaling",
            "transformer_engine.common.recipe.Float8CurrentScaling"} <= calls
    assert set(TE_API["versions"]) >= {"v2.9", "v2.11"}  # the range megatron-core 0.16.1 declares
    assert all(len(v["commit"]) == 40 for v in TE_API["versions"].values())
    assert te_api_problems(refs, TE_API) == []


def test_a_renamed_keyword_in_a_call_into_transformer_engine_is_caught(tmp_path):
    from te_api_table import te_references

    source = (ROOT / "megawan" / "training" / "precision.py").read_text()
    assert "amax_reduction_group=" in source and "fp8_dpa=" in source
    for old, new in (("amax_reduction_group=", "fp8_group="), ("fp8_dpa=", "fp8_attention=")):
        path = tmp_path / "precision.py"
        path.write_text(source.replace(old, new))
        problems = te_api_problems(te_references([path]), TE_API)
        assert problems and all(f"unexpected keyword argument '{new[:-1]}'" in p for p in problems), problems
    path.write_text(source.replace("recipe.Format.HYBRID", "recipe.Format.HYBRID8"))
    assert any("'HYBRID8' is not a member" in p for p in te_api_problems(te_references([path]), TE_API))
