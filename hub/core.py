"""The hub's core: accepts forwarded jobs, journals them, drives the backend, computes adverts."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import shutil
import re
import time
from pathlib import Path

from federation import __version__
from federation.audit import AuditLog
from federation.blobs import BlobStore
from federation.config import HubConfig, PartitionConfig
from federation.errors import (AifedError, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                               PermissionDenied, Unavailable)
from federation.identity import Identity, Role, parse_identity
from federation.journal import Journal, Tx, purge_forever
from federation.limits import SubmitLimiter
from federation.metrics import Metrics, register_journal_gauges
from federation.model import Job, JobSpec, JobState, Transition
from federation.rpc import peer
from federation.timefmt import format_duration
from federation.watch import Signal, Topics, bounded, every
from hub.backend import Backend, Change
from hub.local import LocalBackend
from hub.outputs import Outputs
from hub.quota import AntennaUsage, Quotas, consumption
from hub.usermap import UserMap

log = logging.getLogger(__name__)

MAX_KEY_LEN = 200
DRAIN_META = "drain"
MAX_USAGE_DAYS = 3660
MAX_BATCH = 5000
MAX_HISTORY = 32       # transitions a job handed over by a peer hub brings along
MAX_ALTERNATIVES = 64  # hubs an antenna may allow a job to be moved to
SWEEP_EVERY_S = 600.0  # how often data past its retention is looked for
LOGS = ("stdout", "stderr")  # what of a finished job's folder is kept as long as its record
SETTLE_LIMIT_S = 10.0  # at a stop, the wait for the last job changes to be journaled
# Job ids name folders: only `<antenna>-<token>`, lower-case letters, digits and dashes, never a path.
JOB_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}[a-z0-9]-[a-z0-9]{1,64}")


class HubCore:
    """Everything a hub knows and does, independent of gRPC."""

    def __init__(self, config: HubConfig):
        self.config = config
        self.changes = Signal()  # the journal committed something: WatchChanges streams wake up
        self.journal = Journal(config.state_dir / "hub.sqlite", on_commit=self.changes.notify)
        self.backend: Backend = make_backend(config, self._on_change)
        self.backend.on_changes = self._on_changes
        self.blobs = BlobStore(config.state_dir / "blobs",  # input files antennas staged here, by SHA-256
                               reserve_bytes=config.min_free_disk_mb * 1_000_000,
                               quota_bytes=config.data.quota_mb * 1_000_000, retention_s=config.data.retention_s)
        # What jobs left behind, collected when they end
        self.outputs = Outputs(config.state_dir / "outputs", max_bytes=config.data.max_output_mb * 1_000_000,
                               retention_s=config.data.outputs_retention_s,
                               quota_bytes=config.data.outputs_quota_mb * 1_000_000)
        self._collecting: dict[str, asyncio.Task] = {}
        self.backend.stage_inputs = lambda job, folder: self.blobs.stage(job.spec.inputs, folder)
        self.jobs: Topics[Job] = Topics()
        self.capacity = Signal()
        self.metrics = Metrics("hub", config.site, __version__)
        self.audit = AuditLog(config.audit_log or config.state_dir / "audit.jsonl", peer=peer,
                              on_drop=self.metrics.dropped.labels("audit").inc)
        self.limiter = SubmitLimiter(config.limits.submit_rate, config.limits.submit_burst)
        self.user_map = UserMap(config.user_map, config.site) if config.user_map else None
        self.quotas = Quotas(config.mode_limits, config.site)  # GPU-hours per project and period, per mode
        if self.quotas:
            self.jobs.taps.append(lambda _, job: self.quotas.observe(job))
        self.jobs.taps.append(lambda _, job: self._collect_when_ended(job))
        self.drain_reason = self.journal.meta(DRAIN_META)  # non-empty: draining; kept across restarts
        self._register_gauges()
        self._purger: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._changes: list[Change] = []  # reported by the backend, not yet journaled
        # Jobs of forwarded batches on their way to the backend (by batches holding each), and those of them
        # cancelled meanwhile: never submitted.
        self._handing_over: collections.Counter[str] = collections.Counter()
        self._cancelled_on_the_way: set[str] = set()
        self._flusher: asyncio.Task | None = None
        self.balancer = None  # hub.balance.Balancer, when the daemon starts one

    def _register_gauges(self) -> None:
        m, backend = self.metrics, self.backend
        register_journal_gauges(m, self.journal, self.config.tls)
        m.gauge("aifed_backend_up", "1 if the hub can reach its scheduler (Slurm) now", (),
                lambda: [((), float(backend.health().ok))])
        m.gauge("aifed_draining", "1 while the site is drained (takes no new jobs)", (),
                lambda: [((), float(self.draining))])
        m.gauge("aifed_gpus", "GPUs per partition, total and free", ("partition", "kind"),
                lambda: [((u.name, kind), float(getattr(u, f"gpus_{kind}"))) for u in backend.usage()
                         for kind in ("total", "free")])
        m.gauge("aifed_partition_jobs", "jobs per partition at the scheduler, running and pending",
                ("partition", "kind"),
                lambda: [((u.name, kind), float(getattr(u, f"{kind}_jobs"))) for u in backend.usage()
                         for kind in ("running", "pending")])

    async def recover(self) -> None:
        """Take back every unfinished job in the journal; report honestly those the backend lost."""
        if self.quotas:
            self._count_quotas()
        for job, ref in self.journal.unfinished():
            if job.state is JobState.MOVING:  # withdrawn from the scheduler; its hand-off is settled by the balancer
                self.backend.adopt_withdrawn(job, ref)
                continue
            change = await self.backend.recover(job, ref)
            if change is not None:
                self._on_change(change)
        await self.backend.start()
        for job_id in self.outputs.pending():  # outputs a crash left uncollected (or jobs never stored)
            job = self.journal.get(job_id)
            if job is None:
                self.outputs.forget(job_id)
            else:
                self._collect_when_ended(job)
        self.capacity.notify()
        self._purger = asyncio.create_task(purge_forever(self.journal, self.config.retention_s), name="purge")
        self._sweeper = asyncio.create_task(every(SWEEP_EVERY_S, self.sweep_data, "deleting data past its retention"),
                                            name="sweep data")

    async def sweep_data(self, now: float | None = None) -> dict[str, int]:
        """Delete what retention lets go ([data] in the configuration, docs/data.md): staged inputs no
        unfinished job needs, unused for `retention`; collected outputs `outputs_retention` after their job
        ended; a finished job's working folder, all but its logs, `retention` after it ended; and the whole
        folder (logs too) once the job's record is gone. Returns what was deleted, by kind."""
        now = time.time() if now is None else now
        data = self.config.data

        def in_use() -> set[str]:
            return {f.sha256 for job, _ in self.journal.unfinished() for f in job.spec.inputs}

        swept = {"blobs": 0, "outputs": 0, "trimmed": 0, "folders": 0}
        labels = {"blobs": "inputs", "outputs": "outputs", "trimmed": "working_files", "folders": "folders"}

        def count(kind: str, n: int = 1) -> None:
            swept[kind] += n
            self.metrics.deleted.labels(labels[kind]).inc(n)

        count("blobs", (await self.blobs.sweep(data.retention_s, in_use, now))[0])
        pending = set(self.outputs.pending())
        for job_id in await asyncio.to_thread(self.outputs.collected):
            job = self.journal.get(job_id)
            if job_id in self._collecting or job_id in pending:
                continue
            try:  # counted from when they were collected, which may be later than the job's end
                collected = max(job.updated_at if job else 0.0, self.outputs.collected_at(job_id))
                if job is None or job.final and collected < now - data.outputs_retention_s:
                    await asyncio.to_thread(self.outputs.forget, job_id)
                    count("outputs")
            except OSError as exc:  # one job's files in the way do not stop the others
                log.warning("retention: the outputs of job %s: %s", job_id, exc)
        for folder in await asyncio.to_thread(lambda: sorted(self.backend.workdir.iterdir())):
            if not JOB_ID.fullmatch(folder.name) or folder.name in self._collecting or folder.name in pending:
                continue
            job = self.journal.get(folder.name)
            try:
                if job is None:  # its record expired (or it was never stored): nothing of it is served any more
                    if folder.stat().st_mtime < now - data.retention_s:
                        await asyncio.to_thread(shutil.rmtree, folder)
                        count("folders")
                elif job.final and job.updated_at < now - data.retention_s:
                    count("trimmed", await asyncio.to_thread(_keep_logs_only, folder))
            except OSError as exc:
                log.warning("retention: the folder of job %s: %s", folder.name, exc)
        if swept["outputs"] or swept["trimmed"] or swept["folders"]:
            log.info("retention: deleted the outputs of %d job(s), the working files of %d and the folders of %d",
                     swept["outputs"], swept["trimmed"], swept["folders"])
        return swept

    def _count_quotas(self) -> None:
        """Count the GPU-hours per project and period again from the journal (only jobs that can matter)."""
        self.quotas.rebuild(self.journal.list(limit=2**62, since=time.time() - self.quotas.longest_s))

    def _collect_when_ended(self, job: Job) -> None:
        if job.final and job.spec.outputs and job.id not in self._collecting and job.state is not JobState.MOVED:
            self._collecting[job.id] = asyncio.get_running_loop().create_task(self._collect(job),
                                                                              name=f"outputs {job.id}")

    async def _collect(self, job: Job) -> None:
        try:
            manifest = await asyncio.to_thread(self.outputs.collect, job, self.backend.folder(job.id))
            log.info("job %s: collected %d output file(s)%s", job.id, len(manifest["files"]),
                     f"; {manifest['error']}" if manifest["error"] else "")
        except Exception:  # noqa: BLE001 - left pending: collected again at the next start
            log.exception("job %s: collecting its outputs failed", job.id)
        finally:
            self._collecting.pop(job.id, None)

    def moving_jobs(self) -> bool:
        """Whether a hand-off to a peer hub was left without an answer (a balancer must settle it)."""
        return bool(self.journal.list(states=(JobState.MOVING,), limit=1))

    async def close(self) -> None:
        if self.balancer is not None:
            await self.balancer.close()
        await bounded(self.settle(), SETTLE_LIMIT_S, "journaling the last job changes")
        if self._collecting:  # copies under way finish (a copy cut short is made again at the next start)
            await bounded(asyncio.gather(*self._collecting.values(), return_exceptions=True), SETTLE_LIMIT_S,
                          "collecting jobs' outputs")
        for task in (self._purger, self._sweeper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.backend.close()
        self.journal.close()
        self.audit.close()
        self.metrics.close()

    # -- jobs ------------------------------------------------------------------------------------

    async def forward(self, who: Identity, key: str, job: Job) -> tuple[Job, bool]:
        """Accept a job from antenna `who`. The same key returns the first job and starts nothing."""
        job_or_error, duplicate = (await self.forward_many(who, [(key, job)]))[0]
        if isinstance(job_or_error, AifedError):
            raise job_or_error
        return job_or_error, duplicate

    async def forward_many(self, who: Identity, requests: list[tuple[str, Job]], hand_off: bool = False
                           ) -> list[tuple[Job | AifedError, bool]]:
        """Accept jobs from antenna `who`, journaled in one group commit before any is acknowledged.

        One (job, duplicate) or (refusal, False) per request, in order. A key seen before returns the job it
        created, and nothing is started again: not after a retry, not after a crash of either side.

        `hand_off`: `who` is a peer hub handing over jobs of other antennas' users that it withdrew from its own
        queue (load balancing). Each is accepted under its antenna's name and key, as if that antenna had
        forwarded it here (so one job can never be here twice), if the antenna allowed this hub for it.
        """
        if len(requests) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} jobs per batch, not {len(requests)}")
        prepared: list[tuple[str, Job] | AifedError] = []
        partitions: dict[tuple, PartitionConfig] = {}  # one placement per job shape in a batch
        scope = [job.antenna if hand_off else who.site for _, job in requests]
        seen = self.journal.known_keys([f"{antenna}/{key}" for antenna, (key, _) in zip(scope, requests)])
        try:
            self.limiter.take(who.uri, sum(f"{antenna}/{key}" not in seen
                                           for antenna, (key, _) in zip(scope, requests)))
        except AifedError as exc:
            self.audit.record("rejected", who=who.uri, jobs=len(requests), reason=exc.message)
            raise
        if self.user_map is not None:
            self.user_map.refresh()
        if reason := self.drain_now():
            # Refused per job with UNAVAILABLE: the antenna places these jobs on another hub (a retry of a job
            # accepted before the drain is still answered as a duplicate).
            draining = Unavailable(f"site {self.config.site} is draining ({reason}) and takes no new jobs now")
            return [(self.journal.by_key(f"{antenna}/{key}"), True) if f"{antenna}/{key}" in seen
                    else (draining, False) for antenna, (key, _) in zip(scope, requests)]
        for antenna, (key, job) in zip(scope, requests):
            try:
                if hand_off:
                    self._check_hand_off(who, job)
                prepared.append(await self._accept(who, key, job, partitions, seen, antenna,
                                                   who.site if hand_off else ""))
            except AifedError as exc:
                prepared.append(exc)

        accepted_keys = [item[0] for item in prepared if not isinstance(item, AifedError)]
        accepted_ids = [item[1].id for item in prepared if not isinstance(item, AifedError)]

        def store(tx: Tx) -> list[tuple[Job | AifedError, bool]]:
            out: list[tuple[Job | AifedError, bool]] = []
            admitted: list[str] = []
            # The batch's keys and ids looked up together; each job stored adds its own, so that a key or an id
            # that comes twice in one batch is a replay or a conflict, as if it had come in two batches.
            keys, ids = tx.taken(accepted_keys, accepted_ids)
            try:
                for item in prepared:
                    if isinstance(item, AifedError):
                        out.append((item, False))
                        continue
                    scoped_key, accepted = item
                    if scoped_key in keys and (first := tx.by_key(scoped_key)) is not None:
                        out.append(_replayed(first, accepted, scoped_key))
                    elif accepted.id in ids:
                        out.append((AlreadyExists(f"job {accepted.id} exists here under another idempotency key"),
                                    False))
                    elif self.quotas and (over := self.quotas.admit(accepted)) is not None:
                        out.append((over, False))
                    else:
                        admitted.append(accepted.id)
                        tx.insert(accepted, scoped_key, checked=True)
                        keys.add(scoped_key)
                        ids.add(accepted.id)
                        out.append((accepted, False))
            except BaseException:
                self.quotas.forget(admitted)  # this batch's changes are undone
                raise
            return out

        # Committing and handing over run to the end even if the caller goes away (a timeout, a killed antenna):
        # a job journaled here must reach the backend, since the antenna's retry is answered as a duplicate.
        return await asyncio.shield(self._store_and_hand_over(who, store, accepted_ids))

    @property
    def draining(self) -> bool:
        return bool(self.drain_now())

    def drain_now(self, now: float | None = None) -> str:
        """Why the site takes no new jobs now: an operator's drain, a maintenance window, or a disk too full to
        hold more jobs' data; "" if it does."""
        if self.drain_reason:
            return self.drain_reason
        if short := self.short_of_disk():
            return short
        now = time.time() if now is None else now
        for window in self.config.maintenance:
            if window.start <= now < window.end:
                until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(window.end))
                return f"maintenance until {until}" + (f": {window.reason}" if window.reason else "")
        return ""

    def short_of_disk(self) -> str:
        """Why the state folder's disk cannot take more jobs' inputs, outputs and logs now; "" if it can. The hub
        says so in its advert (as a drain) and refuses new jobs, rather than failing them later."""
        try:
            free = shutil.disk_usage(self.config.state_dir).free
        except OSError as exc:
            return f"its state folder cannot be read ({exc.strerror})"
        keep = self.config.min_free_disk_mb * 1_000_000
        if free < keep:
            return (f"its disk is nearly full ({free / 1e6:.0f} MB free in its state folder; it keeps "
                    f"{self.config.min_free_disk_mb} MB free)")
        return ""

    def maintenance_ahead(self, now: float | None = None) -> list:
        """Announced windows not yet over."""
        now = time.time() if now is None else now
        return [w for w in self.config.maintenance if w.end > now]

    def set_drain(self, who: Identity, drain: bool, reason: str = "") -> None:
        """Stop or resume taking new jobs; journaled, so a restarted hub keeps draining."""
        if len(reason) > 500:
            raise InvalidArgument("the drain reason is longer than 500 characters")
        value = (reason.strip() or f"drained by {who.name or who.site}") if drain else ""
        self.journal.write(lambda tx: tx.set_meta(DRAIN_META, value))
        was, self.drain_reason = self.drain_reason, value
        if bool(was) != drain:
            log.warning("site %s %s by %s%s", self.config.site, "draining" if drain else "resumed", who.uri,
                        f": {value}" if drain else "")
        self.capacity.notify()  # antennas learn it from the next advert

    async def _store_and_hand_over(self, who: Identity, store, ids: list[str]) -> list[tuple[Job | AifedError, bool]]:
        # From before the commit until the backend has each job: a cancel that comes meanwhile is noted, and the
        # hand-over skips the job (counted per batch: a resent job may be in two batches at once).
        self._handing_over.update(ids)
        try:
            return await self._commit_and_hand_over(who, store)
        finally:
            self._handing_over.subtract(ids)
            for job_id in ids:
                if self._handing_over[job_id] <= 0:
                    del self._handing_over[job_id]
                    self._cancelled_on_the_way.discard(job_id)

    async def _commit_and_hand_over(self, who: Identity, store) -> list[tuple[Job | AifedError, bool]]:
        try:
            results = await self.journal.commit(store)
        except BaseException:
            if self.quotas:  # the transaction failed: what it charged is void
                self._count_quotas()
            raise
        created = [job for job, duplicate in results if isinstance(job, Job) and not duplicate]
        for job, duplicate in results:
            if isinstance(job, AifedError):
                self.audit.record("rejected", who=who.uri, reason=job.message)
            elif not duplicate:
                self.audit.record("accepted", who=who.uri, owner=job.owner, job=job.id, partition=job.partition,
                                  account=job.account, **({"moved_from": job.moved_from} if job.moved_from else {}))
        # Look again just before each job goes out: a cancel that came while earlier jobs were handed over has
        # ended it (`cancel` notes it, with no journal read per job).
        await self.backend.submit_many(created, lambda job: job.id not in self._cancelled_on_the_way)
        if created:
            log.info("accepted %d job(s) from %s", len(created), who.site)
            for job in created:
                self.jobs.publish(job.id, job)
            self.capacity.notify()
        return results

    def _check_hand_off(self, who: Identity, job: Job) -> None:
        """What a job handed over by peer hub `who` must be: allowed here by its antenna, moved once at most."""
        if who.site == self.config.site:
            raise InvalidArgument(f"hub {who.site} cannot hand a job to itself")
        if job.moved_from:
            raise FailedPrecondition(f"job {job.id} was already moved once (from {job.moved_from}); a job moves "
                                     "one hop at most")
        if self.config.site not in job.alternatives:
            raise PermissionDenied(f"antenna {job.antenna or '?'} did not allow job {job.id} to be moved to site "
                                   f"{self.config.site} (it allows: {', '.join(job.alternatives) or 'none'})")

    async def _accept(self, who: Identity, key: str, job: Job, partitions: dict[tuple, PartitionConfig],
                      seen: set[str], antenna: str = "", moved_from: str = "") -> tuple[str, Job]:
        """Check one forwarded job and choose its partition: (scoped key, the job as this hub accepts it).
        `antenna`: whose job it is (default: the caller's); `moved_from`: the peer hub that handed it over."""
        antenna = antenna or who.site
        if not key or len(key) > MAX_KEY_LEN:
            raise InvalidArgument(f"the idempotency key must be 1 to {MAX_KEY_LEN} characters")
        if not JOB_ID.fullmatch(job.id) or not names_of(antenna, job.id):
            raise InvalidArgument(f"job id {job.id[:80]!r} is not valid: antenna {antenna} names its jobs "
                                  f"'{antenna}-' followed by up to 64 lower-case letters and digits")
        scoped_key = f"{antenna}/{key}"
        if len(job.alternatives) > MAX_ALTERNATIVES or any(not 0 < len(a) <= 100 for a in job.alternatives):
            raise InvalidArgument(f"a job may name at most {MAX_ALTERNATIVES} alternative hubs, each a site name")
        if scoped_key in seen:
            return scoped_key, job  # a retry: the store step returns the first job
        try:
            owner = parse_identity(job.owner)
        except ValueError as exc:
            raise InvalidArgument(f"the job's owner is not a federation identity: {exc}") from None
        if owner.role is not Role.USER or owner.site != antenna or owner.federation != who.federation:
            raise PermissionDenied(f"antenna {antenna!r} may only forward jobs of its own users, not {job.owner}")
        if self.config.countries and job.country not in self.config.countries:
            raise PermissionDenied(f"site {self.config.site} serves users from {', '.join(self.config.countries)} "
                                   f"only; this job is from {job.country or 'no declared country'} "
                                   f"(as antenna {antenna} vouches)")
        account = self.user_map.account(antenna, owner.name, job.spec.project) if self.user_map else ""
        job.spec.validate()
        if job.spec.outputs:
            self.outputs.expect(job.id)  # collected when it ends (a job that is not stored is forgotten at start)
        for f in job.spec.inputs:
            if not f.allows(self.config.site, self.config.location):
                raise FailedPrecondition(f"input {f.name!r} of job {job.id} must stay in {', '.join(f.residency)} "
                                         f"(data residency); hub {self.config.site} is in "
                                         f"{self.config.location or 'no declared country (hub.location)'}")
        sender = f"hub/{moved_from}" if moved_from else antenna  # who sent the inputs (service.blob_owner)
        if missing := self.blobs.missing(sender, job.spec.inputs):
            raise FailedPrecondition(f"input {missing[0].name!r} (sha256 {missing[0].sha256[:12]}...) of job "
                                     f"{job.id} was not staged at hub {self.config.site} by "
                                     f"{'hub ' + moved_from if moved_from else 'antenna ' + antenna}: the sender "
                                     "of a job sends its inputs (PutBlob) before the job")
        now = time.time()
        for window in self.config.maintenance:
            if window.overlaps(now, now + job.spec.walltime_s):
                raise Unavailable(  # per job: the antenna places it elsewhere, or waits for the window to pass
                    f"its walltime would run into maintenance at site {self.config.site} from "
                    f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(window.start))} to "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(window.end))}"
                    + (f" ({window.reason})" if window.reason else ""))
        s = job.spec
        shape = (s.partition, s.gpus, s.cpus, s.walltime_s, s.access_mode, s.sector_required and s.sector)
        partition = partitions.get(shape) or await self._place(job)
        partitions[shape] = partition
        now = time.time()
        # The hub's history starts when it accepts the job; the antenna keeps what came before. A job handed over
        # by a peer keeps the history it had there, so that its owner sees where it waited.
        # It is journaled QUEUED, having passed through FORWARDED (two transitions, one journal write).
        history = tuple(job.history[-MAX_HISTORY:]) if moved_from else ()
        queued = f"queued in partition {partition.name}"
        return scoped_key, Job(
            id=job.id, spec=job.spec, state=JobState.QUEUED, owner=job.owner, antenna=antenna, site=self.config.site,
            partition=partition.name, reason=queued, created_at=now, updated_at=now, account=account,
            country=job.country, moved_from=moved_from, alternatives=() if moved_from else job.alternatives,
            history=(*history, Transition(JobState.FORWARDED, now, f"moved here from hub {moved_from}"
                                          if moved_from else f"accepted by hub {self.config.site}"),
                     Transition(JobState.QUEUED, now, queued)))

    async def _place(self, job: Job) -> PartitionConfig:
        spec, parts = job.spec, self.config.partitions
        modes = self.config.access_modes
        if spec.access_mode and modes and spec.access_mode not in modes:
            raise FailedPrecondition(f"site {self.config.site} does not accept access mode {spec.access_mode.slug}; "
                                     "it accepts " + ", ".join(m.slug for m in modes))
        if spec.sector_required and spec.sector not in self.config.sectors:
            raise FailedPrecondition(f"site {self.config.site} does not specialise in sector {spec.sector}; its "
                                     "sectors: " + (", ".join(self.config.sectors) or "none"))
        for limits in self.config.mode_limits:
            if limits.mode is spec.access_mode and (why := limits.why_not(spec.gpus, spec.walltime_s)):
                raise FailedPrecondition(f"site {self.config.site} {why}")
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

    async def usage(self, who: Identity, days: int) -> tuple[float, list[AntennaUsage]]:
        """GPU-hours consumed here per antenna, project and mode by jobs accepted in the last `days` days (from
        when, and the rows): an antenna sees its own, this site's operators every antenna's."""
        if not 0 < days <= MAX_USAGE_DAYS:
            raise InvalidArgument(f"days must be between 1 and {MAX_USAGE_DAYS}, not {days}")
        since = time.time() - days * 86400
        antenna = who.site if who.role is Role.ANTENNA else None
        jobs = await asyncio.to_thread(self.journal.list, since=since, antenna=antenna, limit=2**62)
        return since, consumption(jobs)

    def get(self, who: Identity, job_id: str) -> Job:
        """The job, if `who` may see it. Others' jobs are NOT_FOUND: their existence is not disclosed."""
        job = self.journal.get(job_id)
        if job is None or (who.role is Role.ANTENNA and job.antenna != who.site) or \
                (who.role is Role.HUB and job.moved_from != who.site):  # a peer: only the jobs it handed here
            raise NotFound(f"no job {job_id[:100]!r} at site {self.config.site}")
        return job

    async def cancel(self, who: Identity, job_id: str) -> Job:
        if self.journal.get(job_id) is None and who.role is Role.ANTENNA and JOB_ID.fullmatch(job_id) \
                and names_of(who.site, job_id):
            # Cancelled before it arrived (its forward may still be on the way): keep the cancel, so that the
            # forward, which carries the same idempotency key, finds the job already CANCELLED and never runs it.
            now = time.time()
            tombstone = Job(id=job_id, spec=JobSpec(argv=("true",)), state=JobState.PENDING, antenna=who.site,
                            site=self.config.site, created_at=now, updated_at=now).moved(
                JobState.CANCELLED, "cancelled before the job reached this hub", at=now)
            stored, _ = self.journal.insert(tombstone, f"{who.site}/{job_id}")
            if stored.final:
                self.audit.record("cancelled", who=who.uri, job=job_id, reason="before the job reached this hub")
                return stored
            # The forward won the race after all: cancel the job it created.
            return await self.cancel(who, job_id)
        job = self.get(who, job_id)
        if job.state in (JobState.MOVING, JobState.MOVED) and self.balancer is not None:
            return await self.balancer.cancel(who, job)  # here, or at the peer that has it now
        if job.final:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state.name}); nothing to cancel")
        self.audit.record("cancelled", who=who.uri, owner=job.owner, job=job_id)
        if not await self.backend.cancel(job_id):
            # Not at the backend (yet): a hand-over in progress skips the job.
            if job_id in self._handing_over:
                self._cancelled_on_the_way.add(job_id)
            self._commit_now(Change(job_id, JobState.CANCELLED, reason="cancelled"))
        await self.settle()
        return self.journal.get(job_id) or job

    def _on_change(self, change: Change) -> None:
        """Journal a change the backend reports. One that carries a new backend reference (a pid, a Slurm id)
        is committed before this returns, with any changes still waiting: recovery after a crash needs it. The
        others (state changes the backend can tell again after a restart: exit files, Slurm's own records) are
        gathered and committed together a moment later, in order."""
        if change.ref is not None:
            self._commit_now(change)
            return
        self._changes.append(change)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_changes(), name="hub changes")

    def _on_changes(self, changes: list[Change]) -> None:
        """Several changes at once: those with new backend references (the Slurm ids of an array's jobs) are
        committed together, in one transaction, before this returns."""
        if any(change.ref is not None for change in changes):
            self._commit_now(*changes)
        else:
            for change in changes:
                self._on_change(change)

    def _commit_now(self, *changes: Change) -> None:
        self._changes.extend(changes)
        self._publish(self.journal.write(self._apply_changes(self._take_changes())))

    async def settle(self) -> None:
        """Until every change reported so far is journaled."""
        while self._changes or (self._flusher is not None and not self._flusher.done()):
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.get_running_loop().create_task(self._flush_changes(), name="hub changes")
            await asyncio.shield(self._flusher)

    async def _flush_changes(self) -> None:
        while self._changes:
            self._publish(await self.journal.commit(self._apply_changes(self._take_changes())))

    def _take_changes(self) -> list[Change]:
        changes, self._changes = self._changes, []
        return changes

    @staticmethod
    def _apply_changes(changes: list[Change]):
        def apply(tx: Tx) -> list[Job]:
            out = []
            for change in changes:
                job = tx.get(change.job_id)
                if job is None or job.final:
                    continue
                extra = {} if change.exit_code is None else {"exit_code": change.exit_code}
                job = job.moved(change.state, change.reason, **extra)
                tx.update(job, backend_ref=change.ref)
                out.append(job)
            return out
        return apply

    def _publish(self, jobs: list[Job]) -> None:
        for job in jobs:
            log.info("job %s is %s%s", job.id, job.state.name, f" ({job.reason})" if job.reason else "")
            self.jobs.publish(job.id, job)
        if jobs:
            self.capacity.notify()

    # -- adverts ---------------------------------------------------------------------------------

    def summary(self) -> dict:
        """What this hub tells the federation's membership (etcd) and event stream (MQTT) about itself: a
        summary for listing and watching. Placement asks the hub itself for live adverts and estimates."""
        cfg, usage = self.config, self.backend.usage()
        models = {p.name: p.gpu_model for p in cfg.partitions}
        return {
            "gpus_total": sum(u.gpus_total for u in usage), "gpus_free": sum(u.gpus_free for u in usage),
            "running_jobs": sum(u.running_jobs for u in usage), "pending_jobs": sum(u.pending_jobs for u in usage),
            "partitions": [{"name": u.name, "gpu_model": models.get(u.name, ""), "gpus_total": u.gpus_total,
                            "gpus_free": u.gpus_free, "pending_jobs": u.pending_jobs} for u in usage],
            "services": list(cfg.services), "sectors": list(cfg.sectors),
            "access_modes": [m.slug for m in cfg.access_modes], "countries": list(cfg.countries),
            "draining": bool(self.drain_now()), "backend_up": self.backend.health().ok, "version": __version__,
        }

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


def names_of(antenna: str, job_id: str) -> bool:
    """Whether `job_id` is in antenna's namespace: exactly `<antenna>-<token>` (the token has no dash), so that
    antenna `a` can never claim the ids of antenna `a-b`."""
    return job_id.rpartition("-")[0] == antenna


def _replayed(first: Job, asked: Job, key: str) -> tuple[Job | AifedError, bool]:
    """A forward whose key this hub has seen: the first job as a duplicate if it is the same job, a refusal if
    the key is replayed with a different body (never silently deduplicated). A cancel that arrived before the
    job (a tombstone, no owner) stands in for it."""
    if not first.owner or (first.id, first.owner, first.spec) == (asked.id, asked.owner, asked.spec):
        return first, True
    return AlreadyExists(f"idempotency key {key.partition('/')[2][:80]!r} was used for job {first.id} with a "
                         "different body; a retry must resend the same job, a new job needs a new key"), False


def make_backend(config: HubConfig, on_change) -> Backend:
    """The backend the hub's config names."""
    workdir = config.state_dir / "jobs"
    if config.backend == "hold":
        from hub.hold import HoldBackend
        return HoldBackend(config.partitions, on_change, workdir)
    if config.backend == "slurm":
        from hub.commands import CommandRunner
        from hub.slurm import SlurmBackend
        env = {"SLURM_CONF": str(config.slurm_conf)} if config.slurm_conf else {}
        return SlurmBackend(config.partitions, on_change, workdir, CommandRunner(env, config.command_timeout_s),
                            accounts=config.accounts, poll_s=config.poll_interval_s,
                            capacity_s=config.capacity_interval_s, array_size=config.array_size)
    return LocalBackend(config.partitions, on_change, workdir, cpu_slots=config.cpu_slots,
                        kill_grace_s=config.kill_grace_s)


def _check_fits(gpus: int, walltime_s: int, part: PartitionConfig) -> None:
    if gpus > part.gpus:
        raise FailedPrecondition(f"the job asks for {gpus} GPUs; partition {part.name} has {part.gpus}")
    if walltime_s > part.max_walltime_s:
        raise FailedPrecondition(
            f"walltime {format_duration(walltime_s)} exceeds partition {part.name}'s maximum of "
            f"{format_duration(part.max_walltime_s)}")


def _keep_logs_only(folder: Path) -> int:
    """Delete everything in a finished job's folder but its logs; 1 if anything was deleted."""
    doomed = [entry for entry in folder.iterdir() if entry.name not in LOGS]
    for entry in doomed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    return int(bool(doomed))
