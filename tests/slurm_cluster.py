"""A real one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd as child processes with
every file (key, config, state, spool, logs, sockets) under one directory, and ports of their own.

    cluster = SlurmCluster(tmp_dir)
    cluster.start()                      # raises SlurmUnavailable (with the reason) when it cannot run here
    subprocess.run(["sbatch", ...], env=cluster.env)
    cluster.job(job_id)                  # scontrol's fields: {"JobState": "COMPLETED", "ExitCode": "0:0", ...}
    cluster.stop()                       # cancels jobs, stops the daemons; safe to call twice

Slurm comes from Debian's slurm-wlm (22.05 on Debian 12); `ensure_installed()` apt-installs it (with munge)
when it is missing and this process is root with apt-get (tools/run_tests.sh does the same before the suite).
The configuration is what works in a container without systemd or cgroups: proctrack/linuxproc, task/none,
no accounting; select/cons_tres with CR_CPU, and the node declares at least 4 CPUs (SlurmdParameters=
config_overrides) so that 2- and 4-task jobs fit on a 2-core machine. `AuthInfo=cred_expire` is short, since it
is also the delay before a requeued job may start again (Slurm's default is 120 s). docs/slurm.md describes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

SLURM_PROGRAMS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun", "slurmctld", "slurmd", "munged")
REQUEUE_DELAY = 5  # cred_expire: seconds a requeued job waits before it may start again (+ 1)


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (the reason is the message)."""


def _which(program: str):
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin:/bin")


def missing_programs() -> list:
    return [p for p in SLURM_PROGRAMS if _which(p) is None]


def ensure_installed(timeout: float = 900) -> None:
    """Install slurm-wlm and munge with apt-get if a program is missing (root + apt only)."""
    missing = missing_programs()
    if not missing:
        return
    if os.environ.get("MEGAWAN_SLURM_NO_INSTALL"):
        raise SlurmUnavailable(f"{', '.join(missing)} not installed (MEGAWAN_SLURM_NO_INSTALL is set)")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed, and installing needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed, and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        try:
            out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{' '.join(cmd)} took more than {timeout:.0f} s") from None
        if out.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout[-2000:]}")
    missing = missing_programs()
    if missing:
        raise SlurmUnavailable(f"apt-get installed slurm-wlm, but {', '.join(missing)} is still missing")


def _free_ports(count: int) -> list:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_name() -> str:
    """`hostname -s` when it resolves (srun tasks meet at the first node's name), else localhost."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        return "localhost"


class SlurmCluster:
    def __init__(self, root: str, cpus: int | None = None):
        self.root = os.path.abspath(root)
        self.node = node_name()
        self.cpus = cpus or max(4, os.cpu_count() or 1)
        self.conf = os.path.join(self.root, "etc", "slurm.conf")
        self.log_dir = os.path.join(self.root, "log")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.procs: dict = {}
        # sbatch exports this environment to the job: no launcher variables of the test process may leak in
        launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
        self.env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = self.conf
        for var in list(self.env):  # a test run inside a Slurm job must not leak that job into ours
            if var.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and var != "SLURM_CONF":
                del self.env[var]

    # ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> "SlurmCluster":
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root (it starts every job's processes)")
        for sub in ("etc", "munge", "state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(self.root, 0o755)  # munged wants the socket's directories searchable
        os.chmod(os.path.join(self.root, "munge"), 0o755)
        try:
            self._start_munge()
            self._write_config()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", self.conf])
            self._wait_for(lambda: self._quiet(["scontrol", "ping"]).returncode == 0, timeout, "slurmctld to answer")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", self.conf])
            self._wait_for(self._node_idle, timeout, f"node {self.node} to be idle")
        except BaseException:  # leave nothing running behind a start that did not finish
            self.stop()
            raise
        return self

    def _start_munge(self):
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        d = os.path.join(self.root, "munge")
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                               f"--seed-file={d}/munged.seed"])
        self._wait_for(lambda: os.path.exists(self.munge_socket), 30, "munged's socket")

    def _write_config(self):
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        lines = f"""
            ClusterName=megawantest
            SlurmctldHost={self.node}(127.0.0.1)
            SlurmctldPort={ctld_port}
            SlurmdPort={slurmd_port}
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={self.munge_socket},cred_expire={REQUEUE_DELAY}
            StateSaveLocation={r}/state
            SlurmdSpoolDir={r}/spool
            SlurmctldPidFile={r}/slurmctld.pid
            SlurmdPidFile={r}/slurmd.pid
            SlurmctldLogFile={r}/log/slurmctld.log
            SlurmdLogFile={r}/log/slurmd.log
            SlurmctldDebug=info
            SlurmdDebug=info
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            MpiDefault=none
            SwitchType=switch/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_CPU
            SchedulerType=sched/builtin
            SchedulerParameters=sched_interval=2
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/none
            JobCompType=jobcomp/none
            MailProg=/bin/true
            ReturnToService=2
            SlurmdParameters=config_overrides
            JobRequeue=1
            KillWait=10
            NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
            PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
            """
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write("\n".join(line.strip() for line in lines.strip().splitlines()) + "\n")

    def _spawn(self, name: str, cmd: list):
        log = open(os.path.join(self.log_dir, f"{name}.out"), "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait_for(self, ready, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                           + self.logs())
            if ready():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}:\n" + self.logs())

    def _node_idle(self) -> bool:
        out = self._quiet(["sinfo", "-h", "-N", "-o", "%N %T"])
        return out.returncode == 0 and f"{self.node} idle" in out.stdout

    def _quiet(self, cmd: list, timeout: float = 30):
        return subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)

    # ------------------------------------------------------------------------------------------
    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> str:
        """A Slurm client command against this cluster; its output."""
        out = self._quiet(list(cmd), timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout}")
        return out.stdout

    def job(self, job_id) -> dict:
        """`scontrol show job -o`'s fields ({} once Slurm has forgotten the job, MinJobAge = 300 s after its end)."""
        out = self._quiet(["scontrol", "show", "job", "-o", str(job_id)])
        if out.returncode != 0:
            return {}
        fields = {}
        for item in out.stdout.split():
            key, sep, value = item.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def logs(self, tail: int = 40) -> str:
        text = []
        for name in sorted(os.listdir(self.log_dir)) if os.path.isdir(self.log_dir) else []:
            with open(os.path.join(self.log_dir, name), errors="replace") as f:
                lines = f.read().splitlines()[-tail:]
            text.append(f"--- {name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(text)

    # ------------------------------------------------------------------------------------------
    def stop(self, timeout: float = 30) -> None:
        """Cancel every job (slurmstepd ends its tasks), then stop slurmd, slurmctld and munged."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                jobs = self._quiet(["squeue", "-h", "-o", "%i"], timeout=10).stdout.split()
                if jobs:
                    self._quiet(["scancel", *jobs], timeout=10)
                    deadline = time.time() + timeout
                    while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).strip():
                        time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        steps = self._step_daemons()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in steps:  # a slurmstepd left over after its job was cancelled: end it and its tasks
            _kill_tree(proc)

    def _step_daemons(self) -> list:
        """slurmstepd processes of this cluster: they hold our slurmd's log file open."""
        try:
            import psutil
        except ImportError:
            return []
        out = []
        for p in psutil.process_iter(["name"]):
            try:
                ours = any(f.path.startswith(self.root + os.sep) for f in p.open_files())
                if p.info["name"] == "slurmstepd" and ours:
                    out.append(p)
            except (psutil.Error, OSError):
                continue
        return out


def _kill_tree(proc) -> None:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
