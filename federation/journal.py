"""The durable job journal shared by hubs and antennas: SQLite in WAL mode.

Every change is committed (and fsynced, `synchronous=FULL`) before the daemon
acknowledges it, so a crash loses nothing that a caller was told had happened.
"""

from __future__ import annotations

import fcntl
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import orjson

from federation.model import FINAL_STATES, AccessMode, Job, JobSpec, JobState, Transition

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    owner TEXT NOT NULL,
    state INTEGER NOT NULL,
    backend_ref TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
"""


def job_to_json(job: Job) -> bytes:
    s = job.spec
    return orjson.dumps({
        "id": job.id, "state": int(job.state), "owner": job.owner, "antenna": job.antenna,
        "site": job.site, "partition": job.partition, "exit_code": job.exit_code, "reason": job.reason,
        "history": [[int(t.state), t.at, t.reason] for t in job.history],
        "created_at": job.created_at, "updated_at": job.updated_at,
        "spec": {"argv": list(s.argv), "script": s.script, "script_args": list(s.script_args), "env": s.env,
                 "name": s.name, "gpus": s.gpus, "cpus": s.cpus, "memory_mb": s.memory_mb,
                 "walltime_s": s.walltime_s, "partition": s.partition, "access_mode": int(s.access_mode),
                 "project": s.project, "site": s.site},
    })


def job_from_json(data: bytes) -> Job:
    d = orjson.loads(data)
    s = d["spec"]
    spec = JobSpec(argv=tuple(s["argv"]), script=s["script"], script_args=tuple(s["script_args"]), env=s["env"],
                   name=s["name"], gpus=s["gpus"], cpus=s["cpus"], memory_mb=s["memory_mb"],
                   walltime_s=s["walltime_s"], partition=s["partition"], access_mode=AccessMode(s["access_mode"]),
                   project=s["project"], site=s["site"])
    return Job(id=d["id"], spec=spec, state=JobState(d["state"]), owner=d["owner"], antenna=d["antenna"],
               site=d["site"], partition=d["partition"], exit_code=d["exit_code"], reason=d["reason"],
               history=tuple(Transition(JobState(st), at, r) for st, at, r in d["history"]),
               created_at=d["created_at"], updated_at=d["updated_at"])


class Journal:
    """Jobs by id, with an optional unique idempotency key and an opaque backend reference."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One daemon per journal: a second one would run every job twice.
        self._lock = open(self.path.with_suffix(".lock"), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"another aifed process is using the journal {self.path}") from None
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()
        self._lock.close()

    def insert(self, job: Job, idempotency_key: str | None = None, backend_ref: str = "") -> tuple[Job, bool]:
        """Store a new job. With a key seen before, store nothing and return (the first job, False)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if idempotency_key is not None:
                row = self._db.execute("SELECT record FROM jobs WHERE idempotency_key = ?",
                                       (idempotency_key,)).fetchone()
                if row:
                    return job_from_json(row[0]), False
            self._db.execute(
                "INSERT INTO jobs (id, idempotency_key, owner, state, backend_ref, created, record)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, idempotency_key, job.owner, int(job.state), backend_ref, job.created_at, job_to_json(job)))
        return job, True

    def update(self, job: Job, backend_ref: str | None = None) -> None:
        with self._db:
            if backend_ref is None:
                cur = self._db.execute("UPDATE jobs SET state = ?, record = ? WHERE id = ?",
                                       (int(job.state), job_to_json(job), job.id))
            else:
                cur = self._db.execute("UPDATE jobs SET state = ?, record = ?, backend_ref = ? WHERE id = ?",
                                       (int(job.state), job_to_json(job), backend_ref, job.id))
            if cur.rowcount != 1:
                raise KeyError(job.id)

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_json(row[0]) if row else None

    def by_key(self, idempotency_key: str) -> Job | None:
        row = self._db.execute("SELECT record FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return job_from_json(row[0]) if row else None

    def backend_ref(self, job_id: str) -> str:
        row = self._db.execute("SELECT backend_ref FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else ""

    def list(self, owner: str | None = None, states: Iterable[JobState] = (), limit: int = 100) -> list[Job]:
        """Newest first."""
        sql, args = "SELECT record FROM jobs WHERE 1=1", []
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        states = [int(s) for s in states]
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        args.append(limit)
        return [job_from_json(r[0]) for r in self._db.execute(sql, args)]

    def unfinished(self) -> list[tuple[Job, str]]:
        """Jobs not in a final state, oldest first, with their backend references."""
        final = ",".join(str(int(s)) for s in FINAL_STATES)
        rows = self._db.execute(
            f"SELECT record, backend_ref FROM jobs WHERE state NOT IN ({final}) ORDER BY created, id")
        return [(job_from_json(r), ref) for r, ref in rows]

    def with_ref(self, backend_ref: str) -> list[Job]:
        """Jobs whose backend reference is `backend_ref`, oldest first."""
        rows = self._db.execute("SELECT record FROM jobs WHERE backend_ref = ? ORDER BY created, id", (backend_ref,))
        return [job_from_json(r[0]) for r in rows]

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM jobs").fetchone()[0]
