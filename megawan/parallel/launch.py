"""Run a function on N local processes over gloo (CPU) with megatron-core model parallelism set up.

The tests, the demo and multi-rank checkpoint conversion use it; real jobs launch with torchrun or srun.

    def work(rank, out_dir): ...
    spawn_local(work, world_size=2, tensor_parallel=2, args=(out_dir,))
"""

from __future__ import annotations

import multiprocessing
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state

from megawan.config import ParallelConfig
from megawan.parallel.groups import set_context_parallel_groups, set_sequence_parallel
from megawan.parallel.initialize import initialize


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, parallel: ParallelConfig, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # N ranks share the machine's cores
    initialize(parallel, backend="gloo")
    try:
        fn(rank, *args)
    finally:
        set_context_parallel_groups(None)
        set_sequence_parallel(False)
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def spawn_local(fn, world_size: int, tensor_parallel: int = 1, args: tuple = (), preload: tuple = (),
                **parallel) -> None:
    """Call fn(rank, *args) on `world_size` spawned processes; raises if any rank fails.

    tensor_parallel and the other ParallelConfig fields (context_parallel=2, …) lay the ranks out; the
    layout is validated here, before any process starts. preload: modules (fn's among them) that a fork server
    imports once, its forks becoming the ranks, instead of each rank importing torch and megatron afresh (8
    ranks on 2 cores: ~10 s to start, not ~80 s). It takes effect when the process starts its fork server.
    """
    layout = ParallelConfig(tensor_parallel=tensor_parallel, **parallel).validate(world_size)
    if preload:
        multiprocessing.set_forkserver_preload(list(preload))
    mp.start_processes(_entry, args=(fn, world_size, free_port(), layout, args), nprocs=world_size, join=True,
                       start_method="forkserver" if preload else "spawn")
