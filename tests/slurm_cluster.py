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

`MultiHostSlurmCluster` (below) is the same cluster with several hosts, each a network namespace on a bridge
with its own address, hostname, /etc/hosts, munged and slurmd, and one slurmctld on the bridge; it can kill a
host (every process on it) and boot it again. tests/test_slurm_multihost.py uses it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

SLURM_PROGRAMS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun", "slurmctld", "slurmd", "munged")
REQUEUE_DELAY = 5  # cred_expire: seconds a requeued job waits before it may start again (+ 1)


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (the reason is the message)."""


class NetnsUnavailable(SlurmUnavailable):
    """This machine cannot make network namespaces (not root, no iproute2, a sandbox without them): no
    multi-host cluster, though Slurm itself may be fine."""


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
        # A host's own files (munged's socket, slurmd's spool, pid and log). One host here: the root itself;
        # MultiHostSlurmCluster gives every host its own directory, mounted at the same path on that host.
        self.local = self.root
        self.munge_key = os.path.join(self.root, "munge", "munge.key")
        self.munge_socket = os.path.join(self.local, "munge", "munge.socket")
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
        with open(self.munge_key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(self.munge_key, 0o600)
        self._start_munged("munged", os.path.join(self.local, "munge"))

    def _start_munged(self, name: str, d: str, prefix: tuple = (), origin: str | None = None):
        """A munged with its socket, pid, log and seed files in `d`, run under `prefix` (a host's namespace)."""
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)  # munged wants the socket's directories searchable
        socket_path = os.path.join(d, "munge.socket")
        self._spawn(name, [*prefix, _which("munged"), "--foreground", "--force", f"--socket={socket_path}",
                           f"--key-file={self.munge_key}", f"--pid-file={d}/munged.pid",
                           f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed",
                           *([f"--origin={origin}"] if origin else [])])
        self._wait_for(lambda: os.path.exists(socket_path), 30, f"{name}'s socket")

    def _node_lines(self, slurmd_port: int) -> str:
        return f"""
            SlurmctldHost={self.node}(127.0.0.1)
            NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
            PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
            """

    def _write_config(self):
        ctld_port, slurmd_port = _free_ports(2)
        r, local = self.root, self.local
        lines = f"""
            ClusterName=megawantest
            SlurmctldPort={ctld_port}
            SlurmdPort={slurmd_port}
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={self.munge_socket},cred_expire={REQUEUE_DELAY}
            StateSaveLocation={r}/state
            SlurmdSpoolDir={local}/spool
            SlurmctldPidFile={r}/slurmctld.pid
            SlurmdPidFile={local}/slurmd.pid
            SlurmctldLogFile={r}/log/slurmctld.log
            SlurmdLogFile={local}/log/slurmd.log
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
            """ + self._node_lines(slurmd_port)
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
        for d in self._log_dirs():
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                with open(os.path.join(d, name), errors="replace") as f:
                    lines = f.read().splitlines()[-tail:]
                where = os.path.relpath(os.path.join(d, name), self.root)
                text.append(f"--- {where} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(text)

    def _log_dirs(self) -> list:
        return [self.log_dir]

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


# ----------------------------------------------------------------------------------------------
# Several hosts: network namespaces on a bridge


NETNS_PREFIX = "mw19-"  # namespaces mw19-<owner pid>-<node>, bridge mw19b<pid>, veths mw19v<pid><i>


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    if check and out.returncode != 0:
        raise SlurmUnavailable(f"ip {' '.join(args)} failed ({out.returncode}): {out.stdout.strip()}")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def netns_pids(ns: str) -> list:
    out = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()] if out.returncode == 0 else []


def kill_netns(ns: str, timeout: float = 15) -> None:
    """kill -9 every process in the namespace (a host losing power), and wait until they are gone."""
    deadline = time.time() + timeout
    while True:
        pids = netns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.time() > deadline:
            raise RuntimeError(f"processes {pids} of network namespace {ns} survive SIGKILL")
        time.sleep(0.1)


def remove_stale_netns() -> list:
    """Namespaces and bridges of earlier test runs whose process is gone (killed before its teardown ran):
    end their processes and delete them. Returns what was removed."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(NETNS_PREFIX) + r"(\d+)-\w+", name)
        if m and not _pid_alive(int(m.group(1))):
            kill_netns(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        m = re.match(r"\d+:\s+(mw19b(\d+))[:@]", line)
        if m and not _pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


def netns_unavailable():
    """Why network namespaces cannot be used here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "`ip` (iproute2), `unshare` or `nsenter` (util-linux) is missing"
    probe = f"{NETNS_PREFIX}{os.getpid()}-probe"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"ip netns add failed: {out.stdout.strip()}"
    try:
        inside = subprocess.run(["nsenter", f"--net=/run/netns/{probe}", "--", "unshare", "--mount", "--uts",
                                 "--", "sh", "-c", "hostname probe && mount --bind /etc/hosts /etc/hosts"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=30)
        if inside.returncode != 0:
            return f"cannot run a host in a network namespace: {inside.stdout.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class MultiHostSlurmCluster(SlurmCluster):
    """Two (or more) hosts, each a network namespace with its own IP on a bridge in the root namespace, its
    own hostname (UTS namespace), /etc/hosts, munged and slurmd; one slurmctld in the root namespace at the
    bridge's address. The file system is shared, as on a cluster with a shared home directory.

        cluster = MultiHostSlurmCluster(tmp_dir, nodes=("mwh1", "mwh2"))
        cluster.start()              # SlurmUnavailable (the reason) without netns or Slurm
        cluster.kill_host("mwh2")    # kill -9 every process of that host: its munged, slurmd, slurmstepd, tasks
        cluster.start_host("mwh2")   # boot it again: munged, slurmd, and the node back in service
        cluster.stop()               # also deletes the namespaces and the bridge

    Every host sees its own directory root/hosts/<node> at root/local (a bind mount in the host's mount
    namespace, set up by `host_command`), and slurm.conf names the host-local files there: munged's socket
    (each host talks to its own munged, all with the same key, as on real nodes), slurmd's spool, pid file
    and log. The root namespace (controller, sbatch/scontrol of the tests) has a root/local of its own.
    """

    def __init__(self, root: str, nodes=("mwh1", "mwh2"), cpus: int = 4):
        super().__init__(root, cpus=cpus)
        self.nodes = list(nodes)
        self.node = self.nodes[0]
        # slurmctld runs on this machine (root namespace, the bridge's address) and insists on finding its
        # own hostname in SlurmctldHost
        self.controller = socket.gethostname().split(".")[0]
        self.local = os.path.join(self.root, "local")
        self.munge_key = os.path.join(self.root, "etc", "munge.key")
        self.munge_socket = os.path.join(self.local, "munge", "munge.socket")
        tag = os.getpid()
        self.netns = {n: f"{NETNS_PREFIX}{tag}-{n}" for n in self.nodes}
        self.bridge = f"mw19b{tag}"
        self.veths = {n: (f"mw19v{tag}{i}", f"mw19p{tag}{i}") for i, n in enumerate(self.nodes)}
        self.subnet = None
        self.addr: dict = {}
        self._network_up = False

    # ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> "MultiHostSlurmCluster":
        ensure_installed()
        reason = netns_unavailable()
        if reason:
            raise NetnsUnavailable(reason)
        remove_stale_netns()
        for sub in ("etc", "state", "log", "local/munge", "local/spool", "local/log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(self.root, 0o755)
        try:
            self._network()
            with open(self.munge_key, "wb") as f:  # one key, "copied" to every host, as on a real cluster
                f.write(os.urandom(1024))
            os.chmod(self.munge_key, 0o600)
            self._start_munged("munged", os.path.join(self.local, "munge"), origin=self.addr[self.controller])
            self._write_config()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", self.conf])
            self._wait_for(lambda: self._quiet(["scontrol", "ping"]).returncode == 0, timeout, "slurmctld to answer")
            for node in self.nodes:
                self.start_host(node, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self):
        used = _ip("-o", "-4", "addr", "show").stdout
        free = [x for x in range(256) if f" 10.19.{x}." not in used]
        if not free:
            raise SlurmUnavailable("no free 10.19.x.0/24 subnet")
        self.subnet = f"10.19.{free[0]}"
        self.addr = {self.controller: f"{self.subnet}.1",
                     **{n: f"{self.subnet}.{11 + i}" for i, n in enumerate(self.nodes)}}
        self._network_up = True  # from here on, stop() removes what exists
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.addr[self.controller]}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = ["127.0.0.1 localhost"] + [f"{a} {n}" for n, a in self.addr.items()]
        for node in self.nodes:
            ns, (outer, inner) = self.netns[node], self.veths[node]
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            d = self.host_dir(node)
            for sub in ("munge", "spool", "log"):
                os.makedirs(os.path.join(d, sub), exist_ok=True)
            os.chmod(d, 0o755)
            # The host's /etc/hosts: every node's name resolves to its bridge address, on every host. The
            # trainer's rendezvous (MASTER_ADDR = first node of the job) and gloo (which binds the address its
            # own hostname resolves to) depend on it.
            with open(os.path.join(self.root, "hosts", node + ".hosts"), "w", encoding="utf-8") as f:
                f.write("\n".join(hosts) + "\n")

    def host_dir(self, node: str) -> str:
        return os.path.join(self.root, "hosts", node)

    def host_command(self, node: str, *cmd: str) -> list:
        """`cmd` run on `node`: in its network namespace, with its hostname, /etc/hosts and root/local.
        nsenter joins the namespace made by `ip netns add`; unshare gives the command a private mount
        namespace (the bind mounts do not leak back to the machine) and a hostname of its own. Everything the
        command starts inherits all three (slurmd -> slurmstepd -> the job's tasks). Not `ip netns exec`: it
        remounts /sys, which hides /sys/fs/cgroup, and slurmd 22.05 will not start without it."""
        setup = ('hostname "$1" && mount --bind "$2" /etc/hosts && mount --bind "$3" "$4" && shift 4 && '
                 'exec "$@"')
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "--", "unshare", "--mount",
                "--propagation", "private", "--uts", "--", "sh", "-c", setup, "host", node,
                os.path.join(self.root, "hosts", node + ".hosts"), self.host_dir(node), self.local, *cmd]

    def _node_lines(self, slurmd_port: int) -> str:
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.addr[n]} CPUs={self.cpus} State=UNKNOWN"
                          for n in self.nodes)
        # Short timeouts, so that a lost host is noticed in seconds (defaults: 300 s and 10 s).
        return f"""
            SlurmctldHost={self.controller}({self.addr[self.controller]})
            SlurmdTimeout={SLURMD_TIMEOUT}
            MessageTimeout=5
            {nodes}
            PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
            """

    # ------------------------------------------------------------------------------------------
    def start_host(self, node: str, timeout: float = 90) -> None:
        """Boot `node`: its munged, its slurmd; wait until Slurm shows it idle again (a node that was DOWN
        is resumed: ReturnToService=2 does that when slurmd registers, `scontrol update` makes sure)."""
        self._start_munged(f"munged@{node}", os.path.join(self.host_dir(node), "munge"),
                           prefix=tuple(self.host_command(node)), origin=self.addr[node])
        self._spawn(f"slurmd@{node}", self.host_command(node, _which("slurmd"), "-D", "-N", node, "-f", self.conf))

        def idle():
            state = self._node_state(node)
            if state.startswith(("down", "drain")) and self.procs[f"slurmd@{node}"].poll() is None:
                self._quiet(["scontrol", "update", f"nodename={node}", "state=resume"])
            return state == "idle"

        self._wait_for(idle, timeout, f"node {node} to be idle")

    def kill_host(self, node: str) -> None:
        """Power loss: SIGKILL every process of the host (munged, slurmd, slurmstepd, the job's tasks)."""
        kill_netns(self.netns[node])
        for name in (f"munged@{node}", f"slurmd@{node}"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.wait(10)

    def _node_state(self, node: str) -> str:
        out = self._quiet(["sinfo", "-h", "-N", "-n", node, "-o", "%T"])
        return out.stdout.strip() if out.returncode == 0 else ""

    def _log_dirs(self) -> list:
        return [self.log_dir, os.path.join(self.local, "log")] + [os.path.join(self.host_dir(n), "log")
                                                                   for n in self.nodes]

    # ------------------------------------------------------------------------------------------
    def stop(self, timeout: float = 30) -> None:
        """Cancel the jobs, stop the daemons, kill whatever is left in the hosts and delete the network."""
        try:
            super().stop(timeout)
        finally:
            if self._network_up:
                for node in self.nodes:
                    ns = self.netns[node]
                    if ns in _ip("netns", "list", check=False).stdout.split():
                        try:
                            kill_netns(ns)
                        except RuntimeError:  # still delete it: its processes lose the network with it
                            pass
                        _ip("netns", "del", ns, check=False)
                    _ip("link", "del", self.veths[node][0], check=False)  # gone with the namespace, normally
                _ip("link", "del", self.bridge, check=False)
                self._network_up = False
            for name in list(self.procs):
                proc = self.procs.pop(name)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


SLURMD_TIMEOUT = 6  # seconds without an answer from a slurmd before slurmctld marks its node DOWN
