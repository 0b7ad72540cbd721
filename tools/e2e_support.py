"""What tools/gpu_e2e.py needs beside its phases: the phase runner (timed, each result recorded and the JSON
rewritten after every phase, so a run stopped by its time limit still leaves what it measured), megawan's
CLI in a child process that reports its peak CUDA memory, and the latent comparison.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class E2EError(RuntimeError):
    """A phase's check failed: the message says what was expected and what was found."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise E2EError(message)


def rel_error(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|: one number for "the same latents" at any scale."""
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------
# Phases


class Report:
    """Phases run in order; each is timed and its outcome kept as {"status": ok | failed | skipped, "seconds",
    its measurements, "error"}. A phase is fn(out): it puts each measurement in `out` as soon as it has it, so
    a check that fails later keeps them in the JSON. A failed phase does not stop the run (a GPU lease is too
    short to lose the later phases to an early one): the phases that need it are skipped, and the script exits
    non-zero."""

    def __init__(self, path: str | None, facts: dict):
        self.path, self.data = path, {**facts}
        self.data.setdefault("phases", {})
        self.data.setdefault("ok", None)
        self.start = time.perf_counter()
        self.current = None  # the phase running now, for a run stopped from outside

    def phase(self, name: str, fn, needs: tuple = (), skip: str | None = None) -> dict:
        phases = self.data["phases"]
        missing = [n for n in needs if phases.get(n, {}).get("status") != "ok"]
        if skip is None and missing:
            skip = f"needs phase {', '.join(missing)}, which did not pass"
        if skip is not None:
            print(f"[e2e] {name}: skipped ({skip})", flush=True)
            phases[name] = {"status": "skipped", "reason": skip}
            self.write()
            return phases[name]
        print(f"[e2e] {name} ...", flush=True)
        t0 = self.current = (name, time.perf_counter())
        out: dict = {}
        try:
            fn(out)
            result = {"status": "ok", **out}
        except Exception as e:  # recorded, and the phases after it still run
            tail = traceback.format_exc(limit=6) if not isinstance(e, E2EError) else ""
            result = {"status": "failed", **out, "error": f"{type(e).__name__}: {e}"}
            print(f"[e2e] {name} FAILED: {type(e).__name__}: {e}\n{tail}", flush=True)
        finally:
            kill_children()  # nothing a phase started outlives it
            self.current = None
        result["seconds"] = round(time.perf_counter() - t0[1], 2)
        phases[name] = result
        shown = {k: v for k, v in result.items() if k not in ("status", "error") and not isinstance(v, (dict, list))}
        print(f"[e2e] {name}: {result['status']} in {result['seconds']} s  {json.dumps(shown)}", flush=True)
        self.write()
        return result

    def interrupted(self, why: str) -> None:
        """Stopped from outside (the stage's time limit): the running phase is recorded as failed."""
        if self.current is not None:
            name, t0 = self.current
            self.data["phases"][name] = {"status": "failed", "error": f"interrupted: {why}",
                                         "seconds": round(time.perf_counter() - t0, 2)}
        self.data["interrupted"] = why
        self.finish()

    def finish(self) -> bool:
        self.data["total_seconds"] = round(time.perf_counter() - self.start, 2)
        self.data["ok"] = all(p["status"] != "failed" for p in self.data["phases"].values())
        self.write()
        return self.data["ok"]

    def write(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=2)
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------------
# megawan's CLI in a child process

# `megawan.cli.main` itself (what `megawan train` / `python -m megawan.cli` run), plus an exit hook that writes
# the process's peak CUDA memory: a child's memory is not visible from here.
_CHILD = """
import atexit, json, os, sys
def _peak():
    import torch
    used = torch.cuda.is_available() and torch.cuda.is_initialized()
    gb = torch.cuda.max_memory_allocated() / 2**30 if used else None
    with open(os.environ["E2E_PEAK_FILE"], "w") as f:
        json.dump({"cuda_peak_gb": gb}, f)
atexit.register(_peak)
from megawan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child_env(device: str, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    path = env.get("PYTHONPATH", "")
    if ROOT not in path.split(os.pathsep):  # this checkout's megawan, whatever the caller's path
        env["PYTHONPATH"] = ROOT + (os.pathsep + path if path else "")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run on a GPU machine stays on the CPU
    env.update(extra or {})
    return env


_LIVE: set = set()  # children not yet waited for


def kill_children() -> None:
    """SIGKILL every child still running (a failed phase's, or all of them when the script is stopped)."""
    for child in list(_LIVE):
        child.kill()


class Child:
    """One `megawan` command in its own process session (so that a kill reaches it and what it started, and
    nothing else), its output in `log`."""

    def __init__(self, args: list, log: str, env: dict):
        self.args, self.log, self.peak_file = args, log, log + ".peak.json"
        if os.path.exists(self.peak_file):
            os.remove(self.peak_file)
        env = dict(env, E2E_PEAK_FILE=self.peak_file)
        self.out = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env=env, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE.add(self)

    def wait(self, timeout: float, kill_when=None) -> int:
        """Wait for the exit; SIGKILL the process group when `kill_when()` turns true (polled every 5 ms) or
        after `timeout` seconds (then E2EError)."""
        deadline = time.time() + timeout
        try:
            while self.proc.poll() is None:
                if kill_when is not None and kill_when():
                    break
                if time.time() > deadline:
                    raise E2EError(f"megawan {self.args[0]} ran past {timeout:.0f} s and was killed; log tail:\n"
                                   f"{self.tail()}")
                time.sleep(0.005)
        finally:
            self.kill()  # a no-op for a child that has exited
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.out.close()
        _LIVE.discard(self)

    def text(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def peak_gb(self):
        if not os.path.exists(self.peak_file):
            return None
        with open(self.peak_file, encoding="utf-8") as f:
            gb = json.load(f)["cuda_peak_gb"]
        return None if gb is None else round(gb, 3)


def run_cli(args: list, log: str, env: dict, timeout: float) -> Child:
    """Run a megawan command to its end; E2EError with the log's tail when it fails."""
    child = Child(args, log, env)
    code = child.wait(timeout)
    check(code == 0, f"megawan {' '.join(args[:1])} exited with {code}; log {log}, tail:\n{child.tail()}")
    return child
