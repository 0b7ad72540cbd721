"""User errors end a command with one line and exit status 2; bugs keep their traceback.

    class ManifestError(UserError, ValueError): ...        # a user error (still a ValueError for callers)

    def main(argv=None) -> int:
        return run_main("convert_checkpoint", _main, argv)   # prints "convert_checkpoint: <message>", returns 2

A user error is something the person running the command can fix from the message alone: a bad config field,
a damaged or missing file, a refused pickle. It is a `UserError`, or one of the OS errors about a path
(`USER_ERRORS`); anything else (an AttributeError in our code, a RuntimeError from torch) is a bug and keeps
its traceback. `MEGAWAN_DEBUG=1` prints the traceback for user errors too (and still exits 2).

Under torchrun / srun every rank exits 2, but only rank 0 prints: the checks that raise these are either
made alike on every rank (configs, arguments) or agreed collectively (checkpoint verification), so the other
ranks would print the same line again.

No torch import here: `megawan --help` and the config module import this, and must stay fast.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

EXIT_USER_ERROR = 2  # argparse's status for a bad command line: the same "you asked for something wrong"
DEBUG_ENV = "MEGAWAN_DEBUG"


class UserError(Exception):
    """An error whose message (one line, naming the file or field) is all the user needs."""


# OS errors about a path the user named: their message already names the file ("[Errno 2] ...: 'x.yaml'").
# Not OSError as a whole: a full disk or a broken pipe in the middle of a job is worth a traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")  # only if something imported it already: no torch import here
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (a multi-line message is joined; an empty one names the type)."""
    text = " ".join(str(error).split()) if str(error).strip() else type(error).__name__
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        text = error.args[0]  # str(KeyError) quotes the message
    elif isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"  # not "[Errno 2] No such file or directory: 'x.yaml'"
    return text


def report(prog: str, error: BaseException) -> int:
    """Print `prog: message` (rank 0 only; the traceback too under MEGAWAN_DEBUG=1); returns the exit status."""
    if _rank() == 0:
        if debug():
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        print(f"{prog}: {one_line(error)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run_main(prog: str, fn: Callable[..., int], *args, also: tuple = (), **kwargs) -> int:
    """fn(*args, **kwargs), with a user error (USER_ERRORS, plus the classes in `also` that this entry point
    treats as user errors) turned into one line on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS + tuple(also) as e:
        return report(prog, e)
