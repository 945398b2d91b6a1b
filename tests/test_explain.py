"""`aifed explain JOB` through real daemons: each hub's verdict, the job's status in words, pins, and who may ask."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from federation.cli import main
from federation.identity import Identity, Role
from federation.model import JobSpec, JobState
from tests.conftest import FEDERATION, eventually

pytestmark = pytest.mark.timeout(120)


def sh(script: str, **kw) -> JobSpec:
    return JobSpec(argv=("sh", "-c", script), **{"walltime_s": 60, **kw})


async def test_a_queued_job_is_explained_hub_by_hub(fed):
    client = fed.client("alice")
    # Fill both hubs' GPUs: the next GPU job must queue wherever it goes.
    fillers = [await client.submit(sh("sleep 30", gpus=4, site=site)) for site in ("leonardo", "lumi")]
    for f in fillers:
        await eventually(lambda f=f: client.get(f.id), timeout=15)
        await eventually(lambda f=f: _state(client, f.id, JobState.RUNNING), timeout=15)
    job = await client.submit(sh("true", gpus=4))
    await eventually(lambda: _state(client, job.id, JobState.QUEUED), timeout=15)
    e = await client.explain(job.id)
    placed = e.job.site
    assert placed in ("leonardo", "lumi")
    assert e.status.startswith(f"waiting in {placed}'s queue: partition booster has 0 of 4 GPU(s) free")
    by_site = {v.site: v for v in e.sites}
    assert set(by_site) == {"leonardo", "lumi"}
    # Both fit; each says how long a job of this shape would wait there now (the fillers run for 30 s).
    assert all(not v.reason and v.has_wait and v.wait_s > 0 for v in e.sites)
    assert sorted(v.rank for v in e.sites) == [1, 2] and e.sites[0].rank == 1
    assert not e.pinned and not e.allocation
    # The decision made when it was placed is kept: the hub chosen and why, the other with its estimated wait.
    other = ({"leonardo", "lumi"} - {placed}).pop()
    assert e.placed.startswith(f"placed on {placed} (estimated wait ") and f"{other} #2 (wait " in e.placed
    assert e.placed_at.seconds > 0

    # The command line shows the same, and marks where the job is.
    out = await _cli(fed, "explain", job.id)
    assert f"Job {job.id} is QUEUED: waiting in {placed}'s queue" in out
    assert "RANK" in out and "<- the job is here" in out and "would start in about" in out
    assert f"placed on {placed} (estimated wait" in out
    for f in fillers:
        await client.cancel(f.id)


async def test_a_pinned_job_and_a_draining_hub(fed):
    client = fed.client("alice")
    lumi = fed.hubs["lumi"]
    lumi.core.set_drain(Identity(FEDERATION, Role.OPERATOR, "lumi", "ops"), True, "disk replacement")
    site = fed.antennas["antenna-a"].core.sites["lumi"]
    await eventually(lambda: site.advert is not None and site.advert.draining, timeout=15)
    job = await client.submit(sh("true", site="leonardo"))
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED
    e = await client.explain(job.id)
    assert e.pinned == "pinned to leonardo when it was submitted (--site)"
    assert e.status.startswith("COMPLETED at leonardo")
    by_site = {v.site: v for v in e.sites}
    assert by_site["leonardo"].rank == 1 and by_site["lumi"].rank == 0
    assert by_site["lumi"].reason == "is draining (disk replacement)" and by_site["lumi"].transient
    out = await _cli(fed, "explain", job.id, "--json")
    assert '"reason": "is draining (disk replacement)"' in out or '"reason":"is draining (disk replacement)"' in out


async def test_only_the_owner_or_an_operator_may_ask(fed, test_pki):
    job = await fed.client("alice").submit(sh("true"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fed.client("bob").explain(job.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # another user's job is not disclosed
    assert (await fed.client("alice").explain(job.id)).job.id == job.id


async def _state(client, job_id: str, state: JobState) -> bool:
    return (await client.get(job_id)).state is state


async def _cli(fed, *args: str) -> str:
    """Run `aifed ARGS` as alice, in a thread (it runs its own event loop), and return what it printed."""
    import contextlib
    import io

    tls = fed.test_pki.user("antenna-a", "alice")
    argv = [*args, "--antenna", f"127.0.0.1:{fed.antennas['antenna-a'].port}", "--ca", str(tls.ca),
            "--cert", str(tls.cert), "--key", str(tls.key)]
    buffer = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(buffer):
            return main(argv)

    assert await asyncio.to_thread(run) == 0
    return buffer.getvalue()
