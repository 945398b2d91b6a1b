"""`aifed site drain|resume`: a drained hub takes no new jobs, lets its own run to the end, and keeps draining
across a restart; antennas place elsewhere, and jobs pinned to it wait."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from certs import pki
from federation import convert
from federation.cli import main
from federation.identity import Role
from federation.model import JobSpec, JobState
from federation.pb import hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel
from tests.conftest import FEDERATION, eventually


def operator(test_pki, site: str, name: str = "olga"):
    tls = test_pki.tls(Role.OPERATOR, site, name)
    if not tls.cert.exists():
        pki.issue(test_pki.root, Role.OPERATOR, site, name)
    return tls


async def site_cli(fed, tls, *args: str, capsys=None) -> int:
    argv = ["site", *args, "--hub", f"127.0.0.1:{fed.hubs['leonardo'].port}", "--ca", str(tls.ca),
            "--cert", str(tls.cert), "--key", str(tls.key)]
    return await asyncio.to_thread(main, argv)


async def test_drain_sends_new_jobs_elsewhere_and_lets_running_ones_finish(fed, test_pki, capsys):
    olga = operator(test_pki, "leonardo")
    alice = fed.client("alice")
    running = await alice.submit(JobSpec(argv=("sleep", "2"), site="leonardo"))
    await eventually(lambda: fed.hubs["leonardo"].core.journal.state(running.id) is JobState.RUNNING)

    assert await site_cli(fed, olga, "drain", "--reason", "maintenance until 14:00") == 0
    assert "draining (maintenance until 14:00)" in capsys.readouterr().out
    leonardo = fed.antennas["antenna-a"].core.sites["leonardo"]
    await eventually(lambda: leonardo.advert.draining, timeout=10)
    assert leonardo.advert.drain_reason == "maintenance until 14:00"

    jobs = [await alice.submit(JobSpec(argv=("true",))) for _ in range(4)]
    pinned = await alice.submit(JobSpec(argv=("true",), site="leonardo"))
    for job in jobs:
        done = await alice.wait(job.id)
        assert (done.state, done.site) == (JobState.COMPLETED, "lumi")
    assert (await alice.wait(running.id)).state is JobState.COMPLETED  # ran to its end at the drained hub
    await asyncio.sleep(0.5)
    waiting = await alice.get(pinned.id)
    assert waiting.state is JobState.PENDING and "draining" in waiting.reason
    assert fed.hubs["leonardo"].core.journal.get(pinned.id) is None

    # A restarted hub is still draining: the drain is journaled.
    await fed.hubs["leonardo"].stop()
    await fed.start_hub("leonardo")
    assert await site_cli(fed, olga, "status", "--json") == 0
    assert '"draining":true' in capsys.readouterr().out.replace(" ", "")

    assert await site_cli(fed, olga, "resume") == 0
    assert "taking jobs" in capsys.readouterr().out
    done = await alice.wait(pinned.id)
    assert (done.state, done.site) == (JobState.COMPLETED, "leonardo")


async def test_a_forward_that_reaches_a_draining_hub_is_placed_again(fed, test_pki):
    hub = fed.hubs["leonardo"]
    hub.core.set_drain(_who(), True, "drill")
    job = jobs_pb2.Job(id="antenna-a-0123456789ab", state=int(JobState.PENDING), owner=f"spiffe://{FEDERATION}/user/antenna-a/alice",
                       spec=convert.spec_to_pb(JobSpec(argv=("true",))))
    async with secure_channel(f"127.0.0.1:{hub.port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as channel:
        reply = await hub_pb2_grpc.HubStub(channel).ForwardJobs(hub_pb2.ForwardJobsRequest(
            jobs=[hub_pb2.ForwardJobRequest(idempotency_key=job.id, job=job)]), timeout=10)
        (result,) = reply.results
        assert result.error.code == grpc.StatusCode.UNAVAILABLE.value[0] and "draining (drill)" in result.error.message
        assert hub.core.journal.get(job.id) is None
        # A job accepted before the drain, resent (its acknowledgement was lost), is still answered as itself.
        hub.core.set_drain(_who(), False)
        earlier = jobs_pb2.Job(id="antenna-a-0123456789cd", state=int(JobState.PENDING), owner=job.owner, spec=job.spec)
        request = hub_pb2.ForwardJobsRequest(jobs=[hub_pb2.ForwardJobRequest(idempotency_key=earlier.id, job=earlier)])
        first = await hub_pb2_grpc.HubStub(channel).ForwardJobs(request, timeout=10)
        hub.core.set_drain(_who(), True, "drill")
        again = await hub_pb2_grpc.HubStub(channel).ForwardJobs(request, timeout=10)
        assert first.results[0].HasField("accepted") and again.results[0].HasField("accepted")
        assert again.results[0].duplicate and again.results[0].accepted.id == earlier.id
    # Through the antenna, a job placed there before the antenna saw the drain ends up at the other hub.
    alice = fed.client("alice")
    jobs = [await alice.submit(JobSpec(argv=("true",))) for _ in range(6)]
    assert {(j.state, j.site) for j in [await alice.wait(j.id) for j in jobs]} == {(JobState.COMPLETED, "lumi")}


def _who():
    from federation.identity import parse_identity
    return parse_identity(f"spiffe://{FEDERATION}/operator/leonardo/olga")


@pytest.mark.parametrize("who", [(Role.ANTENNA, "antenna-a", ""), (Role.OPERATOR, "lumi", "olga"),
                                 (Role.USER, "antenna-a", "alice")])
async def test_only_the_sites_operators_may_drain_it(fed, test_pki, who):
    role, site, name = who
    tls = operator(test_pki, site, name) if role is Role.OPERATOR else test_pki.tls(role, site, name)
    async with secure_channel(f"127.0.0.1:{fed.hubs['leonardo'].port}", tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hub_pb2_grpc.HubStub(channel).SetDrain(hub_pb2.SetDrainRequest(drain=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not fed.hubs["leonardo"].core.draining


# -- announced maintenance windows ----------------------------------------------------------------------------

async def test_jobs_that_would_run_into_maintenance_go_elsewhere_or_wait(test_pki, tmp_path):
    import time

    from federation.config import Maintenance
    from tests.conftest import running_federation

    now = time.time()
    window = Maintenance(now + 60, now + 3600, "firmware upgrade")
    async with running_federation(test_pki, tmp_path, {"leonardo": {"maintenance": (window,)}, "lumi": {}},
                          antenna={}) as f:
        leonardo = f.antennas["antenna-a"].core.sites["leonardo"]
        (announced,) = leonardo.advert.maintenance
        assert (announced.start.seconds, announced.reason) == (int(window.start), "firmware upgrade")
        assert not leonardo.advert.draining  # not yet
        alice = f.client("alice")
        short = await alice.submit(JobSpec(argv=("true",), site="leonardo", walltime_s=30))  # ends before it
        assert (await alice.wait(short.id)).site == "leonardo"
        long = [await alice.submit(JobSpec(argv=("true",), walltime_s=600)) for _ in range(3)]
        assert {(j.state, j.site) for j in [await alice.wait(j.id) for j in long]} == {(JobState.COMPLETED, "lumi")}
        pinned = await alice.submit(JobSpec(argv=("true",), site="leonardo", walltime_s=600))
        await asyncio.sleep(1.0)
        waiting = await alice.get(pinned.id)
        assert waiting.state is JobState.PENDING and "maintenance" in waiting.reason
        assert f.hubs["leonardo"].core.journal.get(pinned.id) is None


async def test_a_hub_in_its_maintenance_window_is_draining(test_pki, tmp_path):
    import time

    from federation.config import Maintenance
    from tests.conftest import running_federation

    now = time.time()
    async with running_federation(test_pki, tmp_path, {"leonardo": {"maintenance": (Maintenance(now - 60, now + 600,
                                                                                         "cooling"),)}}) as f:
        hub = f.hubs["leonardo"]
        assert hub.core.draining and hub.core.drain_now().startswith("maintenance until ")
        assert hub.core.drain_now().endswith(": cooling")
        assert not hub.core.drain_now(now + 601)  # over: takes jobs again by itself
