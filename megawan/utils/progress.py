"""A progress line for long jobs (precompute, training): count, rate, ETA, extra fields; rewritten in place on
a terminal, one line every `every` seconds in a log file (Slurm's output), so both stay readable.

    bar = Progress(total=len(entries), desc="precompute [rank 0]", unit="clips")
    for ...: bar.update(1, skipped=n_skipped)
    bar.close()
"""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int | None, desc: str = "", unit: str = "it", stream=None, every: float = 1.0,
                 enabled: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.every, self.enabled = every, enabled
        self.count, self.fields, self._shown = 0, {}, None
        self.start = self._last = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.count / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        done = f"{self.count}/{self.total}" if self.total is not None else f"{self.count}"
        parts = [f"{self.desc} {done} {self.unit}".strip(), f"{self.rate:.2f} {self.unit}/s"]
        if self.total and self.rate > 0:
            parts.append(f"eta {_duration((self.total - self.count) / self.rate)}")
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        return " | ".join(parts)

    def update(self, n: int = 1, **fields) -> None:
        self.count += n
        self.fields.update(fields)
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every or self.count == self.total):
            self._last = now
            self._write()

    def _write(self) -> None:
        self._shown = (self.count, tuple(self.fields.items()))
        if self.tty:
            self.stream.write("\r" + self.line() + "\033[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self._shown != (self.count, tuple(self.fields.items())):
                self._write()
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
