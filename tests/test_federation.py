"""End to end through real daemons over mutual TLS: every final state, placement, logs, restarts."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from federation import convert
from federation.identity import Role
from federation.model import Job, JobSpec, JobState
from federation.pb import hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel
from tests.conftest import eventually


def sh(script: str, **kw) -> JobSpec:
    return JobSpec(argv=("sh", "-c", script), **{"walltime_s": 60, **kw})


def states(job: Job) -> list[JobState]:
    return [t.state for t in job.history]


async def test_completed_with_output_and_full_history(fed):
    client = fed.client("alice")
    job = await client.submit(sh("echo out; echo err >&2"))
    assert job.state is JobState.PENDING and job.id.startswith("antenna-a-")
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED and done.exit_code == 0
    # Accepted by the antenna, placed by it (two hubs: a choice, recorded), then the hub's states.
    assert states(done) == [JobState.PENDING, JobState.PENDING, JobState.FORWARDED, JobState.QUEUED,
                            JobState.RUNNING, JobState.COMPLETED]
    assert done.history[1].reason.startswith(f"placed on {done.site} (estimated wait ")
    stamps = [t.at for t in done.history]
    assert stamps == sorted(stamps) and stamps[0] > 0
    assert done.site in ("leonardo", "lumi") and done.partition
    out = b"".join([c.data async for c in client.logs(job.id, jobs_pb2.LOG_STREAM_STDOUT)])
    err = b"".join([c.data async for c in client.logs(job.id, jobs_pb2.LOG_STREAM_STDERR)])
    assert (out, err) == (b"out\n", b"err\n")


async def test_failed_keeps_exit_code(fed):
    client = fed.client("alice")
    done = await client.wait((await client.submit(sh("exit 7"))).id)
    assert done.state is JobState.FAILED and done.exit_code == 7 and "code 7" in done.reason


async def test_timeout_at_walltime(fed):
    client = fed.client("alice")
    done = await client.wait((await client.submit(sh("sleep 30", walltime_s=1))).id)
    assert done.state is JobState.TIMEOUT
    took = done.history[-1].at - next(t.at for t in done.history if t.state is JobState.RUNNING)
    assert 0.9 <= took < 5


async def test_cancel_running_job(fed):
    client = fed.client("alice")
    job = await client.submit(sh("echo started; sleep 30"))
    await eventually(lambda: _is(client, job.id, JobState.RUNNING))
    cancelled = await client.cancel(job.id)
    assert cancelled.state in (JobState.RUNNING, JobState.CANCELLED)
    done = await client.wait(job.id)
    assert done.state is JobState.CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.cancel(job.id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already ended" in err.value.details()


async def test_lost_when_job_dies_while_hub_is_down(fed):
    """A hub restarted after its job's processes vanished says LOST, not COMPLETED or silence."""
    client = fed.client("alice")
    job = await client.submit(sh("sleep 30", site="lumi"))
    running = await eventually(lambda: _is(client, job.id, JobState.RUNNING))
    await fed.hubs["lumi"].stop()
    pid = _pid_of(fed, "lumi", job.id)
    os.killpg(pid, signal.SIGKILL)
    await eventually(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid))
    await fed.start_hub("lumi")
    done = await client.wait(job.id)
    assert running.site == "lumi"
    assert done.state is JobState.LOST and "hub was down" in done.reason


async def test_hub_restart_takes_back_running_job(fed):
    """A hub that restarts while a job runs follows it to its real end."""
    client = fed.client("alice")
    job = await client.submit(sh("sleep 1.5; echo finished", site="leonardo"))
    await eventually(lambda: _is(client, job.id, JobState.RUNNING))
    await fed.hubs["leonardo"].stop()
    await fed.start_hub("leonardo")
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED and done.exit_code == 0
    assert b"finished" in b"".join([c.data async for c in client.logs(job.id)])


async def test_gpu_jobs_queue_when_partition_full_and_placement_prefers_idle_hub(fed):
    client = fed.client("alice")
    first = await client.submit(sh("sleep 2", gpus=4, site="leonardo"))
    await eventually(lambda: _is(client, first.id, JobState.RUNNING))
    queued = await client.submit(sh("true", gpus=4, site="leonardo"))
    await eventually(lambda: _is(client, queued.id, JobState.QUEUED))
    sites = {s.site: s for s in await client.sites()}
    await eventually(lambda: fed.antennas["antenna-a"].core.sites["leonardo"].advert.partitions[0].pending_jobs == 1)
    free = await client.submit(sh("true", gpus=4))  # unpinned: lumi can start it now, leonardo in ~60 s
    assert (await client.wait(free.id)).site == "lumi"
    assert (await client.wait(queued.id)).state is JobState.COMPLETED
    assert set(sites) == {"leonardo", "lumi"}


async def test_list_and_watch(fed):
    client = fed.client("alice")
    ids = [(await client.submit(sh(f"exit {i}", name=f"j{i}"))).id for i in range(3)]
    seen = [j async for j in client.watch(ids[0])]
    assert seen[-1].final and [s.state for s in seen] == sorted(s.state for s in seen)
    for job_id in ids:
        await client.wait(job_id)
    listed = await client.list()
    assert [j.id for j in listed][:3] == ids[::-1]
    failed = await client.list(states=(JobState.FAILED,))
    assert {j.id for j in failed} == set(ids[1:])
    # Another user of the same antenna sees none of them.
    assert await fed.client("bob").list() == []


async def test_logs_follow_streams_until_the_end(fed):
    client = fed.client("alice")
    job = await client.submit(sh("for i in 1 2 3; do echo line $i; sleep 0.3; done"))
    data = b"".join([c.data async for c in client.logs(job.id, follow=True)])
    assert data == b"line 1\nline 2\nline 3\n"
    assert (await client.get(job.id)).state is JobState.COMPLETED


async def test_submit_request_id_is_idempotent(fed):
    client = fed.client("alice")
    a = await client.submit(sh("true"), request_id="retry-1")
    b = await client.submit(sh("true"), request_id="retry-1")
    assert a.id == b.id
    assert len(await client.list()) == 1


async def test_forward_is_idempotent_at_the_hub(fed, test_pki):
    """The same idempotency key twice: one job, run once; the second answer says duplicate."""
    port = fed.hubs["leonardo"].port
    async with secure_channel(f"127.0.0.1:{port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as channel:
        stub = hub_pb2_grpc.HubStub(channel)
        job = Job(id="antenna-a-idem", spec=sh("echo once >> $HOME/../../count; echo ran"), state=JobState.PENDING,
                  owner="spiffe://eurohpc.test/user/antenna-a/alice")
        request = hub_pb2.ForwardJobRequest(idempotency_key="key-1", job=convert.job_to_pb(job))
        first, second = await asyncio.gather(stub.ForwardJob(request), stub.ForwardJob(request))
        assert sorted([first.duplicate, second.duplicate]) == [False, True]
        assert first.job.id == second.job.id == "antenna-a-idem"
        async for update in stub.WatchJob(jobs_pb2.JobRef(job_id="antenna-a-idem")):
            if JobState(update.state).final:
                break
        third = await stub.ForwardJob(request)
        assert third.duplicate and third.job.state == JobState.COMPLETED
        runs = (fed.hubs["leonardo"].config.state_dir / "count").read_text()
        assert runs == "once\n"


async def test_antenna_restart_finishes_jobs_it_acknowledged(fed):
    """Jobs acknowledged but not yet forwarded, and jobs running, are finished by a restarted antenna."""
    client = fed.client("alice")
    running = await client.submit(sh("sleep 1; echo done-running"))
    await eventually(lambda: _is(client, running.id, JobState.RUNNING))
    # Stop both hubs, so that the next job can only be acknowledged, not forwarded.
    for site in ("leonardo", "lumi"):
        await fed.hubs[site].stop()
    pending = await client.submit(sh("echo done-pending"))
    assert (await client.get(pending.id)).state is JobState.PENDING
    await fed.antennas["antenna-a"].stop()
    for site in ("leonardo", "lumi"):
        await fed.start_hub(site)
    await fed.start_antenna("antenna-a")
    client = fed.client("alice")
    done_running, done_pending = await client.wait(running.id), await client.wait(pending.id)
    assert done_running.state is JobState.COMPLETED and done_pending.state is JobState.COMPLETED
    # accepted, placed after the restart (a choice between two hubs, recorded), then forwarded
    assert states(done_pending)[:3] == [JobState.PENDING, JobState.PENDING, JobState.FORWARDED]
    hub_jobs = [fed.hubs[s].core.journal.get(pending.id) for s in ("leonardo", "lumi")]
    assert sum(j is not None for j in hub_jobs) == 1  # forwarded exactly once


async def test_sites_lists_capacity(fed):
    sites = {s.site: s for s in await fed.client("alice").sites()}
    assert set(sites) == {"leonardo", "lumi"}
    for s in sites.values():
        assert s.reachable and s.advert.site == s.site
        booster = next(p for p in s.advert.partitions if p.name == "booster")
        assert (booster.gpu_model, booster.gpus_total, booster.max_walltime_s) == ("A100", 4, 3600)


async def test_antenna_marks_unreachable_hub(fed):
    await fed.hubs["lumi"].stop()
    core = fed.antennas["antenna-a"].core
    await eventually(lambda: not core.sites["lumi"].fresh)
    sites = {s.site: s for s in await fed.client("alice").sites()}
    assert not sites["lumi"].reachable and sites["lumi"].error
    job = await fed.client("alice").submit(sh("true"))
    assert (await fed.client("alice").wait(job.id)).site == "leonardo"


async def _is(client, job_id: str, state: JobState):
    job = await client.get(job_id)
    assert not job.final or job.state is state, f"{job_id} ended {job.state.name}: {job.reason}"
    return job if job.state is state else None


def _pid_of(fed, site: str, job_id: str) -> int:
    import orjson
    ref = fed.hubs[site].config.state_dir / "hub.sqlite"
    from federation.journal import Journal
    journal = Journal(ref)
    try:
        return orjson.loads(journal.backend_ref(job_id))["pid"]
    finally:
        journal.close()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_second_daemon_on_the_same_state_is_refused(fed):
    from hub.daemon import HubDaemon
    with pytest.raises(RuntimeError, match="another aifed process is using the journal"):
        await HubDaemon(fed.hubs["leonardo"].config).start()
    assert (await fed.client("alice").wait((await fed.client("alice").submit(sh("true"))).id)).final
