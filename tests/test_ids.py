"""federation.ids: random identifiers drawn in bulk from the OS CSPRNG."""

from __future__ import annotations

import os
import re
import threading

import pytest

from federation.ids import random_hex


def test_ids_are_hex_of_the_asked_length_and_do_not_repeat():
    ids = [random_hex(6) for _ in range(20_000)]  # several draws of the pool
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(random_hex(1)) == 2 and len(random_hex(4096)) == 8192


def test_bad_sizes_are_refused():
    for n in (0, -1, 4097):
        with pytest.raises(ValueError, match="1 to 4096"):
            random_hex(n)


def test_threads_never_get_the_same_bytes():
    got: list[list[str]] = [[] for _ in range(4)]

    def draw(out):
        out.extend(random_hex(6) for _ in range(5_000))

    threads = [threading.Thread(target=draw, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for out in got for i in out]
    assert len(set(ids)) == len(ids) == 20_000


def test_a_forked_child_does_not_repeat_its_parents_ids():
    random_hex(6)  # the parent holds a pool with unused bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, " ".join(random_hex(6) for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 65536).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    parent = [random_hex(6) for _ in range(50)]
    assert len(child) == 50 and not set(child) & set(parent)
