"""A private single-node Slurm cluster with fake GPUs, for tests, the demo and benchmarks.

Everything lives under one folder: a private munged (its own key and socket), `slurm.conf` and `gres.conf`,
state, spool and logs. Clients and daemons find it through `SLURM_CONF`, so the machine's /etc/slurm is never
read or touched. Needs Debian's `slurm-wlm` and `munge` (`make services` installs them) and root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from federation.net import free_port

REQUIRED = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "sacct", "scancel", "scontrol")


class SlurmLabError(RuntimeError):
    """The private cluster could not be started; the message says why and where the logs are."""


def missing_programs() -> list[str]:
    return [p for p in REQUIRED if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmLab:
    """`with SlurmLab(folder) as lab:` a running cluster; `lab.env` is the environment for Slurm clients."""

    root: Path
    partitions: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "debug": 0})  # name -> MaxTime minutes
    gpus: int = 8
    cpus: int = 16
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "gpus"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            dev = r / "gpus" / f"nvidia{i}"
            if not dev.is_symlink():
                dev.symlink_to("/dev/null")  # Slurm wants device files; a symlink to /dev/null passes
        host = socket.gethostname()
        parts = "\n".join(
            f"PartitionName={name} Nodes={host} Default={'YES' if i == 0 else 'NO'} "
            f"MaxTime={minutes or 'INFINITE'} State=UP" for i, (name, minutes) in enumerate(self.partitions.items()))
        self.conf.write_text(f"""# Private single-node cluster written by aifed's hub/slurmlab.py
ClusterName=aifedlab
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge.sock'}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r / 'log' / 'jobcomp.txt'}
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
MinJobAge=300
KillWait=2
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=16000 Gres=gpu:{self.gpus} State=UNKNOWN
{parts}
""")
        (r / "gres.conf").write_text(f"Name=gpu File={r / 'gpus'}/nvidia[0-{self.gpus - 1}]\n")

    def start(self, timeout: float = 30.0) -> "SlurmLab":
        missing = missing_programs()
        if missing:
            raise SlurmLabError(f"Slurm is not installed (missing {', '.join(missing)}): run `make services` "
                                "or `apt-get install slurm-wlm munge`")
        if os.geteuid() != 0:
            raise SlurmLabError("the private Slurm cluster runs its daemons as root; run as root")
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        key = self.root / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        self._spawn("munged", [_program("munged"), "--foreground", "--force", f"--socket={self.root / 'munge.sock'}",
                               f"--key-file={key}", f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--pid-file={self.root / 'munged.pid'}", f"--seed-file={self.root / 'munged.seed'}"])
        self._wait(lambda: (self.root / "munge.sock").exists(), timeout, "munged did not create its socket")
        self.start_controller()
        self._spawn("slurmd", [_program("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_ready, timeout, "the node did not become idle")
        return self

    def start_controller(self, timeout: float = 30.0) -> None:
        self._spawn("slurmctld", [_program("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(self.controller_up, timeout, "slurmctld did not answer `scontrol ping`")

    def stop_controller(self) -> None:
        self._stop("slurmctld")

    def controller_up(self) -> bool:
        try:
            out = subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return "is UP" in out.stdout

    def _node_ready(self) -> bool:
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True,
                                 timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and out.stdout.strip() != "" and all(
            s.strip().rstrip("*") in ("idle", "mixed", "allocated") for s in out.stdout.split())

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait(self, ready, timeout: float, problem: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    self.stop()
                    raise SlurmLabError(f"{name} exited with {proc.returncode}; see {self.root / 'log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise SlurmLabError(f"{problem} within {timeout:.0f}s; see {self.root / 'log'}")
            time.sleep(0.1)

    def _stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Cancel what still runs, stop slurmd first (it ignores SIGTERM while it retries a missing controller),
        then the rest, and leave no job step behind (a slurmstepd outlives a stopped slurmd)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=10)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and subprocess.run(
                        ["squeue", "-h", "-t", "RUNNING,COMPLETING,PENDING", "-o", "%i"], env=self.env,
                        capture_output=True, text=True, timeout=10).stdout.strip():
                    time.sleep(0.2)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            self._stop(name)
        self._kill_steps()

    def _kill_steps(self) -> None:
        mine = f"SLURM_CONF={self.conf}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if (proc / "comm").read_text().strip() == "slurmstepd" and \
                        mine in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def __enter__(self) -> "SlurmLab":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
