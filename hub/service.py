"""The hub's gRPC service: thin translation between `aifed.v1.Hub` and `HubCore`."""

from __future__ import annotations

import asyncio
import time

from federation import blobs, convert
from federation.errors import AifedError, InvalidArgument, PermissionDenied
from federation.identity import Identity, Role
from federation.model import JobState
from federation.pb import hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import Rule, allow_roles, caller
from federation.tls import cert_expires
from federation.watch import follow
from hub.core import MAX_BATCH, HubCore

LOG_CHUNK = 64 * 1024
MAX_SHAPES = 64
CHANGES_BATCH = 1000
CHANGES_LINGER_S = 0.05
STREAMS = {jobs_pb2.LOG_STREAM_STDOUT: ("stdout",), jobs_pb2.LOG_STREAM_STDERR: ("stderr",),
           jobs_pb2.LOG_STREAM_UNSPECIFIED: ("stdout", "stderr")}
STREAM_ENUM = {"stdout": jobs_pb2.LOG_STREAM_STDOUT, "stderr": jobs_pb2.LOG_STREAM_STDERR}


OPERATOR_METHODS = ("GetAdvert", "WatchAdverts", "GetJob", "WatchJob", "CancelJob", "StreamLogs", "SetDrain",
                    "GetUsage")
OPERATOR_ONLY = ("SetDrain",)
# Peer hubs (load balancing): read adverts, send the inputs of jobs they hand over, hand jobs over, and look at or
# cancel the jobs they handed here.
PEER_METHODS = ("GetAdvert", "WatchAdverts", "PutBlob", "StatBlob", "HandOffJobs", "GetJob", "CancelJob")
PEER_ONLY = ("HandOffJobs",)


def blob_owner(who: Identity) -> str:
    """Whose upload it is at a hub: an antenna's (by its site name, what its jobs' inputs are checked against) or a
    peer hub's, for a job it hands over (`hub/<site>`: never an antenna's name)."""
    return f"hub/{who.site}" if who.role is Role.HUB else who.site


def access_rules(site: str) -> dict[str, Rule]:
    """Who may call what on a hub: antennas; this site's operators to look at and cancel any job here; peer hubs
    to balance load; never users, never another site's operators."""

    def rule(method: str) -> Rule:
        if method in PEER_ONLY:
            roles: tuple[Role, ...] = (Role.HUB,)
        elif method in OPERATOR_ONLY:
            roles = (Role.OPERATOR,)
        else:
            roles = (Role.ANTENNA, Role.OPERATOR) if method in OPERATOR_METHODS else (Role.ANTENNA,)
            roles += (Role.HUB,) if method in PEER_METHODS else ()
        by_role = allow_roles(*roles)

        def check(who: Identity) -> None:
            by_role(who)
            if who.role is Role.OPERATOR and who.site != site:
                raise PermissionDenied(f"operator {who.name} of site {who.site} may not operate hub {site}")
            if who.role is Role.HUB and who.site == site:
                raise PermissionDenied(f"hub {site} does not call itself as a peer")
        return check

    service = hub_pb2.DESCRIPTOR.services_by_name["Hub"]
    return {f"/{service.full_name}/{m.name}": rule(m.name) for m in service.methods}


class HubService(hub_pb2_grpc.HubServicer):
    def __init__(self, core: HubCore):
        self.core = core

    async def advert(self, shapes=()) -> jobs_pb2.Advert:
        cfg, core = self.core.config, self.core
        if len(shapes) > MAX_SHAPES:
            raise InvalidArgument(f"ask for at most {MAX_SHAPES} job shapes at once")
        usage = {u.name: u for u in core.backend.usage()}
        now = time.time()
        estimates = []
        for shape in shapes:
            for partition, wait in await core.estimates(shape.gpus, shape.walltime_s or 1, shape.partition):
                estimates.append(jobs_pb2.StartEstimate(shape=shape, partition=partition,
                                                        earliest_start=convert.ts(now + wait), wait_s=int(wait)))
        health = core.backend.health()
        return jobs_pb2.Advert(
            degraded=not health.ok, status_message=health.message, site=cfg.site, federation=cfg.federation,
            services=cfg.services, sectors=cfg.sectors,
            access_modes=[int(m) for m in cfg.access_modes], sequence=core.capacity.version,
            cert_expires_at=convert.ts(cert_expires(cfg.tls)), draining=bool(drain := core.drain_now(now)),
            drain_reason=drain,
            maintenance=[jobs_pb2.Maintenance(start=convert.ts(w.start), end=convert.ts(w.end), reason=w.reason)
                         for w in core.maintenance_ahead(now)],
            countries=cfg.countries, location=cfg.location,
            mode_limits=[jobs_pb2.ModeLimits(mode=int(m.mode), max_gpus=m.max_gpus, max_walltime_s=m.max_walltime_s,
                                             max_gpu_hours=m.max_gpu_hours, period_s=m.period_s)
                         for m in cfg.mode_limits],
            issued_at=convert.ts(now), ttl_s=cfg.advert_ttl_s, estimates=estimates,
            partitions=[jobs_pb2.PartitionAdvert(
                name=p.name, gpu_model=p.gpu_model, gflops_per_watt=p.gflops_per_watt,
                gpus_total=usage[p.name].gpus_total, gpus_free=usage[p.name].gpus_free,
                running_jobs=usage[p.name].running_jobs, pending_jobs=usage[p.name].pending_jobs,
                pending_gpu_seconds=usage[p.name].pending_gpu_seconds, max_walltime_s=p.max_walltime_s,
                max_cpus=cfg.cpu_slots)
                for p in cfg.partitions])

    async def GetAdvert(self, request, context):
        return await self.advert(request.shapes)

    async def WatchAdverts(self, request, context):
        heartbeat = max(1.0, self.core.config.advert_ttl_s / 3)
        version = -1
        while True:
            version = self.core.capacity.version
            yield await self.advert(request.shapes)
            await self.core.capacity.wait_past(version, heartbeat)
            await asyncio.sleep(0.05)  # coalesce bursts of changes into one advert

    async def ForwardJob(self, request, context):
        job, duplicate = await self.core.forward(caller(), request.idempotency_key, convert.job_from_pb(request.job))
        return hub_pb2.ForwardJobResponse(job=convert.job_to_pb(job), duplicate=duplicate)

    async def ForwardJobs(self, request, context):
        return await self._forward_jobs(request)

    async def HandOffJobs(self, request, context):
        return await self._forward_jobs(request, hand_off=True)

    async def _forward_jobs(self, request, hand_off: bool = False) -> hub_pb2.ForwardJobsResponse:
        if len(request.jobs) > MAX_BATCH:  # before converting any of them
            raise InvalidArgument(f"at most {MAX_BATCH} jobs per batch, not {len(request.jobs)}")
        requests = [(r.idempotency_key, convert.job_from_pb(r.job)) for r in request.jobs]
        answers = await self.core.forward_many(caller(), requests, hand_off=hand_off)
        response = hub_pb2.ForwardJobsResponse()
        add = response.results.add  # built in place: a message given to a list is copied into it
        for (job_or_error, duplicate), (_, asked) in zip(answers, requests):
            if isinstance(job_or_error, AifedError):
                add(job_id=asked.id, error=convert.error_pb(job_or_error))
            else:
                add(job_id=asked.id, accepted=convert.receipt_pb(job_or_error), duplicate=duplicate)
        return response

    async def WatchChanges(self, request, context):
        who, journal, changes = caller(), self.core.journal, self.core.changes
        after = request.after if request.epoch == journal.epoch else 0
        caught_up = False
        while True:
            version = changes.version
            rows = journal.changes(who.site, after, CHANGES_BATCH)
            if rows:
                after = rows[-1][0]
                caught_up = len(rows) < CHANGES_BATCH
                message = hub_pb2.JobChanges(epoch=journal.epoch, sequence=after, caught_up=caught_up)
                add = message.jobs.add  # each job built in place: a message given to a list is copied into it
                for _, record in rows:
                    convert.progress_pb(record, add)
                yield message
                continue
            if not caught_up:
                caught_up = True
                yield hub_pb2.JobChanges(epoch=journal.epoch, sequence=after, caught_up=True)
            await changes.wait_past(version, 30.0)
            await asyncio.sleep(CHANGES_LINGER_S)  # changes come in bursts: send them together

    async def GetJob(self, request, context):
        return convert.job_to_pb(self.core.get(caller(), request.job_id))

    async def WatchJob(self, request, context):
        who = caller()
        async for job in follow(self.core.jobs, request.job_id, lambda: self.core.get(who, request.job_id)):
            yield convert.job_to_pb(job)

    async def CancelJob(self, request, context):
        return convert.job_to_pb(await self.core.cancel(caller(), request.job_id))

    async def SetDrain(self, request, context):
        self.core.set_drain(caller(), request.drain, request.reason)
        counts = self.core.journal.census()[0]
        return hub_pb2.DrainState(draining=self.core.draining, reason=self.core.drain_now(),
                                  jobs_running=counts.get(JobState.RUNNING, 0),
                                  jobs_queued=counts.get(JobState.QUEUED, 0))

    async def PutBlob(self, request_iterator, context):
        return await blobs.put_rpc(self.core.blobs, blob_owner(caller()), request_iterator,
                                   self.core.metrics.uploaded_bytes.inc)

    async def StatBlob(self, request, context):
        return blobs.stat_rpc(self.core.blobs, blob_owner(caller()), request)

    async def ListOutputs(self, request, context):
        job = self.core.get(caller(), request.job_id)
        ready, files, error = self.core.outputs.listing(job)
        return jobs_pb2.OutputList(ready=ready, error=error, files=[
            jobs_pb2.InputFile(name=f.name, sha256=f.sha256, size=f.size) for f in files])

    async def FetchOutput(self, request, context):
        job = self.core.get(caller(), request.job_id)
        f = self.core.outputs.open(job, request.name, request.offset)
        offset = request.offset
        with f:  # the next chunk is read (in a worker thread) while this one is sent
            reading = asyncio.ensure_future(asyncio.to_thread(f.read, blobs.CHUNK_BYTES))
            try:
                while data := await reading:
                    reading = asyncio.ensure_future(asyncio.to_thread(f.read, blobs.CHUNK_BYTES))
                    yield blobs.chunk_bytes(offset, data)  # serialized here: one copy fewer
                    offset += len(data)
            finally:
                await asyncio.shield(reading)  # before the file is closed

    async def GetUsage(self, request, context):
        since, rows = await self.core.usage(caller(), request.days or 30)
        reply = hub_pb2.HubUsageResponse(site=self.core.config.site, rows=[
            hub_pb2.AntennaUsage(antenna=r.antenna, project=r.project, mode=int(r.mode), used_gpu_hours=r.used_s / 3600,
                                 reserved_gpu_hours=r.reserved_s / 3600, jobs=r.jobs) for r in rows])
        reply.since.FromNanoseconds(int(since * 1e9))
        return reply

    async def StreamLogs(self, request, context):
        who = caller()
        job = self.core.get(who, request.job_id)
        streams = STREAMS.get(request.stream)
        if streams is None:
            raise InvalidArgument(f"unknown log stream {request.stream}")
        offsets = dict.fromkeys(streams, 0)
        while True:
            # Read the state before the files: output written before the job ended is never missed.
            ended = job.final
            sent = False
            for name in streams:
                while data := self.core.backend.read_log(job.id, name, offsets[name], LOG_CHUNK):
                    yield jobs_pb2.LogChunk(stream=STREAM_ENUM[name], offset=offsets[name], data=data)
                    offsets[name] += len(data)
                    sent = True
            if not request.follow or ended:
                return
            if not sent:
                await asyncio.sleep(0.2)
            job = self.core.get(who, request.job_id)
            if job.state == JobState.QUEUED:
                await asyncio.sleep(0.3)
