"""Membership discovery: one contract for every backend (static, etcd), then what only etcd does: leases that
end with their hub, a store that goes away and comes back, and leader election between a site's hub processes.

etcd runs for real (tests/etcd_server.py), over mutual TLS with the test federation's certificates. Leases and
TTLs are LEASE seconds so that expiry can be waited for.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import orjson
import pytest

from federation.discovery import Change, ChangeKind, Discovery, Member, StaticDiscovery
from federation.election import Election
from federation.etcd_client import EtcdClient
from federation.etcd_discovery import EtcdDiscovery
from federation.identity import Role
from federation.net import free_port
from tests.etcd_server import EtcdServer, TcpProxy

LEASE = 2  # seconds: etcd's shortest useful lease
PREFIX = "/aifed/eurohpc.test"
REPO = Path(__file__).resolve().parent.parent


class Recorder:
    """A membership listener that keeps every change and can wait for one."""

    def __init__(self, discovery: Discovery):
        self.changes: list[tuple[float, Change]] = []
        self._new = asyncio.Event()
        discovery.on_change(self._record)

    def _record(self, change: Change) -> None:
        self.changes.append((time.monotonic(), change))
        self._new.set()

    def seen(self, kind: ChangeKind, site: str, after: int = 0) -> list[tuple[float, Change]]:
        return [(t, c) for t, c in self.changes[after:] if c.kind is kind and c.member.site == site]

    async def wait(self, kind: ChangeKind, site: str, timeout: float = 5, after: int = 0) -> tuple[float, Member]:
        """When `site` last had a change of `kind` (after the first `after` changes), waiting for one."""
        deadline = time.monotonic() + timeout
        while not self.seen(kind, site, after):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.value} of {site} within {timeout} s; saw "
                                     f"{[(c.kind.value, c.member.site) for _, c in self.changes]}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except asyncio.TimeoutError:
                pass
        t, change = self.seen(kind, site, after)[-1]
        return t, change.member


async def eventually(predicate, timeout: float, what: str) -> float:
    """Poll `predicate` until true; when it became true (monotonic)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic()


def hub_member(site: str = "leonardo", port: int = 4000, **summary) -> Member:
    return Member(site, f"127.0.0.1:{port}", summary or {"gpus_free": 8})


# -- the contract, for every backend -----------------------------------------------------------------------------

class StaticBackend:
    """Static membership: nobody else hears of a hub, so a hub observes its own record."""

    name = "static"

    def __init__(self):
        self.initial: list[Member] = []
        self.opened: list[Discovery] = []

    async def seed(self, members: list[Member]) -> None:
        self.initial += members

    async def hub(self, site: str = "leonardo") -> Discovery:
        d = StaticDiscovery(self.initial)
        await d.start()
        self.opened.append(d)
        return d

    async def observer(self, hub: Discovery) -> Discovery:
        return hub

    async def close(self) -> None:
        for d in self.opened:
            await d.close()


class EtcdBackend:
    """Each hub and each observer its own EtcdDiscovery, with its own certificate, on the test etcd."""

    name = "etcd"

    def __init__(self, server: EtcdServer, test_pki):
        self.server, self.test_pki = server, test_pki
        self.opened: list[Discovery] = []

    def client(self) -> EtcdClient:
        return EtcdClient([self.server.endpoint], self.test_pki.tls(Role.HUB, "lumi"))

    async def seed(self, members: list[Member]) -> None:
        async with self.client() as c:
            for m in members:
                await c.put(f"{PREFIX}/hubs/{m.site}".encode(), orjson.dumps(m.to_dict()))

    async def open(self, role: Role, site: str) -> EtcdDiscovery:
        d = EtcdDiscovery([self.server.endpoint], self.test_pki.tls(role, site), PREFIX, LEASE)
        self.opened.append(d)
        await d.start()
        return d

    async def hub(self, site: str = "leonardo") -> Discovery:
        return await self.open(Role.HUB, site)

    async def observer(self, hub: Discovery) -> Discovery:
        return await self.open(Role.ANTENNA, "antenna-a")

    async def close(self) -> None:
        for d in self.opened:
            await d.close()


@pytest.fixture(params=["static", "etcd"])
async def backend(request, test_pki, tmp_path):
    if request.param == "static":
        b = StaticBackend()
    else:
        b = EtcdBackend(request.getfixturevalue("etcd_server"), test_pki)
    try:
        yield b
    finally:
        await b.close()


async def test_start_loads_the_membership(backend):
    await backend.seed([hub_member("lumi", 4100, gpus_free=3)])
    d = await backend.hub()
    assert d.members() == {"lumi": hub_member("lumi", 4100)}
    assert d.members()["lumi"].summary == {"gpus_free": 3}
    assert d.degraded == ""


async def test_join_is_seen(backend):
    hub = await backend.hub()
    watcher = Recorder(await backend.observer(hub))
    member = hub_member()
    await hub.register(member)
    _, seen = await watcher.wait(ChangeKind.JOIN, "leonardo")
    assert (seen.endpoint, seen.summary) == (member.endpoint, member.summary)
    assert hub.members()["leonardo"].summary == member.summary  # a hub reads its own record at once


async def test_update_is_seen(backend):
    hub = await backend.hub()
    watcher = Recorder(await backend.observer(hub))
    await hub.register(hub_member())
    await watcher.wait(ChangeKind.JOIN, "leonardo")
    await hub.update({"gpus_free": 2, "pending": 5})
    _, seen = await watcher.wait(ChangeKind.UPDATE, "leonardo")
    assert seen.summary == {"gpus_free": 2, "pending": 5}
    assert hub.members()["leonardo"].summary == {"gpus_free": 2, "pending": 5}


async def test_update_before_register_is_refused(backend):
    hub = await backend.hub()
    with pytest.raises(RuntimeError, match="before register"):
        await hub.update({"gpus_free": 1})


async def test_close_is_seen_as_leave_at_once(backend):
    hub = await backend.hub()
    observer = await backend.observer(hub)
    watcher = Recorder(observer)
    await hub.register(hub_member())
    await watcher.wait(ChangeKind.JOIN, "leonardo")
    closed = time.monotonic()
    await hub.close()
    left, _ = await watcher.wait(ChangeKind.LEAVE, "leonardo")
    assert left - closed < LEASE / 2, "the record must go when the hub closes, not when its lease expires"
    assert "leonardo" not in observer.members()


# -- etcd only ---------------------------------------------------------------------------------------------------

@pytest.fixture
async def etcd(etcd_server, test_pki):  # noqa: F811
    b = EtcdBackend(etcd_server, test_pki)
    try:
        yield b
    finally:
        await b.close()


async def test_malformed_records_are_ignored(etcd):
    async with etcd.client() as c:
        await c.put(f"{PREFIX}/hubs/broken".encode(), b"{not json")
        await c.put(f"{PREFIX}/hubs/liar".encode(), orjson.dumps(hub_member("lumi").to_dict()))  # key != site
    observer = await etcd.observer(None)
    assert observer.members() == {}
    watcher = Recorder(observer)
    async with etcd.client() as c:
        await c.put(f"{PREFIX}/hubs/noport".encode(), orjson.dumps({"site": "noport", "endpoint": "nohost"}))
        await c.put(f"{PREFIX}/hubs/lumi".encode(), orjson.dumps(hub_member("lumi").to_dict()))
        await c.put(f"{PREFIX}/hubs/a/b".encode(), orjson.dumps(hub_member("b").to_dict()))
        await watcher.wait(ChangeKind.JOIN, "lumi")
        # a valid record that turns malformed no longer counts
        await c.put(f"{PREFIX}/hubs/lumi".encode(), b"[]")
        await watcher.wait(ChangeKind.LEAVE, "lumi")
    assert observer.members() == {}
    assert observer.degraded == ""
    assert [(c.kind, c.member.site) for _, c in watcher.changes] == [(ChangeKind.JOIN, "lumi"),
                                                                     (ChangeKind.LEAVE, "lumi")]


async def start_peer(*args: str) -> asyncio.subprocess.Process:
    """A separate process (tests/etcd_peer.py) that registers or campaigns, once it says READY."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.etcd_peer", *args, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
    except asyncio.TimeoutError:
        line = b""
    if line.strip() != b"READY":
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"peer {args[0]} did not start: {err.decode()[-2000:]}")
    return proc


def tls_args(test_pki, role: Role, site: str) -> list[str]:
    tls = test_pki.tls(role, site)
    return [str(tls.ca), str(tls.cert), str(tls.key)]


async def stop_peer(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


async def test_hub_that_dies_disappears_when_its_lease_ends(etcd, test_pki):
    watcher = Recorder(await etcd.observer(None))
    proc = await start_peer("hub", etcd.server.endpoint, *tls_args(test_pki, Role.HUB, "lumi"), PREFIX, "lumi",
                            str(LEASE))
    try:
        await watcher.wait(ChangeKind.JOIN, "lumi")
        killed = time.monotonic()
        proc.kill()  # SIGKILL: no goodbye, the lease must do it
        left, _ = await watcher.wait(ChangeKind.LEAVE, "lumi", timeout=LEASE + 3)
    finally:
        await stop_peer(proc)
    # refreshed every LEASE/3, so the last refresh was at most that long before the kill; etcd checks every 0.5 s
    assert LEASE * 2 / 3 - 0.2 <= left - killed <= LEASE + 1.0, f"left {left - killed:.2f} s after the kill"


async def test_hub_cut_off_longer_than_its_lease_registers_again(etcd, test_pki):
    """The hub process is frozen (SIGSTOP) past its lease: others see it leave; thawed, it finds its lease gone
    and registers again."""
    watcher = Recorder(await etcd.observer(None))
    proc = await start_peer("hub", etcd.server.endpoint, *tls_args(test_pki, Role.HUB, "lumi"), PREFIX, "lumi",
                            str(LEASE))
    try:
        await watcher.wait(ChangeKind.JOIN, "lumi")
        proc.send_signal(signal.SIGSTOP)
        await watcher.wait(ChangeKind.LEAVE, "lumi", timeout=LEASE + 3)
        mark = len(watcher.changes)
        proc.send_signal(signal.SIGCONT)
        await watcher.wait(ChangeKind.JOIN, "lumi", timeout=LEASE + 3, after=mark)
    finally:
        proc.send_signal(signal.SIGCONT)
        await stop_peer(proc)


async def test_hub_whose_lease_is_revoked_registers_again(etcd):
    hub = await etcd.hub()
    watcher = Recorder(await etcd.observer(hub))
    await hub.register(hub_member())
    await watcher.wait(ChangeKind.JOIN, "leonardo")
    async with etcd.client() as c:
        got = await c.get(f"{PREFIX}/hubs/leonardo".encode())
        await c.revoke_lease(got.lease)
    await watcher.wait(ChangeKind.LEAVE, "leonardo")
    mark = len(watcher.changes)
    await watcher.wait(ChangeKind.JOIN, "leonardo", timeout=LEASE + 2, after=mark)  # noticed at its next refresh
    async with etcd.client() as c:
        assert (await c.get(f"{PREFIX}/hubs/leonardo".encode())).lease not in (0, got.lease)


async def test_etcd_away_keeps_the_membership_and_says_so_then_catches_up(etcd):
    hub = await etcd.hub()
    observer = await etcd.observer(hub)
    watcher = Recorder(observer)
    await hub.register(hub_member(gpus_free=8))
    await watcher.wait(ChangeKind.JOIN, "leonardo")

    await asyncio.to_thread(etcd.server.stop)
    await eventually(lambda: observer.degraded and hub.degraded, 5, "both notice etcd is gone")
    assert f"etcd at {etcd.server.endpoint} unreachable since " in observer.degraded
    assert "using the last known membership of 1 hub(s)" in observer.degraded
    assert list(observer.members()) == ["leonardo"]
    began = time.monotonic()
    await hub.update({"gpus_free": 1})  # must neither raise nor wait for etcd
    assert time.monotonic() - began < 0.5
    await asyncio.sleep(LEASE + 1)  # down for longer than the lease
    assert list(observer.members()) == ["leonardo"]
    assert not watcher.seen(ChangeKind.LEAVE, "leonardo")

    mark = len(watcher.changes)
    await asyncio.to_thread(etcd.server.start)
    await eventually(lambda: not observer.degraded and not hub.degraded, 10, "degraded clears once etcd is back")
    _, seen = await watcher.wait(ChangeKind.UPDATE, "leonardo", after=mark)  # the update made while it was away
    assert seen.summary == {"gpus_free": 1}
    other = await etcd.hub("lumi")  # a change after the restart: the watch follows again
    await other.register(hub_member("lumi", 4100))
    await watcher.wait(ChangeKind.JOIN, "lumi", after=mark)
    assert set(observer.members()) == {"leonardo", "lumi"}


@pytest.fixture
async def proxy(etcd):
    """A relay to etcd that a test can cut: a network partition between one client and etcd."""
    p = await TcpProxy(etcd.server.endpoint).start()
    try:
        yield p
    finally:
        await p.close()


@pytest.mark.parametrize("compacted", [False, True], ids=["replayed", "compacted"])
async def test_watcher_cut_off_catches_up_with_what_happened_meanwhile(etcd, proxy, test_pki, caplog, compacted):
    """Cut off while one hub leaves and another changes: when the watch resumes it replays the history it missed
    or, when that was compacted away, reads everything again and reports who left."""
    stay, leave = await etcd.hub("leonardo"), await etcd.hub("lumi")
    await stay.register(hub_member())
    await leave.register(hub_member("lumi", 4100))
    observer = EtcdDiscovery([proxy.endpoint], test_pki.tls(Role.ANTENNA, "antenna-a"), PREFIX, LEASE)
    etcd.opened.append(observer)
    await observer.start()
    assert set(observer.members()) == {"leonardo", "lumi"}
    watcher = Recorder(observer)
    proxy.cut()
    await eventually(lambda: observer.degraded, 5, "the observer notices it is cut off")
    await leave.close()
    await stay.update({"gpus_free": 0})
    if compacted:
        async with etcd.client() as c:
            await c.put(f"{PREFIX}/marker".encode(), b"")
            await c.compact((await c.get(f"{PREFIX}/marker".encode())).mod_revision, physical=True)
    assert set(observer.members()) == {"leonardo", "lumi"}  # what it last knew
    proxy.restore()
    await watcher.wait(ChangeKind.LEAVE, "lumi", timeout=10)
    _, seen = await watcher.wait(ChangeKind.UPDATE, "leonardo")
    assert seen.summary == {"gpus_free": 0}
    await eventually(lambda: not observer.degraded, 5, "degraded clears")
    assert set(observer.members()) == {"leonardo"}
    assert ("reading it all again" in caplog.text) is compacted


async def test_endpoints_are_tried_in_order(etcd, test_pki):
    await etcd.seed([hub_member("lumi", 4100)])
    dead = f"127.0.0.1:{free_port()}"
    began = time.monotonic()
    d = EtcdDiscovery([dead, etcd.server.endpoint], test_pki.tls(Role.ANTENNA, "antenna-a"), PREFIX, LEASE)
    etcd.opened.append(d)
    await d.start()
    assert time.monotonic() - began < 3
    assert list(d.members()) == ["lumi"] and d.degraded == ""


async def test_next_endpoint_takes_over_when_one_is_cut_off(etcd, proxy, test_pki):
    hub = await etcd.hub()
    await hub.register(hub_member())
    observer = EtcdDiscovery([proxy.endpoint, etcd.server.endpoint], test_pki.tls(Role.ANTENNA, "antenna-a"),
                             PREFIX, LEASE)
    etcd.opened.append(observer)
    await observer.start()
    watcher = Recorder(observer)
    proxy.cut()  # the first endpoint, in use, is gone for good
    await hub.update({"gpus_free": 1})
    _, seen = await watcher.wait(ChangeKind.UPDATE, "leonardo", timeout=8)
    assert seen.summary == {"gpus_free": 1}
    await eventually(lambda: not observer.degraded, 5, "following again, through the second endpoint")


async def test_etcd_restored_empty_gets_every_hub_back(etcd):
    """etcd replaced by an empty one (data lost, revision back to 1): hubs register again, watchers resync."""
    hub = await etcd.hub()
    observer = await etcd.observer(hub)
    watcher = Recorder(observer)
    await hub.register(hub_member())
    await watcher.wait(ChangeKind.JOIN, "leonardo")
    for i in range(20):  # push the revisions the observer saw up, so that the empty etcd is behind them
        await hub.update({"gpus_free": i})
    await watcher.wait(ChangeKind.UPDATE, "leonardo")
    await eventually(lambda: observer.members()["leonardo"].summary == {"gpus_free": 19}, 2, "all updates seen")
    await asyncio.to_thread(etcd.server.stop)
    etcd.server.wipe()
    await asyncio.to_thread(etcd.server.start)
    await eventually(lambda: not observer.degraded, 10, "the observer follows the new etcd")
    async with etcd.client() as c:
        deadline = time.monotonic() + LEASE + 3
        while await c.get(f"{PREFIX}/hubs/leonardo".encode()) is None:  # the hub wrote its record again
            assert time.monotonic() < deadline, "the hub did not register in the new etcd"
            await asyncio.sleep(0.1)
    mark = len(watcher.changes)
    late = await etcd.hub("lumi")
    await late.register(hub_member("lumi", 4100))
    await watcher.wait(ChangeKind.JOIN, "lumi", after=mark)  # seen although its revision is below the old ones
    assert set(observer.members()) == {"leonardo", "lumi"}


async def test_etcd_down_at_start_starts_degraded_and_catches_up(etcd):
    await asyncio.to_thread(etcd.server.stop)
    began = time.monotonic()
    hub = await etcd.hub()
    await hub.register(hub_member())
    assert time.monotonic() - began < 5, "start() and register() must not wait for etcd for long"
    assert hub.members() == {}
    assert "unreachable since" in hub.degraded and "0 hub(s)" in hub.degraded
    await asyncio.to_thread(etcd.server.start)
    await eventually(lambda: "leonardo" in hub.members() and not hub.degraded, 10, "registered once etcd is up")


async def test_refused_certificate_is_a_clear_degraded_reason(etcd, test_pki):
    """A certificate from another CA: etcd refuses the handshake; the daemon says it cannot connect."""
    from certs import pki
    from federation.tls import TlsFiles
    cert, key = pki.cert_paths(test_pki.other_ca_root, pki.identity_for("eurohpc.test", Role.HUB, "leonardo"))
    d = EtcdDiscovery([etcd.server.endpoint], TlsFiles(test_pki.ca, cert, key), PREFIX, LEASE)
    try:
        await d.start()
        assert d.members() == {}
        assert "refusing this certificate" in d.degraded
    finally:
        await d.close()


# -- leader election ---------------------------------------------------------------------------------------------

LEADER_KEY = f"{PREFIX}/leaders/leonardo"


@pytest.fixture
async def candidates(etcd, test_pki):
    made: list[Election] = []

    def make(instance: str) -> Election:
        e = Election(EtcdClient([etcd.server.endpoint], test_pki.tls(Role.HUB, "leonardo")), LEADER_KEY, instance,
                     LEASE)
        made.append(e)
        return e

    try:
        yield make
    finally:
        for e in made:
            await e.close()
            await e.client.close()


async def test_only_one_of_two_leads(candidates):
    a, b = candidates("leonardo-1"), candidates("leonardo-2")
    ta, tb = asyncio.create_task(a.campaign()), asyncio.create_task(b.campaign())
    done, pending = await asyncio.wait({ta, tb}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    await asyncio.sleep(LEASE)  # the other keeps waiting, well past a lease
    assert len(pending) == 1 and not pending.pop().done()
    winner, loser = (a, b) if ta in done else (b, a)
    assert winner.is_leader and not loser.is_leader
    await eventually(lambda: a.known_leader == b.known_leader == winner.instance, 2, "both see the same leader")
    assert not winner.lost.is_set()
    (tb if ta in done else ta).cancel()


async def test_leader_killed_is_replaced_within_its_ttl(candidates, etcd, test_pki):
    proc = await start_peer("leader", etcd.server.endpoint, *tls_args(test_pki, Role.HUB, "leonardo"), LEADER_KEY,
                            "leonardo-1", str(LEASE))
    try:
        follower = candidates("leonardo-2")
        task = asyncio.create_task(follower.campaign())
        await eventually(lambda: follower.known_leader == "leonardo-1", 5, "the follower sees the leader")
        await asyncio.sleep(0.5)
        assert not task.done()
        killed = time.monotonic()
        proc.kill()
        await asyncio.wait_for(task, LEASE + 3)
        took = time.monotonic() - killed
    finally:
        await stop_peer(proc)
    assert LEASE * 2 / 3 - 0.2 <= took <= LEASE + 1.0, f"took over {took:.2f} s after the kill"
    assert follower.is_leader
    # the watch reports the new holder a moment after the transaction that made it the leader
    await eventually(lambda: follower.known_leader == "leonardo-2", 5, "the follower sees itself lead")


async def test_resign_hands_over_at_once(candidates):
    a, b = candidates("leonardo-1"), candidates("leonardo-2")
    await a.campaign()
    task = asyncio.create_task(b.campaign())
    await eventually(lambda: b.known_leader == "leonardo-1", 5, "b sees a lead")
    assert await candidates("observer").leader() == "leonardo-1"  # a look from outside the race
    resigned = time.monotonic()
    await a.resign()
    await asyncio.wait_for(task, LEASE)
    assert time.monotonic() - resigned < LEASE / 2, "resigning must not wait for the lease to expire"
    assert b.is_leader and not a.is_leader
    assert not a.lost.is_set()  # resigning is not losing


async def test_leader_cut_off_from_etcd_steps_down_by_its_ttl(candidates, etcd):
    a = candidates("leonardo-1")
    await a.campaign()
    await asyncio.sleep(0.3)
    stopped = time.monotonic()
    await asyncio.to_thread(etcd.server.kill)
    await asyncio.wait_for(a.lost.wait(), LEASE + 1)
    took = time.monotonic() - stopped
    # at the TTL after its last refresh (every TTL/3): never later than the TTL, so nobody else leads meanwhile
    assert LEASE * 2 / 3 - 0.2 <= took <= LEASE + 0.2, f"stepped down {took:.2f} s after losing etcd"
    assert not a.is_leader and "not refreshed" in a.why_lost


async def test_leader_whose_key_is_deleted_steps_down(candidates, etcd, test_pki):
    a = candidates("leonardo-1")
    await a.campaign()
    async with EtcdClient([etcd.server.endpoint], test_pki.tls(Role.HUB, "lumi")) as c:
        await c.delete(LEADER_KEY.encode())
    await asyncio.wait_for(a.lost.wait(), 2)
    assert not a.is_leader and "deleted" in a.why_lost


async def test_election_can_share_the_hub_discovery_connection(etcd, test_pki):
    """How a hub process uses both: its discovery's client also carries its campaign."""
    hub = await etcd.hub()
    await hub.register(hub_member())
    election = Election(hub.client, LEADER_KEY, "leonardo-1", LEASE)
    try:
        assert await election.leader() == ""
        await asyncio.wait_for(election.campaign(), 5)
        assert await election.leader() == "leonardo-1"
        await hub.update({"gpus_free": 3})
        assert hub.members()["leonardo"].summary == {"gpus_free": 3}
        await asyncio.sleep(LEASE)  # both leases kept alive over the one connection
        assert election.is_leader and "leonardo" in hub.members()
    finally:
        await election.close()
    async with etcd.client() as c:
        assert await c.get(LEADER_KEY.encode()) is None
