"""Identifiers for jobs and job arrays: random ones from the operating system's CSPRNG, and job tokens that sort
by the time they were made.

`secrets.token_hex` makes one `getrandom` system call per identifier (and lets go of the GIL for it); py-spy put
about 5% of a busy antenna's samples there. `random_hex` draws 4 KiB at a time and cuts identifiers from it:
the same source and the same unpredictability, one system call per several hundred identifiers. A forked child
starts with a fresh draw, so parent and child never hand out the same bytes.

`job_token` is the part of a job id after the antenna's name: 15 characters of base32hex (digits, then `a` to
`v`, so that text order is number order), the time in milliseconds (45 bits, enough until the year 3084) and 30
random bits. Each token is greater than the one before it in the process, even within one millisecond or when
the clock steps back (it then counts on from the last one). Ids that grow with time land at the end of the
journals' indexes instead of at a random page each: a journal that writes a batch of jobs touches a few pages
instead of one per job, and costs half as much CPU per job as with random ids once it holds a million of them
(`aifed bench journal`, docs/benchmarks.md). As with Slurm's job ids, a later job has a greater id. Job ids are
not secrets: an antenna shows a job only to its owner and its operators.
"""

from __future__ import annotations

import os
import threading
import time

_DRAW = 4096
_lock = threading.Lock()
_pool = b""
_used = 0
_last_token = 0

_DIGITS = "0123456789abcdefghijklmnopqrstuv"  # base32hex: in the order of the values
_PAIRS = [a + b for a in _DIGITS for b in _DIGITS]  # 10 bits at a time
_RANDOM_BITS = 30


def _forget() -> None:
    global _pool, _used, _lock, _last_token
    _pool, _used, _lock, _last_token = b"", 0, threading.Lock(), 0


os.register_at_fork(after_in_child=_forget)


def _take(nbytes: int) -> bytes:
    """`nbytes` bytes of the pool, each used once (lock held)."""
    global _pool, _used
    if _used + nbytes > len(_pool):
        _pool, _used = os.urandom(_DRAW), 0
    start = _used
    _used += nbytes
    return _pool[start:_used]


def random_hex(nbytes: int) -> str:
    """`nbytes` random bytes as lower-case hex (like `secrets.token_hex(nbytes)`); each byte is used once."""
    if not 0 < nbytes <= _DRAW:
        raise ValueError(f"random_hex takes 1 to {_DRAW} bytes, not {nbytes}")
    with _lock:
        return _take(nbytes).hex()


def job_token(now_ns: int | None = None) -> str:
    """A token for a job id: greater than every token this process made before (see the module's text).
    `now_ns`: the time to use (tests); default the clock."""
    global _last_token
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    with _lock:
        value = (ms << _RANDOM_BITS) | (int.from_bytes(_take(4), "big") >> (32 - _RANDOM_BITS))
        if value <= _last_token:
            value = _last_token + 1  # the same millisecond, or the clock went back: count on
        _last_token = value
    p = _PAIRS
    return (_DIGITS[(value >> 70) & 31] + p[(value >> 60) & 1023] + p[(value >> 50) & 1023] + p[(value >> 40) & 1023]
            + p[(value >> 30) & 1023] + p[(value >> 20) & 1023] + p[(value >> 10) & 1023] + p[value & 1023])


def token_time(token: str) -> float:
    """When a `job_token` was made, in seconds since the epoch (for people and tests; ids are not clocks)."""
    return (int(token, 32) >> _RANDOM_BITS) / 1000
