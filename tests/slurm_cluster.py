"""A real one-node Slurm cluster for the `slurm` tests: munged + slurmctld + slurmd on this machine.

`start_cluster()` writes a slurm.conf into a fresh temporary folder (state, spool, logs, pid files and the munge
socket all in it, non-default ports), starts munged as the `munge` user and the two Slurm daemons as root, and waits
until the node is idle; `SlurmCluster.stop()` cancels what is left and stops the daemons by their pid files.
Clients find the cluster through SLURM_CONF (`cluster.env`). Debian's packages: `apt-get install -y slurm-wlm
munge` (scripts/setup_slurm.sh does it as part of the set-up). `missing_piece()` says why a cluster cannot start here.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qrl_megatron.utils.net import free_port

INSTALL = "apt-get install -y slurm-wlm munge (as root; scripts/setup_slurm.sh does it)"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scancel")
MUNGE_KEY = Path("/etc/munge/munge.key")
NODE = "localhost"
PARTITION = "debug"


def missing_piece() -> str | None:
    """None when a cluster can start here, else one line naming what is missing and how to get it."""
    absent = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found): {INSTALL}"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root (run the slurm tests as root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"there is no `munge` user (the munge package creates it): {INSTALL}"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _total_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    cpus: int
    pid_files: list[Path] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment plus SLURM_CONF: what sbatch/sinfo/srun (and nemo-run) need to find it."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-n", NODE, "-o", "%t", check=False, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else f"sinfo failed: {proc.stderr.strip()}"

    def logs(self) -> str:
        """The tails of the daemons' logs (for failure messages)."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        self.run("scancel", "--full", "--partition", PARTITION, check=False, timeout=10)
        pids = []
        for pid_file in self.pid_files:  # all at once: each Slurm daemon takes seconds to shut down
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            pids.append(pid)
        deadline = time.monotonic() + 15
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _slurm_conf(root: Path, socket: Path, cpus: int, memory_mb: int) -> str:
    ctld_port, slurmd_port = free_port(), free_port()
    return f"""\
ClusterName=qrltest
SlurmctldHost={NODE}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={NODE} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _start_munged(root: Path) -> tuple[Path, Path]:
    """munged as the `munge` user, its socket, log, pid and seed in root/munge (owned by munge)."""
    user = pwd.getpwnam("munge")
    mdir = root / "munge"
    mdir.mkdir(mode=0o755)
    os.chown(mdir, user.pw_uid, user.pw_gid)
    if not MUNGE_KEY.exists():  # the package's postinst makes one; a key is 1 KiB of random bytes
        MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
    os.chown(MUNGE_KEY.parent, user.pw_uid, user.pw_gid)
    os.chown(MUNGE_KEY, user.pw_uid, user.pw_gid)
    MUNGE_KEY.chmod(0o400)
    socket, pid_file = mdir / "munge.socket", mdir / "munged.pid"
    command = [
        "runuser", "-u", "munge", "--", _which("munged"), f"--socket={socket}", f"--key-file={MUNGE_KEY}",
        f"--log-file={mdir / 'munged.log'}", f"--pid-file={pid_file}", f"--seed-file={mdir / 'munged.seed'}",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        log = (mdir / "munged.log").read_text(errors="replace") if (mdir / "munged.log").exists() else ""
        raise RuntimeError(f"munged did not start ({proc.returncode}): {proc.stderr.strip()} {log[-2000:]}")
    return socket, pid_file


def start_cluster(timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under a fresh temporary folder; return once the node is idle.
    RuntimeError (with the daemons' logs) when they do not come up; the caller should check missing_piece() first."""
    root = Path(tempfile.mkdtemp(prefix="qrl-slurm-"))
    root.chmod(0o755)  # munged (not root) must reach its folder inside
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    cluster = SlurmCluster(root=root, conf=conf, cpus=cpus)
    try:
        socket, munged_pid = _start_munged(root)
        cluster.pid_files.append(munged_pid)
        conf.write_text(_slurm_conf(root, socket, cpus, int(_total_memory_mb() * 0.8)))
        env = cluster.env
        for daemon, args in (("slurmctld", ["-i"]), ("slurmd", ["-N", NODE])):
            proc = subprocess.run([_which(daemon), "-f", str(conf), *args], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{daemon} did not start ({proc.returncode}): {proc.stderr.strip()}")
            cluster.pid_files.append(root / "run" / f"{daemon}.pid")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = cluster.node_state()
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node is not idle after {timeout:.0f} s (state: {state!r})\n{cluster.logs()}")
    except BaseException:
        cluster.stop()
        raise
