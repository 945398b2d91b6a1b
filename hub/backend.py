"""The interface between a hub and its site's scheduler.

A backend runs jobs and tells the hub when they change (`on_change`). The hub
journals every change; the backend keeps only what it needs to drive the
scheduler. Implementations: `hub.local.LocalBackend` (the embedded default) and
`hub.slurm.SlurmBackend`. Each job has a folder `<workdir>/<job id>/` that holds
its `stdout` and `stderr`.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from federation.config import PartitionConfig
from federation.model import Job, JobState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """A job changed state in the backend. `ref` is the backend's handle for it, if it has a new one."""

    job_id: str
    state: JobState
    exit_code: int | None = None
    reason: str = ""
    ref: str | None = None


@dataclass(frozen=True)
class PartitionUsage:
    name: str
    gpus_total: int
    gpus_free: int
    running_jobs: int
    pending_jobs: int
    pending_gpu_seconds: float


@dataclass(frozen=True)
class Health:
    """Whether the backend can reach its scheduler now; `message` says why not."""

    ok: bool = True
    message: str = ""


OnChange = Callable[[Change], None]
T = TypeVar("T")
FILE_THREADS = 2  # copies of jobs' inputs at once


class Backend(abc.ABC):
    """Submit, follow, cancel and read the logs of jobs on one site's scheduler."""

    submit_concurrency = 1  # how many `submit` calls the hub may run at once

    def __init__(self, partitions: tuple[PartitionConfig, ...], on_change: OnChange, workdir: Path):
        self.partitions = {p.name: p for p in partitions}
        self.on_change = on_change
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Puts a job's input files into its folder before it starts (the hub core sets it; raises OSError or
        # AifedError if it cannot: the job fails with that reason).
        self.stage_inputs: Callable[[Job, Path], None] = lambda job, folder: None
        # Takes several changes at once (the hub journals them in one commit); without it, `on_change` each.
        self.on_changes: Callable[[list[Change]], None] | None = None
        self._files: ThreadPoolExecutor | None = None

    async def in_file_thread(self, fn: Callable[..., T], *args) -> T:
        """Run file work that may take seconds (copying a job's inputs into its folder) in a thread of the
        backend's own: the event loop's default threads also commit the journal and run scheduler commands,
        which must not queue behind a large copy."""
        if self._files is None:
            self._files = ThreadPoolExecutor(FILE_THREADS, thread_name_prefix="backend-files")
        return await asyncio.get_running_loop().run_in_executor(self._files, fn, *args)

    def close_files(self) -> None:
        if self._files is not None:
            self._files.shutdown(wait=False, cancel_futures=True)

    def _report(self, changes: list[Change]) -> None:
        if not changes:
            return
        if self.on_changes is not None:
            self.on_changes(changes)
        else:
            for change in changes:
                self.on_change(change)

    async def start(self) -> None:
        """Begin following the scheduler, after every unfinished job was handed to `recover`."""

    @abc.abstractmethod
    async def submit(self, job: Job) -> None:
        """Queue the job in `job.partition`. Report what follows through `on_change`; never wait for the job."""

    async def submit_many(self, jobs: list[Job], wanted: Callable[[Job], bool] = lambda job: True) -> None:
        """Queue several jobs (the jobs of one forwarded batch), `submit_concurrency` at a time. `wanted` is
        asked just before each job goes out: a job cancelled meanwhile is not submitted."""
        slots = asyncio.Semaphore(self.submit_concurrency)

        async def one(job: Job) -> None:
            async with slots:
                if wanted(job):
                    await self.submit(job)

        if self.submit_concurrency > 1 and len(jobs) > 1:
            await asyncio.gather(*(one(job) for job in jobs))
        else:
            for job in jobs:
                await one(job)

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> bool:
        """Ask the scheduler to stop the job; the CANCELLED change follows. False if it is not known here."""

    @abc.abstractmethod
    async def recover(self, job: Job, ref: str) -> Change | None:
        """After a hub restart, take back a job the journal says is unfinished.

        Return a change to journal (for example LOST), or None if the backend follows it again."""

    @abc.abstractmethod
    def usage(self) -> list[PartitionUsage]:
        """What each partition is doing now."""

    @abc.abstractmethod
    async def estimate_wait(self, partition: str, gpus: int, walltime_s: int) -> float:
        """Seconds from now until a job of this shape, submitted now, would start (inf: never)."""

    async def waiting(self) -> list[tuple[str, float]]:
        """(job id, expected seconds until it starts) of the jobs waiting in the scheduler, for the hub's load
        balancer. A backend that cannot tell returns none: its hub then never offers jobs to peers."""
        return []

    async def withdraw(self, job_id: str) -> bool:
        """Take a waiting job back from the scheduler, to hand it to a peer hub. True only if it had not started
        and now never will here (no change is reported for it any more); False if it started, ended or is not
        known here."""
        return False

    async def discard(self, job_id: str) -> None:
        """A withdrawn job was handed to a peer hub for good: drop what is left of it in the scheduler."""

    def adopt_withdrawn(self, job: Job, ref: str) -> None:
        """After a restart, a job the journal says is MOVING (withdrawn, its hand-off unsettled): remember it, so
        that `submit` (the peer refused it) or `discard` (the peer took it) can finish with it."""

    def health(self) -> Health:
        return Health()

    def folder(self, job_id: str) -> Path:
        return self.workdir / job_id

    def read_log(self, job_id: str, stream: str, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes of the job's `stdout` or `stderr` from `offset`. A log the job replaced by a
        symbolic link (to a file it cannot read itself, but the hub can), or by anything but a regular file (a
        pipe would block the read), is not followed: nothing is served."""
        try:
            fd = os.open(self.folder(job_id) / stream, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            log.warning("job %s: its %s is a symbolic link; not followed", job_id, stream)
            return b""
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a pipe, or a hard link to another file
                log.warning("job %s: its %s is not a regular file of its own; not read", job_id, stream)
                return b""
            f.seek(offset)
            return f.read(limit)

    async def close(self) -> None:
        """Stop following jobs. Running jobs are left to the scheduler."""
