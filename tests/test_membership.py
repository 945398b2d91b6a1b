"""Membership on a real, private etcd (mutual TLS), through real hub and antenna daemons: hubs that join, leave,
die and move; etcd away while jobs flow; and two hub processes for one site, with failover while jobs run."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from antenna.daemon import AntennaDaemon
from federation.client import AntennaClient
from federation.config import ClientConfig, DiscoveryConfig
from federation.identity import Role
from federation.model import JobSpec, JobState
from hub.daemon import HubDaemon
from tests.conftest import FEDERATION, antenna_config, eventually, hub_config

pytestmark = pytest.mark.timeout(180)

AIFED = str(Path(sys.executable).parent / "aifed")
LEASE = 3


def etcd_discovery(etcd, lease: int = LEASE) -> DiscoveryConfig:
    return DiscoveryConfig("etcd", (etcd.endpoint,), "", lease)


async def etcd_antenna(test_pki, state: Path, etcd) -> AntennaDaemon:
    config = replace(antenna_config(test_pki, state, {}), discovery=etcd_discovery(etcd))
    return await AntennaDaemon(config).start()


def client_of(test_pki, antenna: AntennaDaemon, user: str = "alice") -> AntennaClient:
    return AntennaClient(ClientConfig(f"127.0.0.1:{antenna.port}", test_pki.user("antenna-a", user)))


def sh(script: str, **kw) -> JobSpec:
    return JobSpec(argv=("sh", "-c", script), **{"walltime_s": 120, **kw})


def hub_toml(test_pki, state: Path, etcd, port: int, instance: str = "", cpu_slots: int = 64) -> Path:
    """A hub config file for a hub run as its own process (`aifed hub --config`), so that a test can kill it."""
    tls = test_pki.tls(Role.HUB, "leonardo")
    path = state / f"leonardo-{instance or 'solo'}-{port}.toml"
    path.write_text(f"""
[hub]
site = "leonardo"
federation = "{FEDERATION}"
listen = "127.0.0.1:{port}"
state_dir = "{state / 'leonardo'}"
advert_ttl = "6s"

[backend]
type = "local"
cpu_slots = {cpu_slots}
kill_grace = "1s"

[discovery]
backend = "etcd"
endpoints = ["{etcd.endpoint}"]
lease = "{LEASE}s"
""" + (f'\n[ha]\ninstance = "{instance}"\n' if instance else "") + f"""
[tls]
ca = "{tls.ca}"
cert = "{tls.cert}"
key = "{tls.key}"

[[partitions]]
name = "cpu"
max_walltime = "1:00:00"
""")
    return path


def start_hub_process(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([AIFED, "hub", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def free_port() -> int:
    from federation.net import free_port as fp
    return fp()


# -- joins, leaves, moves ----------------------------------------------------------------------------------

async def test_an_antenna_follows_hubs_that_join_leave_and_move(test_pki, tmp_path, etcd_server):
    antenna = await etcd_antenna(test_pki, tmp_path, etcd_server)
    client = client_of(test_pki, antenna)
    hub = None
    try:
        assert antenna.core.sites == {}
        job = await client.submit(sh("echo hello"))  # no hub yet: accepted, and waits for one
        assert job.state is JobState.PENDING and not job.site
        hub = await HubDaemon(hub_config(test_pki, tmp_path, discovery=etcd_discovery(etcd_server))).start()
        done = await asyncio.wait_for(client.wait(job.id), 30)  # the hub joined: the job went there
        assert done.state is JobState.COMPLETED and done.site == "leonardo"
        site = antenna.core.sites["leonardo"]
        assert site.endpoint == f"127.0.0.1:{hub.port}" and site.member
        listing = await client.site_list()
        assert listing.discovery == "etcd" and not listing.discovery_degraded and not listing.sites[0].left

        # A clean stop revokes the lease: the hub leaves at once, not a lease later.
        stopped, stopping = time.monotonic(), asyncio.create_task(hub.stop())
        await eventually(lambda: not site.member, timeout=LEASE)
        assert time.monotonic() - stopped < LEASE / 2
        await stopping
        hub = None
        assert (await client.site_list()).sites[0].left
        dry = await antenna.core.dry_run(alice(), sh("true"))
        assert "left the federation" in dry.reason

        # It comes back on another port: the antenna dials the new address and the waiting job runs there.
        job = await client.submit(sh("echo again"))
        hub = await HubDaemon(hub_config(test_pki, tmp_path, discovery=etcd_discovery(etcd_server))).start()
        done = await asyncio.wait_for(client.wait(job.id), 30)
        assert done.state is JobState.COMPLETED
        assert site.member and site.endpoint == f"127.0.0.1:{hub.port}"
    finally:
        await client.close()
        if hub is not None:
            await hub.stop()
        await antenna.stop()


def alice():
    from federation.identity import Identity
    return Identity(FEDERATION, Role.USER, "antenna-a", "alice")


async def test_an_antenna_refuses_a_record_that_points_at_another_hub(test_pki, tmp_path, etcd_server):
    """etcd holds addresses, not trust: a record for lumi whose endpoint serves leonardo's certificate gets no
    job, whatever the record says."""
    from federation.discovery import Member
    from federation.etcd_discovery import EtcdDiscovery

    hub = await HubDaemon(hub_config(test_pki, tmp_path)).start()  # leonardo, static: not registered
    forger = EtcdDiscovery([etcd_server.endpoint], test_pki.tls(Role.HUB, "lumi"), f"/aifed/{FEDERATION}", LEASE)
    await forger.start()
    await forger.register(Member("lumi", f"127.0.0.1:{hub.port}", {}))
    antenna = await etcd_antenna(test_pki, tmp_path, etcd_server)
    try:
        lumi = await eventually(lambda: antenna.core.sites.get("lumi"))
        await eventually(lambda: lumi.untrusted, timeout=10)
        assert "serves the certificate of spiffe://eurohpc.test/hub/leonardo, not of hub lumi" in lumi.untrusted
        assert not lumi.fresh
    finally:
        await antenna.stop()
        await forger.close()
        await hub.stop()


async def test_a_killed_hub_is_dropped_after_its_lease(test_pki, tmp_path, etcd_server):
    antenna = await etcd_antenna(test_pki, tmp_path, etcd_server)
    proc = start_hub_process(hub_toml(test_pki, tmp_path, etcd_server, free_port()), tmp_path / "hub.log")
    try:
        site = await eventually(lambda: antenna.core.sites.get("leonardo"), timeout=30)
        await eventually(lambda: site.fresh, timeout=30)
        kill(proc)
        killed = time.monotonic()
        await eventually(lambda: not site.member, timeout=LEASE + 10)
        gone_after = time.monotonic() - killed
        # Not before the lease can have run out (the last keepalive was at most a third of it before the kill),
        # and not long after it.
        assert LEASE * 2 / 3 - 0.5 <= gone_after <= LEASE + 3, gone_after
    finally:
        kill(proc)
        await antenna.stop()


# -- etcd away ---------------------------------------------------------------------------------------------

@pytest.mark.slow
async def test_etcd_away_for_30_seconds_loses_no_job_and_membership_resumes(test_pki, tmp_path, etcd_server):
    hub = await HubDaemon(hub_config(test_pki, tmp_path, discovery=etcd_discovery(etcd_server))).start()
    antenna = await etcd_antenna(test_pki, tmp_path, etcd_server)
    client = client_of(test_pki, antenna)
    lumi = None
    try:
        await eventually(lambda: "leonardo" in antenna.core.sites and antenna.core.sites["leonardo"].fresh,
                         timeout=20)
        etcd_server.stop()
        away = time.monotonic()
        await eventually(lambda: antenna.core.discovery.degraded, timeout=10)
        listing = await client.site_list()
        assert "unreachable" in listing.discovery_degraded and [s.site for s in listing.sites] == ["leonardo"]
        jobs = []
        while time.monotonic() - away < 30:  # jobs keep flowing to the hub the antenna knows
            jobs.append(await client.submit(sh("true")))
            await asyncio.sleep(1)
        done = [await asyncio.wait_for(client.wait(j.id), 30) for j in jobs]
        assert len(done) >= 25 and all(d.state is JobState.COMPLETED for d in done)
        assert antenna.core.sites["leonardo"].member  # the last known membership was kept

        etcd_server.start()
        await eventually(lambda: not antenna.core.discovery.degraded, timeout=20)
        await eventually(lambda: not hub.discovery.degraded, timeout=20)
        # Watching resumed: a hub that joins now is seen, and leonardo is still registered.
        lumi = await HubDaemon(hub_config(test_pki, tmp_path, "lumi", discovery=etcd_discovery(etcd_server))).start()
        await eventually(lambda: "lumi" in antenna.core.sites and antenna.core.sites["lumi"].fresh, timeout=20)
        assert set(antenna.core.discovery.members()) == {"leonardo", "lumi"}
        job = await client.submit(sh("true", site="lumi"))
        assert (await asyncio.wait_for(client.wait(job.id), 30)).state is JobState.COMPLETED
    finally:
        await client.close()
        await antenna.stop()
        for h in (hub, lumi):
            if h is not None:
                await h.stop()


# -- two hub processes for one site ------------------------------------------------------------------------

@pytest.mark.slow
async def test_leader_failover_with_jobs_in_flight_runs_each_job_exactly_once(test_pki, tmp_path, etcd_server):
    runs = tmp_path / "runs.txt"
    ports = {"a": free_port(), "b": free_port()}
    procs = {name: start_hub_process(hub_toml(test_pki, tmp_path, etcd_server, port, f"leonardo-{name}",
                                              cpu_slots=2), tmp_path / f"hub-{name}.log")
             for name, port in ports.items()}
    antenna = await etcd_antenna(test_pki, tmp_path, etcd_server)
    client = client_of(test_pki, antenna)
    try:
        site = await eventually(lambda: antenna.core.sites.get("leonardo"), timeout=30)
        await eventually(lambda: site.fresh, timeout=30)
        leader = next(n for n, p in ports.items() if site.endpoint == f"127.0.0.1:{p}")
        standby = "b" if leader == "a" else "a"
        # 2 CPU slots: two jobs run, the others queue at the hub; every run is recorded.
        jobs = [await client.submit(sh(f"echo job{i} >> {runs}; sleep 2")) for i in range(8)]
        await eventually(lambda: runs.exists() and len(runs.read_text().split()) >= 2, timeout=30)
        kill(procs[leader])
        killed = time.monotonic()
        await eventually(lambda: site.endpoint == f"127.0.0.1:{ports[standby]}" and site.fresh, timeout=LEASE + 20)
        took_over = time.monotonic() - killed
        done = [await asyncio.wait_for(client.wait(j.id), 60) for j in jobs]
        assert all(d.state is JobState.COMPLETED for d in done), [(d.id, d.state, d.reason) for d in done]
        ran = runs.read_text().split()
        assert sorted(ran) == sorted(f"job{i}" for i in range(8)), ran  # each exactly once
        assert took_over <= LEASE + 10, took_over
        assert "leads now" in (tmp_path / f"hub-{standby}.log").read_text()
    finally:
        await client.close()
        await antenna.stop()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    kill(proc)


def test_a_standby_hub_stops_cleanly_on_sigterm_before_it_leads(test_pki, tmp_path, etcd_server):
    """systemd stops a standby that never led: exit 0 at once, not after a campaign."""
    ports = [free_port(), free_port()]
    leader = start_hub_process(hub_toml(test_pki, tmp_path, etcd_server, ports[0], "leonardo-a"), tmp_path / "a.log")
    try:
        deadline = time.monotonic() + 30
        while "leads now" not in (tmp_path / "a.log").read_text():
            assert leader.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()
            time.sleep(0.1)
        standby = start_hub_process(hub_toml(test_pki, tmp_path, etcd_server, ports[1], "leonardo-b"),
                                    tmp_path / "b.log")
        deadline = time.monotonic() + 30
        while "standby, waiting to lead" not in (tmp_path / "b.log").read_text():
            assert standby.poll() is None and time.monotonic() < deadline, (tmp_path / "b.log").read_text()
            time.sleep(0.1)
        standby.send_signal(signal.SIGTERM)
        try:
            assert standby.wait(15) == 0
        except subprocess.TimeoutExpired:
            kill(standby)
            raise AssertionError("the standby did not stop on SIGTERM:\n" + (tmp_path / "b.log").read_text())
        assert "stopped before it started serving" in (tmp_path / "b.log").read_text()
        assert leader.poll() is None  # the leader was not disturbed
    finally:
        for proc in (leader,):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)

