"""Progress for long jobs (precompute, training, sampling, conversion) on tqdm: count, rate, ETA, extra fields.
On a terminal tqdm's bar, redrawn in place; in a log file (Slurm's output) one plain line every `every` seconds,
so both stay readable.

    bar = Progress(total=len(entries), desc="precompute [rank 0]", unit="clips")
    for ...: bar.update(1, skipped=n_skipped)
    bar.close()

    bar = Progress(total=steps, desc="train", unit="steps", initial=resumed_step)  # rate and ETA over the steps
    bar.write("checkpoint ...")                                                     # run here, not since step 0

Messages printed while a bar is open go through `write` (the bar is cleared, the line printed, the bar redrawn),
never onto the bar.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

# the plain line of a log file: "train 40/100 steps [00:12<00:18, 3.33steps/s] | loss 0.1234 | bucket 1x32x32"
_LINE = "{desc} {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]"
_OPEN_ENDED = "{desc} {n_fmt} {unit} [{elapsed}, {rate_fmt}]"  # no total: no ETA


def write(message: str, file=None) -> None:
    """Print `message` on its own line (stdout by default), clearing and redrawing any tqdm bar on the terminal."""
    file = file or sys.stdout
    tqdm.write(message, file=file)
    file.flush()


class Progress:
    def __init__(self, total: int | None, desc: str = "", unit: str = "it", stream=None, every: float = 1.0,
                 enabled: bool = True, initial: int = 0, clock=time.perf_counter):
        """initial: units already done before this process (a resumed run's step): shown in the count, left out
        of the rate. clock: seconds (tests pass a fake one)."""
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.every, self.enabled, self.initial, self.clock = every, enabled, initial, clock
        self.count, self.fields, self._shown = initial, {}, None
        self.start = self._last = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if enabled and self.tty:
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream, dynamic_ncols=True,
                             mininterval=min(every, 0.1), leave=True)

    @property
    def rate(self) -> float:
        """Units per second since this Progress started (a resumed run's earlier units do not count)."""
        elapsed = self.clock() - self.start
        return (self.count - self.initial) / elapsed if elapsed > 0 else 0.0

    def _postfix(self) -> str:
        return "".join(f" | {k} {v}" for k, v in self.fields.items())

    def line(self) -> str:
        """The plain line a log file gets."""
        elapsed = self.clock() - self.start
        rate = self.rate if self.count > self.initial else None
        meter = tqdm.format_meter(self.count, self.total, elapsed, prefix=self.desc, unit=self.unit, rate=rate,
                                  bar_format=_LINE if self.total is not None else _OPEN_ENDED, initial=self.initial)
        return " ".join(meter.split()) + self._postfix()

    def update(self, n: int = 1, **fields) -> None:
        self.count += n
        self.fields.update(fields)
        if self._bar is not None:
            if fields:
                self._bar.set_postfix_str(self._postfix()[3:], refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        if self.enabled and (now - self._last >= self.every or self.count == self.total):
            self._last = now
            self._write_line()

    def write(self, message: str, file=None) -> None:
        """A message on its own line (stdout by default), not onto the bar."""
        write(message, file)

    def _write_line(self) -> None:
        self._shown = (self.count, tuple(self.fields.items()))
        self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._shown != (self.count, tuple(self.fields.items())):
            self._write_line()
