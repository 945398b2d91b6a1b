"""The antenna's user-facing gRPC service: thin translation between `aifed.v1.Antenna` and `AntennaCore`."""

from __future__ import annotations

from federation import blobs, convert
from federation.errors import AifedError, InvalidArgument, PermissionDenied
from federation.identity import Identity, Role, article
from federation.model import JobState
from federation.pb import antenna_pb2, antenna_pb2_grpc
from federation.rpc import Rule, caller
from federation.tls import cert_expires
from federation.watch import follow
from antenna.allocations import AllocationUsage, UserUsage
from antenna.core import MAX_SUBMIT, AntennaCore, Submission


OPERATOR_METHODS = ("GetJob", "ListJobs", "WatchJob", "CancelJob", "StreamLogs", "ListSites", "GetUsage",
                    "ExplainJob")


def access_rules(site: str) -> dict[str, Rule]:
    """Users of this antenna, and its operators to look at and cancel every job here (operators submit
    nothing: a job belongs to a user). Another antenna, a hub, or anyone vouched for by another site is
    refused."""

    def rule(method: str) -> Rule:
        roles = (Role.USER, Role.OPERATOR) if method in OPERATOR_METHODS else (Role.USER,)

        def check(who: Identity) -> None:
            if who.role not in roles:
                raise PermissionDenied(f"{article(who.role.value)} may not call {method} on antenna {site}; it is for "
                                       + " and ".join(f"{r.value}s" for r in roles) + " of this antenna")
            if who.site != site:
                where = "antenna" if who.role is Role.USER else "site"
                raise PermissionDenied(f"{who.role.value} {who.name} belongs to {where} {who.site}, not {site}"
                                       + (f"; submit through {who.site}" if who.role is Role.USER else ""))
        return check

    service = antenna_pb2.DESCRIPTOR.services_by_name["Antenna"]
    return {f"/{service.full_name}/{m.name}": rule(m.name) for m in service.methods}


class AntennaService(antenna_pb2_grpc.AntennaServicer):
    def __init__(self, core: AntennaCore):
        self.core = core

    async def SubmitJob(self, request, context):
        if not request.HasField("spec"):
            raise InvalidArgument("the request has no job spec")
        if request.array:
            raise InvalidArgument("a job array is submitted with SubmitJobs (aifed submit --array)")
        if request.dry_run:
            return convert.job_to_pb(await self.core.dry_run(caller(), convert.spec_from_pb(request.spec)))
        job = await self.core.submit(caller(), convert.spec_from_pb(request.spec), request.request_id)
        return convert.job_to_pb(job)

    async def SubmitJobs(self, request, context):
        if len(request.jobs) > MAX_SUBMIT:
            raise InvalidArgument(f"at most {MAX_SUBMIT} jobs per call, not {len(request.jobs)}")
        entries: list[Submission | AifedError] = []
        for r in request.jobs:
            try:
                if not r.HasField("spec"):
                    raise InvalidArgument("the request has no job spec")
                entries.append(Submission(convert.spec_from_pb(r.spec), r.request_id, r.array))
            except AifedError as exc:
                entries.append(exc)
        valid = [e for e in entries if isinstance(e, Submission)]
        outcomes = iter(await self.core.submit_many(caller(), valid))
        response = antenna_pb2.SubmitJobsResponse()
        add = response.results.add  # built in place: a message given to a list is copied into it
        for entry in entries:
            outcome = entry if isinstance(entry, AifedError) else next(outcomes)
            if isinstance(outcome, AifedError):
                add(error=convert.error_pb(outcome))
            else:
                for job in outcome:
                    add(accepted=convert.receipt_pb(job))
        return response

    async def GetJob(self, request, context):
        return convert.job_to_pb(self.core.get(caller(), request.job_id))

    async def ListJobs(self, request, context):
        try:
            states = [JobState(s) for s in request.states]
        except ValueError:
            raise InvalidArgument("unknown job state in the filter") from None
        jobs = self.core.list(caller(), states, request.limit or 100)
        return antenna_pb2.ListJobsResponse(jobs=[convert.job_to_pb(j) for j in jobs])

    async def WatchJob(self, request, context):
        who = caller()
        async for job in follow(self.core.jobs, request.job_id, lambda: self.core.get(who, request.job_id)):
            yield convert.job_to_pb(job)

    async def CancelJob(self, request, context):
        return convert.job_to_pb(await self.core.cancel(caller(), request.job_id))

    async def StreamLogs(self, request, context):
        async for chunk in self.core.logs(caller(), request):
            yield chunk

    async def ListSites(self, request, context):
        out = []
        for site in self.core.sites.values():
            msg = antenna_pb2.Site(site=site.site, endpoint=site.endpoint, reachable=site.fresh,
                                   error=site.left or site.error, left=bool(site.left))
            if site.advert is not None:
                msg.advert.CopyFrom(site.advert)
                msg.advert_received_at.CopyFrom(convert.ts(site.received_at))
            out.append(msg)
        discovery = self.core.discovery
        return antenna_pb2.ListSitesResponse(sites=out,
                                             cert_expires_at=convert.ts(cert_expires(self.core.config.tls)),
                                             discovery=discovery.backend, discovery_degraded=discovery.degraded)


    async def ExplainJob(self, request, context):
        job, status, ranked, pinned, allocation, placed = await self.core.explain(caller(), request.job_id)
        return antenna_pb2.Explanation(
            job=convert.job_to_pb(job), status=status, pinned=pinned, allocation=allocation,
            placed=placed.reason if placed else "", placed_at=convert.ts(placed.at) if placed else None,
            sites=[antenna_pb2.SiteVerdict(site=v.site, reason=v.reason, transient=v.transient,
                                           has_wait=v.wait_s is not None, wait_s=v.wait_s or 0.0, rank=r)
                   for v, r in ranked])

    async def PutBlob(self, request_iterator, context):
        return await blobs.put_rpc(self.core.blobs, caller().uri, request_iterator,
                                   self.core.metrics.uploaded_bytes.inc)

    async def StatBlob(self, request, context):
        return blobs.stat_rpc(self.core.blobs, caller().uri, request)

    async def ListOutputs(self, request, context):
        return await self.core.list_outputs(caller(), request.job_id)

    async def FetchOutput(self, request, context):
        async for chunk in self.core.fetch_output(caller(), request):
            yield chunk

    async def GetUsage(self, request, context):
        allocations, users = self.core.usage(caller())
        return antenna_pb2.UsageResponse(allocations=[_allocation_pb(u) for u in allocations],
                                         users=[_user_pb(u) for u in users])


def _allocation_pb(u: AllocationUsage) -> antenna_pb2.AllocationUsage:
    a = u.allocation
    return antenna_pb2.AllocationUsage(
        project=a.project, hub=a.hub, modes=[int(m) for m in a.modes], start=convert.ts(a.start),
        end=convert.ts(a.end), gpu_hours=a.gpu_hours, used_gpu_hours=u.used_s / 3600,
        reserved_gpu_hours=u.reserved_s / 3600, remaining_gpu_hours=u.remaining_s / 3600, jobs=u.jobs)


def _user_pb(u: UserUsage) -> antenna_pb2.UserUsage:
    return antenna_pb2.UserUsage(project=u.project, owner=u.owner, used_gpu_hours=u.used_s / 3600,
                                 reserved_gpu_hours=u.reserved_s / 3600, jobs=u.jobs)
