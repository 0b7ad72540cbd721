"""`initialize()`: one call that starts torch.distributed and megatron-core's process groups.

Launchers: torchrun (RANK, WORLD_SIZE, MASTER_ADDR, …), srun (SLURM_PROCID, SLURM_NTASKS, …; the first
node of SLURM_JOB_NODELIST is the rendezvous host), or a single process. nccl on GPU, gloo on CPU (or
`backend="gloo"` on a GPU machine: `megawan generate --device cpu`); either way a rank with CUDA gets its GPU
(LOCAL_RANK), which `megawan.capabilities.rank_device()` then reports.

    from megawan.parallel import initialize
    initialize(ParallelConfig(tensor_parallel=2, context_parallel=2), seed=0)
"""

from __future__ import annotations

import logging
import os
import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megawan.capabilities import cuda_available
from megawan.config import ParallelConfig
from megawan.parallel import groups as _groups
from megawan.parallel.groups import ContextParallelGroups, set_context_parallel_groups, set_sequence_parallel


def _launcher_environment() -> dict:
    """torchrun's variables, derived from Slurm's under srun."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env:
        return env
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
        env["MASTER_ADDR"] = first_slurm_host(env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
        env["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)  # same on every task of the job
    return env


def first_slurm_host(nodelist: str) -> str:
    """'gpu[012-015,020],cpu1' -> 'gpu012' (Slurm's compressed host list, first entry)."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = m.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def local_device(local_rank: int) -> int:
    """This task's GPU: LOCAL_RANK among the GPUs it sees. All of the node's under torchrun or plain srun; one
    under srun --gpus-per-task=1 / --gpu-bind=single:1, where Slurm sets CUDA_VISIBLE_DEVICES per task."""
    count = torch.cuda.device_count()
    return local_rank % count if count else local_rank


def initialize(parallel: ParallelConfig | None = None, backend: str | None = None, seed: int = 0) -> ParallelConfig:
    """Start (or join) the job's process groups. Returns the validated ParallelConfig.

    Must run on every rank before models are built. A lone process with no launcher needs no call at all
    when every parallel size is 1.
    """
    parallel = parallel or ParallelConfig()
    env = _launcher_environment()
    if _groups._PRIVATE_WORLD["active"]:  # a lone process's one-rank world: make way for the real job
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        _groups._PRIVATE_WORLD["active"] = False
    if not dist.is_initialized():
        world_size = int(env.get("WORLD_SIZE", "1"))
        parallel.validate(world_size)
        if backend is None:
            backend = "nccl" if cuda_available() else "gloo"
        if backend == "nccl" and not cuda_available():
            raise RuntimeError("the nccl backend needs CUDA; this machine has none (use gloo)")
        if cuda_available():  # this rank's GPU, whatever the backend: `capabilities.rank_device()` reports it
            torch.cuda.set_device(local_device(int(env.get("LOCAL_RANK", "0"))))
        if "RANK" in env:
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend=backend, rank=int(env["RANK"]), world_size=world_size,
                                    store=_elastic_store(env, world_size))
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    parallel.validate(dist.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
            context_parallel_size=parallel.context_parallel,
            # 2d: [ulysses, ring] groups, which megatron's TEDotProductAttention hands TE for a2a+p2p
            hierarchical_context_parallel_sizes=parallel.hierarchical_context_parallel_sizes,
        )
    set_context_parallel_groups(_context_parallel_groups(parallel))
    set_sequence_parallel(parallel.sequence_parallel)
    _seed(seed)
    _rank_logging()
    return parallel


def _elastic_store(env, world_size: int):
    """Under torchrun's elastic agent (c10d rendezvous), the key-value store of this start of the worker group;
    None elsewhere (torch.distributed's env:// then connects to MASTER_ADDR:MASTER_PORT itself).

    The agent hosts one TCPStore for the whole job (MASTER_PORT points at it) and hands it to every restart of
    the group unprefixed (torch 2.13's env:// rendezvous; older versions prefixed it per attempt): a restarted
    group would read the keys its predecessor left (gloo's peer addresses of each process group) and connect to
    ranks that are gone, failing in `new_group` ("connectFullMesh ... Connection refused") or waiting on them.
    Each start (TORCHELASTIC_RESTART_COUNT) gets a prefix of its own."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False,
                          timeout=default_pg_timeout)
    attempt = f"megawan/{env.get('TORCHELASTIC_RUN_ID', 'run')}/start_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(attempt, store)


def _context_parallel_groups(parallel: ParallelConfig):
    if parallel.context_parallel == 1:
        return None
    cp_group = parallel_state.get_context_parallel_group()
    mode = parallel.context_parallel_mode
    if mode == "ulysses":
        return ContextParallelGroups(cp_group, mode, ulysses=cp_group, ring=None)
    if mode == "ring":
        return ContextParallelGroups(cp_group, mode, ulysses=None, ring=cp_group)
    # 2d: CP rank c = g * U + a. Ulysses groups are U consecutive CP ranks (inside a node); ring groups link
    # the ranks with the same a across groups. Every rank must create every group, in the same order.
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, tuple(parallel_state.get_context_parallel_global_ranks()))
    u = parallel.ulysses_size
    mine_ulysses = mine_ring = None
    me = dist.get_rank()
    for ranks in sorted(set(everyone)):
        for g in range(len(ranks) // u):
            group = dist.new_group(list(ranks[g * u:(g + 1) * u]))
            if me in ranks[g * u:(g + 1) * u]:
                mine_ulysses = group
        for a in range(u):
            members = list(ranks[a::u])
            group = dist.new_group(members)
            if me in members:
                mine_ring = group
    return ContextParallelGroups(cp_group, mode, ulysses=mine_ulysses, ring=mine_ring)


def _seed(seed: int) -> None:
    """Same seed on every rank (weights are initialised whole, then split); dropout-free Wan needs no
    per-TP-rank streams. On GPU megatron's CUDA RNG tracker is seeded too."""
    torch.manual_seed(seed)
    if cuda_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _rank_logging() -> None:
    rank = dist.get_rank()
    fmt = f"[rank {rank}] %(asctime)s %(name)s %(levelname)s: %(message)s"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt, force=True)
    if os.environ.get("MEGAWAN_VERBOSE", "0") in ("0", ""):
        # megatron's INFO lines (every parameter of every DDP bucket, the whole optimizer config) bury the
        # training log; MEGAWAN_VERBOSE=1 brings them back
        logging.getLogger("megatron").setLevel(logging.WARNING)
