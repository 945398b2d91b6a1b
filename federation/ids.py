"""Random identifiers for jobs and job arrays, from the operating system's CSPRNG.

`secrets.token_hex` makes one `getrandom` system call per identifier (and lets go of the GIL for it); py-spy put
about 5% of a busy antenna's samples there. `random_hex` draws 4 KiB at a time and cuts identifiers from it:
the same source and the same unpredictability, one system call per several hundred identifiers. A forked child
starts with a fresh draw, so parent and child never hand out the same bytes.
"""

from __future__ import annotations

import os
import threading

_DRAW = 4096
_lock = threading.Lock()
_pool = b""
_used = 0


def _forget() -> None:
    global _pool, _used, _lock
    _pool, _used, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget)


def random_hex(nbytes: int) -> str:
    """`nbytes` random bytes as lower-case hex (like `secrets.token_hex(nbytes)`); each byte is used once."""
    global _pool, _used
    if not 0 < nbytes <= _DRAW:
        raise ValueError(f"random_hex takes 1 to {_DRAW} bytes, not {nbytes}")
    with _lock:
        if _used + nbytes > len(_pool):
            _pool, _used = os.urandom(_DRAW), 0
        start = _used
        _used += nbytes
        return _pool[start:_used].hex()
