"""The antenna's core: accept users' jobs durably, place them, forward them, follow them to the end.

The work is done in batches, by a few long-lived tasks rather than one task per job:
- submissions are journaled by group commit (many callers, one transaction, each answered once it is on disk);
- the placer chooses a hub for each accepted job, a whole batch at a time, and journals the choice before any
  forward (a restarted antenna never sends one job to two hubs);
- one forwarder per hub sends placed jobs in batches (`ForwardJobs`, the job id as idempotency key), and
  resends a batch whose outcome is unknown until the hub answers;
- one follower per hub reads the hub's change feed (`WatchChanges`) from the last position journaled here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import grpc

from federation import __version__, convert
from federation.config import AntennaConfig, HubEndpoint
from federation.audit import AuditLog
from federation.blobs import BlobStore, send
from federation.errors import (AifedError, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                              ResourceExhausted, Unavailable)
from federation.ids import job_token
from federation.identity import Identity, Role
from federation.journal import Journal, Tx, job_from_record, purge_forever
from federation.crl import Revocations
from federation.discovery import Change, ChangeKind, Member, make_discovery
from federation.limits import SubmitLimiter
from federation.metrics import Metrics, register_journal_gauges
from federation.model import FINAL_STATES, Job, JobSpec, JobState, Transition, evolve
from federation.pb import hub_pb2, jobs_pb2
from federation.rpc import peer
from federation.sbatch import parse_array
from federation.watch import Signal, Topics, every, stop_tasks, stopping
from antenna.allocations import (Allocation, AllocationUsage, Allocations, UserUsage, load as load_allocations,
                                 retention_s)
from federation.placement import Candidate, Placer, Scored, Verdict, maintenance_in_the_way, why_not
from federation.sites import HubSite

log = logging.getLogger(__name__)

# A hub that answers with one of these did not accept the job: retrying the same request cannot help.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED}
ANTENNA_STATES = (JobState.PENDING,)
HUB_STATES = tuple(s for s in JobState if s is not JobState.PENDING and s not in FINAL_STATES)
MAX_REQUEST_ID = 200
MAX_SUBMIT = 10_000       # jobs per SubmitJobs call, arrays expanded
MAX_SUBMIT_BYTES = 64 << 20  # scripts and commands per SubmitJobs call, arrays expanded
SWEEP_EVERY_S = 600.0     # how often uploads past their retention are looked for
ESTIMATE_TIMEOUT_S = 3.0
FORWARD_BATCH = 1000      # jobs per ForwardJobs call
FORWARD_BYTES = 4 << 20   # and at most this much of job specs per call (gRPC messages are limited to 16 MiB)
FORWARD_IN_FLIGHT = 2     # ForwardJobs calls in flight per hub
FORWARD_LINGER_S = 0.05   # how long a small batch waits for company before it goes
PLACE_BATCH = 2000
LINK_SAMPLE_BYTES = 8 << 20  # a transfer of at least this much measures the link to a hub
CANCEL_OWED = "cancel-owed"  # backend_ref of a job cancelled here whose hub may have it: the hub must be told


@dataclass
class Submission:
    """One entry of a submit call: a spec, the caller's optional request id, an optional array."""

    spec: JobSpec
    request_id: str = ""
    array: str = ""



def _replay_conflict(tx: Tx, item: list[tuple[Job, str | None]], pinned: bool = False) -> AifedError | None:
    """A request id seen before with a different job: refused, never silently answered with the old job.
    `pinned`: the antenna chose the job's hub for its allocation, so a retry may name another one."""
    def same(a: JobSpec, b: JobSpec) -> bool:
        return replace(a, array_job="", site=a.site if not pinned else "") == \
            replace(b, array_job="", site=b.site if not pinned else "")

    for job, key in item:
        if key is not None and (first := tx.by_key(key)) is not None and not same(first.spec, job.spec):
            return AlreadyExists(f"this request id was used for job {first.id} with a different job; a retry must "
                                 "resend the same job, a new job needs a new request id")
    return None

class AntennaCore:
    """Everything an antenna knows and does, independent of its gRPC service."""

    def __init__(self, config: AntennaConfig):
        self.config = config
        self.journal = Journal(config.state_dir / "antenna.sqlite", feed=False)  # an antenna serves no change feed
        self.blobs = BlobStore(config.state_dir / "blobs",  # users' input files, by SHA-256
                               quota_bytes=config.data.quota_mb * 1_000_000, retention_s=config.data.retention_s)
        self.sites_changed = Signal()
        self.revocations = Revocations(config.tls)  # the daemon's server shares it, and refreshes it
        self.revocations.refresh()
        self.discovery = make_discovery(config.federation, config.discovery, config.tls,
                                        [Member(h.site, h.endpoint) for h in config.hubs])
        self.sites: dict[str, HubSite] = {}  # every hub this antenna has known since it started
        self.jobs: Topics[Job] = Topics()
        # Allocations: their usage is rebuilt from the journal now (before any submission), then follows every
        # job change published.
        self.allocations = Allocations(load_allocations(config.allocations) if config.allocations else (),
                                       config.site)
        if self.allocations:
            started = time.monotonic()
            self.allocations.rebuild(self.journal.list(limit=2**62))
            log.info("allocations: %d, usage counted from the journal in %.2fs", len(self.allocations.all),
                     time.monotonic() - started)
            self.jobs.taps.append(lambda _, job: self.allocations.observe(job))
        self.placer = Placer(config.placement, config.home)
        self.metrics = Metrics("antenna", config.site, __version__)
        self.audit = AuditLog(config.audit_log or config.state_dir / "audit.jsonl", peer=peer,
                              on_drop=self.metrics.dropped.labels("audit").inc)
        self._register_gauges()
        self.limiter = SubmitLimiter(config.limits.submit_rate, config.limits.submit_burst)
        self.retry_max_s = 5.0
        self._unplaced: dict[str, None] = {}             # job ids waiting for a hub to be chosen, oldest first
        self._outbox: dict[str, dict[str, Job]] = {}  # per hub: placed, not yet acknowledged
        self._in_flight: dict[str, set[str]] = {}  # per hub: in a ForwardJobs call now
        self._wake_placer = asyncio.Event()
        self._wake_forwarder: dict[str, asyncio.Event] = {}
        self._awaiting_hub: dict[str, list[Job]] = {}  # placed on a hub not in the membership when we started
        self._tasks: list[asyncio.Task] = []
        self._cancels: dict[str, asyncio.Task] = {}
        self._link_rates: dict[str, float] = {}  # per hub: bytes/s measured by transfers of inputs (moving average)

    async def start(self) -> None:
        await self.discovery.start()
        for member in self.discovery.members().values():
            self._add_site(member)
        self.discovery.on_change(self._membership_changed)
        static = self.discovery.backend == "static"
        for job, ref in self.journal.unfinished():
            if job.site and job.site not in self.sites:
                if static:
                    self._record(job.moved(JobState.LOST,
                                           f"hub {job.site} is no longer in this antenna's configuration"))
                else:  # not registered right now: its jobs are sent or followed when it is
                    log.warning("job %s is for hub %s, which is not in the federation's membership now",
                                job.id, job.site)
                    if job.state is JobState.PENDING:
                        self._awaiting_hub.setdefault(job.site, []).append(job)
            elif job.state is JobState.PENDING:
                log.info("resuming job %s after restart", job.id)
                self._queue(job)
        for job in self.journal.with_ref(CANCEL_OWED):
            self._deliver_cancel_later(job.id)
        self._spawn(self._placer(), "placer")
        retention = retention_s(self.config.retention_s, self.allocations.all)
        if retention != self.config.retention_s:
            log.info("finished jobs are kept %d days (not %d): as long as the longest allocation lasts, so that "
                     "its charges are not forgotten", retention // 86400, self.config.retention_s // 86400)
        self._spawn(purge_forever(self.journal, retention), "purge")
        self._spawn(every(SWEEP_EVERY_S, self.sweep_data, "deleting uploads past their retention"), "sweep data")

    async def sweep_data(self, now: float | None = None) -> int:
        """Delete users' uploads unused for [data] retention that no unfinished job needs; how many went."""
        deleted, _ = await self.blobs.sweep(
            self.config.data.retention_s,
            lambda: {f.sha256 for job, _ in self.journal.unfinished() for f in job.spec.inputs}, now)
        self.metrics.deleted.labels("inputs").inc(deleted)
        return deleted

    def _add_site(self, member: Member) -> HubSite:
        """Start using a hub: follow its adverts and its change feed, forward the jobs placed on it."""
        site = HubSite(HubEndpoint(member.site, member.endpoint), self.config.tls, self.sites_changed,
                       self.revocations, self.config.federation)
        self.sites[site.site] = site
        self._outbox[site.site], self._in_flight[site.site] = {}, set()
        self._wake_forwarder[site.site] = asyncio.Event()
        site.start()
        for i in range(FORWARD_IN_FLIGHT):
            self._spawn(self._forwarder(site.site), f"forward {site.site} {i}")
        self._spawn(self._follower(site.site), f"follow {site.site}")
        for job in self._awaiting_hub.pop(site.site, []):
            self._queue(job)
        self.sites_changed.notify()
        return site

    def _membership_changed(self, change: Change) -> None:
        member, site = change.member, self.sites.get(change.member.site)
        if change.kind is ChangeKind.LEAVE:
            if site is not None:
                log.warning("hub %s left the federation: no new job is placed there until it registers again",
                            member.site)
                site.leave(f"left the federation ({self.discovery.backend} membership)")
            return
        if site is None:
            log.info("hub %s joined the federation at %s", member.site, member.endpoint)
            self._add_site(member)
            return
        if not site.member:
            log.info("hub %s is back in the federation at %s", member.site, member.endpoint)
            site.rejoin()
        if site.endpoint != member.endpoint:
            log.info("hub %s now answers at %s (was %s)", member.site, member.endpoint, site.endpoint)
            site.move(member.endpoint)
        self.sites_changed.notify()

    def _spawn(self, coro, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def close(self) -> None:
        await self.discovery.close()
        tasks = [*self._tasks, *self._cancels.values()]
        for task in tasks:
            task.cancel()
        await stop_tasks(tasks)
        for site in self.sites.values():
            await site.close()
        self.journal.close()
        self.audit.close()
        self.metrics.close()

    async def renew_channels(self) -> None:
        """This antenna's certificate was renewed: new connections to the hubs present the new one."""
        for site in self.sites.values():
            site.renew_channel(self.config.tls)
        log.info("TLS certificate renewed: new connections to %d hub(s) use it", len(self.sites))

    def _register_gauges(self) -> None:
        m, sites = self.metrics, self.sites
        register_journal_gauges(m, self.journal, self.config.tls)
        m.gauge("aifed_hub_up", "1 if the hub's advert stream is connected and its advert fresh", ("site",),
                lambda: [((s.site,), float(s.fresh)) for s in sites.values()])
        m.gauge("aifed_advert_age_seconds", "age of the last advert received from each hub", ("site",),
                lambda: [((s.site,), time.time() - s.received_at) for s in sites.values() if s.advert is not None])
        m.gauge("aifed_outbox_jobs", "jobs placed on a hub, waiting to be forwarded or acknowledged", ("site",),
                lambda: [((site,), float(len(box))) for site, box in list(self._outbox.items())])
        m.gauge("aifed_unplaced_jobs", "jobs waiting for a hub to be chosen", (),
                lambda: [((), float(len(self._unplaced)))])
        m.gauge("aifed_membership_degraded", "1 while the federation's membership may be out of date (etcd away)",
                (), lambda: [((), float(bool(self.discovery.degraded)))])
        m.gauge("aifed_hub_member", "1 while the hub is in the federation's membership", ("site",),
                lambda: [((s.site,), float(s.member)) for s in sites.values()])

    async def recheck_hubs(self) -> None:
        """A new CRL arrived: stop using any hub whose certificate it revokes."""
        await asyncio.gather(*(site.check_certificate() for site in self.sites.values()))

    # -- what users ask --------------------------------------------------------------------------

    async def submit(self, who: Identity, spec: JobSpec, request_id: str = "") -> Job:
        """Validate, check that some hub could run it, journal it PENDING (durably), then acknowledge."""
        outcome = (await self.submit_many(who, [Submission(spec, request_id)]))[0]
        if isinstance(outcome, AifedError):
            raise outcome
        return outcome[0]

    async def submit_many(self, who: Identity, entries: list[Submission]) -> list[list[Job] | AifedError]:
        """Submit many jobs in one group commit. Per entry, its jobs (an array's in index order) or why it was
        refused: a refused entry never stops the others."""
        prepared: list[list[tuple[Job, str | None]] | AifedError] = []
        charges: list[tuple[Allocation | None, bool]] = []  # per entry: the allocation it is charged to, pinned
        total = size = 0
        sites: dict[tuple, str] = {}  # the precheck's answer per job shape, within this call
        now = time.time()
        for entry in entries:
            charges.append((None, False))
            try:
                jobs, charges[-1] = self._prepare(who, entry, sites, now)
                total += len(jobs)
                size += len(jobs) * (len(entry.spec.script) + sum(map(len, entry.spec.argv)))
                if total > MAX_SUBMIT:
                    raise InvalidArgument(f"at most {MAX_SUBMIT} jobs per call, arrays counted in full")
                if size > MAX_SUBMIT_BYTES:
                    raise InvalidArgument(
                        f"this call would store more than {MAX_SUBMIT_BYTES >> 20} MiB of scripts and commands "
                        "(arrays counted in full): submit fewer tasks per call, or keep a large script in a file "
                        "the job runs")
                prepared.append(jobs)
            except AifedError as exc:
                prepared.append(exc)
        try:
            self.limiter.take(who.uri, sum(len(item) for item in prepared if not isinstance(item, AifedError)))
        except AifedError as exc:
            self.audit.record("rejected", who=who.uri, jobs=total, reason=exc.message)
            raise

        def store(tx: Tx) -> list[list[tuple[Job, bool]] | AifedError]:
            out: list[list[tuple[Job, bool]] | AifedError] = []
            reserved: list[str] = []
            try:
                for item, (allocation, pinned) in zip(prepared, charges):
                    if not isinstance(item, AifedError):
                        item = _replay_conflict(tx, item, pinned) or self._reserve(tx, item, allocation, reserved) \
                            or [tx.insert(job, key) for job, key in item]
                    out.append(item)
            except BaseException:
                self.allocations.release(reserved)  # this caller's changes are undone
                raise
            return out

        # The commit and the hand-over to the placer run to the end even if the caller goes away: a stored job
        # must be forwarded (a retry with the same request id returns it and does not queue it again).
        return await asyncio.shield(self._store_and_queue(who, store))

    def _reserve(self, tx: Tx, item: list[tuple[Job, str | None]], allocation: Allocation | None,
                 reserved: list[str]) -> AifedError | None:
        """In the transaction that stores them: reserve the new jobs' GPU-hours in their allocation, or refuse
        them all. Jobs already stored (a retry with the same request id) were counted when they were."""
        if allocation is None:
            return None
        new = [job for job, key in item if key is None or tx.by_key(key) is None]
        if not new:
            return None
        if refusal := self.allocations.reserve(allocation, new, new[0].spec):
            return refusal
        reserved += [job.id for job in new]
        return None

    async def _store_and_queue(self, who: Identity, store) -> list[list[Job] | AifedError]:
        results: list[list[Job] | AifedError] = []
        created = 0
        try:
            stored = await self.journal.commit(store)
        except BaseException:
            if self.allocations:  # the transaction failed: its reservations are void
                self.allocations.rebuild(self.journal.list(limit=2**62))
            raise
        placed: dict[str, int] = defaultdict(int)  # placed when accepted: it names its hub, or only one can take it
        for item in stored:
            if isinstance(item, AifedError):
                self.audit.record("rejected", who=who.uri, reason=item.message)
                results.append(item)
                continue
            results.append([job for job, _ in item])
            for job, new in item:
                if new:
                    created += 1
                    self.audit.record("accepted", who=who.uri, job=job.id, site=job.site)
                    self.jobs.publish(job.id, job)
                    if job.site:
                        placed[job.site] += 1
                    self._queue(job)
        for site, n in placed.items():
            self.metrics.placements.labels(site).inc(n)
        if created:
            log.info("accepted %d job(s) from %s", created, who.uri)
        return results

    def _prepare(self, who: Identity, entry: Submission, sites: dict[tuple, str], now: float
                 ) -> tuple[list[tuple[Job, str | None]], tuple[Allocation | None, bool]]:
        """The jobs (with their idempotency keys) that one entry asks for, checked; nothing stored yet. With the
        allocation they are charged to, and whether it pinned them to its hub."""
        spec, request_id = entry.spec, entry.request_id
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters")
        if spec.array_job or spec.array_task:
            raise InvalidArgument("array_job and array_task are set by the antenna; ask for an array instead")
        indices = [None]
        if entry.array:
            try:
                indices = parse_array(entry.array, MAX_SUBMIT)
            except ValueError as exc:
                raise InvalidArgument(f"array {entry.array[:80]!r}: {exc}") from None
        spec.validate()
        self._check_input_size(spec)
        self._check_uploaded(who, spec)
        self.allocations.check_member(spec, who)
        country = self.allocations.country_of(spec, who, self.config.country)
        site = self._precheck_once(spec, country, sites)  # what no hub could run is refused first, allocation or not
        charged, allocation = self.allocations.assess(spec, now, len(indices))
        pinned = charged.site != spec.site
        if pinned:
            spec = charged
            site = self._precheck_once(spec, country, sites)
        array_id = f"{self.config.site}-{job_token()}" if entry.array else ""
        jobs = []
        for index in indices:
            key = f"{who.uri}#{request_id}" if request_id else None
            task_spec = spec
            if index is not None:
                task_spec = evolve(spec, array_job=array_id, array_task=index)
                key = f"{key}#{index}" if key else None
            jobs.append((Job(id=f"{self.config.site}-{job_token()}", spec=task_spec, state=JobState.PENDING,
                             owner=who.uri, antenna=self.config.site, site=site, created_at=now, updated_at=now,
                             country=country,
                             reason=f"forwarding to {site}" if site else "waiting to be forwarded",
                             history=(Transition(JobState.PENDING, now, "accepted by the antenna"),)), key))
        return jobs, (allocation, pinned)

    def _check_input_size(self, spec: JobSpec) -> None:
        total, limit = sum(f.size for f in spec.inputs), self.config.data.max_job_input_mb * 1_000_000
        if total > limit:
            raise ResourceExhausted(f"the job's inputs come to {total / 1e6:.0f} MB; antenna {self.config.site} "
                                    f"takes at most {limit / 1e6:.0f} MB of inputs per job")

    def _check_uploaded(self, who: Identity, spec: JobSpec) -> None:
        if missing := self.blobs.missing(who.uri, spec.inputs):
            raise FailedPrecondition(
                f"input {missing[0].name!r} ({missing[0].size} bytes, sha256 {missing[0].sha256[:12]}...) has not "
                f"been uploaded to antenna {self.config.site} by you"
                + (f", nor {len(missing) - 1} other input(s)" if len(missing) > 1 else "")
                + ": upload inputs first (aifed submit --input does)")

    def _precheck_once(self, spec: JobSpec, country: str, sites: dict[tuple, str]) -> str:
        shape = (spec.site, spec.partition, spec.gpus, spec.cpus, spec.walltime_s, spec.access_mode, spec.sector,
                 spec.sector_required, spec.exclude, country, spec.residency())
        if shape not in sites:
            sites[shape] = self.precheck(spec, country)
        return sites[shape]

    async def dry_run(self, who: Identity, spec: JobSpec) -> Job:
        """Every check a submission gets, and the hub it would go to now; nothing is stored or forwarded."""
        if spec.array_job or spec.array_task:
            raise InvalidArgument("array_job and array_task are set by the antenna; ask for an array instead")
        spec.validate()
        self._check_input_size(spec)
        self.allocations.check_member(spec, who)
        country = self.allocations.country_of(spec, who, self.config.country)
        self.precheck(spec, country)  # refuses what no hub could ever run
        now = time.time()
        charged, allocation = self.allocations.assess(spec, now)
        if charged.site != spec.site:
            spec = charged
            self.precheck(spec, country)
        verdicts = await self.verdicts(spec, country)
        ranked = self._order(verdicts, spec, turn=False)
        if ranked:
            site = ranked[0].site
            reason = f"dry run: would be forwarded to {site} ({self._why_chosen(ranked[0])})"
        else:
            site = ""
            reason = "dry run: would be accepted and wait for a hub: " + "; ".join(
                f"{v.site} {v.reason}" for v in verdicts if not v.fits)
        if allocation is not None:
            reason += "; " + self.allocations.describe(allocation, spec)
        return Job(id="", spec=spec, state=JobState.PENDING, owner=who.uri, antenna=self.config.site, site=site,
                   reason=reason, created_at=now, updated_at=now, country=country)

    async def explain(self, who: Identity, job_id: str
                      ) -> tuple[Job, str, list[tuple[Verdict, int]], str, str, Transition | None]:
        """Why a job is where it is: (the job, its status in words, each hub's verdict for it now with its rank
        in placement's order (0: not a candidate), why it is pinned to one hub, its allocation, and the
        placement decision recorded when it was placed, if it was)."""
        job = self.get(who, job_id)
        spec = replace(job.spec, site="")
        verdicts = await self.verdicts(spec, job.country, estimates=True) if self.sites else []
        order = {v.site: i + 1 for i, v in enumerate(self._order(verdicts, spec, turn=False))}
        if job.spec.site:
            order = {job.spec.site: 1} if job.spec.site in order else {}
        ranked = [(v, order.get(v.site, 0))
                  for v in sorted(verdicts, key=lambda v: (order.get(v.site) or 1e9, v.site))]
        allocation, pinned = "", ""
        if self.allocations:
            if (a := self.allocations.select(job.spec, job.created_at)) is not None:
                allocation = self.allocations.describe(a, job.spec)
                if a.hub and a.hub == job.spec.site:
                    pinned = f"pinned to {a.hub}: its allocation ({a.window}) is for that hub only"
        if job.spec.site and not pinned:
            pinned = f"pinned to {job.spec.site} when it was submitted (--site)"
        placed = next((t for t in reversed(job.history) if t.state is JobState.PENDING and t.reason.startswith(PLACED)),
                      None)
        return job, self._status(job, {v.site: v for v in verdicts}), ranked, pinned, allocation, placed

    def _status(self, job: Job, verdicts: dict[str, Verdict]) -> str:
        """The job's situation in words, for `aifed explain`."""
        at = verdicts.get(job.site)
        if job.final:
            return f"{job.state.name} at {job.site or 'no hub'}: {job.reason or 'ended'}"
        if job.state is JobState.RUNNING:
            return f"running at {job.site} (partition {job.partition or '?'})"
        if job.state in (JobState.FORWARDED, JobState.QUEUED):
            why = ""
            site = self.sites.get(job.site)
            if site is not None and site.advert is not None:
                part = next((p for p in site.advert.partitions if p.name == job.partition), None)
                if part is not None:
                    why = (f": partition {part.name} has {part.gpus_free} of {part.gpus_total} GPU(s) free and "
                           f"{part.pending_jobs} job(s) waiting ({part.pending_gpu_seconds / 3600:.1f} GPU-hours)")
            wait = f"; a job of this shape submitted there now would start in about {at.wait_s:.0f} s" \
                if at is not None and at.wait_s is not None else ""
            return f"waiting in {job.site}'s queue{why}{wait}"
        if job.site:
            return f"placed on {job.site}, being forwarded ({job.reason or 'not yet acknowledged'})"
        blocked = [f"{v.site} {v.reason}" for v in verdicts.values() if not v.fits]
        return ("waiting at the antenna for a hub to take it" + (": " + "; ".join(blocked) if blocked else "")
                if not any(v.fits for v in verdicts.values()) else "waiting at the antenna: being placed now")

    def _why_not(self, spec: JobSpec, site: HubSite, country: str) -> str:
        """Why a hub whose advert is known could never take this job: its owner's exclusion, the advert's filters,
        or the policy's."""
        if site.site in spec.exclude:
            return "is excluded by the job's owner (--exclude)"
        return why_not(spec, site.advert, country) or self.placer.excludes(site.site)

    def _candidates(self, verdicts: list[Verdict], spec: JobSpec) -> list[Candidate]:
        """The hubs that passed every filter and gave an estimate, with what their adverts say."""
        specialised = self._specialised(spec)
        out = []
        for v in verdicts:
            if not v.fits or v.wait_s is None:
                continue
            advert = self.sites[v.site].advert if v.site in self.sites else None
            parts = [p for p in advert.partitions if not spec.partition or p.name == spec.partition] if advert else []
            out.append(Candidate(v.site, v.wait_s, free_gpus=max((p.gpus_free for p in parts), default=0),
                                 total_gpus=sum(p.gpus_total for p in parts),
                                 pending_jobs=sum(p.pending_jobs for p in parts), specialised=v.site in specialised,
                                 gflops_per_watt=max((p.gflops_per_watt for p in parts), default=0.0),
                                 transfer_s=spec.input_bytes / self.link_rate(v.site) if spec.inputs else 0.0))
        return out

    def link_rate(self, site: str) -> float:
        """Bytes per second to `site`: measured by the last transfers of inputs there, else as configured."""
        return self._link_rates.get(site) or self.config.link_rate_mb_s * 1e6

    def _order(self, verdicts: list[Verdict], spec: JobSpec, turn: bool = True) -> list[Scored]:
        return self._rank(self._candidates(verdicts, spec), spec, turn)

    def _rank(self, candidates: list[Candidate], spec: JobSpec, turn: bool = True, lane: str | None = None
              ) -> list[Scored]:
        """The policy's order, with the user's preferred hubs first where they would start the job in time.
        `lane`: the short-job lane, if the caller has it at hand (one per group of jobs placed together)."""
        lane = self._lane() if lane is None else lane
        ranked = self.placer.order(candidates, spec.gpus, spec.walltime_s, turn=turn, lane=lane)
        return self.placer.preferred_first(ranked, spec.prefer, spec.overflow_after_s) if spec.prefer else ranked

    def _lane(self) -> str:
        """The hub kept for short jobs (federation/placement.py): the one with the fewest GPUs (then by name) of
        the trusted hubs whose adverts this antenna has, when there are two or more; "" when there is no lane."""
        if not self.config.short_job_lane or self.placer.policy != "earliest-start":
            return ""
        sizes = [(sum(p.gpus_total for p in s.advert.partitions), s.site) for s in self.sites.values()
                 if s.advert is not None and not s.untrusted]
        return min(sizes)[1] if len(sizes) > 1 else ""

    def _why_chosen(self, chosen: Scored) -> str:
        """Why placement chose this hub, in words, for the job's reason."""
        policy = self.placer.policy
        if policy == "earliest-start":
            return f"estimated wait {chosen.score:.0f}s"
        if policy == "least-queue":
            return f"placement least-queue: {chosen.score:.0f} job(s) waiting there"
        return f"placement {policy}"

    def _specialised(self, spec: JobSpec) -> frozenset[str]:
        """The hubs that advertise the job's strategic sector (placement prefers them)."""
        if not spec.sector:
            return frozenset()
        return frozenset(s.site for s in self.sites.values()
                         if s.advert is not None and spec.sector in s.advert.sectors)

    def precheck(self, spec: JobSpec, country: str) -> str:
        """Refuse now a job that no known hub could ever run, so users are never rejected late.

        Return the hub to forward it to when that needs no choice: the job names its hub, or this antenna has
        a single hub and it fits; otherwise "" and the placer chooses."""
        if spec.site and spec.site not in self.sites:
            raise NotFound(f"no hub site {spec.site!r} in this federation; known sites: "
                           + ", ".join(sorted(self.sites)))
        candidates = [self.sites[spec.site]] if spec.site else list(self.sites.values())
        known = [s for s in candidates if s.advert is not None]
        if not known:
            return ""  # nothing known yet: the job waits until a hub is heard from
        reasons = {s.site: self._why_not(spec, s, country) for s in known}
        if all(reasons.values()):
            if spec.partition and all("has no partition" in r for r in reasons.values()):
                raise NotFound(f"no hub has a partition {spec.partition!r}; partitions: " + ", ".join(
                    sorted({f"{p.name}@{s.site}" for s in known for p in s.advert.partitions})))
            raise FailedPrecondition("no hub can run this job: " + "; ".join(
                f"{site} {why}" for site, why in sorted(reasons.items())))
        if len(candidates) == 1 and candidates[0].fresh:
            return candidates[0].site
        return ""

    def get(self, who: Identity, job_id: str) -> Job:
        """The job, if `who` may see it: its owner, or an operator of this antenna. Others' jobs are NOT_FOUND:
        their existence is not disclosed."""
        job = self.journal.get(job_id)
        if job is None or (job.owner != who.uri and who.role is not Role.OPERATOR):
            raise NotFound(f"no job {job_id[:100]!r} of yours at antenna {self.config.site}")
        return job

    def list(self, who: Identity, states=(), limit: int = 100) -> list[Job]:
        owner = None if who.role is Role.OPERATOR else who.uri
        return self.journal.list(owner=owner, states=states, limit=min(max(limit, 1), 1000))

    def usage(self, who: Identity) -> tuple[list[AllocationUsage], list[UserUsage]]:
        """The allocations and their usage: an operator sees all; a user, those of the projects they have jobs
        under here, and only their own consumption."""
        return self.allocations.usage(None if who.role is Role.OPERATOR else who.uri)

    async def cancel(self, who: Identity, job_id: str) -> Job:
        job = self.get(who, job_id)
        if job.final:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state.name}); nothing to cancel")
        self.audit.record("cancelled", who=who.uri, owner=job.owner, job=job_id, site=job.site)
        if job.state is JobState.PENDING:
            self._unplaced.pop(job_id, None)
            self._outbox.get(job.site, {}).pop(job_id, None)
            # Recorded first: a cancelled job is never forwarded. If a forward may already have reached the
            # hub, the cancel is owed to the hub too, and it is delivered until the hub confirms.
            job = self._record(job.moved(JobState.CANCELLED, "cancelled before it reached a hub"),
                               ref=CANCEL_OWED if job.site else "")
            if job.site:
                self._deliver_cancel_later(job.id)
            return job
        site = self._site_of(job)
        try:
            remote = await site.stub.CancelJob(jobs_pb2.JobRef(job_id=job_id), timeout=10, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REFUSALS:
                raise FailedPrecondition(f"hub {job.site} refused to cancel: {exc.details()}") from None
            raise Unavailable(f"hub {job.site} cannot be reached to cancel the job ({exc.code().name}); "
                              "try again") from None
        return self._record(_merge(self.journal.get(job_id) or job, convert.job_from_pb(remote)), from_hub=True)

    async def logs(self, who: Identity, request: jobs_pb2.LogsRequest) -> AsyncIterator[jobs_pb2.LogChunk]:
        job = self.get(who, request.job_id)
        while not job.site or job.state is JobState.PENDING:
            if not request.follow or job.final:
                return  # it never reached a hub: there is no output
            await asyncio.sleep(0.3)
            job = self.get(who, request.job_id)
        while True:
            try:
                async for chunk in self._site_of(job).stub.StreamLogs(request, wait_for_ready=True,
                                                                      timeout=None if request.follow else 60):
                    yield chunk
                if request.follow:
                    # The hub's stream ends when the job ends there; its final state reaches this antenna on the
                    # change feed a moment later. Wait for it, so that a status asked right after shows the end.
                    deadline = time.monotonic() + 5.0
                    while not (now := self.get(who, request.job_id)).final and now.site == job.site \
                            and time.monotonic() < deadline:
                        await asyncio.sleep(0.02)
                    if not now.final and now.site != job.site:
                        job = now  # its hub handed it to a peer before it ran there: follow it to the peer
                        continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND and job.final:
                    return  # cancelled before the hub had it: no output
                raise Unavailable(f"logs of {job.id} are at hub {job.site}, which answered "
                                  f"{exc.code().name}: {exc.details()}") from None
            return

    async def list_outputs(self, who: Identity, job_id: str) -> jobs_pb2.OutputList:
        """The job's outputs as its hub collected them (not ready until the job ended there and they were copied)."""
        job = self.get(who, job_id)
        if not job.spec.outputs:
            raise FailedPrecondition(f"job {job.id} declared no outputs (aifed submit --collect PATH)")
        if not job.site or job.state is JobState.PENDING:
            return jobs_pb2.OutputList(ready=False, error="" if not job.final else "the job never reached a hub")
        try:
            return await self._site_of(job).stub.ListOutputs(jobs_pb2.JobRef(job_id=job.id), timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # such as outputs deleted after their retention
                raise FailedPrecondition(f"hub {job.site}: {exc.details()}") from None
            raise Unavailable(f"the outputs of {job.id} are at hub {job.site}, which answered "
                              f"{exc.code().name}: {exc.details()}") from None

    async def fetch_output(self, who: Identity, request: jobs_pb2.FetchRequest) -> AsyncIterator[bytes]:
        """One output file of the job, from `offset` on, relayed from its hub."""
        job = self.get(who, request.job_id)
        if not job.site:
            raise FailedPrecondition(f"job {job.id} never reached a hub: it has no outputs")
        # Relayed as the hub serialized them: neither parsed nor serialized again here (the user checks the
        # SHA-256).
        call = self._site_of(job).channel.unary_stream(
            "/aifed.v1.Hub/FetchOutput", request_serializer=jobs_pb2.FetchRequest.SerializeToString,
            response_deserializer=None)(request, timeout=None)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise (NotFound if exc.code() == grpc.StatusCode.NOT_FOUND else FailedPrecondition)(
                    exc.details()) from None
            raise Unavailable(f"output of {job.id} at hub {job.site}: {exc.code().name}: {exc.details()}") from None
        finally:
            call.cancel()

    def _site_of(self, job: Job) -> HubSite:
        site = self.sites.get(job.site)
        if site is None:
            raise FailedPrecondition(f"job {job.id} ran at hub {job.site}, which this antenna no longer knows")
        return site

    # -- journaling ------------------------------------------------------------------------------

    def _record(self, job: Job, ref: str | None = None, from_hub: bool = False) -> Job:
        """Journal and publish one change (see `_apply`)."""
        stored = self.journal.write(lambda tx: _apply(tx, job, ref, from_hub))
        if stored is not None:
            self.jobs.publish(stored.id, stored)
            return stored
        return self.journal.get(job.id) or job

    async def _commit_changes(self, changes: Callable[[Tx], list]) -> list:
        """Run `changes` in a group commit, publish the jobs it changed, and return what it returned. A change may
        be given as the stored record (`Tx.records`): it is made into a `Job` only if someone is listening."""
        changed = await self.journal.commit(changes)
        for job in changed:
            if isinstance(job, dict):
                if not self.jobs.wanted(job["id"]):
                    continue
                job = job_from_record(job)
            self.jobs.publish(job.id, job)
        return changed

    def _queue(self, job: Job) -> None:
        """Hand a PENDING job to the placer, or to its hub's forwarder once it has a hub."""
        if job.site:
            if job.site in self._outbox:
                self._outbox[job.site][job.id] = job
                self._wake_forwarder[job.site].set()
        else:
            self._unplaced[job.id] = None
            self._wake_placer.set()

    # -- placing ---------------------------------------------------------------------------------

    async def _placer(self) -> None:
        while True:
            if not self._unplaced:
                self._wake_placer.clear()
                await self._wake_placer.wait()
            version = self.sites_changed.version
            ids = _first(self._unplaced, PLACE_BATCH)
            for job_id in ids:
                del self._unplaced[job_id]
            try:
                waiting = await self._place(ids)
            except Exception:
                log.exception("placing %d job(s) failed; retrying", len(ids))
                waiting = ids
            if waiting:
                self._unplaced.update(dict.fromkeys(waiting))
                if len(waiting) == len(ids):  # nothing could be placed: wait for news from the hubs
                    await self.sites_changed.wait_past(version, 2.0)

    async def _place(self, ids: list[str]) -> list[str]:
        """Choose a hub for each job, a decision per distinct job shape; return the ids that must wait."""
        jobs = self.journal.get_many(ids)
        groups: dict[tuple, list[Job]] = defaultdict(list)
        for job_id in ids:
            job = jobs.get(job_id)
            if job is None or job.state is not JobState.PENDING:
                continue
            if job.site:
                self._queue(job)
                continue
            s = job.spec
            groups[(s.gpus, s.cpus, s.walltime_s, s.partition, s.access_mode, s.site, s.sector, s.prefer, s.exclude,
                    s.overflow_after_s, s.sector_required, job.country, s.residency(), s.input_bytes)].append(job)
        decisions: list[tuple[str, JobState, str, str, str]] = []  # (job id, state, site, reason, decision)
        waiting: list[str] = []
        for group in groups.values():
            verdicts = await self.verdicts(group[0].spec, group[0].country)
            if verdicts and not any(v.fits or v.transient for v in verdicts):
                reason = "no hub can run this job: " + "; ".join(f"{v.site} {v.reason}" for v in verdicts)
                decisions += [(job.id, JobState.FAILED, "", reason, "") for job in group]
                continue
            spec = group[0].spec
            candidates = self._candidates(verdicts, spec)
            if not candidates:
                waiting += [job.id for job in group]
                continue
            lane = self._lane()
            for job in group:  # one by one: what this antenna just sent counts against each hub (no herding)
                ranked = self._rank(candidates, spec, lane=lane)
                chosen = ranked[0]
                self.placer.sent(chosen.site, job.id, spec.gpus, spec.walltime_s)
                self.metrics.placements.labels(chosen.site).inc()
                why = self._why_chosen(chosen)
                decisions.append((job.id, JobState.PENDING, chosen.site, f"forwarding to {chosen.site} ({why})",
                                  _decision(chosen, why, ranked, verdicts, spec)))

        def apply(tx: Tx) -> list[Job]:
            out = []
            now = time.time()
            for job_id, state, site, reason, decision in decisions:
                current = tx.get(job_id)
                if current is None or current.final or current.site:
                    continue  # cancelled (or placed) meanwhile
                # The decision is kept in the job's history, for `aifed explain` and `aifed status` later.
                job = current.moved(state, reason) if state is JobState.FAILED else \
                    evolve(current, site=site, reason=reason, updated_at=now,
                           history=(*current.history, Transition(JobState.PENDING, now, decision)))
                tx.update(job)
                out.append(job)
            return out

        for job in await self._commit_changes(apply):
            if not job.final:
                self._queue(job)
        return waiting

    async def verdicts(self, spec: JobSpec, country: str, estimates: bool = False) -> list[Verdict]:
        """Each candidate hub with the reason it cannot take the job, or its estimated wait (asked of the hubs
        when there is a choice to make, or always with `estimates`)."""
        if spec.site and spec.site not in self.sites:
            return [Verdict(spec.site, "is no longer in this antenna's configuration")]
        candidates = [self.sites[spec.site]] if spec.site else list(self.sites.values())
        shape = jobs_pb2.JobShape(gpus=spec.gpus, walltime_s=spec.walltime_s, partition=spec.partition)

        fit_now = [s for s in candidates if s.advert is not None and s.fresh and not self._why_not(spec, s, country)]
        # Estimates are asked when the policy compares them and there is a choice to make, or for explain.
        ask = estimates or (len(fit_now) > 1 and (self.placer.needs_estimates or bool(spec.prefer)))

        async def judge(site: HubSite) -> Verdict:
            if site.untrusted:
                return Verdict(site.site, site.untrusted, transient=True)
            if site.advert is None:
                return Verdict(site.site, f"has not been heard from ({site.error})", transient=True)
            if reason := self._why_not(spec, site, country):
                return Verdict(site.site, reason)
            if site.left:
                return Verdict(site.site, site.left, transient=True)
            if not site.fresh:
                return Verdict(site.site, f"is unreachable ({site.error or 'advert expired'})", transient=True)
            if site.advert.draining:
                return Verdict(site.site, f"is draining ({site.advert.drain_reason})", transient=True)
            if window := maintenance_in_the_way(site.advert, spec.walltime_s):
                return Verdict(site.site, window, transient=True)
            if not ask:
                return Verdict(site.site, wait_s=0.0)
            try:
                advert = await site.stub.GetAdvert(hub_pb2.AdvertRequest(shapes=[shape]),
                                                   timeout=ESTIMATE_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                return Verdict(site.site, f"did not give an estimate ({exc.code().name})", transient=True)
            waits = [e.wait_s for e in advert.estimates]
            if not waits:
                return Verdict(site.site, "has no partition that fits")
            return Verdict(site.site, wait_s=float(min(waits)))

        return list(await asyncio.gather(*(judge(s) for s in candidates)))

    # -- forwarding ------------------------------------------------------------------------------

    async def _forwarder(self, site_name: str) -> None:
        """Send this hub's placed jobs in batches until each is acknowledged or refused."""
        site, outbox, wake = self.sites[site_name], self._outbox[site_name], self._wake_forwarder[site_name]
        backoff = 0.2
        while True:
            if not outbox:
                wake.clear()
                await wake.wait()
            if len(outbox) < FORWARD_BATCH:
                await asyncio.sleep(FORWARD_LINGER_S)  # let a trickle of jobs gather into one call
            if site.untrusted:  # placed before the revocation was known: held until the hub is trustworthy
                await asyncio.sleep(1.0)
                continue
            jobs = _batch(outbox, FORWARD_BATCH, FORWARD_BYTES)
            if not jobs:
                continue
            in_flight = self._in_flight[site_name]
            in_flight.update(job.id for job in jobs)
            try:
                await self._forward(site, jobs)
                backoff = 0.2
                continue
            except asyncio.CancelledError:
                if stopping():
                    raise
                log.info("hub %s: forwarding %d job(s) was cut short (the hub moved); sending again", site_name,
                         len(jobs))
            except grpc.aio.AioRpcError as exc:
                log.warning("hub %s: forwarding %d job(s): %s: %s; retrying in %.1fs", site_name, len(jobs),
                            exc.code().name, exc.details(), backoff)
            except Exception:
                log.exception("hub %s: forwarding %d job(s) failed; retrying in %.1fs", site_name, len(jobs),
                              backoff)
            finally:
                in_flight.difference_update(job.id for job in jobs)
            # The outcome is unknown: the same jobs go again, first, with the same keys.
            later = dict(outbox)
            outbox.clear()
            outbox.update((job.id, job) for job in jobs)
            outbox.update(later)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.retry_max_s)

    async def _forward(self, site: HubSite, jobs: list[Job]) -> None:
        """One ForwardJobs call. An acknowledgement needs no write here: the hub journaled the job, a resend
        after a crash is answered as a duplicate, and the job's new state arrives on the change feed. Only a
        refusal is journaled (FAILED)."""
        alternatives: dict[tuple, list[str]] = {}  # one list per job shape (what the filters read)
        keys = {}
        for job in jobs:
            s = job.spec
            keys[job.id] = key = (s.gpus, s.cpus, s.walltime_s, s.partition, s.access_mode, s.site, s.sector,
                                  s.sector_required, s.exclude, job.country, s.residency())
            if key not in alternatives:
                alternatives[key] = self._alternatives(job, site.site)
        await self._stage(site, jobs)
        request = hub_pb2.ForwardJobsRequest()
        add = request.jobs.add  # built in place: a message given to a list is copied into it
        for job in jobs:
            add(idempotency_key=job.id, job=jobs_pb2.Job(
                id=job.id, spec=convert.spec_to_pb(job.spec), owner=job.owner, antenna=job.antenna,
                state=job.state, country=job.country, alternatives=alternatives[keys[job.id]]))
        elsewhere: dict[str, str] = {}
        try:
            started = time.monotonic()
            response = await site.stub.ForwardJobs(request, timeout=60)
            self.metrics.forward_latency.labels(site.site).observe(time.monotonic() - started)
            refusals = {r.job_id: r.error.message for r in response.results if r.HasField("error")}
            # Not refused for what it is but for now (the hub is draining): the job is placed again.
            elsewhere = {r.job_id: r.error.message for r in response.results
                         if r.HasField("error") and r.error.code == grpc.StatusCode.UNAVAILABLE.value[0]}
            for job_id in elsewhere:
                del refusals[job_id]
        except grpc.aio.AioRpcError as exc:
            # A single job too large for a message is refused; a rate limit (also RESOURCE_EXHAUSTED) is waited out.
            too_large = (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(jobs) == 1
                         and "larger than max" in (exc.details() or ""))
            if exc.code() not in REFUSALS and not too_large:
                raise  # the outcome is unknown: retried with the same keys
            refusals = {job.id: exc.details() for job in jobs}
        self.placer.landed(site.site, [job.id for job in jobs])  # in the hub's own figures from now on
        for job in jobs:
            if job.id in refusals:
                self.audit.record("rejected", owner=job.owner, job=job.id, site=site.site, reason=refusals[job.id])
            elif job.id not in elsewhere:
                self.audit.record("forwarded", owner=job.owner, job=job.id, site=site.site)
        if elsewhere:
            await self._place_again(site, elsewhere)
        self.metrics.forwarded.labels(site.site, "accepted").inc(len(jobs) - len(refusals) - len(elsewhere))
        if refusals:
            self.metrics.forwarded.labels(site.site, "refused").inc(len(refusals))
        if refusals:
            def apply(tx: Tx) -> list[Job]:
                out = []
                for job_id, why in refusals.items():
                    current = tx.get(job_id)
                    if current is not None:
                        job = current.moved(JobState.FAILED, f"hub {site.site} refused the job: {why}")
                        if (stored := _apply(tx, job, None, False, current)) is not None:
                            out.append(stored)
                return out

            await self._commit_changes(apply)
            log.info("hub %s refused %d job(s), for example %s: %s", site.site, len(refusals),
                     *next(iter(refusals.items())))
        log.debug("hub %s acknowledged %d job(s)", site.site, len(jobs) - len(refusals))

    async def _stage(self, site: HubSite, jobs: list[Job]) -> None:
        """Before forwarding: every input of these jobs is at the hub, each content sent once (an array's shared
        inputs too), an interrupted transfer resumed where the hub says it stopped."""
        needed = {f.sha256: f.size for job in jobs for f in job.spec.inputs}
        for sha, size in needed.items():
            started = time.monotonic()
            sent = await send(site, self.blobs, sha, size, f"hub {site.site}")
            if not sent:
                continue
            self.metrics.staged_bytes.labels(site.site).inc(sent)
            took = time.monotonic() - started
            if sent >= LINK_SAMPLE_BYTES and took > 0:  # a transfer long enough to measure the link by
                old = self._link_rates.get(site.site)
                self._link_rates[site.site] = sent / took if old is None else 0.7 * old + 0.3 * sent / took
            log.info("hub %s: staged input %s... (%d bytes) in %.2fs", site.site, sha[:12], sent, took)

    def _alternatives(self, job: Job, chosen: str) -> list[str]:
        """The other hubs the job may be moved to by its hub's load balancing: those that pass this antenna's
        filters for it, which this antenna follows. None for a job pinned to a site, or under home-only."""
        if job.spec.site or self.placer.policy == "home-only":
            return []
        return sorted(s.site for s in self.sites.values() if s.site != chosen and s.advert is not None
                      and s.member and not s.untrusted and not self._why_not(job.spec, s, job.country))

    async def _place_again(self, site: HubSite, why: dict[str, str]) -> None:
        """Jobs a hub could not take now (it drains): back to the placer, which chooses again."""
        def apply(tx: Tx) -> list[Job]:
            out = []
            for job_id, reason in why.items():
                current = tx.get(job_id)
                if current is not None and current.state is JobState.PENDING and current.site == site.site:
                    job = evolve(current, site="", reason=f"hub {site.site} did not take it now: {reason}; "
                                 "choosing a hub again", updated_at=time.time())
                    tx.update(job)
                    out.append(job)
            return out

        for job in await self._commit_changes(apply):
            self._unplaced[job.id] = None
        self._wake_placer.set()
        log.info("hub %s did not take %d job(s) now (%s); placing them again", site.site, len(why),
                 next(iter(why.values())))

    # -- following -------------------------------------------------------------------------------

    async def _follower(self, site_name: str) -> None:
        """Apply this hub's change feed, from the position journaled here, for as long as the antenna runs."""
        site = self.sites[site_name]
        backoff = 0.2
        while True:
            try:
                await self._follow(site)
            except asyncio.CancelledError:
                if stopping():
                    raise
                # not us: grpc cancels the calls of a channel that is closed (the hub moved): follow it again
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    log.warning("hub %s: change feed: %s: %s; reconnecting in %.1fs", site_name, exc.code().name,
                                exc.details(), backoff)
            except Exception:
                log.exception("hub %s: change feed failed; reconnecting in %.1fs", site_name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.retry_max_s)

    async def _follow(self, site: HubSite) -> None:
        cursor_key = f"feed/{site.site}"
        epoch, _, after = self.journal.meta(cursor_key, ":0").partition(":")
        # Jobs this hub has acknowledged and not finished. A feed that starts over (a new hub journal) must
        # mention each; those it does not mention are lost there. Acknowledged includes the PENDING jobs
        # placed here that are neither waiting to be sent nor in a call now: their forward was answered (the
        # answer is not journaled), and only the change feed was still to bring their new state.
        waiting = set(self._outbox.get(site.site, ())) | self._in_flight.get(site.site, set())
        expected = {j.id for j in self.journal.list(states=(*HUB_STATES, JobState.PENDING), limit=10**9)
                    if j.site == site.site and (j.state is not JobState.PENDING or j.id not in waiting)}
        restart: set[str] | None = None
        async for batch in site.stub.WatchChanges(hub_pb2.WatchChangesRequest(epoch=epoch, after=int(after)),
                                                  wait_for_ready=True):
            if batch.epoch != epoch:
                log.info("hub %s: following its change feed from the start (journal %s)", site.site, batch.epoch)
                epoch, restart = batch.epoch, set()
            lost: list[str] = []
            scanning = restart is not None
            if restart is not None:
                restart.update(j.id for j in batch.jobs)
                if batch.caught_up:
                    lost, restart = sorted(expected - restart), None
            # While a feed that started over is being read, the old position stays journaled: if the feed breaks
            # now, the next one starts over again and the check for lost jobs is not skipped.
            position = None if restart is not None else f"{batch.epoch}:{batch.sequence}"

            def apply(tx: Tx, messages=batch.jobs, lost=lost, position=position) -> list[Job | dict]:
                out: dict[str, Job | dict] = {}  # by id: a job named twice in one batch is published at its latest
                records = tx.records(m.id for m in messages)
                jobs: dict[str, Job] = {}  # the jobs of this batch changed by the general path, at their latest
                for msg in messages:
                    record = records.get(msg.id)
                    if record is None:
                        continue
                    if msg.id not in jobs and _progress_applies(record, msg, site.site):
                        # The usual case, and thousands a second: the hub's word on a job it is running, merged
                        # into the stored record without making either into a `Job` (what `_merge` does).
                        if _merge_progress(record, msg):
                            tx.put_record(record)
                            out[msg.id] = record
                        continue
                    current, job = jobs.get(msg.id) or job_from_record(record), convert.job_from_pb(msg)
                    if current.site == site.site:
                        merged = _moved_on(current, job) if job.state is JobState.MOVED else _merge(current, job)
                    elif job.moved_from and job.moved_from == current.site:
                        # The hub it was at handed it to this one (load balancing): it is followed here from now
                        # on. This record may arrive before the first hub's own word of the move.
                        merged = evolve(_merge(current, job), site=site.site)
                    else:
                        continue
                    if merged != current and (stored := _apply(tx, merged, None, True, current)) is not None:
                        out[msg.id] = jobs[msg.id] = stored
                for job_id in lost:
                    current = tx.get(job_id)
                    if current is not None and not current.final:
                        job = current.moved(JobState.LOST, f"hub {site.site} no longer knows this job")
                        if (stored := _apply(tx, job, None, True, current)) is not None:
                            out[job_id] = stored
                if position is not None:
                    tx.set_meta(cursor_key, position)
                return list(out.values())

            await self._commit_changes(apply)
            if scanning and restart is None and lost:
                log.warning("hub %s no longer knows %d job(s) of this antenna: reported LOST", site.site, len(lost))

    # -- cancels owed to hubs --------------------------------------------------------------------

    def _deliver_cancel_later(self, job_id: str) -> None:
        if job_id in self._cancels:
            return
        task = asyncio.create_task(self._deliver_cancel(job_id), name=f"cancel {job_id}")
        self._cancels[job_id] = task
        task.add_done_callback(lambda t: self._cancels.pop(job_id, None))

    async def _deliver_cancel(self, job_id: str) -> None:
        """Tell the hub a job it may have received is cancelled; it keeps the cancel even if the job arrives later."""
        backoff = 0.2
        while (job := self.journal.get(job_id)) is not None and self.journal.backend_ref(job_id) == CANCEL_OWED:
            try:
                remote = await self._site_of(job).stub.CancelJob(jobs_pb2.JobRef(job_id=job.id), timeout=10)
                if remote.state != JobState.CANCELLED:
                    log.info("job %s: hub %s says %s after the cancel", job.id, job.site, JobState(remote.state).name)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in REFUSALS:
                    log.warning("job %s: cancel at hub %s: %s; retrying in %.1fs", job_id, job.site,
                                exc.code().name, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.retry_max_s)
                    continue
                # already ended there: nothing to cancel
            except FailedPrecondition:
                pass  # its hub was removed from the configuration
            self.journal.write(lambda tx: tx.set_ref(job_id, ""))
            return


PLACED = "placed on "  # how a placement decision in a job's history begins
MAX_DECISION_SITES = 8  # other hubs named in a recorded decision


def _decision(chosen: Scored, why: str, ranked: list[Scored], verdicts: list[Verdict], spec: JobSpec) -> str:
    """A placement decision in words, recorded in the job's history: the hub chosen and why, then the others
    in rank order with their estimated wait, then those filtered out with the reason."""
    parts = [f"{PLACED}{chosen.site} ({why})"]
    if spec.prefer:
        parts[0] += f", preferred: {', '.join(spec.prefer)}"
    others = [f"{s.site} #{i} (wait {s.candidate.wait_s:.0f}s{'; kept for shorter jobs' if s.kept else ''})"
              for i, s in enumerate(ranked[1:], 2)]
    others += [f"{v.site} {v.reason}" for v in verdicts if not v.fits]
    if others:
        parts.append("; ".join(others[:MAX_DECISION_SITES])
                     + (f"; {len(others) - MAX_DECISION_SITES} more" if len(others) > MAX_DECISION_SITES else ""))
    return " | ".join(parts)


def _batch(outbox: dict[str, Job], most: int, most_bytes: int) -> list[Job]:
    """Take the first jobs of an outbox: at most `most`, and no more than `most_bytes` of specs (one job at
    least, whatever its size)."""
    jobs, size = [], 0
    for job_id, job in outbox.items():
        s = job.spec
        weight = 256 + len(s.script) + sum(map(len, s.argv)) + sum(map(len, s.script_args)) + sum(
            len(k) + len(v) for k, v in s.env.items())
        if jobs and (len(jobs) == most or size + weight > most_bytes):
            break
        jobs.append(job)
        size += weight
    for job in jobs:
        del outbox[job.id]
    return jobs


def _first(ordered: dict, n: int) -> list:
    """The first `n` keys of an insertion-ordered dict."""
    out = []
    for key in ordered:
        out.append(key)
        if len(out) == n:
            break
    return out


def _apply(tx: Tx, job: Job, ref: str | None, from_hub: bool, current: Job | None = None) -> Job | None:
    """Store a change unless it would replace a final state; only the hub that ran the job may replace one with
    another final state (a stale placement or refusal decided before a cancel never does). The stored job, or
    None if nothing changed. `current`: the stored job, if the caller has just read it in this transaction."""
    current = current or tx.get(job.id)
    if current is None or (current.final and not (from_hub and job.final)):
        return None
    tx.update(job, backend_ref=ref)
    return job


_FINAL = frozenset(int(s) for s in FINAL_STATES)
_KNOWN = frozenset(int(s) for s in JobState)
_OWN = frozenset(int(s) for s in ANTENNA_STATES)


def _progress_applies(record: dict, msg: jobs_pb2.Job, site: str) -> bool:
    """Whether the hub `site`'s word on a job (`msg`, from its change feed) is the plain case that
    `_merge_progress` handles: the stored job is at that hub and not ended, and the hub reports a known state
    other than a move."""
    return (record["site"] == site and record["state"] not in _FINAL and msg.state != JobState.MOVED
            and msg.state in _KNOWN and all(t.state in _KNOWN for t in msg.history))


def _merge_progress(record: dict, msg: jobs_pb2.Job) -> bool:
    """`_merge(job_from_record(record), convert.job_from_pb(msg))` done on the stored record in place, for the
    case `_progress_applies` accepts; whether anything changed."""
    at = msg.updated_at
    fields = {"state": msg.state, "partition": msg.partition,
              "exit_code": msg.exit_code if msg.has_exit_code else None, "reason": msg.reason,
              "history": [t for t in record["history"] if t[0] in _OWN]
              + [[t.state, t.at.seconds + t.at.nanos / 1e9, t.reason] for t in msg.history],
              "updated_at": max(record["updated_at"], at.seconds + at.nanos / 1e9)}
    if all(record[k] == v for k, v in fields.items()):
        return False
    record.update(fields)
    return True


def _moved_on(local: Job, remote: Job) -> Job:
    """The job's hub handed it to a peer (`remote` is MOVED there): the antenna follows it to the peer, where it
    is FORWARDED until the peer's own change feed says more."""
    if local.final:
        return local  # cancelled here: the cancel owed to the first hub is passed on by it
    merged = _merge(local, evolve(remote, state=JobState.FORWARDED))
    return evolve(merged, site=remote.moved_to, partition="", reason=remote.reason)


def _merge(local: Job, remote: Job) -> Job:
    """The antenna's record updated with the hub's: the hub owns every state after PENDING."""
    if local.final and local.state is JobState.CANCELLED and not remote.final:
        return local  # cancelled here; the hub's cancel will follow
    own = tuple(t for t in local.history if t.state in ANTENNA_STATES)
    return evolve(local, state=remote.state, partition=remote.partition,
                  exit_code=remote.exit_code, reason=remote.reason, history=own + remote.history,
                  updated_at=max(local.updated_at, remote.updated_at))
