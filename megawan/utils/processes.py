"""Helper processes that must not outlive the rank that started them.

A rank killed with SIGKILL (the OOM killer, a failing node's agent, a test) cannot stop its helpers: they are
re-parented and live on. Linux's PR_SET_PDEATHSIG has the kernel send them a signal when their parent dies.

    Process(target=run_dying_with_parent, args=(os.getpid(), fn, *args))   # fn(*args), killed with its parent
"""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    """Called first in a helper process: SIGKILL it when its parent dies (Linux; elsewhere nothing). The signals
    meant for the rank are ignored here: Slurm's pre-emption warning (SIGUSR1) and SIGTERM reach every process of
    the job step, and the rank answers them by checkpointing, which needs its helpers alive."""
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)


def run_dying_with_parent(parent_pid: int, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a helper process that dies with `parent_pid` (the process that started it)."""
    die_with_parent(parent_pid)
    return fn(*args, **kwargs)
