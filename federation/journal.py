"""The durable job journal shared by hubs and antennas: SQLite in WAL mode.

Every change is committed (and fsynced, `synchronous=FULL`) before the daemon
acknowledges it, so a crash loses nothing that a caller was told had happened.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from federation.model import FINAL_STATES, AccessMode, InputFile, Job, JobSpec, JobState, Transition

T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Columns added after the first release: added in place to an older journal.
_COLUMNS = {"antenna": "TEXT NOT NULL DEFAULT ''", "seq": "INTEGER NOT NULL DEFAULT 0",
            "updated": "REAL NOT NULL DEFAULT 0"}
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, updated);
"""
_FEED_INDEX = "CREATE INDEX IF NOT EXISTS jobs_feed ON jobs (antenna, seq)"  # what `changes` reads
PURGE_CHUNK = 10_000
FINAL_SQL = ",".join(str(int(s)) for s in FINAL_STATES)
IN_CHUNK = 500  # values per `IN (...)` query, well under SQLite's limit on parameters


def _select_in(db: sqlite3.Connection, what: str, column: str, values: Iterable[str]) -> Iterable[tuple]:
    """The rows of `SELECT what FROM jobs WHERE column IN values`, one query per `IN_CHUNK` values."""
    values = list(values)
    for i in range(0, len(values), IN_CHUNK):
        chunk = values[i:i + IN_CHUNK]
        yield from db.execute(f"SELECT {what} FROM jobs WHERE {column} IN ({','.join('?' * len(chunk))})", chunk)


def _jobs_by_id(rows: Iterable[tuple]) -> dict[str, Job]:
    return {job.id: job for job in (job_from_json(record) for (record,) in rows)}


def job_to_json(job: Job) -> bytes:
    """The job's journal record. Its spec is written by orjson itself, field by field (a `JobSpec` is a
    dataclass), which costs less than building the same dict here (the record 16.7 to 13.2 µs)."""
    return orjson.dumps({
        "id": job.id, "state": int(job.state), "owner": job.owner, "antenna": job.antenna,
        "site": job.site, "partition": job.partition, "exit_code": job.exit_code, "reason": job.reason,
        "history": [[int(t.state), t.at, t.reason] for t in job.history],
        "created_at": job.created_at, "updated_at": job.updated_at, "account": job.account,
        "country": job.country, "alternatives": list(job.alternatives), "moved_from": job.moved_from,
        "moved_to": job.moved_to, "spec": job.spec,
    })


def _input(f: dict | list) -> InputFile:
    """An input file as a record keeps it: an object with the fields of `InputFile`, or (records written before
    2026-11-27) a list: name, sha256, size and, if it has any, its residency."""
    if isinstance(f, dict):
        return InputFile(f["name"], f["sha256"], f["size"], tuple(f["residency"]))
    return InputFile(f[0], f[1], f[2], tuple(f[3]) if len(f) > 3 else ())


_STATES = {int(s): s for s in JobState}  # a dict lookup costs a tenth of calling the enum
_MODES = {int(m): m for m in AccessMode}


def job_from_json(data: bytes) -> Job:
    return job_from_record(orjson.loads(data))


def job_from_record(d: dict) -> Job:
    """The job of a decoded journal record (`orjson.loads` of what `job_to_json` wrote)."""
    s = d["spec"]
    spec = JobSpec(argv=tuple(s["argv"]), script=s["script"], script_args=tuple(s["script_args"]), env=s["env"],
                   name=s["name"], gpus=s["gpus"], cpus=s["cpus"], memory_mb=s["memory_mb"],
                   walltime_s=s["walltime_s"], partition=s["partition"], access_mode=_MODES[s["access_mode"]],
                   project=s["project"], site=s["site"], array_job=s.get("array_job", ""),
                   array_task=s.get("array_task", 0), sector=s.get("sector", ""),
                   sector_required=s.get("sector_required", False), prefer=tuple(s.get("prefer", ())),
                   exclude=tuple(s.get("exclude", ())), overflow_after_s=s.get("overflow_after_s", 3600),
                   inputs=tuple(map(_input, s.get("inputs", ()))),
                   outputs=tuple(s.get("outputs", ())))
    return Job(id=d["id"], spec=spec, state=_STATES[d["state"]], owner=d["owner"], antenna=d["antenna"],
               site=d["site"], partition=d["partition"], exit_code=d["exit_code"], reason=d["reason"],
               history=tuple(Transition(_STATES[st], at, r) for st, at, r in d["history"]),
               created_at=d["created_at"], updated_at=d["updated_at"], account=d.get("account", ""),
               country=d.get("country", ""), alternatives=tuple(d.get("alternatives", ())),
               moved_from=d.get("moved_from", ""), moved_to=d.get("moved_to", ""))


class Tx:
    """The operations of one write transaction; handed to the functions given to `Journal.write`/`commit`."""

    def __init__(self, journal: Journal, db: sqlite3.Connection):
        self.journal = journal
        self.db = db

    def get(self, job_id: str) -> Job | None:
        row = self.db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_json(row[0]) if row else None

    def by_key(self, idempotency_key: str) -> Job | None:
        row = self.db.execute("SELECT record FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return job_from_json(row[0]) if row else None

    def records(self, job_ids: Iterable[str]) -> dict[str, dict]:
        """The stored records among these ids, decoded but not made into jobs, by id: for a change that touches a
        few fields of many jobs (see `put_record`)."""
        return {job_id: orjson.loads(record) for job_id, record in _select_in(self.db, "id, record", "id", job_ids)}

    def put_record(self, record: dict) -> None:
        """Store a record read by `records` and changed in place; `update` with the job it decodes to stores the
        same."""
        self._rewrite(record["id"], record["state"], record["updated_at"], orjson.dumps(record), None)

    def exists(self, job_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def taken(self, keys: Iterable[str], job_ids: Iterable[str]) -> tuple[set[str], set[str]]:
        """Which of these idempotency keys, and which of these job ids, are stored, as this transaction sees it."""
        return ({k for (k,) in _select_in(self.db, "idempotency_key", "idempotency_key", keys)},
                {i for (i,) in _select_in(self.db, "id", "id", job_ids)})

    def backend_ref(self, job_id: str) -> str:
        row = self.db.execute("SELECT backend_ref FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else ""

    def insert(self, job: Job, idempotency_key: str | None = None, backend_ref: str = "", checked: bool = False
               ) -> tuple[Job, bool]:
        """Store a new job. With a key seen before, store nothing and return (the first job, False).
        `checked`: the caller has just found the key free in this transaction (`taken`), so it is not looked up
        again; a key or id that is taken after all fails the insert (sqlite3.IntegrityError)."""
        if idempotency_key is not None and not checked and (first := self.by_key(idempotency_key)) is not None:
            return first, False
        self.db.execute(
            "INSERT INTO jobs (id, idempotency_key, owner, antenna, state, backend_ref, created, updated, seq, record)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.id, idempotency_key, job.owner, job.antenna, int(job.state), backend_ref, job.created_at,
             job.updated_at, self.journal._next_seq(), job_to_json(job)))
        return job, True

    def update(self, job: Job, backend_ref: str | None = None) -> None:
        self._rewrite(job.id, int(job.state), job.updated_at, job_to_json(job), backend_ref)

    def _rewrite(self, job_id: str, state: int, updated: float, record: bytes, backend_ref: str | None) -> None:
        seq = self.journal._next_seq()
        if backend_ref is None:
            cur = self.db.execute("UPDATE jobs SET state = ?, updated = ?, seq = ?, record = ? WHERE id = ?",
                                  (state, updated, seq, record, job_id))
        else:
            cur = self.db.execute(
                "UPDATE jobs SET state = ?, updated = ?, seq = ?, record = ?, backend_ref = ? WHERE id = ?",
                (state, updated, seq, record, backend_ref, job_id))
        if cur.rowcount != 1:
            raise KeyError(job_id)

    def set_ref(self, job_id: str, backend_ref: str) -> None:
        self.db.execute("UPDATE jobs SET backend_ref = ? WHERE id = ?", (backend_ref, job_id))

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = ?",
                        (key, value, value))


class Journal:
    """Jobs by id, with an optional unique idempotency key and an opaque backend reference.

    Writes go through one connection, one transaction at a time. `write` commits one function's changes at
    once; `commit` (async) gathers the functions of concurrent callers into one transaction run in a worker
    thread (group commit): each caller is answered only after the transaction holding its change is on disk.
    Every write gives the rows it touches the next number of a change sequence, which `changes` follows.
    Reads use a second connection and see only committed changes.
    """

    def __init__(self, path: str | Path, on_commit: Callable[[], None] | None = None, feed: bool = True):
        """`feed`: whether `changes` will be read (a hub's change feed). Without it, the index that serves them is
        not kept: it costs every insert and update about 4 µs (an antenna's journal, which no one follows)."""
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
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in _COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        self._db.executescript(_INDEXES)
        self._db.execute(_FEED_INDEX if feed else "DROP INDEX IF EXISTS jobs_feed")
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (secrets.token_hex(8),))
        self.epoch: str = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        # The sequence never goes back, not even when the newest rows were purged: followers hold positions in it.
        floor = self._db.execute("SELECT value FROM meta WHERE key = 'seq_floor'").fetchone()
        self._seq: int = max(self._db.execute("SELECT coalesce(max(seq), 0) FROM jobs").fetchone()[0],
                             int(floor[0]) if floor else 0)
        self._read = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._read.execute("PRAGMA busy_timeout=5000")
        self._write_lock = threading.Lock()
        self._queue: list[tuple[Callable[[Tx], Any], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.on_commit = on_commit
        self.batches = 0  # group commits so far, and the changes they held (for metrics and benchmarks)
        self.batched = 0

    def close(self) -> None:
        with self._write_lock:
            self._db.close()
            self._read.close()
        self._lock.close()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- writing ---------------------------------------------------------------------------------

    def write(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in a transaction of its own and commit it before returning its result."""
        with self._write_lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                result = fn(Tx(self, self._db))
        if self.on_commit:
            self.on_commit()
        return result

    async def commit(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in the next group commit; return its result once that transaction is durable.

        An exception raised by `fn` undoes `fn`'s own changes only and is raised here; if the transaction
        itself fails, every caller in it gets the error and nothing of it was stored.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.append((fn, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"journal {self.path.name}")
        return await future  # a caller that gives up does not stop the commit (its future is skipped)

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                fns = [fn for fn, _ in batch]
                outcomes = await asyncio.to_thread(self._run, fns)
            except BaseException as exc:  # the transaction failed: nobody's change was stored
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            self.batches += 1
            self.batched += len(batch)
            if self.on_commit:
                self.on_commit()
            for (_, future), (ok, value) in zip(batch, outcomes):
                if not future.done():
                    future.set_result(value) if ok else future.set_exception(value)

    def _run(self, fns: list[Callable[[Tx], Any]]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        with self._write_lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                tx = Tx(self, self._db)
                for fn in fns:
                    if len(fns) == 1:
                        outcomes.append((True, fn(tx)))  # alone: its failure fails the transaction
                        continue
                    self._db.execute("SAVEPOINT one")
                    try:
                        outcomes.append((True, fn(tx)))
                    except Exception as exc:  # undo this caller's changes only
                        self._db.execute("ROLLBACK TO one")
                        outcomes.append((False, exc))
                    self._db.execute("RELEASE one")
        return outcomes

    def insert(self, job: Job, idempotency_key: str | None = None, backend_ref: str = "") -> tuple[Job, bool]:
        """Store a new job. With a key seen before, store nothing and return (the first job, False)."""
        return self.write(lambda tx: tx.insert(job, idempotency_key, backend_ref))

    def update(self, job: Job, backend_ref: str | None = None) -> None:
        self.write(lambda tx: tx.update(job, backend_ref))

    def purge(self, before: float, limit: int = 0) -> int:
        """Delete up to `limit` jobs that ended before `before` (a Unix time); return how many."""
        def purge(tx: Tx) -> int:
            tx.set_meta("seq_floor", str(self._seq))
            return tx.db.execute(
                f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN ({FINAL_SQL}) AND updated < ?"
                " LIMIT ?)", (before, limit or PURGE_CHUNK)).rowcount

        return self.write(purge)

    # -- reading (committed changes only) --------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        row = self._read.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_json(row[0]) if row else None

    def get_many(self, job_ids: Iterable[str]) -> dict[str, Job]:
        return _jobs_by_id(_select_in(self._read, "record", "id", job_ids))

    def state(self, job_id: str) -> JobState | None:
        row = self._read.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _STATES[row[0]] if row else None

    def known_keys(self, keys: Iterable[str]) -> set[str]:
        """Which of these idempotency keys are taken."""
        return {k for (k,) in _select_in(self._read, "idempotency_key", "idempotency_key", keys)}

    def by_key(self, idempotency_key: str) -> Job | None:
        row = self._read.execute("SELECT record FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return job_from_json(row[0]) if row else None

    def backend_ref(self, job_id: str) -> str:
        row = self._read.execute("SELECT backend_ref FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else ""

    def meta(self, key: str, default: str = "") -> str:
        row = self._read.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def list(self, owner: str | None = None, states: Iterable[JobState] = (), limit: int = 100,
             since: float | None = None, antenna: str | None = None) -> list[Job]:
        """Newest first; with `since`, only jobs created at or after it; with `antenna`, only its jobs."""
        sql, args = "SELECT record FROM jobs WHERE 1=1", []
        if since is not None:
            sql += " AND created >= ?"
            args.append(since)
        if antenna is not None:
            sql += " AND antenna = ?"
            args.append(antenna)
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        states = [int(s) for s in states]
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        args.append(limit)
        return [job_from_json(r[0]) for r in self._read.execute(sql, args)]

    def unfinished(self) -> list[tuple[Job, str]]:
        """Jobs not in a final state, oldest first, with their backend references."""
        rows = self._read.execute(
            f"SELECT record, backend_ref FROM jobs WHERE state NOT IN ({FINAL_SQL}) ORDER BY created, id")
        return [(job_from_json(r), ref) for r, ref in rows]

    def with_ref(self, backend_ref: str) -> list[Job]:
        """Jobs whose backend reference is `backend_ref`, oldest first."""
        rows = self._read.execute("SELECT record FROM jobs WHERE backend_ref = ? ORDER BY created, id",
                                  (backend_ref,))
        return [job_from_json(r[0]) for r in rows]

    def changes(self, antenna: str, after: int, limit: int = 1000) -> list[tuple[int, bytes]]:
        """(sequence, record) of the jobs of `antenna` changed after sequence `after`, in change order. Read from
        an index kept only by a journal opened with `feed` (without it, every call reads the whole table)."""
        return self._read.execute("SELECT seq, record FROM jobs WHERE antenna = ? AND seq > ? ORDER BY seq LIMIT ?",
                                  (antenna, after, limit)).fetchall()

    def census(self) -> tuple[dict[JobState, int], int]:
        """Jobs by state, and the journal's size on disk in bytes. Safe from any thread (for metrics scrapes):
        it reads through a connection of its own."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            counts = {JobState(state): n for state, n in
                      db.execute("SELECT state, count(*) FROM jobs GROUP BY state")}
        finally:
            db.close()
        size = 0
        for suffix in ("", "-wal"):
            try:
                size += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return counts, size

    def count(self, states: Iterable[JobState] = ()) -> int:
        states = [int(s) for s in states]
        if not states:
            return self._read.execute("SELECT count(*) FROM jobs").fetchone()[0]
        return self._read.execute(f"SELECT count(*) FROM jobs WHERE state IN ({','.join('?' * len(states))})",
                                  states).fetchone()[0]


async def purge_forever(journal: Journal, retention_s: int, every_s: float = 600.0) -> None:
    """Delete finished jobs older than `retention_s` now and every `every_s` seconds (0: keep them all)."""
    if retention_s <= 0:
        return
    while True:
        while journal.purge(time.time() - retention_s) == PURGE_CHUNK:
            await asyncio.sleep(0)  # a large backlog goes in chunks, between other work
        await asyncio.sleep(every_s)
