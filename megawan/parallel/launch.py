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


# What every rank imports: the fork server imports them once and its forks become the ranks, instead of each
# rank importing torch and megatron-core afresh (~6 s of CPU apiece; 8 ranks on 2 cores: ~25 s to start).
RANK_IMPORTS = ("torch", "torch.distributed", "megatron.core", "megawan.parallel.launch")


def spawn_local(fn, world_size: int, tensor_parallel: int = 1, args: tuple = (), preload: tuple = (),
                **parallel) -> None:
    """Call fn(rank, *args) on `world_size` processes forked from a fork server; raises if any rank fails.

    tensor_parallel and the other ParallelConfig fields (context_parallel=2, …) lay the ranks out; the
    layout is validated here, before any process starts. The fork server has imported RANK_IMPORTS and
    `preload` (more modules, fn's among them, that the ranks would import). The server starts at the process's
    first call, with the environment and sys.path of that moment, and serves every later call: the preload of
    a later call has no effect, and the ranks see the environment the server started with (then updated by
    _entry), not later changes to os.environ.
    """
    layout = ParallelConfig(tensor_parallel=tensor_parallel, **parallel).validate(world_size)
    multiprocessing.set_forkserver_preload([*RANK_IMPORTS, *preload])
    mp.start_processes(_entry, args=(fn, world_size, free_port(), layout, args), nprocs=world_size, join=True,
                       start_method="forkserver")
