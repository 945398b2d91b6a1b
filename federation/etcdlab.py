"""A private etcd on loopback over mutual TLS, for tests and benchmarks (`aifed bench membership`): one member
on free ports in a folder of its own, with a server certificate from the federation's CA (`pki.issue_service`).

Needs Debian's etcd-server (`make services` installs it).
"""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from federation.net import free_port

ETCD = "/usr/bin/etcd"
NAME = "aifed-test"


class EtcdError(RuntimeError):
    """The private etcd could not be started; the message says why and where its log is."""


class EtcdServer:
    """One etcd member. `start()` again after `stop()` (or `kill()`) restarts it on the same ports and data."""

    def __init__(self, root: Path, ca: Path, cert: Path, key: Path):
        self.root = Path(root)
        self.ca, self.cert, self.key = Path(ca), Path(cert), Path(key)
        self.client_port, self.peer_port = free_port(), free_port()
        self.log = self.root / "etcd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        client, peer = f"https://{self.endpoint}", f"https://127.0.0.1:{self.peer_port}"
        return [ETCD, "--name", NAME, "--data-dir", str(self.root / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{NAME}={peer}", "--initial-cluster-state", "new",
                "--cert-file", str(self.cert), "--key-file", str(self.key),
                "--client-cert-auth", "--trusted-ca-file", str(self.ca),
                "--peer-cert-file", str(self.cert), "--peer-key-file", str(self.key),
                "--peer-client-cert-auth", "--peer-trusted-ca-file", str(self.ca),
                "--logger=zap", "--log-level=warn", "--log-outputs=stderr"]

    def start(self, timeout: float = 20) -> None:
        """Start etcd and return once it answers /health over mutual TLS."""
        if not Path(ETCD).exists() and shutil.which("etcd") is None:
            raise EtcdError(f"{ETCD} is missing: run `make services` (installs Debian's etcd-server)")
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdError(f"etcd exited with {self.proc.returncode} at start; see {self.log}:\n{self._tail()}")
            last = self.health()
            if not last:
                return
            time.sleep(0.05)
        self.stop()
        raise EtcdError(f"etcd at {self.endpoint} not healthy after {timeout:.0f} s ({last}); see {self.log}:\n"
                        f"{self._tail()}")

    def health(self) -> str:
        """"" when etcd says it is healthy, else why not."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        try:
            with urllib.request.urlopen(f"https://{self.endpoint}/health", timeout=2, context=context) as reply:
                body = reply.read().decode()
        except (OSError, urllib.error.URLError) as exc:
            return str(exc)
        return "" if '"health":"true"' in body.replace(" ", "") else body

    def stop(self, timeout: float = 10) -> None:
        """Stop etcd gracefully (SIGTERM), killing it if it lingers."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Crash etcd (SIGKILL)."""
        self._signal(signal.SIGKILL, 10)

    def _signal(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def wipe(self) -> None:
        """Delete etcd's data (stop it first): the next `start()` is a new, empty cluster on the same ports."""
        if self.running:
            raise EtcdError("stop etcd before wiping its data")
        shutil.rmtree(self.root / "data", ignore_errors=True)

    def _tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
