"""Federation membership in etcd: each hub keeps `<prefix>/hubs/<site>` (its `Member` as JSON) under a lease it
refreshes; everyone follows the `<prefix>/hubs/` prefix with a watch that survives etcd restarts.

A hub that dies without closing disappears when its lease expires (at most `lease_s` after its last refresh). A
hub whose lease was lost while it was cut off (or that finds etcd restored without it) registers again. While
etcd cannot be reached the last membership known stays in place and `degraded` says since when and why; a daemon
whose etcd is down at start starts anyway, with an empty membership, and catches up when etcd answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import orjson
from aetcd import rtypes

from federation.discovery import Discovery, Member
from federation.etcd_client import Backoff, EtcdClient, LeaseKeeper, PrefixWatch, describe, stop_if_cancelled
from federation.tls import TlsFiles

log = logging.getLogger(__name__)

START_WAIT_S = 3.0  # start() returns after this long even if etcd has not answered (degraded)
WRITE_WAIT_S = 1.0  # register()/update() wait this long for their record to be written and seen, when healthy


class EtcdDiscovery(Discovery):
    """Membership from the federation's etcd, reached over mutual TLS with this daemon's certificate."""

    backend = "etcd"

    def __init__(self, endpoints: Sequence[str], tls: TlsFiles, prefix: str, lease_s: float = 10, *,
                 server_name: str = ""):
        super().__init__()
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.prefix = prefix.rstrip("/")
        self.hubs_prefix = f"{self.prefix}/hubs/"
        self.lease_s = lease_s
        # this hub's record and lease; an Election of the same daemon may share it
        self.client = EtcdClient(self.endpoints, tls, server_name=server_name)
        self._watch = PrefixWatch(EtcdClient(self.endpoints, tls, server_name=server_name),
                                  self.hubs_prefix.encode(), on_reset=self._on_reset, on_event=self._on_event,
                                  on_trouble=lambda reason: self._trouble("watch", reason))
        self._troubles: dict[str, tuple[float, str]] = {}  # source -> (since, wall clock; latest reason)
        self._own: Member | None = None  # this hub's record as it should be in etcd
        self._written: tuple[int, bytes] | None = None  # (lease, record) last written
        self._write_lock = asyncio.Lock()
        self._dirty = asyncio.Event()  # this hub's record must be written again
        self._keeper: LeaseKeeper | None = None
        self._writer: asyncio.Task | None = None
        self._started = self._closed = False

    def key(self, site: str) -> str:
        return f"{self.hubs_prefix}{site}"

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the membership, waiting at most START_WAIT_S for etcd; when it does not answer in time, start
        degraded with an empty membership and follow it once it answers."""
        if self._started:
            return
        self._started = True
        self._watch.start()
        try:
            await asyncio.wait_for(self._watch.ready.wait(), START_WAIT_S)
        except asyncio.TimeoutError:
            if "watch" not in self._troubles:
                self._trouble("watch", f"no answer within {START_WAIT_S:g} s")
            log.warning("%s", self.degraded)

    async def close(self) -> None:
        """Revoke this hub's lease (its record goes at once), stop following, close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        if self._keeper is not None:
            await self._keeper.stop(revoke=True)
        await self._watch.stop()
        await self.client.close()
        if self._own is not None:
            self._remove(self._own.site)
            self._own = None

    # -- this hub's record -------------------------------------------------------------------------------------

    async def register(self, member: Member) -> None:
        """Put this hub's record under a lease and keep it there until `close`. Returns at once if etcd is away
        (the record is written when it answers)."""
        if self._closed:
            raise RuntimeError("register() after close()")
        if self._own is not None and self._own.site != member.site:
            raise RuntimeError(f"already registered as {self._own.site!r}, cannot register {member.site!r} too")
        self._own = member
        if self._keeper is None:  # it grants a lease and writes the record, now or once etcd answers
            self._keeper = LeaseKeeper(self.client, self.lease_s, on_new_lease=self._write_with,
                                       on_trouble=lambda reason: self._trouble("lease", reason))
            self._keeper.start()
            self._writer = asyncio.create_task(self._write_loop(), name=f"etcd record {member.site}")
        else:
            self._dirty.set()
        await self._settle()

    async def update(self, summary: dict) -> None:
        """Replace this hub's summary. Never raises for etcd being away: the latest summary is written when it
        answers. Waits at most WRITE_WAIT_S, and not at all while degraded."""
        if self._own is None:
            raise RuntimeError("update() before register()")
        self._own = Member(self._own.site, self._own.endpoint, dict(summary))
        self._dirty.set()
        await self._settle()

    async def _settle(self) -> None:
        """While healthy, wait (briefly) until this hub's latest record is written and back through the watch,
        so that `members()` reads it."""
        if self.degraded or not self._started:
            return
        deadline = time.monotonic() + WRITE_WAIT_S
        while (left := deadline - time.monotonic()) > 0 and not self.degraded:
            own = self._own
            seen = self._members.get(own.site) if own is not None else None
            if own is None or (seen is not None and (seen.endpoint, seen.summary) == (own.endpoint, own.summary)):
                return
            await self._watch.wait_change(self._watch.version, left)

    async def _write_with(self, lease_id: int) -> None:
        """Write this hub's record under `lease_id` (a new lease: raise if it cannot be written)."""
        async with self._write_lock:
            own = self._own
            if own is None:
                return
            value = orjson.dumps(own.to_dict())
            await self.client.put(self.key(own.site).encode(), value, lease=lease_id)
            if self._written is None or self._written[0] != lease_id:
                log.info("%s written to etcd at %s under lease %x (TTL %d s)", self.key(own.site),
                         self.client.endpoint, lease_id, self._keeper.ttl if self._keeper else 0)
            self._written = (lease_id, value)
            self._trouble("write", "")

    async def _write_loop(self) -> None:
        """Write the record again whenever it changed, or vanished while our lease lives; retry while etcd is
        away. A lost lease is the keeper's business: it writes the record under the new one."""
        backoff = Backoff()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            lease = self._keeper.lease_id if self._keeper is not None else 0
            if not lease:  # being granted (the keeper then writes the record) or etcd is away: look again soon
                self._dirty.set()
                await asyncio.sleep(0.2)
                continue
            if self._own is None or self._written == (lease, orjson.dumps(self._own.to_dict())):
                continue
            try:
                await self._write_with(lease)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stop_if_cancelled()
                self._trouble("write", describe(exc))
                self._dirty.set()
                await self.client.failed()
                await backoff.wait()

    # -- following the prefix ----------------------------------------------------------------------------------

    def _parse(self, key: bytes, value: bytes) -> Member | None:
        """The member a key holds, or None (logged) when the key or value is not a member record."""
        name = key.decode(errors="replace")
        site = name[len(self.hubs_prefix):]
        try:
            if not site or "/" in site:
                raise ValueError("the key is not <prefix>/hubs/<site>")
            member = Member.from_dict(orjson.loads(value))
            if member.site != site:
                raise ValueError(f"the record names site {member.site!r}")
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            log.warning("etcd key %s is not a hub record, ignored: %s", name, exc)
            return None
        return member

    def _site(self, key: bytes) -> str:
        return key.decode(errors="replace")[len(self.hubs_prefix):]

    def _on_reset(self, kvs: list[rtypes.KeyValue], revision: int) -> None:
        members = [m for kv in kvs if (m := self._parse(kv.key, kv.value)) is not None]
        self._set(members)
        self._check_own()
        self._refresh_degraded()

    def _on_event(self, event: rtypes.Event) -> None:
        site = self._site(event.kv.key)
        if event.kind == rtypes.EventKind.PUT:
            member = self._parse(event.kv.key, event.kv.value)
            if member is not None:
                self._put(member)
            else:
                self._remove(site)  # it no longer holds a valid record
        else:
            self._remove(site)
        self._check_own()
        self._refresh_degraded()

    def _check_own(self) -> None:
        """If this hub's record is missing or stale in etcd while the lease lives, write it again."""
        own = self._own
        if own is None or self._closed:
            return
        seen = self._members.get(own.site)
        if seen is None or (seen.endpoint, seen.summary) != (own.endpoint, own.summary):
            self._written = None if seen is None else self._written
            self._dirty.set()

    # -- degraded ----------------------------------------------------------------------------------------------

    def _trouble(self, source: str, reason: str) -> None:
        if not reason:
            self._troubles.pop(source, None)
        else:
            since = self._troubles.get(source, (time.time(), ""))[0]
            self._troubles[source] = (since, reason)
        self._refresh_degraded()

    def _refresh_degraded(self) -> None:
        where = ", ".join(self.endpoints)
        n = len(self._members)
        if "watch" in self._troubles:
            since, reason = self._troubles["watch"]
            self.degraded = (f"etcd at {where} unreachable since {time.strftime('%H:%M:%S', time.localtime(since))}"
                             f": {reason}; using the last known membership of {n} hub(s)")
        elif self._troubles:
            since, reason = min(self._troubles.values())
            self.degraded = (f"etcd at {where}: this hub's record cannot be written since "
                             f"{time.strftime('%H:%M:%S', time.localtime(since))}: {reason}; others may not see "
                             "it, or see an old one")
        else:
            self.degraded = ""
