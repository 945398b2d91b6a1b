"""`aifed top`, rendered once (non-interactive)."""

from __future__ import annotations

import asyncio
import time

from federation import convert, output
from federation.cli import main
from federation.model import Job, JobSpec, JobState
from federation.pb import antenna_pb2, jobs_pb2


async def test_top_once_shows_hubs_capacity_and_recent_jobs(fed, test_pki, capsys):
    alice = fed.client("alice")
    job = await alice.wait((await alice.submit(JobSpec(argv=("true",), name="hello"))).id)
    tls = test_pki.user("antenna-a", "alice")
    argv = ["top", "--once", "--antenna", f"127.0.0.1:{fed.antennas['antenna-a'].port}", "--ca", str(tls.ca),
            "--cert", str(tls.cert), "--key", str(tls.key)]
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: no screen control
    lines = out.splitlines()
    assert lines[0].startswith("aifed top - antenna 127.0.0.1:")
    assert "2 hub(s), 2 up; GPUs free 8/8; jobs here: 1 completed" in lines[1]
    assert any(line.split()[:5] == ["leonardo", "up", "booster", "A100", "4/4"] for line in lines)
    assert any(line.split()[:3] == ["lumi", "up", "dcgp"] for line in lines)
    assert any(line.startswith(job.id) and "COMPLETED" in line and "hello" in line for line in lines)
    assert await asyncio.to_thread(main, [*argv, "--json"]) == 0
    assert '"health":"up"' in capsys.readouterr().out.replace(" ", "")


def test_top_view_names_each_hubs_health_and_the_queue_wait():
    now = time.time()
    advert = lambda **kw: jobs_pb2.Advert(partitions=[jobs_pb2.PartitionAdvert(  # noqa: E731
        name="booster", gpu_model="H100", gpus_total=8, gpus_free=2, running_jobs=3, pending_jobs=4,
        pending_gpu_seconds=8 * 7200)], **kw)
    listing = antenna_pb2.ListSitesResponse(sites=[
        antenna_pb2.Site(site="jupiter", reachable=True, advert=advert(), advert_received_at=convert.ts(now - 3)),
        antenna_pb2.Site(site="leonardo", reachable=True, advert=advert(draining=True, drain_reason="maintenance"),
                         advert_received_at=convert.ts(now)),
        antenna_pb2.Site(site="lumi", reachable=True, advert=advert(degraded=True), advert_received_at=convert.ts(now)),
        antenna_pb2.Site(site="mn5", reachable=False, error="UNAVAILABLE: connection refused"),
        antenna_pb2.Site(site="vega", reachable=False, error="hub vega's certificate (serial 1f) has been revoked")])
    jobs = [Job(id="antenna-a-1", spec=JobSpec(argv=("x",)), state=JobState.RUNNING, site="jupiter", updated_at=now),
            Job(id="antenna-a-2", spec=JobSpec(argv=("x",)), state=JobState.PENDING, updated_at=now,
                reason="waiting to be forwarded")]
    view = output.top_view(listing, jobs, "antenna-a", now, width=200)
    rows = {line.split()[0]: line.split() for line in view.splitlines()[3:9] if line and not line.startswith("SITE")}
    assert rows["jupiter"][:9] == ["jupiter", "up", "booster", "H100", "2/8", "3", "4", "02:00:00", "3s"]
    assert rows["leonardo"][1] == "draining" and rows["lumi"][1] == "degraded"
    assert rows["mn5"][1] == "down" and rows["vega"][1] == "revoked"
    assert "5 hub(s), 1 up; GPUs free 6/24; jobs here: 1 pending, 1 running" in view
    assert all(len(line) <= 60 for line in output.top_view(listing, jobs, "antenna-a", now, width=60).splitlines())
