"""The machine's gRPC floor, for `aifed bench forward`: what one Python process serving unary calls over mutual TLS
does here with a handler that does nothing, measured in the same command as aifed itself.

The forwarding figures move by a factor of two from one day to the next on a shared machine; against this
floor they do not. The server is a separate process (`python -m federation.bench_floor PORT CA CERT KEY`), with
the daemons' server options and uvloop, and no aifed code between gRPC and the handler: no guard, no journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from federation.pb import antenna_pb2_grpc, jobs_pb2


class _Nothing(antenna_pb2_grpc.AntennaServicer):
    async def GetJob(self, request, context):
        return jobs_pb2.Job(id=request.job_id)


async def _serve(port: int, tls) -> None:
    from federation.rpc import SERVER_OPTIONS
    server = grpc.aio.server(options=SERVER_OPTIONS)
    antenna_pb2_grpc.add_AntennaServicer_to_server(_Nothing(), server)
    if server.add_secure_port(f"127.0.0.1:{port}", tls.server_credentials()) == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


@contextlib.contextmanager
def _server(pki: Path, server_id):
    """The floor server, in a process of its own, for as long as the block runs; yields its port."""
    from federation.net import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "federation.bench_floor", str(port), str(pki / "ca.pem"),
                             str(server_id.cert), str(server_id.key)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        yield port, proc
    finally:
        proc.kill()
        proc.wait()


async def measure(pki: Path, server_id, client_id, seconds: float, clients: int = 16) -> dict:
    """Unary calls per second, and the server's CPU per call, with `clients` calls in flight for `seconds`."""
    from federation.bench import cpu_seconds
    from federation.rpc import secure_channel
    from federation.tls import TlsFiles

    with _server(pki, server_id) as (port, proc):
        channel = secure_channel(f"localhost:{port}", TlsFiles(pki / "ca.pem", client_id.cert, client_id.key))
        stub = antenna_pb2_grpc.AntennaStub(channel)
        request = jobs_pb2.JobRef(job_id="floor")
        await stub.GetJob(request, timeout=30, wait_for_ready=True)
        calls = 0
        cpu0, started = cpu_seconds(proc.pid), time.perf_counter()
        stop_at = started + seconds

        async def caller():
            nonlocal calls
            while time.perf_counter() < stop_at:
                await stub.GetJob(request, timeout=30)
                calls += 1

        await asyncio.gather(*(caller() for _ in range(clients)))
        window, cpu = time.perf_counter() - started, cpu_seconds(proc.pid) - cpu0
        await channel.close()
        return {"calls_per_s": round(calls / window, 1), "server_cpu_us_per_call": round(1e6 * cpu / calls),
                "server_cpu_pct": round(100 * cpu / window, 1), "clients": clients}


async def round_trips(pki: Path, server_id, client_id, calls: int) -> list[float]:
    """The seconds each of `calls` unary calls takes, one at a time: the floor under any one query's latency
    on this machine now (`aifed bench scale` compares a hub's status queries with it)."""
    from federation.rpc import secure_channel
    from federation.tls import TlsFiles

    with _server(pki, server_id) as (port, _):
        async with secure_channel(f"localhost:{port}", TlsFiles(pki / "ca.pem", client_id.cert, client_id.key)
                                  ) as channel:
            stub = antenna_pb2_grpc.AntennaStub(channel)
            request = jobs_pb2.JobRef(job_id="floor")
            await stub.GetJob(request, timeout=30, wait_for_ready=True)
            latencies = []
            for _ in range(calls):
                t = time.perf_counter()
                await stub.GetJob(request, timeout=10)
                latencies.append(time.perf_counter() - t)
            return latencies


def main(argv: list[str]) -> None:
    from federation.tls import TlsFiles
    import uvloop
    port, ca, cert, key = argv
    uvloop.run(_serve(int(port), TlsFiles(Path(ca), Path(cert), Path(key))))


if __name__ == "__main__":
    main(sys.argv[1:])
