"""megatron-core's checkpoint writer reports its results through a multiprocessing Manager queue, whose server
is a process of its own, started at the first save and never stopped. When a rank is SIGKILLed (the OOM killer,
a test, a failing node's agent) that server and its resource tracker live on as orphans: torchrun's elastic
agent stops only the process groups of the workers still alive, so every restart would leave two processes
behind (holding the job's stdout open, which also keeps a launcher that waits for it from ever finishing).

    tie_checkpoint_writer_to_this_process()   # once per rank, before the first save (the trainer's setup)

starts that Manager now, with its server set to die with this process (Linux's PR_SET_PDEATHSIG), and hands
megatron its queue. The resource tracker exits by itself once both are gone.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.managers import SyncManager

from megawan.utils.processes import die_with_parent

_MANAGER = {}


def tie_checkpoint_writer_to_this_process() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # what megatron's ctx.Manager() makes
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    _MANAGER["manager"] = manager
    filesystem_async._results_queue = manager.Queue()
