"""The audit log: one JSON object per line for every job accepted, rejected, cancelled or forwarded, and every
call refused for who made it.

Each record says when (`ts`, UTC ISO 8601), what (`event`), who (`who`: the caller's federation identity, and
`owner` for the user a job belongs to), from where (`peer`: the caller's address), which job and site, and why
(`reason`). Records are appended to the file with one write per batch of events; an operator rotates the file
with logrotate (`copytruncate`) or by moving it away: a moved file is noticed and a new one opened.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

EVENTS = ("accepted", "rejected", "cancelled", "forwarded", "moved", "denied")


class AuditLog:
    """Append-only JSON lines. `record` is cheap and thread-safe; lines reach the file on `flush`, which the
    daemon calls every quarter of a second and at shutdown, so a crash loses at most the last quarter second
    of audit records, never a job."""

    def __init__(self, path: str | Path, peer=None, on_drop=None):
        self.path = Path(path)
        self._on_drop = on_drop  # called with the number of records lost to a write error
        self._peer = peer  # a callable giving the current caller's address, if any
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._file = None
        self._inode = None

    def record(self, event: str, **fields) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        entry = {"ts": _timestamp(), "event": event}
        if self._peer is not None and "peer" not in fields:
            entry["peer"] = self._peer()
        entry.update((k, v) for k, v in fields.items() if v not in (None, ""))
        line = orjson.dumps(entry) + b"\n"
        with self._lock:
            self._pending.append(line)

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
        if not lines:
            return
        try:
            self._open().write(b"".join(lines))
            self._file.flush()
        except OSError as exc:
            log.error("cannot write the audit log %s: %s (%d record(s) lost)", self.path, exc, len(lines))
            self._close()
            if self._on_drop is not None:
                self._on_drop(len(lines))

    def _open(self):
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None
        if self._file is None or inode != self._inode:  # first write, or the file was rotated away
            self._close()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "ab")
            self._inode = os.fstat(fd).st_ino
        return self._file

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None

    def close(self) -> None:
        self.flush()
        self._close()


_last_ts: tuple[int, str] = (0, "")


def _timestamp() -> str:
    """Now in UTC, ISO 8601 to the millisecond; formatted once per millisecond however many records share it."""
    global _last_ts
    ms = time.time_ns() // 1_000_000
    if ms != _last_ts[0]:
        _last_ts = (ms, dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds"))
    return _last_ts[1]


def read(path: str | Path) -> list[dict]:
    """Every record of an audit log (for tests and tools)."""
    return [orjson.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]
