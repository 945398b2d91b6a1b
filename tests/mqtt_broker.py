"""A private Mosquitto for tests: one broker on a free loopback port, in a temporary folder, anonymous or over
mutual TLS with the test federation's PKI (its server certificate from `pki.issue_service`). tests/conftest.py
loads it as a pytest plugin, so test modules just name the fixtures `mqtt_broker` and `mqtt_broker_tls`.

Needs Debian's mosquitto (`make services` installs it); nothing is skipped when it is missing.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from certs import pki
from federation.net import free_port

MOSQUITTO = "/usr/sbin/mosquitto"


class MosquittoError(RuntimeError):
    """The private Mosquitto could not be started; the message says why and where its log is."""


def mosquitto_binary() -> str:
    found = MOSQUITTO if Path(MOSQUITTO).exists() else shutil.which("mosquitto")
    if not found:
        raise MosquittoError(f"{MOSQUITTO} is missing: run `make services` (installs Debian's mosquitto)")
    return found


class MosquittoBroker:
    """One Mosquitto listening on 127.0.0.1. `start()` again after `stop()` (or `kill()`) restarts it on the same
    port; persistence is off, so a restart forgets retained messages and sessions, like a broker that lost its
    disk. With `tls` (CA, certificate, key), the listener requires a client certificate from that CA."""

    def __init__(self, root: Path, tls: tuple[Path, Path, Path] | None = None, port: int | None = None):
        self.root = Path(root)
        self.tls = tls
        self.port = port or free_port()
        self.conf = self.root / "mosquitto.conf"
        self.log = self.root / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self) -> str:
        lines = [f"listener {self.port} 127.0.0.1",
                 "allow_anonymous true",
                 "persistence false",
                 f"user {getpass.getuser()}",  # as root, mosquitto would otherwise switch to user "mosquitto"
                 f"log_dest file {self.log}",
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "connection_messages true"]
        if self.tls:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "require_certificate true"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10) -> None:
        """Start Mosquitto and return once its port accepts connections."""
        binary = mosquitto_binary()
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config())
        with open(self.root / "mosquitto.out", "ab") as out:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise MosquittoError(f"mosquitto exited with {code} at start; see {self.log}:\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise MosquittoError(f"mosquitto at {self.endpoint} not listening after {timeout:.0f} s; see {self.log}:\n"
                             f"{self.tail()}")

    def stop(self, timeout: float = 10) -> None:
        """Stop Mosquitto gracefully (SIGTERM), killing it if it lingers."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Crash Mosquitto (SIGKILL); a paused one dies without handling what it had received."""
        self._signal(signal.SIGKILL, 10)

    def pause(self) -> None:
        """Freeze Mosquitto (SIGSTOP): connections stay open but nothing is answered, like an overloaded broker."""
        if self.running:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGCONT)

    def _signal(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if sig != signal.SIGKILL:
                self.proc.send_signal(signal.SIGCONT)  # a paused broker cannot act on SIGTERM
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


_certificates: dict[Path, tuple[Path, Path]] = {}  # PKI folder -> the broker's certificate and key, issued once


def broker_certificate(pki_root: Path) -> tuple[Path, Path]:
    """The test broker's server certificate and key (service "mqtt-broker", for localhost and 127.0.0.1)."""
    if pki_root not in _certificates:
        _certificates[pki_root] = pki.issue_service(pki_root, "mqtt-broker")
    return _certificates[pki_root]


@pytest.fixture
def mqtt_broker(tmp_path):
    """A private anonymous Mosquitto on a free loopback port, stopped at the end of the test."""
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mqtt_broker_tls(tmp_path, test_pki):
    """A private Mosquitto that requires a client certificate from the test federation's CA."""
    broker = MosquittoBroker(tmp_path / "mosquitto-tls", tls=(test_pki.ca, *broker_certificate(test_pki.root)))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
