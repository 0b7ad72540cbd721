"""The te backend's contract, checked on CPU where Transformer Engine cannot be installed.

Without TE, megatron-core swaps its TE wrappers for placeholders, so their signatures are read with `ast` from
the installed megatron/core/extensions/transformer_engine.py (`wrapper_signatures`). `contract_spec` is the te
block spec on our local classes (Fp8ColumnParallelLinear, Fp8RowParallelLinear, SDPACoreAttention: real
behaviour, on CPU), each constructor and forward call bound to the TE wrapper's signature first (an unknown
keyword or a missing required argument raises ContractError), and the attention's arguments held to what TE
takes (from TE 2.9-2.11's dot_product_attention sources: a padding mask is bool [b, 1, 1, sk]; under context
parallelism in sbhd, no padding, an even chunk, heads that the all-to-all divides; a2a+p2p's two groups from
megatron's hierarchical CP groups).
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType

from megawan.models.dit.core_attention import SDPACoreAttention
from megawan.models.dit.fp8_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from megawan.models.dit.specs import wan_block_spec
from megawan.parallel.groups import context_parallel_groups

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
from te_api_table import function_params, signature  # noqa: E402

MEGATRON_TE = "megatron.core.extensions.transformer_engine"
LOCAL = {"TEColumnParallelLinear": Fp8ColumnParallelLinear, "TERowParallelLinear": Fp8RowParallelLinear,
         "TEDotProductAttention": SDPACoreAttention}
METHODS = ("__init__", "forward")


class ContractError(TypeError):
    """A call megawan makes that Transformer Engine (through megatron's wrapper) would not take."""


def wrapper_source() -> str:
    return pathlib.Path(importlib.util.find_spec(MEGATRON_TE).origin).read_text(encoding="utf-8")


def wrapper_signatures(source: str) -> dict:
    """{class: {method: inspect.Signature without self}} of megatron's TE wrappers; a method a class inherits
    from another class of the file (TELinear.forward) is found there."""
    classes = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)}

    def method(name: str, meth: str):
        node = classes[name]
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == meth:
                return item
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                return method(base.id, meth)
        raise KeyError(f"{name}.{meth} is not defined in {MEGATRON_TE}")

    return {cls: {m: signature(function_params(method(cls, m), drop_self=True)) for m in METHODS} for cls in LOCAL}


def check_call(sig, where: str, args: tuple, kwargs: dict) -> None:
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ContractError(f"{where}: {e}") from None


def _check_te_attention_init(module, cp_comm_type) -> None:
    """What megatron's TEDotProductAttention reads to build TE's context parallelism, and what TE asserts."""
    cfg = module.config
    if cfg.context_parallel_size == 1:
        return
    cp = context_parallel_groups()
    cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
    if cp_group is None or dist.get_world_size(cp_group) != cfg.context_parallel_size:
        raise ContractError(f"config.context_parallel_size={cfg.context_parallel_size} but megatron's CP group is "
                            f"{cp_group}")
    if cp_comm_type not in ("p2p", "a2a", "a2a+p2p", "all_gather"):
        raise ContractError(f"TE knows no cp_comm_type={cp_comm_type!r}")
    if cp_comm_type == "a2a+p2p":  # megatron hands TE its hierarchical groups: [a2a group, p2p group]
        groups = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
        if not groups or len(groups) != 2:
            raise ContractError("a2a+p2p: megatron's hierarchical CP groups are not set up "
                                "(initialize_model_parallel(hierarchical_context_parallel_sizes=...))")
        ranks = [dist.get_process_group_ranks(g) for g in groups]
        ours = [dist.get_process_group_ranks(cp.ulysses), dist.get_process_group_ranks(cp.ring)]
        if ranks != ours:
            raise ContractError(f"a2a+p2p: megatron's hierarchical CP groups {ranks} are not ours {ours}")


def _check_te_attention_forward(module, query, key, attention_mask, attn_mask_type) -> None:
    if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
        raise ContractError(f"bidirectional attention with attn_mask_type={attn_mask_type}")
    if attn_mask_type == AttnMaskType.padding:
        b, sk = query.shape[1], key.shape[0] * module.config.context_parallel_size
        if attention_mask is None or attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (b, 1, 1, sk):
            raise ContractError(f"TE's self-attention padding mask is one bool tensor [b, 1, 1, sk] = [{b}, 1, 1, {sk}], "
                                f"got {None if attention_mask is None else (attention_mask.dtype, attention_mask.shape)}")
    cp = module.config.context_parallel_size
    if cp > 1:
        if attn_mask_type != AttnMaskType.no_mask:
            raise ContractError("TE's context parallelism in sbhd takes no padding mask")
        if query.shape[0] % 2:
            raise ContractError(f"TE's context parallelism needs an even sequence per rank, got {query.shape[0]}")
        a2a = {"a2a": cp, "a2a+p2p": dist.get_world_size(context_parallel_groups().ulysses)}.get(module.cp_comm_type, 1)
        if query.shape[2] % a2a or query.shape[-1] % 8:
            raise ContractError(f"{module.cp_comm_type}: {query.shape[2]} heads over {a2a} ranks, head dim "
                                f"{query.shape[-1]} (TE: divisible heads, head dim a multiple of 8)")


def contract_class(te_name: str, signatures: dict, calls: list):
    """Our local class for `te_name`, every constructor / forward call checked against TE's signature first and
    recorded in `calls` as (te_name, method, keyword names, whether a padding mask came along)."""
    sigs = signatures[te_name]

    class Contract(LOCAL[te_name]):
        def __init__(self, *args, **kwargs):
            check_call(sigs["__init__"], f"{te_name}.__init__", args, kwargs)
            calls.append((te_name, "__init__", tuple(sorted(kwargs)), False))
            super().__init__(*args, **kwargs)
            if te_name == "TEDotProductAttention":
                self.cp_comm_type = kwargs.get("cp_comm_type", "p2p")  # megatron's default
                _check_te_attention_init(self, self.cp_comm_type)

        def forward(self, *args, **kwargs):
            check_call(sigs["forward"], f"{te_name}.forward", args, kwargs)
            padded = False
            if te_name == "TEDotProductAttention":
                bound = sigs["forward"].bind(*args, **kwargs).arguments
                _check_te_attention_forward(self, bound["query"], bound["key"], bound["attention_mask"],
                                            bound["attn_mask_type"])
                padded = bound["attention_mask"] is not None
            calls.append((te_name, "forward", tuple(sorted(kwargs)), padded))
            return super().forward(*args, **kwargs)

    Contract.__name__ = Contract.__qualname__ = f"Contract{te_name}"
    return Contract


def contract_spec(signatures: dict, calls: list):
    """The te block spec (TE's column / row linears, TE's attention) on contract-checked local classes."""
    return wan_block_spec(*(contract_class(name, signatures, calls) for name in LOCAL))
