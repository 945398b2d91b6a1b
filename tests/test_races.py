"""Regression tests for races and reconfigurations: cancels that must stick, ids that must not be paths."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from federation import convert
from federation.config import PartitionConfig
from federation.identity import Role
from federation.model import Job, JobSpec, JobState
from federation.pb import hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel
from tests.conftest import eventually

ALICE = "spiffe://eurohpc.test/user/antenna-a/alice"


def sh(script: str, **kw) -> JobSpec:
    return JobSpec(argv=("sh", "-c", script), **{"walltime_s": 60, **kw})


@pytest.mark.parametrize("job_id", ["/tmp/victim", ".", "..", "antenna-a-../../x", "antenna-b-123", "ANTENNA-A-1",
                                    "antenna-a-"])
async def test_job_ids_that_are_paths_or_foreign_are_refused(fed, test_pki, tmp_path, job_id):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    async with secure_channel(f"127.0.0.1:{fed.hubs['leonardo'].port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as ch:
        job = Job(id=job_id.replace("/tmp/victim", str(victim)), spec=sh("true"), state=JobState.PENDING, owner=ALICE)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hub_pb2_grpc.HubStub(ch).ForwardJob(
                hub_pb2.ForwardJobRequest(idempotency_key="k", job=convert.job_to_pb(job)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not valid" in err.value.details()
    assert (victim / "precious.txt").read_text() == "keep me"
    assert fed.hubs["leonardo"].core.journal.count() == 0


async def test_cancel_that_arrives_before_the_forward_wins(fed, test_pki):
    """A forward whose outcome the antenna never learned, then a cancel: the late forward must not run."""
    async with secure_channel(f"127.0.0.1:{fed.hubs['leonardo'].port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as ch:
        stub = hub_pb2_grpc.HubStub(ch)
        cancelled = await stub.CancelJob(jobs_pb2.JobRef(job_id="antenna-a-late1"))
        assert cancelled.state == JobState.CANCELLED
        job = Job(id="antenna-a-late1", spec=sh("echo ran > $HOME/../../late"), state=JobState.PENDING, owner=ALICE)
        late = await stub.ForwardJob(hub_pb2.ForwardJobRequest(idempotency_key="antenna-a-late1",
                                                               job=convert.job_to_pb(job)))
    assert late.duplicate and late.job.state == JobState.CANCELLED
    await asyncio.sleep(0.5)
    assert not (fed.hubs["leonardo"].config.state_dir / "late").exists()


async def test_a_job_cancelled_while_its_batch_goes_to_the_backend_is_not_submitted(fed, test_pki, monkeypatch):
    """The hub hands a forwarded batch to its backend one job after another; a cancel that comes meanwhile for a
    job not yet handed over keeps that job from the backend."""
    hub = fed.hubs["leonardo"].core
    real, submitted = hub.backend.submit, []
    first_in, release = asyncio.Event(), asyncio.Event()

    async def slow_submit(job):
        submitted.append(job.id)
        if len(submitted) == 1:
            first_in.set()
            await release.wait()
        await real(job)

    monkeypatch.setattr(hub.backend, "submit", slow_submit)
    state_dir = fed.hubs["leonardo"].config.state_dir
    batch = hub_pb2.ForwardJobsRequest(jobs=[hub_pb2.ForwardJobRequest(
        idempotency_key=f"antenna-a-ho{i}", job=convert.job_to_pb(Job(
            id=f"antenna-a-ho{i}", spec=sh(f"echo ran > {state_dir}/ran{i}"), state=JobState.PENDING, owner=ALICE)))
        for i in (1, 2)])
    async with secure_channel(f"127.0.0.1:{fed.hubs['leonardo'].port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as ch:
        stub = hub_pb2_grpc.HubStub(ch)
        call = asyncio.ensure_future(stub.ForwardJobs(batch, timeout=30))
        await asyncio.wait_for(first_in.wait(), 10)
        cancelled = await stub.CancelJob(jobs_pb2.JobRef(job_id="antenna-a-ho2"), timeout=10)
        assert cancelled.state == JobState.CANCELLED
        release.set()
        results = (await call).results
    assert [r.job_id for r in results] == ["antenna-a-ho1", "antenna-a-ho2"]
    assert submitted == ["antenna-a-ho1"]
    await eventually(lambda: (state_dir / "ran1").exists())
    await asyncio.sleep(0.5)
    assert not (state_dir / "ran2").exists() and hub.journal.get("antenna-a-ho2").state is JobState.CANCELLED
    assert not hub._handing_over and not hub._cancelled_on_the_way  # nothing kept once the batch is handed over


async def test_a_job_cancelled_just_after_its_batch_is_committed_is_not_submitted(fed, test_pki, monkeypatch):
    """A cancel that comes between the forwarded batch's commit and the start of its hand-over (the moment the
    forward's commit returns) also keeps the job from the backend."""
    from federation.identity import Identity
    hub = fed.hubs["leonardo"].core
    real_commit, real_submit, submitted = hub.journal.commit, hub.backend.submit, []
    antenna = Identity("eurohpc.test", Role.ANTENNA, "antenna-a")

    async def commit_then_cancel(fn):
        result = await real_commit(fn)
        if hub.journal.get("antenna-a-race1") is not None and not submitted and not hub.journal.get(
                "antenna-a-race1").final:
            assert (await hub.cancel(antenna, "antenna-a-race1")).state is JobState.CANCELLED
        return result

    async def recording_submit(job):
        submitted.append(job.id)
        await real_submit(job)

    monkeypatch.setattr(hub.journal, "commit", commit_then_cancel)
    monkeypatch.setattr(hub.backend, "submit", recording_submit)
    state_dir = fed.hubs["leonardo"].config.state_dir
    job = Job(id="antenna-a-race1", spec=sh(f"echo ran > {state_dir}/race1"), state=JobState.PENDING, owner=ALICE)
    async with secure_channel(f"127.0.0.1:{fed.hubs['leonardo'].port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as ch:
        result = (await hub_pb2_grpc.HubStub(ch).ForwardJobs(hub_pb2.ForwardJobsRequest(jobs=[
            hub_pb2.ForwardJobRequest(idempotency_key="antenna-a-race1", job=convert.job_to_pb(job))]),
            timeout=30)).results[0]
    assert result.job_id == "antenna-a-race1" and not result.HasField("error")
    await asyncio.sleep(0.5)
    assert submitted == [] and not (state_dir / "race1").exists()
    assert hub.journal.get("antenna-a-race1").state is JobState.CANCELLED
    assert not hub._handing_over and not hub._cancelled_on_the_way


async def test_cancel_during_placement_is_not_overwritten(fed, monkeypatch):
    """Placement that finishes after a cancel must not bring the job back to life."""
    core = fed.antennas["antenna-a"].core
    real = core.verdicts

    async def slow_verdicts(spec):
        result = await real(spec)
        await asyncio.sleep(1.0)
        return result

    monkeypatch.setattr(core, "verdicts", slow_verdicts)
    client = fed.client("alice")
    job = await client.submit(sh("echo ran"))
    await asyncio.sleep(0.3)
    assert (await client.cancel(job.id)).state is JobState.CANCELLED
    await asyncio.sleep(2.0)
    final = await client.get(job.id)
    assert final.state is JobState.CANCELLED and [t.state for t in final.history][-1] is JobState.CANCELLED
    assert all(h.core.journal.get(job.id) is None for h in fed.hubs.values())


async def test_antenna_that_lost_a_hub_from_its_config_reports_its_jobs_lost(fed):
    client = fed.client("alice")
    job = await client.submit(sh("sleep 20", site="leonardo"))
    await eventually(lambda: _state(client, job.id, JobState.RUNNING))
    await fed.antennas["antenna-a"].stop()
    await fed.start_antenna("antenna-a", hubs=("lumi",))
    client = fed.client("alice")
    done = await client.get(job.id)
    assert done.state is JobState.LOST and "no longer in this antenna's configuration" in done.reason
    await fed.hubs["leonardo"].core.cancel(_antenna("antenna-a"), job.id)  # do not leave it running


async def test_hub_restart_with_a_removed_partition_fails_its_queued_jobs(fed):
    client = fed.client("alice")
    blocker = await client.submit(sh("sleep 6", gpus=4, site="leonardo", partition="booster"))
    await eventually(lambda: _state(client, blocker.id, JobState.RUNNING))
    queued = await client.submit(sh("true", gpus=4, site="leonardo", partition="booster"))
    await eventually(lambda: _state(client, queued.id, JobState.QUEUED))
    await fed.hubs["leonardo"].stop()
    await fed.start_hub("leonardo", partitions=(PartitionConfig("booster", "A100", 2, 3600),
                                                PartitionConfig("dcgp", "", 0, 600)))
    done = await client.wait(queued.id)
    assert done.state is JobState.FAILED and "no longer fits" in done.reason
    assert (await client.wait(blocker.id)).state is JobState.COMPLETED  # the running one is followed to its end
    advert = await fed.antennas["antenna-a"].core.sites["leonardo"].stub.GetAdvert(
        hub_pb2.AdvertRequest(shapes=[jobs_pb2.JobShape(gpus=1, walltime_s=60)]))
    assert advert.estimates  # no INTERNAL from the estimate after the shrink


async def _state(client, job_id, state):
    job = await client.get(job_id)
    assert not job.final or job.state is state, f"{job_id} ended {job.state.name}: {job.reason}"
    return job if job.state is state else None


def _antenna(site: str):
    from federation.identity import Identity
    return Identity("eurohpc.test", Role.ANTENNA, site)
