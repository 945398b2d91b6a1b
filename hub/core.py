"""The hub's core: accepts forwarded jobs, journals them, drives the backend, computes adverts."""

from __future__ import annotations

import logging
import math
import re
import time

from federation.config import HubConfig, PartitionConfig
from federation.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from federation.identity import Identity, Role, parse_identity
from federation.journal import Journal
from federation.model import Job, JobSpec, JobState
from federation.timefmt import format_duration
from federation.watch import Signal, Topics
from hub.backend import Backend, Change
from hub.local import LocalBackend

log = logging.getLogger(__name__)

MAX_KEY_LEN = 200
# Job ids name folders: only `<antenna>-<token>`, lower-case letters, digits and dashes, never a path.
JOB_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}[a-z0-9]-[a-z0-9]{1,64}")


class HubCore:
    """Everything a hub knows and does, independent of gRPC."""

    def __init__(self, config: HubConfig):
        self.config = config
        self.journal = Journal(config.state_dir / "hub.sqlite")
        self.backend: Backend = make_backend(config, self._on_change)
        self.jobs: Topics[Job] = Topics()
        self.capacity = Signal()
        self.sequence = 0

    async def recover(self) -> None:
        """Take back every unfinished job in the journal; report honestly those the backend lost."""
        for job, ref in self.journal.unfinished():
            change = await self.backend.recover(job, ref)
            if change is not None:
                self._on_change(change)
        await self.backend.start()
        self.capacity.notify()

    async def close(self) -> None:
        await self.backend.close()
        self.journal.close()

    # -- jobs ------------------------------------------------------------------------------------

    async def forward(self, who: Identity, key: str, job: Job) -> tuple[Job, bool]:
        """Accept a job from antenna `who`. The same key returns the first job and starts nothing."""
        if not key or len(key) > MAX_KEY_LEN:
            raise InvalidArgument(f"the idempotency key must be 1 to {MAX_KEY_LEN} characters")
        if not JOB_ID.fullmatch(job.id) or not job.id.startswith(f"{who.site}-"):
            raise InvalidArgument(f"job id {job.id[:80]!r} is not valid: antenna {who.site} names its jobs "
                                  f"'{who.site}-' followed by up to 64 lower-case letters and digits")
        scoped_key = f"{who.site}/{key}"
        existing = self.journal.by_key(scoped_key)
        if existing is not None:
            return existing, True
        try:
            owner = parse_identity(job.owner)
        except ValueError as exc:
            raise InvalidArgument(f"the job's owner is not a federation identity: {exc}") from None
        if owner.role is not Role.USER or owner.site != who.site or owner.federation != who.federation:
            raise PermissionDenied(f"antenna {who.site!r} may only forward jobs of its own users, not {job.owner}")
        job.spec.validate()
        partition = await self._place(job)
        now = time.time()
        # The hub's history starts when it accepts the job; the antenna keeps what came before.
        accepted = Job(id=job.id, spec=job.spec, state=JobState.PENDING, owner=job.owner, antenna=who.site,
                       site=self.config.site, partition=partition.name, created_at=now, updated_at=now,
                       ).moved(JobState.FORWARDED, f"accepted by hub {self.config.site}", at=now)
        accepted = accepted.moved(JobState.QUEUED, f"queued in partition {partition.name}", at=now)
        if self.journal.get(job.id) is not None:
            raise AlreadyExists(f"job {job.id} exists here under another idempotency key")
        stored, created = self.journal.insert(accepted, scoped_key)
        if not created:
            return stored, True
        log.info("accepted job %s from %s for partition %s", job.id, who.site, partition.name)
        await self.backend.submit(stored)
        self.capacity.notify()
        return self.journal.get(job.id) or stored, False

    async def _place(self, job: Job) -> PartitionConfig:
        spec, parts = job.spec, self.config.partitions
        modes = self.config.access_modes
        if spec.access_mode and modes and spec.access_mode not in modes:
            raise FailedPrecondition(f"site {self.config.site} does not accept access mode {spec.access_mode.slug}; "
                                     "it accepts " + ", ".join(m.slug for m in modes))
        if spec.cpus > self.config.cpu_slots:
            raise FailedPrecondition(f"the job asks for {spec.cpus} CPUs; site {self.config.site} runs jobs of at "
                                     f"most {self.config.cpu_slots} CPUs")
        if spec.partition:
            part = next((p for p in parts if p.name == spec.partition), None)
            if part is None:
                raise NotFound(f"site {self.config.site} has no partition {spec.partition!r}; it has: "
                               + ", ".join(p.name for p in parts))
            _check_fits(spec.gpus, spec.walltime_s, part)
            return part
        fitting = [p for p in parts if p.gpus >= spec.gpus and p.max_walltime_s >= spec.walltime_s]
        if not fitting:
            most = max(p.gpus for p in parts)
            longest = max(p.max_walltime_s for p in parts)
            raise FailedPrecondition(
                f"no partition of site {self.config.site} fits {spec.gpus} GPUs for "
                f"{format_duration(spec.walltime_s)}: the most GPUs is {most}, the longest walltime "
                f"{format_duration(longest)}")
        waits = [await self.backend.estimate_wait(p.name, spec.gpus, spec.walltime_s) for p in fitting]
        return min(zip(waits, fitting), key=lambda wp: (wp[0], wp[1].gpus, wp[1].name))[1]

    def get(self, who: Identity, job_id: str) -> Job:
        """The job, if `who` may see it. Others' jobs are NOT_FOUND: their existence is not disclosed."""
        job = self.journal.get(job_id)
        if job is None or (who.role is Role.ANTENNA and job.antenna != who.site):
            raise NotFound(f"no job {job_id!r} at site {self.config.site}")
        return job

    async def cancel(self, who: Identity, job_id: str) -> Job:
        if self.journal.get(job_id) is None and who.role is Role.ANTENNA and JOB_ID.fullmatch(job_id) \
                and job_id.startswith(f"{who.site}-"):
            # Cancelled before it arrived (its forward may still be on the way): keep the cancel, so that the
            # forward, which carries the same idempotency key, finds the job already CANCELLED and never runs it.
            now = time.time()
            tombstone = Job(id=job_id, spec=JobSpec(argv=("true",)), state=JobState.PENDING, antenna=who.site,
                            site=self.config.site, created_at=now, updated_at=now).moved(
                JobState.CANCELLED, "cancelled before the job reached this hub", at=now)
            stored, _ = self.journal.insert(tombstone, f"{who.site}/{job_id}")
            return stored
        job = self.get(who, job_id)
        if job.final:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state.name}); nothing to cancel")
        if not await self.backend.cancel(job_id):
            self._on_change(Change(job_id, JobState.CANCELLED, reason="cancelled"))
        return self.journal.get(job_id) or job

    def _on_change(self, change: Change) -> None:
        job = self.journal.get(change.job_id)
        if job is None or job.final:
            return
        changes = {}
        if change.exit_code is not None:
            changes["exit_code"] = change.exit_code
        job = job.moved(change.state, change.reason, **changes)
        self.journal.update(job, backend_ref=change.ref)
        log.info("job %s is %s%s", job.id, job.state.name, f" ({job.reason})" if job.reason else "")
        self.jobs.publish(job.id, job)
        self.capacity.notify()

    # -- adverts ---------------------------------------------------------------------------------

    async def estimates(self, gpus: int, walltime_s: int, partition: str = "") -> list[tuple[str, float]]:
        """(partition, seconds to wait) for each partition that fits the shape."""
        out = []
        for p in self.config.partitions:
            if (partition and p.name != partition) or p.gpus < gpus or p.max_walltime_s < walltime_s:
                continue
            wait = await self.backend.estimate_wait(p.name, gpus, walltime_s)
            if math.isfinite(wait):
                out.append((p.name, wait))
        return out


def make_backend(config: HubConfig, on_change) -> Backend:
    """The backend the hub's config names."""
    workdir = config.state_dir / "jobs"
    if config.backend == "slurm":
        from hub.commands import CommandRunner
        from hub.slurm import SlurmBackend
        env = {"SLURM_CONF": str(config.slurm_conf)} if config.slurm_conf else {}
        return SlurmBackend(config.partitions, on_change, workdir, CommandRunner(env, config.command_timeout_s),
                            accounts=config.accounts, poll_s=config.poll_interval_s,
                            capacity_s=config.capacity_interval_s)
    return LocalBackend(config.partitions, on_change, workdir, cpu_slots=config.cpu_slots,
                        kill_grace_s=config.kill_grace_s)


def _check_fits(gpus: int, walltime_s: int, part: PartitionConfig) -> None:
    if gpus > part.gpus:
        raise FailedPrecondition(f"the job asks for {gpus} GPUs; partition {part.name} has {part.gpus}")
    if walltime_s > part.max_walltime_s:
        raise FailedPrecondition(
            f"walltime {format_duration(walltime_s)} exceeds partition {part.name}'s maximum of "
            f"{format_duration(part.max_walltime_s)}")
