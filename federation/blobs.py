"""Content-addressed storage of jobs' input files, at antennas and hubs (docs/data.md).

Content is stored once under its SHA-256, checked when the last byte arrives: `<root>/sha256/<hex>`. An upload
in progress lives in `<root>/partial/<hex>` and resumes at its current length after an interruption; it becomes
visible only once complete and checked, by a rename, so nothing partial is ever used as if complete.

Who may use what: content is shared on disk, but each uploader (a user at an antenna, an antenna at a hub) may
use, and learn about, only content it uploaded itself (`<root>/owners/<hex>/<owner digest>`): asking for a hash
tells nobody whether someone else holds that content.

Quota and retention: an uploader may hold at most `quota_bytes` here, complete and partial uploads together.
Each use of content (an upload, a job naming it) marks it used by that uploader; `sweep` deletes an uploader's
hold on content it has not used for the retention period, unless an unfinished job needs that content, and the
content itself once nobody holds it. Partial uploads untouched for the retention period go too.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import io
import logging
import mmap
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from federation.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from federation.model import SHA256_HEX, InputFile, check_input_name

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20                 # what one upload message carries at most
MAX_BLOB_BYTES = 64 << 30             # one input file
RESERVE_BYTES = 512_000_000           # free space an upload must leave on the disk
SEND_TIMEOUT_S = 60.0                 # a transfer to another daemon may take this long,
SEND_MIN_RATE = 1 << 20               # plus a second per MiB
SYNC_EVERY_BYTES = 16 << 20           # an upload is handed to the disk as it arrives, this much at a time
WRITE_AHEAD = 4                       # chunks received but not yet written, per upload (16 MiB)
MAX_UPLOADS = 32                      # uploads received at once by one daemon; more wait their turn
MAX_UPLOADS_PER_OWNER = 4             # uploads one uploader may run at once; more are refused


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int = 0       # known once the upload began
    held: int = 0       # bytes received
    complete: bool = False


@dataclass(frozen=True)
class Chunk:
    sha256: str
    size: int
    offset: int
    data: bytes


def check_sha(sha256: str) -> str:
    if not SHA256_HEX.fullmatch(sha256):
        raise InvalidArgument(f"{sha256[:80]!r} is not a SHA-256: 64 lower-case hex digits")
    return sha256


def _owner_key(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


class BlobStore:
    """Blobs under `root`; `max_blob_bytes` bounds one file."""

    def __init__(self, root: Path, max_blob_bytes: int = MAX_BLOB_BYTES, reserve_bytes: int = RESERVE_BYTES,
                 quota_bytes: int = 0, retention_s: int = 7 * 86400):
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        self.reserve_bytes = reserve_bytes  # an upload that would leave less free space than this is refused
        self.quota_bytes = quota_bytes  # what one uploader may hold here; 0: no quota
        self.retention_s = retention_s  # for the messages; `sweep` is given its own
        for sub in ("sha256", "partial", "owners"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._locks: dict[tuple[str, str], list] = {}  # (sha, owner) -> [lock, uploads holding or awaiting it]
        self._held = self._count_held()  # owner digest -> {sha: bytes} of its complete and partial uploads
        self._active: dict[str, int] = {}  # owner -> uploads in progress
        self._slots = asyncio.Semaphore(MAX_UPLOADS)  # bounds the threads and buffers of uploads in progress

    def _count_held(self) -> dict[str, dict[str, int]]:
        held: dict[str, dict[str, int]] = {}
        for content in (self.root / "owners").iterdir():
            try:
                size = (self.root / "sha256" / content.name).stat().st_size
            except FileNotFoundError:
                continue
            for mark in content.iterdir():
                held.setdefault(mark.name, {})[content.name] = size
        for partial in (self.root / "partial").iterdir():
            if partial.suffix != ".size":
                sha, _, key = partial.name.partition(".")
                held.setdefault(key, {})[sha] = max(_announced(partial), partial.stat().st_size)
        return held

    def held_bytes(self, owner: str) -> int:
        """What `owner` holds here, complete and partial uploads together (what its quota counts)."""
        return sum(self._held.get(_owner_key(owner), {}).values())

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / check_sha(sha256)

    def _partial(self, sha256: str, owner: str) -> Path:
        return self.root / "partial" / f"{sha256}.{_owner_key(owner)}"

    def _owner_mark(self, sha256: str, owner: str) -> Path:
        return self.root / "owners" / sha256 / _owner_key(owner)

    def owns(self, owner: str, sha256: str) -> bool:
        return self._owner_mark(sha256, owner).exists() and self.path(sha256).exists()

    def stat(self, owner: str, sha256: str) -> BlobInfo:
        """What `owner` holds of this content: complete (its own upload, checked), partial, or nothing."""
        check_sha(sha256)
        if self.owns(owner, sha256):
            size = self.path(sha256).stat().st_size
            self._used(owner, sha256)  # a sender that hears "complete" sends nothing and counts on it: a use
            return BlobInfo(sha256, size, size, True)
        partial = self._partial(sha256, owner)
        try:
            return BlobInfo(sha256, int(partial.with_suffix(partial.suffix + ".size").read_text()),
                            partial.stat().st_size, False)
        except (FileNotFoundError, ValueError):
            return BlobInfo(sha256)

    async def put(self, owner: str, chunks: AsyncIterator[Chunk]) -> BlobInfo:
        """Receive an upload (or the rest of one). The first chunk names the content and its size; each chunk's
        offset must be where the upload stands. Returns what is held afterwards: complete once every byte arrived
        and the SHA-256 matched; a stream that ends early leaves a partial upload to resume."""
        first = None
        async for chunk in chunks:
            first = chunk
            break
        if first is None:
            raise InvalidArgument("the upload is empty: its first message must name the content (sha256, size)")
        sha = check_sha(first.sha256)
        if first.size > self.max_blob_bytes:
            raise ResourceExhausted(f"an input file may be at most {self.max_blob_bytes} bytes, not {first.size}")
        if self._active.get(owner, 0) >= MAX_UPLOADS_PER_OWNER:
            raise ResourceExhausted(f"at most {MAX_UPLOADS_PER_OWNER} uploads at once per uploader: let one finish "
                                    "first")
        self._active[owner] = self._active.get(owner, 0) + 1
        key = (sha, owner)  # one upload at a time per content and uploader: they share the partial file
        entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0], self._slots:
                return await self._receive(owner, sha, first, chunks)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[key]
            self._active[owner] -= 1
            if not self._active[owner]:
                del self._active[owner]

    async def _receive(self, owner: str, sha: str, first: Chunk, chunks: AsyncIterator[Chunk]) -> BlobInfo:
        size = first.size
        if self.owns(owner, sha):
            if self.path(sha).stat().st_size != size:
                raise InvalidArgument(f"content {sha} is {self.path(sha).stat().st_size} bytes, not {size}")
            self._used(owner, sha)
            return BlobInfo(sha, size, size, True)  # nothing more to send
        partial = self._partial(sha, owner)
        size_file = partial.with_suffix(partial.suffix + ".size")
        mine = self._held.setdefault(_owner_key(owner), {})
        if self.quota_bytes:
            others = sum(n for s, n in mine.items() if s != sha)
            if others + size > self.quota_bytes:
                raise ResourceExhausted(
                    f"over your quota here: you hold {others / 1e6:.0f} MB of uploaded files, and this one's "
                    f"{size / 1e6:.0f} MB would pass your quota of {self.quota_bytes / 1e6:.0f} MB. Files no "
                    f"unfinished job needs are deleted after {self.retention_s // 86400} day(s) unused; ask the "
                    "operator for a larger quota if you need one")
        free = shutil.disk_usage(self.root).free
        if free - size < self.reserve_bytes:  # refused before a byte is written, not failed half way
            raise ResourceExhausted(f"no space for {size} bytes here: {free / 1e6:.0f} MB free, and "
                                    f"{self.reserve_bytes / 1e6:.0f} MB are kept free; try later or elsewhere")
        try:
            announced = int(size_file.read_text())
            held = partial.stat().st_size
        except (FileNotFoundError, ValueError):
            announced, held = -1, 0
        if announced != size or first.offset == 0:  # a new upload, or one started over from its first byte
            size_file.write_text(str(size))
            partial.write_bytes(b"")
            held = 0
        mine[sha] = size
        digest = hashlib.sha256()  # over every byte as it is written: no second pass over the file
        if held:
            await asyncio.to_thread(hash_into, digest, partial, held)
        try:
            # Written and hashed in order, a few chunks behind the receiving (OrderedWriter); only the fsync at
            # the end makes the upload durable.
            async with OrderedWriter(partial, held, digest, WRITE_AHEAD, "blob-write") as out:
                async for chunk in _with_first(first, chunks):
                    if chunk.offset != held:
                        raise FailedPrecondition(f"the upload of {sha} stands at byte {held}, not {chunk.offset}: "
                                                 "resume it there")
                    if held + len(chunk.data) > size:
                        raise InvalidArgument(f"the upload of {sha} sent more than the {size} bytes it announced")
                    await out.write(chunk.data)
                    held += len(chunk.data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"no space left to store uploads here ({exc.strerror}); the upload stands "
                                        f"at byte {partial.stat().st_size} and can resume later") from None
            raise
        if held < size:
            return BlobInfo(sha, size, held, False)
        actual = digest.hexdigest()
        size_file.unlink(missing_ok=True)
        if actual != sha:
            partial.unlink(missing_ok=True)
            mine.pop(sha, None)
            raise InvalidArgument(f"checksum mismatch: the bytes uploaded hash to {actual}, not {sha}; nothing was "
                                  "kept")
        if self.path(sha).exists():
            partial.unlink()  # the same content, uploaded by someone else too: stored once
        else:
            os.replace(partial, self.path(sha))
            fsync_dir(self.root / "sha256")
        mark = self._owner_mark(sha, owner)
        mark.parent.mkdir(exist_ok=True)
        mark.touch()
        return BlobInfo(sha, size, size, True)

    def missing(self, owner: str, inputs: Iterable[InputFile]) -> list[InputFile]:
        """The inputs `owner` has not uploaded completely (or whose size differs from what was uploaded). Those
        it has are marked used now: retention counts from here."""
        out, used = [], set()
        for f in inputs:
            path = self.path(f.sha256)
            if not self.owns(owner, f.sha256) or path.stat().st_size != f.size:
                out.append(f)
            elif f.sha256 not in used:
                used.add(f.sha256)
                self._used(owner, f.sha256)
        return out

    def _used(self, owner: str, sha256: str) -> None:
        """Retention counts from now for `owner`'s hold on this content."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._owner_mark(sha256, owner))

    # -- retention ---------------------------------------------------------------------------------

    async def sweep(self, retention_s: float, in_use: Callable[[], set[str]], now: float | None = None
                    ) -> tuple[int, int]:
        """Delete holds on content unused for `retention_s` (unless `in_use()`, the contents unfinished jobs
        need, names it), content nobody holds any more, and partial uploads untouched that long. The directories
        are read in a worker thread; what is deleted is checked again and deleted here, on the event loop, so
        that an upload or a job that uses the content meanwhile keeps it. Returns (contents deleted, bytes
        freed)."""
        cutoff = (time.time() if now is None else now) - retention_s
        marks, partials = await asyncio.to_thread(self._stale, cutoff)
        if not marks and not partials:
            return 0, 0
        needed, deleted, freed = in_use(), 0, 0
        for mark in marks:
            sha = mark.parent.name
            if sha in needed or not _older(mark, cutoff):
                continue
            mark.unlink(missing_ok=True)
            self._held.get(mark.name, {}).pop(sha, None)
            if mark.parent.exists() and not any(mark.parent.iterdir()):
                mark.parent.rmdir()
                content = self.root / "sha256" / sha
                try:
                    freed += content.stat().st_size
                    content.unlink()
                    deleted += 1
                except FileNotFoundError:
                    pass
        busy = {(sha, _owner_key(owner)) for sha, owner in self._locks}
        for partial in partials:
            sha, _, key = partial.name.partition(".")
            if (sha, key) in busy or not _older(partial, cutoff):
                continue
            with contextlib.suppress(FileNotFoundError):
                freed += partial.stat().st_size
                partial.unlink()
            partial.with_suffix(partial.suffix + ".size").unlink(missing_ok=True)
            self._held.get(key, {}).pop(sha, None)
        if deleted or freed:
            log.info("retention: deleted %d stored file(s) and stale partial uploads, %d bytes", deleted, freed)
        return deleted, freed

    def _stale(self, cutoff: float) -> tuple[list[Path], list[Path]]:
        """Holds (owner marks) and partial uploads not touched since `cutoff`; content without any mark (a
        crash between storing it and marking it) is given a mark to age by."""
        marks = []
        for content in (self.root / "owners").iterdir():
            marks.extend(m for m in content.iterdir() if _older(m, cutoff))
        for content in (self.root / "sha256").iterdir():
            if not (self.root / "owners" / content.name).exists():
                (self.root / "owners" / content.name).mkdir(exist_ok=True)
                (self.root / "owners" / content.name / "unowned").touch()
        partials = [p for p in (self.root / "partial").iterdir() if p.suffix != ".size" and _older(p, cutoff)]
        return marks, partials

    def stage(self, inputs: Iterable[InputFile], folder: Path) -> None:
        """Copy each input to its name under `folder` (a copy, not a link: a job that writes to its input must
        not change the content other jobs use). Names are checked again here: nothing is written outside
        `folder`, not even through a symbolic link left there."""
        folder = Path(folder)
        for f in inputs:
            check_input_name(f.name)
            target = folder / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.parent.resolve().is_relative_to(folder.resolve()):
                raise InvalidArgument(f"input {f.name!r} would be placed outside the job's working directory")
            if target.is_symlink() or target.exists():
                target.unlink()
            copy_file(self.path(f.sha256), target)


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _announced(partial: Path) -> int:
    try:
        return int(partial.with_suffix(partial.suffix + ".size").read_text())
    except (FileNotFoundError, ValueError):
        return 0


async def _with_first(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    async for chunk in rest:
        if chunk.sha256 and chunk.sha256 != first.sha256:
            raise InvalidArgument("one upload carries one content: a later message names another SHA-256")
        yield chunk


def write_chunk(out: FileWriter, digest, data: bytes, failed: list) -> None:
    """Write and hash one chunk, in order. After a write failed, the chunks queued behind it are not written:
    the file keeps only bytes at their right offsets, and a transfer resumes where it really stands."""
    if failed:
        return
    try:
        out.write(data)
        digest.update(data)
    except BaseException as exc:
        failed.append(exc)
        raise


def _finish(out: FileWriter, failed: list) -> None:
    """Write what `out` still buffers, and fsync it unless a write failed (the transfer is then not complete
    anyway). Bytes received before a failure are kept when they can be: the transfer resumes after them."""
    try:
        out.finish(sync=not failed)  # after a failed write nothing is buffered any more (see FileWriter)
    except BaseException as exc:
        if not failed:
            failed.append(exc)


async def _settle_writes(writer: concurrent.futures.Executor, writing: Iterable[asyncio.Future], out: FileWriter,
                         failed: list) -> None:
    """After a transfer's last chunk (or its end, early or failed): wait for the chunks queued to `writer`, then
    write what `out` buffers and fsync it. Runs to the end even if the caller is cancelled meanwhile, again and
    again (the cancel is raised afterwards): what arrived is written in order, and the executor has nothing
    left to wait for when it shuts down."""
    async def settle() -> None:
        await asyncio.gather(*writing, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(writer, _finish, out, failed)

    task = asyncio.ensure_future(settle())
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class OrderedWriter:
    """A transfer received into a file (an upload, a fetched output): each chunk written and hashed into `digest`
    in order, in a thread of the transfer's own (both let go of the GIL), at most `ahead` chunks behind the
    receiving, through a FileWriter from `offset` on. After a failed write nothing more is written: the file keeps
    only bytes at their right offsets, and the transfer resumes after them. On leaving, whatever happened, what
    arrived is written and fsynced (_settle_writes); then a failed write is raised, if nothing else was."""

    def __init__(self, path: Path, offset: int, digest, ahead: int, name: str):
        self.out = FileWriter(path, offset)
        self.digest = digest
        self.ahead = ahead
        self.failed: list[BaseException] = []  # the first failed write
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._writing: collections.deque[asyncio.Future] = collections.deque()

    async def write(self, data) -> None:
        while self._writing and (self._writing[0].done() or len(self._writing) >= self.ahead):
            await self._writing.popleft()
        self._writing.append(asyncio.get_running_loop().run_in_executor(
            self._pool, write_chunk, self.out, self.digest, data, self.failed))

    async def __aenter__(self) -> OrderedWriter:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            await _settle_writes(self._pool, self._writing, self.out, self.failed)
        finally:
            self._pool.shutdown()
            self.out.close()
        if exc_type is None and self.failed:
            raise self.failed[0]


DIRECT_ALIGN = 4096                   # direct I/O writes whole blocks, from aligned memory, at aligned offsets
DIRECT_BUFFER = 4 << 20               # what one FileWriter gathers before it writes it directly
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _open(path: Path, flags: int) -> io.FileIO:
    """A file descriptor that is closed when dropped, whatever happens before its owner closes it."""
    return io.FileIO(os.open(path, flags | os.O_CLOEXEC), "r" if flags & os.O_ACCMODE == os.O_RDONLY else "w")


class _Direct:
    """What FileWriter and FileReader share: the file opened a second time for direct I/O, with an aligned buffer
    of their own, dropped for good once direct I/O is refused."""

    def __init__(self, path: Path, flags: int, direct: bool, buffer: int):
        self._file = _open(path, flags)
        self.fd = self._file.fileno()
        self._direct_file: io.FileIO | None = None
        self.direct = -1
        self.buf: mmap.mmap | None = None
        if direct and _O_DIRECT:
            try:
                self._direct_file = _open(path, flags | _O_DIRECT)
                self.buf = mmap.mmap(-1, buffer)
            except OSError:  # no direct I/O on this file system (or no memory for the buffer): the page cache
                self._no_direct()
            else:
                self.direct = self._direct_file.fileno()

    def _no_direct(self) -> None:
        self.direct = -1
        if self._direct_file is not None:
            self._direct_file.close()
            self._direct_file = None
        if self.buf is not None:
            with contextlib.suppress(BufferError):  # a view of it still alive somewhere: it goes with that
                self.buf.close()
            self.buf = None

    def close(self) -> None:
        try:
            self._no_direct()
        finally:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileWriter(_Direct):
    """Writes a large file once, in order, from `offset` on, and makes it durable with `finish()`.

    Whole blocks go straight to the disk (O_DIRECT) from a buffer of the writer's own, past the page cache: a
    file that is written once and then read once or never (an upload, an output, a fetched file) gains nothing
    from the cache, and filling the cache is what costs most when such a file is written on a virtual machine
    (docs/benchmarks.md measures the CPU it saves). Where direct I/O is not available (tmpfs, some network file
    systems) or is refused, and for the last bytes that do not fill a block, the writer goes through the page
    cache instead, starting writeback every SYNC_EVERY_BYTES so that the final fsync has little left to do.

    Not thread-safe: one thread writes. `offset` is always how far the file holds the bytes written, in order;
    if a write fails, the file is cut back to it (and what was buffered is dropped)."""

    def __init__(self, path: Path, offset: int = 0, direct: bool = True):
        super().__init__(path, os.O_WRONLY, direct, DIRECT_BUFFER)
        self.offset = offset
        self.pending = 0                # bytes in `buf`, which follow `offset`
        self.unsynced = 0

    def write(self, data) -> None:
        view = memoryview(data)
        if self.buf is None:
            self._cached(view)
            return
        if not self.pending and self.offset % DIRECT_ALIGN:  # up to a block boundary through the cache
            head = min(len(view), DIRECT_ALIGN - self.offset % DIRECT_ALIGN)
            self._cached(view[:head])
            view = view[head:]
        while view:
            if self.buf is None:  # direct I/O was refused on the way
                self._cached(view)
                return
            n = min(len(view), len(self.buf) - self.pending)
            self.buf[self.pending:self.pending + n] = view[:n]
            self.pending += n
            view = view[n:]
            if self.pending == len(self.buf):
                self._flush_buffer()

    def finish(self, sync: bool = True) -> None:
        """Write what is buffered and, with `sync`, fsync the file: its bytes are then on disk."""
        if self.pending:
            self._flush_buffer()
        if sync:
            os.fsync(self.fd)

    def _flush_buffer(self) -> None:
        whole = self.pending - self.pending % DIRECT_ALIGN
        try:
            # every view of the buffer is released on the way out, even by an error: the buffer can be closed
            with memoryview(self.buf) as buf:
                if whole:
                    with buf[:whole] as part:
                        self._direct(part)
                if whole < self.pending:
                    with buf[whole:self.pending] as part:
                        self._cached(part)
        finally:
            self.pending = 0
        if self.direct < 0:  # refused on the way: no more direct writes, no buffer
            self._no_direct()

    def _direct(self, view: memoryview) -> None:
        done, refused = 0, False
        try:
            while done < len(view):
                with view[done:] as part:
                    done += os.pwrite(self.direct, part, self.offset + done)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                self._cut()
                raise
            refused = True  # alignment this file system wants, a short write: the page cache takes the rest
        self.offset += done
        if refused:
            self.direct = -1
            with view[done:] as rest:
                self._cached(rest)

    def _cached(self, view: memoryview) -> None:
        done = 0
        try:
            while done < len(view):
                with view[done:] as part:
                    done += os.pwrite(self.fd, part, self.offset + done)
        except OSError:
            self._cut()
            raise
        self.offset += done
        self.unsynced += done
        if self.unsynced >= SYNC_EVERY_BYTES:
            self.unsynced = 0
            start_writeback(self.fd)

    def _cut(self) -> None:
        """After a failed write: the file ends where its good bytes end, nothing half-written after them."""
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, self.offset)
        self.pending = 0


try:
    _sync_file_range = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):  # not Linux: flush synchronously instead
    _sync_file_range = None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting for them (Linux sync_file_range), so that
    the disk works while more arrives; durability still comes only from the final fsync."""
    if _sync_file_range is None or _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
        os.fdatasync(fd)


def hash_into(digest, path: Path, length: int) -> None:
    with open(path, "rb") as f:
        while length > 0 and (block := f.read(min(CHUNK_BYTES, length))):
            digest.update(block)
            length -= len(block)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileReader(_Direct):
    """Reads a file in order from `offset` on. With `direct`, for files FileWriter wrote (so not in the page
    cache), the bytes come straight from the disk into a buffer of the reader's own (O_DIRECT): reading them
    through the page cache would fill it with a file read once, which costs most on a virtual machine. Without
    `direct`, or where direct I/O is not available or is refused, through the page cache (a user's own file is
    often there already). Not thread-safe: one thread reads."""

    def __init__(self, path: Path, offset: int = 0, direct: bool = False):
        super().__init__(path, os.O_RDONLY, direct, DIRECT_BUFFER + DIRECT_ALIGN)
        self.pos = offset

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (at most 4 MiB) from where the reader stands; fewer only at the end of the file."""
        if self.buf is not None:
            n = min(n, len(self.buf) - DIRECT_ALIGN)
            start = self.pos - self.pos % DIRECT_ALIGN
            skip = self.pos - start
            want = -(-(skip + n) // DIRECT_ALIGN) * DIRECT_ALIGN
            got = -1
            try:
                with memoryview(self.buf) as view, view[:want] as part:
                    got = os.preadv(self.direct, [part], start)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            if got >= 0:
                data = self.buf[skip:max(skip, min(got, skip + n))]
                self.pos += len(data)
                return data
            self._no_direct()  # refused after all: through the page cache from here on
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data


def copy_file(src: Path, dst: Path) -> None:
    """Copy a stored file (written by FileWriter, so not in the page cache) to `dst`, replacing it, past the
    page cache both ways where the file systems allow it (see FileWriter). Not made durable: a copy for a job."""
    with open(dst, "wb"):
        pass
    with FileReader(src, direct=True) as reader, FileWriter(dst) as writer:
        while block := reader.read(DIRECT_BUFFER):
            writer.write(block)
        writer.finish(sync=False)


def blob_chunks(path: Path, sha256: str, size: int, offset: int = 0, direct: bool = False):
    """The upload messages (aifed.v1.BlobChunk) of the file at `path`, from `offset` on, serialized already (for
    `put_blob`: protobuf would copy each chunk's data twice more); `direct`: see FileReader. The file is opened
    here, so that a missing file is an OSError for the caller, not a broken call; one that shrinks while it is
    read ends the upload short (the receiver keeps what came, and says how much)."""
    f = FileReader(path, offset, direct)

    async def chunks():
        nonlocal offset
        with f:  # the next chunk is read (in a worker thread) while this one is sent
            first = True
            reading = asyncio.ensure_future(asyncio.to_thread(f.read, CHUNK_BYTES))
            try:
                while True:
                    data = await reading
                    if data and offset + len(data) < size:
                        reading = asyncio.ensure_future(asyncio.to_thread(f.read, CHUNK_BYTES))
                    if data or first:
                        yield chunk_bytes(offset, data, sha256, size) if first else chunk_bytes(offset, data)
                    if not data or offset + len(data) >= size:
                        return
                    first = False
                    offset += len(data)
            finally:
                await asyncio.shield(reading)  # before the file is closed
    return chunks()


def put_blob(channel, service: str):
    """The PutBlob call of `service` ("aifed.v1.Antenna" or "aifed.v1.Hub") on `channel`, for the messages
    `blob_chunks` yields (serialized already)."""
    from federation.pb import jobs_pb2
    return channel.stream_unary(f"/{service}/PutBlob", request_serializer=None,
                                response_deserializer=jobs_pb2.BlobInfo.FromString)


async def send(site, store: BlobStore, sha256: str, size: int, to: str) -> int:
    """Make sure the hub `site` (a HubSite: its `stub` and `channel`) holds this content from us: nothing if it
    does, else the upload, resumed where an interrupted one stopped. Returns the bytes sent; raises Unavailable
    if the transfer ended short (it resumes on the next try) and grpc.aio.AioRpcError if the hub refused it."""
    from federation.errors import Unavailable
    from federation.pb import jobs_pb2
    held = await site.stub.StatBlob(jobs_pb2.BlobRef(sha256=sha256), timeout=30)
    if held.complete:
        return 0
    answer = await put_blob(site.channel, "aifed.v1.Hub")(
        blob_chunks(store.path(sha256), sha256, size, held.held, direct=True),
        timeout=SEND_TIMEOUT_S + size / SEND_MIN_RATE)
    if not answer.complete:
        raise Unavailable(f"{to} holds {answer.held} of the {size} bytes of input {sha256[:12]}...; the rest goes "
                          "on the next try")
    return size - held.held


def _varint(raw: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = raw[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, i  # what protobuf keeps of an over-long varint
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_bytes(offset: int, data: bytes, sha256: str = "", size: int = 0) -> bytes:
    """One serialized aifed.v1.BlobChunk: what protobuf would produce, with one copy of the data instead of
    three (fields in number order, zero values left out)."""
    parts = []
    if sha256:
        raw = sha256.encode()
        parts += [b"\x0a", _encode_varint(len(raw)), raw]
    if size:
        parts += [b"\x10", _encode_varint(size)]
    if offset:
        parts += [b"\x18", _encode_varint(offset)]
    if data:
        parts += [b"\x22", _encode_varint(len(data)), data]
    return b"".join(parts)


def pass_serialized(message) -> bytes:
    """A response serializer for messages that may come already serialized (relayed, or built by chunk_bytes)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def parse_chunk(raw: bytes) -> Chunk:
    """Deserialize one aifed.v1.BlobChunk without copying its data: `data` is a view of the received bytes
    (protobuf would copy it twice, into its message and out again). Anything unusual is left to protobuf."""
    try:
        sha, size, offset, data = "", 0, 0, memoryview(b"")
        view, i, end = memoryview(raw), 0, len(raw)
        while i < end:
            key, i = _varint(raw, i)
            field, wire = key >> 3, key & 7
            if not 0 < field < 1 << 29:
                raise ValueError("invalid field number")
            if wire == 0:
                value, i = _varint(raw, i)
                if field == 2:
                    size = value
                elif field == 3:
                    offset = value
            elif wire == 2:
                length, i = _varint(raw, i)
                if i + length > end:
                    raise ValueError("truncated")
                if field == 1:
                    sha = bytes(view[i:i + length]).decode()
                elif field == 4:
                    data = view[i:i + length]
                i += length
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            else:
                raise ValueError("unexpected wire type")
        if i != end:
            raise ValueError("truncated")
        return Chunk(sha, size, offset, data)
    except (ValueError, IndexError, UnicodeDecodeError):
        from federation.pb import jobs_pb2
        msg = jobs_pb2.BlobChunk.FromString(raw)  # raises protobuf's own DecodeError for what is malformed
        return Chunk(msg.sha256, msg.size, msg.offset, msg.data)


# -- the PutBlob and StatBlob RPCs, the same at antennas (for users) and hubs (for antennas) -----------------------

def info_pb(info: BlobInfo):
    from federation.pb import jobs_pb2
    return jobs_pb2.BlobInfo(sha256=info.sha256, size=info.size, held=info.held, complete=info.complete)


async def put_rpc(store: BlobStore, owner: str, requests, on_bytes=None):
    """Serve PutBlob: the request stream into `store` for `owner`; the BlobInfo message to answer."""
    received = 0

    async def chunks() -> AsyncIterator[Chunk]:
        nonlocal received
        async for msg in requests:  # already a Chunk where the server deserializes with parse_chunk
            received += len(msg.data)
            yield msg if isinstance(msg, Chunk) else Chunk(msg.sha256, msg.size, msg.offset, msg.data)

    info = await store.put(owner, chunks())
    if on_bytes is not None and received:  # kept: complete and checked, or a partial upload to resume
        on_bytes(received)
    return info_pb(info)


def stat_rpc(store: BlobStore, owner: str, request):
    return info_pb(store.stat(owner, request.sha256))


# -- the client's side: which files, under which names --------------------------------------------------------------

def collect_inputs(paths: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(name in the job's working directory, local file) for each --input: a file goes in under its own name, a
    folder with everything below it under the folder's name. A symbolic link is followed only if it stays inside
    the folder given; anything but regular files (devices, sockets) is refused."""
    out: list[tuple[str, Path]] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise InvalidArgument(f"input {str(given)!r} does not exist")
        if path.is_dir():
            top = path.resolve()
            for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
                dirnames.sort()
                for entry in (*sorted(filenames), *[d for d in dirnames if Path(dirpath, d).is_symlink()]):
                    local = Path(dirpath, entry)
                    if not local.resolve().is_relative_to(top):
                        raise InvalidArgument(f"input {str(local)!r} is a symbolic link out of {str(given)!r}: "
                                              "give its target as an input of its own if the job needs it")
                    if local.is_dir():
                        raise InvalidArgument(f"input {str(local)!r} is a symbolic link to a folder: give the "
                                              "folder itself")
                    if not local.is_file():
                        raise InvalidArgument(f"input {str(local)!r} is not a regular file")
                    name = "/".join((top.name, *local.relative_to(path).parts))
                    out.append((check_input_name(name), local))
        elif path.is_file():
            out.append((check_input_name(path.resolve().name), path))
        else:
            raise InvalidArgument(f"input {str(given)!r} is not a regular file or a folder")
    return out


def describe_inputs(files: list[tuple[str, Path]]) -> tuple[tuple[InputFile, ...], dict[str, Path]]:
    """The job's inputs (hashing each file), and a local file per content to upload."""
    inputs, sources = [], {}
    for name, local in files:
        size = local.stat().st_size
        sha = _sha256_of(local)
        inputs.append(InputFile(name, sha, size))
        sources.setdefault(sha, local)
    return tuple(inputs), sources
