"""A small async client for an antenna's user service, used by the CLI, the demo and the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import AsyncIterator
from pathlib import Path

from federation import convert
from federation.config import ClientConfig, load_client
from federation.errors import AifedError, ConfigError, error_from_status
from federation.model import Job, JobSpec, JobState
from federation.blobs import Chunk
from federation.pb import antenna_pb2, antenna_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel
from federation.tls import TlsFiles

@dataclass(frozen=True)
class Receipt:
    """A job accepted by a bulk submit: its id, state and place in its array (`get` has the rest)."""

    id: str
    state: JobState
    array_job: str = ""
    array_task: int = 0


DEFAULT_CONFIG = Path("~/.config/aifed/client.toml").expanduser()


def resolve_client_config(config: str | None = None, antenna: str | None = None, ca: str | None = None,
                          cert: str | None = None, key: str | None = None) -> ClientConfig:
    """Flags win over the config file (--config, then $AIFED_CONFIG, then ~/.config/aifed/client.toml)."""
    path = config or os.environ.get("AIFED_CONFIG") or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)
    if path is None and not (antenna and ca and cert and key):
        raise ConfigError("(no client config)", "",
                          "give --antenna, --ca, --cert and --key, or a client config file with --config, "
                          f"$AIFED_CONFIG or {DEFAULT_CONFIG}")
    base = load_client(path) if path else None
    tls = TlsFiles(ca=Path(ca) if ca else base.tls.ca, cert=Path(cert) if cert else base.tls.cert,
                   key=Path(key) if key else base.tls.key)
    return ClientConfig(antenna=antenna or base.antenna, tls=tls)


class AntennaClient:
    """`async with AntennaClient(config) as c:` then submit, get, list, watch, cancel, logs, sites."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.channel = secure_channel(config.antenna, config.tls)
        self.stub = antenna_pb2_grpc.AntennaStub(self.channel)

    async def __aenter__(self) -> "AntennaClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def submit(self, spec: JobSpec, request_id: str = "", timeout: float = 30, dry_run: bool = False) -> Job:
        msg = await self.stub.SubmitJob(antenna_pb2.SubmitJobRequest(
            spec=convert.spec_to_pb(spec), request_id=request_id, dry_run=dry_run), timeout=timeout)
        return convert.job_from_pb(msg)

    async def submit_many(self, entries: list[tuple[JobSpec, str, str]], timeout: float = 60
                          ) -> list[Receipt | AifedError]:
        """Submit (spec, request id, array) entries in one call: a receipt, or the refusal, per job (arrays
        expanded; a refused entry has one error)."""
        msg = await self.stub.SubmitJobs(antenna_pb2.SubmitJobsRequest(jobs=[
            antenna_pb2.SubmitJobRequest(spec=convert.spec_to_pb(spec), request_id=rid, array=array)
            for spec, rid, array in entries]), timeout=timeout)
        return [Receipt(r.accepted.id, JobState(r.accepted.state), r.accepted.array_job, r.accepted.array_task)
                if r.HasField("accepted") else error_from_status(r.error.code, r.error.message) for r in msg.results]

    async def upload(self, path: Path, sha256: str, size: int, timeout: float = 600) -> jobs_pb2.BlobInfo:
        """Upload one file's content, or the rest of an interrupted upload of it; nothing if the antenna holds it
        from you already. Returns what the antenna holds afterwards."""
        from federation.blobs import blob_chunks, put_blob
        held = await self.stub.StatBlob(jobs_pb2.BlobRef(sha256=sha256), timeout=30)
        if held.complete:
            return held
        return await put_blob(self.channel, "aifed.v1.Antenna")(blob_chunks(path, sha256, size, held.held),
                                                              timeout=timeout)

    async def list_outputs(self, job_id: str) -> jobs_pb2.OutputList:
        return await self.stub.ListOutputs(jobs_pb2.JobRef(job_id=job_id), timeout=30)

    async def fetch_output(self, job_id: str, name: str, offset: int = 0) -> AsyncIterator[Chunk]:
        """The output's chunks (offset, data), the data a view of the received message (not copied out)."""
        from federation.blobs import parse_chunk
        fetch = self.channel.unary_stream("/aifed.v1.Antenna/FetchOutput",
                                          request_serializer=jobs_pb2.FetchRequest.SerializeToString,
                                          response_deserializer=parse_chunk)
        async for chunk in fetch(jobs_pb2.FetchRequest(job_id=job_id, name=name, offset=offset)):
            yield chunk

    async def get(self, job_id: str) -> Job:
        return convert.job_from_pb(await self.stub.GetJob(jobs_pb2.JobRef(job_id=job_id), timeout=30))

    async def list(self, states: tuple[JobState, ...] = (), limit: int = 100) -> list[Job]:
        resp = await self.stub.ListJobs(
            antenna_pb2.ListJobsRequest(states=[int(s) for s in states], limit=limit), timeout=30)
        return [convert.job_from_pb(j) for j in resp.jobs]

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        async for msg in self.stub.WatchJob(jobs_pb2.JobRef(job_id=job_id)):
            yield convert.job_from_pb(msg)

    async def wait(self, job_id: str) -> Job:
        """Follow the job until it is in a final state, and return it."""
        job = None
        async for job in self.watch(job_id):
            if job.final:
                return job
        return await self.get(job_id)

    async def cancel(self, job_id: str) -> Job:
        return convert.job_from_pb(await self.stub.CancelJob(jobs_pb2.JobRef(job_id=job_id), timeout=30))

    async def logs(self, job_id: str, stream: int = jobs_pb2.LOG_STREAM_UNSPECIFIED,
                   follow: bool = False) -> AsyncIterator[jobs_pb2.LogChunk]:
        async for chunk in self.stub.StreamLogs(jobs_pb2.LogsRequest(job_id=job_id, stream=stream, follow=follow)):
            yield chunk

    async def sites(self) -> list[antenna_pb2.Site]:
        return list((await self.site_list()).sites)

    async def explain(self, job_id: str) -> antenna_pb2.Explanation:
        """Each hub's verdict for the job now, its status in words, its allocation."""
        return await self.stub.ExplainJob(jobs_pb2.JobRef(job_id=job_id), timeout=60)

    async def usage(self) -> antenna_pb2.UsageResponse:
        """The allocations (GPU-hour budgets) the caller may see, and what has been used of them."""
        return await self.stub.GetUsage(antenna_pb2.UsageRequest(), timeout=30)

    async def site_list(self) -> antenna_pb2.ListSitesResponse:
        """The sites, and when the antenna's own certificate expires."""
        return await self.stub.ListSites(antenna_pb2.ListSitesRequest(), timeout=30)
