"""federation.ids: random identifiers drawn in bulk from the OS CSPRNG."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from federation import ids
from federation.ids import job_token, random_hex, token_time


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


# -- job tokens: they sort by the time they were made ---------------------------------------------------------

@pytest.fixture(autouse=True)
def _clock_back_after(monkeypatch):
    """Tests below make tokens at times to come: the process's sequence goes back to where it was after each."""
    monkeypatch.setattr(ids, "_last_token", ids._last_token)


def test_job_tokens_are_fixed_width_base32hex_and_strictly_increasing():
    tokens = [job_token() for _ in range(20_000)]  # many within one millisecond
    assert all(re.fullmatch(r"[0-9a-v]{15}", t) for t in tokens)
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert [int(t, 32) for t in tokens] == sorted(int(t, 32) for t in tokens)  # text order is number order


def test_a_job_token_carries_the_time_it_was_made():
    before = time.time()
    token = job_token()
    assert before - 0.002 <= token_time(token) <= time.time() + 0.002
    at = 1_900_000_000_123_456_789  # 2030
    assert token_time(job_token(now_ns=at)) == pytest.approx(1_900_000_000.123)


def test_job_tokens_count_on_when_the_clock_stands_still_or_steps_back():
    at = 2_000_000_000_000_000_000
    first = job_token(now_ns=at)
    same = [job_token(now_ns=at) for _ in range(100)]
    back = job_token(now_ns=at - 3_600 * 10**9)  # an hour back (NTP stepped the clock)
    assert [first, *same, back] == sorted({first, *same, back})
    assert int(back, 32) == int(same[-1], 32) + 1
    later = job_token(now_ns=at + 10**9)
    assert later > back and token_time(later) == pytest.approx(2_000_000_001.0)


def test_threads_never_get_the_same_job_token():
    got: list[list[str]] = [[] for _ in range(4)]

    def make(out):
        out.extend(job_token() for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out == sorted(out) for out in got)
    assert len({t for out in got for t in out}) == 20_000


def test_a_forked_child_starts_its_own_sequence():
    at = 2_100_000_000_000_000_000
    for _ in range(10):
        job_token(now_ns=at)  # the parent counts on within one millisecond
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, " ".join(job_token(now_ns=at) for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 65536).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    parent = [job_token(now_ns=at) for _ in range(50)]
    assert len(child) == 50 and not set(child) & set(parent)
