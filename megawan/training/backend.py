"""Which backend a run trains on, decided in preflight, before any rank starts: `local`, or `te` where Transformer
Engine is usable and can take the run's layout and every sequence it will see (megawan.config.te_limits).

    model.backend=local  -> local
    model.backend=te     -> te, or a ConfigError naming the field and the alternative (model.backend=local)
    model.backend=auto   -> te when it could be te, else local with the reason (the trainer logs it)

    backend, reason = run_backend(cfg, {("data.buckets", "81x480x832"): 32760, ...})
"""

from __future__ import annotations

from typing import Optional

from megawan import capabilities  # (read at call time: tests select the te branch by patching it)
from megawan.config import ConfigError, RunConfig
from megawan.config.te_limits import te_fp8_problem, te_layout_problem, te_tokens_problem

TE_MISSING = ("model.backend: te needs Transformer Engine (>= 2.9) and a CUDA device, which this machine lacks; "
              "use model.backend=local (pure torch) or auto")


def te_usable() -> bool:
    return capabilities.transformer_engine_available()


def te_run_problem(cfg: RunConfig, sequences: dict) -> Optional[str]:
    """Why TE cannot train this run (None: it can), starting with the field to change.

    sequences: (field, bucket) -> video tokens, for every bucket the run trains or validates on."""
    p, m = cfg.parallel, cfg.model
    problem = te_layout_problem(m.head_dim, p)
    if problem:
        return problem
    for (field, bucket), tokens in sequences.items():
        problem = te_tokens_problem(tokens, p)
        if problem:
            return f"{field}: {bucket}: {problem} (or change parallel.context_parallel)"
    if cfg.train.fp8:
        for (field, bucket), tokens in sequences.items():
            if field == "data.buckets":  # (validation runs without FP8)
                problem = te_fp8_problem(m.dim, m.ffn_dim, m.text_len, tokens, cfg.data.micro_batch_size, p)
                if problem:
                    return f"train.fp8: {bucket}: {problem}"
    return None


def run_backend(cfg: RunConfig, sequences: dict) -> tuple:
    """(backend, reason): the backend this run trains on and, when model.backend=auto settles for local on a
    machine with Transformer Engine, why. Raises ConfigError when model.backend=te cannot be."""
    name = cfg.model.backend
    if name == "local":
        return "local", None
    if not te_usable():
        if name == "te":
            raise ConfigError(TE_MISSING)
        return "local", None
    problem = te_run_problem(cfg, sequences)
    if problem is None:
        return "te", None
    if name == "te":
        raise ConfigError(f"{problem}; model.backend=local (or auto) takes this run")
    return "local", f"model.backend=auto trains on local, not te: {problem}"
