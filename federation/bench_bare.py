"""The bare pipeline, for `aifed bench forward`: jobs acknowledged, forwarded and followed the way aifed does it,
with none of aifed's own work, measured in the same command as aifed itself.

Two processes, a bare antenna and a bare hub, keep only what forwarding cannot do without:
- gRPC over mutual TLS, with the daemons' server options and uvloop;
- a SQLite journal each, aifed's own `Journal` (the same table and indexes, WAL, synchronous=FULL, its group
  commit in a worker thread), holding a JSON record per job with its spec, written by one `executemany` per call;
- a job journaled before it is acknowledged;
- forwarding in calls of up to 1,000 jobs, two in flight, after the same linger, and the hub's change feed in
  batches after its linger, all with the daemons' own settings; the feed is applied to the antenna's records.

They leave out everything aifed adds to that: the guard, validation, placement, allocations, idempotency,
audit lines, metrics, the job model, the hub's backend. aifed's jobs per second over theirs is the share of
what this machine can do with this design that aifed reaches, on the day of the run.

Run as `python -m federation.bench_bare hub|antenna DIR PORT CA CERT KEY [HUB_PORT]`; `measure` does that.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import orjson

from antenna.core import FORWARD_BATCH, FORWARD_IN_FLIGHT, FORWARD_LINGER_S, _first
from federation.convert import _stamp
from federation.ids import job_token
from federation.journal import Journal, Tx
from federation.pb import antenna_pb2, antenna_pb2_grpc, hub_pb2, hub_pb2_grpc, jobs_pb2
from hub.service import CHANGES_BATCH, CHANGES_LINGER_S

ANTENNA = "antenna1"
INSERT = ("INSERT INTO jobs (id, idempotency_key, owner, antenna, state, backend_ref, created, updated, seq, record)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
UPDATE = "UPDATE jobs SET state = ?, updated = ?, seq = ?, record = ? WHERE id = ?"
PENDING, FORWARDED, QUEUED = jobs_pb2.JOB_STATE_PENDING, jobs_pb2.JOB_STATE_FORWARDED, jobs_pb2.JOB_STATE_QUEUED


def _spec(s: jobs_pb2.JobSpec) -> dict:
    return {"argv": list(s.argv), "script": s.script, "script_args": list(s.script_args), "env": dict(s.env),
            "name": s.name, "gpus": s.gpus, "cpus": s.cpus, "memory_mb": s.memory_mb, "walltime_s": s.walltime_s,
            "partition": s.partition, "access_mode": s.access_mode, "project": s.project, "site": s.site}


def _insert(tx: Tx, rows: list[tuple]) -> None:
    """New jobs' rows, each given the journal's next change sequence (what a hub's change feed follows)."""
    tx.db.executemany(INSERT, [(*row[:8], tx.journal._next_seq(), row[9]) for row in rows])


class BareHub(hub_pb2_grpc.HubServicer):
    def __init__(self, folder: Path):
        self.journal = Journal(folder / "hub.sqlite")
        self.changed = asyncio.Event()

    async def ForwardJobs(self, request, context):
        now, journal, rows = time.time(), self.journal, []
        for forwarded in request.jobs:
            job = forwarded.job
            record = orjson.dumps({
                "id": job.id, "state": QUEUED, "owner": job.owner, "antenna": job.antenna, "site": "hub1",
                "partition": "debug", "reason": "queued in partition debug",
                "history": [[FORWARDED, now, "accepted by hub hub1"], [QUEUED, now, "queued in partition debug"]],
                "created_at": now, "updated_at": now, "spec": _spec(job.spec)})
            rows.append((job.id, forwarded.idempotency_key, job.owner, job.antenna, QUEUED, "", now, now, 0, record))
        await journal.commit(lambda tx: _insert(tx, rows))
        self.changed.set()
        response = hub_pb2.ForwardJobsResponse()
        add = response.results.add
        for row in rows:
            add(job_id=row[0]).accepted.id = row[0]
        return response

    async def WatchChanges(self, request, context):
        after = request.after
        while True:
            self.changed.clear()
            rows = self.journal.changes(ANTENNA, after, CHANGES_BATCH)
            if not rows:
                await self.changed.wait()
                await asyncio.sleep(CHANGES_LINGER_S)
                continue
            after = rows[-1][0]
            message = hub_pb2.JobChanges(epoch="bare", sequence=after)
            add = message.jobs.add
            for _, record in rows:
                d = orjson.loads(record)
                job = add(id=d["id"], state=d["state"], partition=d["partition"], reason=d["reason"])
                for state, at, reason in d["history"]:
                    _stamp(job.history.add(state=state, reason=reason).at, at)
                _stamp(job.updated_at, d["updated_at"])
            yield message


class BareAntenna(antenna_pb2_grpc.AntennaServicer):
    def __init__(self, folder: Path, hub: hub_pb2_grpc.HubStub):
        self.journal = Journal(folder / "antenna.sqlite", feed=False)
        self.hub = hub
        self.outbox: dict[str, jobs_pb2.JobSpec] = {}
        self.wake = asyncio.Event()
        self.owner = f"spiffe://bench.test/user/{ANTENNA}/bench"

    def _row(self, spec: jobs_pb2.JobSpec, now: float) -> tuple:
        job_id = f"{ANTENNA}-{job_token()}"
        record = orjson.dumps({"id": job_id, "state": PENDING, "owner": self.owner, "antenna": ANTENNA, "site": "hub1",
                               "partition": "", "reason": "forwarding to hub1",
                               "history": [[PENDING, now, "accepted by the antenna"]], "created_at": now,
                               "updated_at": now, "spec": _spec(spec)})
        return (job_id, None, self.owner, ANTENNA, PENDING, "", now, now, 0, record)

    async def _store(self, rows: list[tuple], specs) -> None:
        await self.journal.commit(lambda tx: _insert(tx, rows))
        for row, spec in zip(rows, specs):
            self.outbox[row[0]] = spec
        self.wake.set()

    async def SubmitJob(self, request, context):
        now = time.time()
        row = self._row(request.spec, now)
        await self._store([row], [request.spec])
        job = jobs_pb2.Job(id=row[0], state=PENDING, owner=self.owner, antenna=ANTENNA, site="hub1")
        _stamp(job.created_at, now)
        return job

    async def SubmitJobs(self, request, context):
        now = time.time()
        specs = [entry.spec for entry in request.jobs]
        rows = [self._row(spec, now) for spec in specs]
        await self._store(rows, specs)
        response = antenna_pb2.SubmitJobsResponse()
        add = response.results.add
        for row in rows:
            receipt = add().accepted
            receipt.id, receipt.state = row[0], PENDING
            _stamp(receipt.created_at, now)
        return response

    async def forwarder(self) -> None:
        while True:
            if not self.outbox:
                self.wake.clear()
                await self.wake.wait()
            if len(self.outbox) < FORWARD_BATCH:
                await asyncio.sleep(FORWARD_LINGER_S)
            ids = _first(self.outbox, FORWARD_BATCH)
            request = hub_pb2.ForwardJobsRequest()
            add = request.jobs.add
            for job_id in ids:
                add(idempotency_key=job_id, job=jobs_pb2.Job(id=job_id, spec=self.outbox.pop(job_id), owner=self.owner,
                                                             antenna=ANTENNA, state=PENDING))
            if ids:
                await self.hub.ForwardJobs(request, timeout=60, wait_for_ready=True)  # the hub may start later

    async def follower(self) -> None:
        async for batch in self.hub.WatchChanges(hub_pb2.WatchChangesRequest(), wait_for_ready=True):
            def apply(tx: Tx, jobs=batch.jobs, position=f"{batch.epoch}:{batch.sequence}"):
                ids = [job.id for job in jobs]
                records = dict(tx.db.execute(f"SELECT id, record FROM jobs WHERE id IN ({','.join('?' * len(ids))})",
                                             ids))
                rows = []
                for job in jobs:
                    d = orjson.loads(records[job.id])
                    d.update(state=job.state, partition=job.partition, reason=job.reason,
                             history=[t for t in d["history"] if t[0] == PENDING]
                             + [[t.state, t.at.seconds + t.at.nanos / 1e9, t.reason] for t in job.history],
                             updated_at=job.updated_at.seconds + job.updated_at.nanos / 1e9)
                    rows.append((job.state, d["updated_at"], tx.journal._next_seq(), orjson.dumps(d), job.id))
                tx.db.executemany(UPDATE, rows)
                tx.set_meta("feed/hub1", position)
            if batch.jobs:
                await self.journal.commit(apply)


async def _serve(role: str, folder: Path, port: int, tls, hub_port: int | None) -> None:
    from federation.rpc import SERVER_OPTIONS, secure_channel
    server = grpc.aio.server(options=SERVER_OPTIONS)
    if role == "hub":
        hub_pb2_grpc.add_HubServicer_to_server(BareHub(folder), server)
    else:
        antenna = BareAntenna(folder, hub_pb2_grpc.HubStub(secure_channel(f"localhost:{hub_port}", tls)))
        antenna_pb2_grpc.add_AntennaServicer_to_server(antenna, server)
        tasks = [asyncio.create_task(antenna.forwarder()) for _ in range(FORWARD_IN_FLIGHT)]
        tasks.append(asyncio.create_task(antenna.follower()))
    if server.add_secure_port(f"127.0.0.1:{port}", tls.server_credentials()) == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def measure(folder: Path, pki: Path, hub_id, antenna_id, user_id, seconds: float, clients: int,
                  batch: int) -> dict:
    """Jobs per second acknowledged by the bare antenna and journaled by the bare hub, and each one's CPU per job,
    with `clients` submitters of `batch` jobs per call (1: SubmitJob) for `seconds`."""
    from federation import convert
    from federation.bench import bench_spec, cpu_seconds
    from federation.net import free_port
    from federation.rpc import secure_channel
    from federation.tls import TlsFiles

    folder.mkdir(parents=True, exist_ok=True)
    hub_port, antenna_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    ca = str(pki / "ca.pem")

    def start(*args) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "federation.bench_bare", *map(str, args)], env=env)

    procs = {"hub": start("hub", folder, hub_port, ca, hub_id.cert, hub_id.key),
             "antenna": start("antenna", folder, antenna_port, ca, antenna_id.cert, antenna_id.key, hub_port)}
    try:
        channel = secure_channel(f"localhost:{antenna_port}", TlsFiles(pki / "ca.pem", user_id.cert, user_id.key))
        stub = antenna_pb2_grpc.AntennaStub(channel)
        one = antenna_pb2.SubmitJobRequest(spec=convert.spec_to_pb(bench_spec()))
        many = antenna_pb2.SubmitJobsRequest(jobs=[one] * batch)
        await stub.SubmitJob(one, timeout=30, wait_for_ready=True)
        hub_db = None

        def forwarded() -> int:
            return hub_db.execute("SELECT count(*) FROM jobs").fetchone()[0]

        while True:  # until the hub has made its journal (read, never created, here) and holds the first job
            try:
                hub_db = hub_db or sqlite3.connect(f"file:{folder / 'hub.sqlite'}?mode=ro", uri=True, timeout=30)
                if forwarded() >= 1:
                    break
            except sqlite3.OperationalError:
                pass
            await asyncio.sleep(0.05)
        acked = 0
        cpu0 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        before, started = forwarded(), time.perf_counter()
        stop_at = started + seconds

        async def submitter():
            nonlocal acked
            while time.perf_counter() < stop_at:
                if batch == 1:
                    await stub.SubmitJob(one, timeout=30)
                else:
                    await stub.SubmitJobs(many, timeout=60)
                acked += batch

        await asyncio.gather(*(submitter() for _ in range(clients)))
        window = time.perf_counter() - started
        cpu = {name: cpu_seconds(p.pid) - cpu0[name] for name, p in procs.items()}
        hub_jobs = forwarded() - before
        await channel.close()
        return {"jobs_per_s": round(acked / window, 1), "forwarded_per_s": round(hub_jobs / window, 1),
                "antenna_cpu_us_per_job": round(1e6 * cpu["antenna"] / max(acked, 1)),
                "hub_cpu_us_per_job": round(1e6 * cpu["hub"] / max(hub_jobs, 1)),
                "antenna_cpu_pct": round(100 * cpu["antenna"] / window, 1),
                "hub_cpu_pct": round(100 * cpu["hub"] / window, 1), "clients": clients, "jobs_per_call": batch}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def main(argv: list[str]) -> None:
    import uvloop

    from federation.tls import TlsFiles
    role, folder, port, ca, cert, key, *rest = argv
    tls = TlsFiles(Path(ca), Path(cert), Path(key))
    uvloop.run(_serve(role, Path(folder), int(port), tls, int(rest[0]) if rest else None))


if __name__ == "__main__":
    main(sys.argv[1:])
