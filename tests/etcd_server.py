"""A private etcd for tests: one member on free loopback ports, in a temporary folder, over mutual TLS with the
test federation's PKI (its server certificate from `pki.issue_service`). tests/conftest.py loads it as a
pytest plugin, so test modules just name the fixture `etcd_server`.

Needs Debian's etcd-server (`make services` installs it); nothing is skipped when it is missing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from certs import pki
from federation.etcdlab import EtcdServer


class TcpProxy:
    """A TCP relay to `upstream` on a free loopback port, that can be cut (open connections are dropped and new
    ones refused) and restored: a network partition between one client and etcd."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.open = True
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        host, port = self.upstream.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.open = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


_certificates: dict[Path, tuple[Path, Path]] = {}  # PKI folder -> etcd's certificate and key, issued once


def etcd_certificate(pki_root: Path) -> tuple[Path, Path]:
    """The test etcd's server certificate and key (service "etcd", for localhost and 127.0.0.1)."""
    if pki_root not in _certificates:
        _certificates[pki_root] = pki.issue_service(pki_root, "etcd")
    return _certificates[pki_root]


@pytest.fixture
def etcd_server(tmp_path, test_pki):
    """A private etcd on free loopback ports over mutual TLS, stopped at the end of the test."""
    server = EtcdServer(tmp_path / "etcd", test_pki.ca, *etcd_certificate(test_pki.root))
    server.start()
    try:
        yield server
    finally:
        server.stop()
