"""FileWriter and FileReader (federation/blobs.py): large files written and read past the page cache where the file
system allows it, through it where it does not, byte for byte the same either way, and cut back to their good
bytes when a write fails."""

from __future__ import annotations

import contextlib
import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import blobs
from federation.blobs import DIRECT_ALIGN, FileReader, FileWriter, copy_file


def _direct_supported(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    return bool(getattr(os, "O_DIRECT", 0))


def _refuse_direct(monkeypatch):
    """A file system without direct I/O: opening with O_DIRECT fails with EINVAL, as on tmpfs."""
    real = os.open

    def fake(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize("start", [0, 1000, DIRECT_ALIGN, 3 * DIRECT_ALIGN + 7])
def test_a_writer_writes_every_byte_in_order_from_its_offset(tmp_path, start):
    path = tmp_path / "f"
    head = os.urandom(start)
    path.write_bytes(head)
    data = os.urandom(2 * blobs.DIRECT_BUFFER + 12345)
    with FileWriter(path, start) as w:
        if _direct_supported(path):
            assert w.direct >= 0  # this file system takes direct I/O: the writer uses it
        for i in range(0, len(data), 1_000_003):  # pieces that fit no block
            w.write(data[i:i + 1_000_003])
        w.finish()
        assert w.offset == start + len(data)
    assert path.read_bytes() == head + data


def test_without_direct_io_the_writer_goes_through_the_page_cache(tmp_path, monkeypatch):
    _refuse_direct(monkeypatch)
    path = tmp_path / "f"
    path.write_bytes(b"")
    data = os.urandom(blobs.SYNC_EVERY_BYTES + 5)
    with FileWriter(path) as w:
        assert w.direct < 0 and w.buf is None
        w.write(data)
        w.finish()
    assert path.read_bytes() == data


def test_a_direct_write_refused_part_way_falls_back_without_losing_a_byte(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"")
    if not _direct_supported(path):
        pytest.skip("this file system has no direct I/O to refuse")  # the fallback above covers it
    real = os.pwrite
    writer: list[FileWriter] = []

    def pwrite(fd, data, offset):
        if writer and fd == writer[0].direct and offset > 0:  # the second direct write is refused
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom(3 * blobs.DIRECT_BUFFER + 99)
    with FileWriter(path) as w:
        writer.append(w)
        w.write(data)
        w.finish()
        assert w.direct < 0  # it went on through the page cache
    assert path.read_bytes() == data


def test_a_failed_write_cuts_the_file_back_to_its_good_bytes(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"")
    real = os.pwrite
    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:  # the disk fills up half way through the second write
            real(fd, data[:len(data) // 2], offset)  # an aligned half is written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom(3 * blobs.DIRECT_BUFFER)
    with pytest.raises(OSError, match="No space") as caught:  # the error outlives the writer
        with FileWriter(path) as w:
            fds = [fd for fd in (w.fd, w.direct) if fd >= 0]
            w.write(data)
    assert caught.value.errno == errno.ENOSPC  # closing the writer did not hide it behind an error of its own
    for fd in fds:  # and closed every file
        with pytest.raises(OSError):
            os.fstat(fd)
    assert path.read_bytes() == data[:blobs.DIRECT_BUFFER]  # the first write only: nothing half-written after it


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 3 * 4096), pieces=st.lists(st.integers(0, 20_000), max_size=12),
       direct=st.booleans())
def test_any_writes_from_any_offset_read_back_the_same(tmp_path_factory, start, pieces, direct):
    """With a small buffer, every boundary case (a head up to a block, full buffers, a tail) comes up often."""
    saved = blobs.DIRECT_BUFFER
    blobs.DIRECT_BUFFER = 2 * DIRECT_ALIGN
    try:
        path = tmp_path_factory.mktemp("w") / "f"
        head = os.urandom(start)
        path.write_bytes(head)
        data = os.urandom(sum(pieces))
        with FileWriter(path, start, direct=direct) as w:
            at = 0
            for n in pieces:
                w.write(data[at:at + n])
                at += n
            w.finish(sync=False)
        assert path.read_bytes() == head + data
        for offset in {0, start, start + len(data) // 3, start + len(data)}:
            with FileReader(path, offset, direct=direct) as r:
                got = b""
                while block := r.read(5000):
                    got += block
            assert got == (head + data)[offset:]
    finally:
        blobs.DIRECT_BUFFER = saved


def test_a_reader_reads_from_any_offset_and_stops_at_the_end(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(blobs.DIRECT_BUFFER + 777)
    path.write_bytes(data)
    for offset in (0, 1, DIRECT_ALIGN, blobs.DIRECT_BUFFER + 5, len(data)):
        with FileReader(path, offset, direct=True) as r:
            if _direct_supported(path):
                assert r.direct >= 0
            got = b""
            while block := r.read(blobs.CHUNK_BYTES):
                got += block
            assert got == data[offset:] and r.read(10) == b""


def test_a_reader_refused_direct_io_reads_through_the_page_cache(tmp_path, monkeypatch):
    path = tmp_path / "f"
    data = os.urandom(100_000)
    path.write_bytes(data)
    real = os.preadv

    def preadv(fd, buffers, offset):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(os, "preadv", preadv)
    with FileReader(path, 10, direct=True) as r:
        assert r.read(50_000) == data[10:50_010]
        assert r.direct < 0  # given up after the refusal
        assert r.read(100_000) == data[50_010:]
    monkeypatch.setattr(os, "preadv", real)
    _refuse_direct(monkeypatch)
    with FileReader(path, 0, direct=True) as r:
        assert r.direct < 0 and r.read(200_000) == data


def test_copy_file_replaces_the_target_with_an_exact_copy(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(blobs.DIRECT_BUFFER * 2 + 4097)
    src.write_bytes(data)
    dst.write_bytes(os.urandom(10 * blobs.DIRECT_BUFFER))  # longer than the copy: nothing of it may remain
    copy_file(src, dst)
    assert dst.read_bytes() == data


def test_files_left_unclosed_are_closed_when_dropped(tmp_path):
    import gc
    path = tmp_path / "f"
    path.write_bytes(os.urandom(10_000))

    def open_here() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        return count

    for _ in range(5):
        FileWriter(path)
        FileReader(path, direct=True)
        blobs.blob_chunks(path, "0" * 64, 10_000)  # an upload never started
    gc.collect()
    assert open_here() == 0
    kept = [FileWriter(path), FileReader(path, direct=True)]  # the check sees files that are open
    assert open_here() >= 2
    for f in kept:
        f.close()
    assert open_here() == 0
