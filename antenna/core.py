"""The antenna's core: accept users' jobs durably, place them, forward them, follow them to the end."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from federation import convert
from federation.config import AntennaConfig
from federation.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from federation.identity import Identity
from federation.journal import Journal
from federation.model import Job, JobSpec, JobState, Transition
from federation.pb import hub_pb2, jobs_pb2
from federation.watch import Signal, Topics
from antenna.placement import Verdict, rank, why_not
from antenna.sites import HubSite

log = logging.getLogger(__name__)

# A hub that answers with one of these did not accept the job: retrying the same request cannot help.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED}
ANTENNA_STATES = (JobState.PENDING,)
MAX_REQUEST_ID = 200
ESTIMATE_TIMEOUT_S = 3.0
CANCEL_OWED = "cancel-owed"  # backend_ref of a job cancelled here whose hub may have it: the hub must be told


class AntennaCore:
    """Everything an antenna knows and does, independent of its gRPC service."""

    def __init__(self, config: AntennaConfig):
        self.config = config
        self.journal = Journal(config.state_dir / "antenna.sqlite")
        self.sites_changed = Signal()
        self.sites = {h.site: HubSite(h, config.tls, self.sites_changed) for h in config.hubs}
        self.jobs: Topics[Job] = Topics()
        self._drivers: dict[str, asyncio.Task] = {}
        self.retry_max_s = 5.0

    async def start(self) -> None:
        for site in self.sites.values():
            site.start()
        for job, _ in self.journal.unfinished():
            if job.site and job.site not in self.sites:
                self._record(job.moved(JobState.LOST, f"hub {job.site} is no longer in this antenna's configuration"))
                continue
            log.info("resuming job %s (%s) after restart", job.id, job.state.name)
            self._drive(job.id)
        for job in self.journal.with_ref(CANCEL_OWED):
            self._drive(job.id)

    async def close(self) -> None:
        drivers = list(self._drivers.values())
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        for site in self.sites.values():
            await site.close()
        self.journal.close()

    # -- what users ask --------------------------------------------------------------------------

    async def submit(self, who: Identity, spec: JobSpec, request_id: str = "") -> Job:
        """Validate, check that some hub could run it, journal it PENDING (durably), then acknowledge."""
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters")
        key = f"{who.uri}#{request_id}" if request_id else None
        if key and (first := self.journal.by_key(key)) is not None:
            return first
        spec.validate()
        self.precheck(spec)
        now = time.time()
        job = Job(id=f"{self.config.site}-{secrets.token_hex(6)}", spec=spec, state=JobState.PENDING,
                  owner=who.uri, antenna=self.config.site, created_at=now, updated_at=now,
                  reason="waiting to be forwarded",
                  history=(Transition(JobState.PENDING, now, "accepted by the antenna"),))
        stored, created = self.journal.insert(job, key)
        if created:
            log.info("accepted job %s from %s", job.id, who.uri)
            self._drive(stored.id)
        return stored

    def precheck(self, spec: JobSpec) -> None:
        """Refuse now a job that no known hub could ever run, so users are never rejected late."""
        if spec.site and spec.site not in self.sites:
            raise NotFound(f"no hub site {spec.site!r} in this federation; known sites: "
                           + ", ".join(sorted(self.sites)))
        candidates = [self.sites[spec.site]] if spec.site else list(self.sites.values())
        known = [s for s in candidates if s.advert is not None]
        if not known:
            return  # nothing known yet: the job waits until a hub is heard from
        reasons = {s.site: why_not(spec, s.advert) for s in known}
        if all(reasons.values()):
            if spec.partition and all("has no partition" in r for r in reasons.values()):
                raise NotFound(f"no hub has a partition {spec.partition!r}; partitions: " + ", ".join(
                    sorted({f"{p.name}@{s.site}" for s in known for p in s.advert.partitions})))
            raise FailedPrecondition("no hub can run this job: " + "; ".join(
                f"{site} {why}" for site, why in sorted(reasons.items())))

    def get(self, who: Identity, job_id: str) -> Job:
        job = self.journal.get(job_id)
        if job is None or job.owner != who.uri:
            raise NotFound(f"no job {job_id!r} of yours at antenna {self.config.site}")
        return job

    def list(self, who: Identity, states=(), limit: int = 100) -> list[Job]:
        return self.journal.list(owner=who.uri, states=states, limit=min(max(limit, 1), 1000))

    async def cancel(self, who: Identity, job_id: str) -> Job:
        job = self.get(who, job_id)
        if job.final:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state.name}); nothing to cancel")
        if job.state is JobState.PENDING:
            # Recorded first: the driver never forwards a cancelled job. If a forward may already have reached the
            # hub, the cancel is owed to the hub too, and the driver delivers it until the hub confirms.
            job = self._record(job.moved(JobState.CANCELLED, "cancelled before it reached a hub"),
                               ref=CANCEL_OWED if job.site else "")
            if job.site:
                self._drive(job.id)
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
        try:
            async for chunk in self._site_of(job).stub.StreamLogs(request, wait_for_ready=True,
                                                                  timeout=None if request.follow else 60):
                yield chunk
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND and job.final:
                return  # cancelled before the hub had it: no output
            raise Unavailable(f"logs of {job.id} are at hub {job.site}, which answered "
                              f"{exc.code().name}: {exc.details()}") from None

    def _site_of(self, job: Job) -> HubSite:
        site = self.sites.get(job.site)
        if site is None:
            raise FailedPrecondition(f"job {job.id} ran at hub {job.site}, which this antenna no longer knows")
        return site

    # -- forwarding and following ----------------------------------------------------------------

    def _record(self, job: Job, ref: str | None = None, from_hub: bool = False) -> Job:
        """Journal and publish a change. A final state is kept, unless the hub that ran the job says otherwise:
        a stale write (a placement or refusal decided before a cancel) never replaces it."""
        current = self.journal.get(job.id)
        if current is not None and current.final and not (from_hub and job.final):
            return current
        self.journal.update(job, backend_ref=ref)
        self.jobs.publish(job.id, job)
        return job

    def _drive(self, job_id: str) -> None:
        if job_id in self._drivers:
            return
        task = asyncio.create_task(self._drive_job(job_id), name=f"drive {job_id}")
        self._drivers[job_id] = task
        task.add_done_callback(lambda t: self._drivers.pop(job_id, None))

    async def _drive_job(self, job_id: str) -> None:
        backoff = 0.2
        while True:
            job = self.journal.get(job_id)
            if job is None:
                return
            try:
                if job.final:
                    if self.journal.backend_ref(job_id) == CANCEL_OWED:
                        await self._deliver_cancel(job)
                    return
                if job.state is JobState.PENDING and not job.site:
                    await self._place(job)
                elif job.state is JobState.PENDING:
                    await self._forward(job)
                else:
                    await self._follow(job)
                backoff = 0.2
                continue
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("job %s: hub %s: %s: %s; retrying in %.1fs", job_id, job.site, exc.code().name,
                            exc.details(), backoff)
            except Exception:
                log.exception("job %s: unexpected failure; retrying in %.1fs", job_id, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.retry_max_s)

    async def _deliver_cancel(self, job: Job) -> None:
        """Tell the hub a job it may have received is cancelled; it keeps the cancel even if the job arrives later."""
        try:
            remote = await self._site_of(job).stub.CancelJob(jobs_pb2.JobRef(job_id=job.id), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in REFUSALS:
                raise
            remote = None  # already ended there: nothing to cancel
        if remote is not None and remote.state != JobState.CANCELLED:
            log.info("job %s: hub %s says %s after the cancel", job.id, job.site, JobState(remote.state).name)
        self.journal.update(self.journal.get(job.id) or job, backend_ref="")

    async def _place(self, job: Job) -> None:
        """Choose the hub with the earliest estimated start, and record the choice before forwarding."""
        verdicts = await self.verdicts(job.spec)
        if verdicts and not any(v.fits or v.transient for v in verdicts):
            self._record(job.moved(JobState.FAILED, "no hub can run this job: " + "; ".join(
                f"{v.site} {v.reason}" for v in verdicts)))
            return
        free = {s.site: max((p.gpus_free for p in s.advert.partitions), default=0)
                for s in self.sites.values() if s.advert is not None}
        ranked = rank(verdicts, free)
        if not ranked:
            await self.sites_changed.wait_past(self.sites_changed.version, 2.0)
            return
        chosen = ranked[0]
        self._record(replace(job.moved(JobState.PENDING), site=chosen.site,
                             reason=f"forwarding to {chosen.site} (estimated wait {chosen.wait_s:.0f}s)"))

    async def verdicts(self, spec: JobSpec) -> list[Verdict]:
        """Each candidate hub with the reason it cannot take the job, or its estimated wait."""
        if spec.site and spec.site not in self.sites:
            return [Verdict(spec.site, "is no longer in this antenna's configuration")]
        candidates = [self.sites[spec.site]] if spec.site else list(self.sites.values())
        shape = jobs_pb2.JobShape(gpus=spec.gpus, walltime_s=spec.walltime_s, partition=spec.partition)

        fit_now = [s for s in candidates if s.advert is not None and s.fresh and not why_not(spec, s.advert)]
        ask = len(fit_now) > 1  # with a single hub that fits, there is nothing to compare: no estimate needed

        async def judge(site: HubSite) -> Verdict:
            if site.advert is None:
                return Verdict(site.site, f"has not been heard from ({site.error})", transient=True)
            if reason := why_not(spec, site.advert):
                return Verdict(site.site, reason)
            if not site.fresh:
                return Verdict(site.site, f"is unreachable ({site.error or 'advert expired'})", transient=True)
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

    async def _forward(self, job: Job) -> None:
        site = self._site_of(job)
        request = hub_pb2.ForwardJobRequest(idempotency_key=job.id, job=convert.job_to_pb(job))
        try:
            response = await site.stub.ForwardJob(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in REFUSALS:
                raise  # the outcome is unknown: retry the same hub with the same key
            self._record(job.moved(JobState.FAILED, f"hub {site.site} refused the job: {exc.details()}"))
            return
        current = self.journal.get(job.id) or job
        self._record(_merge(current, convert.job_from_pb(response.job)), from_hub=True)
        log.info("job %s forwarded to %s%s", job.id, site.site, " (already there)" if response.duplicate else "")

    async def _follow(self, job: Job) -> None:
        site = self._site_of(job)
        try:
            async for update in site.stub.WatchJob(jobs_pb2.JobRef(job_id=job.id)):
                current = self.journal.get(job.id) or job
                merged = _merge(current, convert.job_from_pb(update))
                if merged != current:
                    merged = self._record(merged, from_hub=True)
                if merged.final:
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self._record((self.journal.get(job.id) or job).moved(
                    JobState.LOST, f"hub {site.site} no longer knows this job"))
                return
            raise


def _merge(local: Job, remote: Job) -> Job:
    """The antenna's record updated with the hub's: the hub owns every state after PENDING."""
    if local.final and local.state is JobState.CANCELLED and not remote.final:
        return local  # cancelled here; the hub's cancel will follow
    own = tuple(t for t in local.history if t.state in ANTENNA_STATES)
    return replace(local, state=remote.state, partition=remote.partition,
                   exit_code=remote.exit_code, reason=remote.reason, history=own + remote.history,
                   updated_at=max(local.updated_at, remote.updated_at))
