"""etcd over mutual TLS for the daemons, and what aetcd leaves to its users:

- `EtcdClient`: aetcd's client on a `grpc.aio.secure_channel` with the daemon's federation certificate (aetcd
  itself only dials plaintext), connecting to the first of several endpoints that answers.
- `LeaseKeeper`: a lease refreshed every ttl/3, re-granted when lost (etcd was away longer than the TTL), or
  reported lost (for a leader, who must not simply carry on).
- `PrefixWatch`: every key under a prefix, followed across etcd restarts: a full read, then a watch from the
  next revision; when the stream dies it resumes from the last revision seen + 1, and reads everything again when
  that revision was compacted away.

Calls that fail because etcd is away raise `aetcd.exceptions.ConnectionFailedError` (or ConnectionTimeoutError);
the helpers retry with backoff and report their state through callbacks, so their owners can say they are
degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
from aetcd import Client, exceptions, rpc, rtypes, watcher

from federation.tls import TlsFiles
from federation.watch import stopping

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 3.0  # any single call; etcd answers in milliseconds when it is up
CONNECT_TIMEOUT_S = 1.5  # per endpoint, to see it answer the TLS handshake
BACKOFF_S = (0.2, 2.0)  # first and longest wait between retries while etcd is away

# A dead etcd must be noticed, and a returning one found quickly: gRPC's own reconnect backoff grows to minutes.
# Keepalive pings only while a call is open (etcd refuses pings on idle connections) and no more often than
# etcd's --grpc-keepalive-min-time (5 s).
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
}

def stop_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop. grpc and aetcd may turn a cancellation that arrives
    during a call into an ordinary error; a retry loop that caught it must not go on as if nothing happened."""
    if stopping():
        raise asyncio.CancelledError


def describe(exc: BaseException) -> str:
    """A short reason for a failed etcd call ("connection refused", "deadline exceeded"...)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


class EtcdClient(Client):
    """An aetcd client over mutual TLS. `endpoints` are tried in order, each for CONNECT_TIMEOUT_S, when
    (re)connecting; `reconnect()` drops the channel so that the next call connects again (and picks up renewed
    certificates). `server_name`, when set, is the DNS name the etcd certificate must carry (instead of the
    endpoint's host)."""

    def __init__(self, endpoints: Sequence[str], tls: TlsFiles, *, timeout: float = CALL_TIMEOUT_S,
                 server_name: str = ""):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        host, port = split_endpoint(endpoints[0])
        for endpoint in endpoints[1:]:
            split_endpoint(endpoint)
        super().__init__(host=host, port=port, timeout=timeout, options=dict(CHANNEL_OPTIONS),
                         connect_wait_timeout=int(CONNECT_TIMEOUT_S * len(endpoints)) + 1)
        self.endpoints = list(endpoints)
        self.tls = tls
        self.server_name = server_name
        self.endpoint = self.endpoints[0]  # the one in use, or the last one tried

    async def connect(self) -> None:
        """Open a channel to the first endpoint that completes a TLS handshake; raise ConnectionFailedError
        naming each endpoint and why when none does."""
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it
            try:
                await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            except asyncio.TimeoutError:
                raise exceptions.ConnectionFailedError(f"etcd at {', '.join(self.endpoints)} unreachable") from None
            return
        self._is_connecting = True
        try:
            credentials = self.tls.channel_credentials()
            options = list(self._options.items())
            if self.server_name:
                options.append(("grpc.ssl_target_name_override", self.server_name))
            failures = []
            for endpoint in self.endpoints:
                self.endpoint = endpoint
                channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
                try:
                    await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
                except asyncio.TimeoutError:
                    await channel.close()
                    failures.append(f"{endpoint}: no TLS connection within {CONNECT_TIMEOUT_S:g} s")
                    continue
                self._open(channel)
                return
            raise exceptions.ConnectionFailedError(
                "no etcd endpoint answers (down, unreachable, or refusing this certificate): " + "; ".join(failures))
        finally:
            self._is_connecting = False

    def _open(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.kvstub = rpc.KVStub(channel)
        self.clusterstub = rpc.ClusterStub(channel)
        self.leasestub = rpc.LeaseStub(channel)
        self.maintenancestub = rpc.MaintenanceStub(channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()

    async def close(self) -> None:
        """Close the channel; safe to call twice and while calls are in flight (they fail)."""
        channel, old_watcher = self.channel, self._watcher
        self._init_channel_attrs()
        self._connected.clear()
        if old_watcher is not None:
            # aetcd's watcher can be left half torn down by a dead stream; its shutdown may then raise or hang
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old_watcher.shutdown(), 1.0)
        if channel is not None:
            await channel.close()

    async def reconnect(self) -> None:
        """Drop the channel: the next call connects again, trying the endpoints in order."""
        await self.close()

    async def failed(self) -> None:
        """Note that a call failed because etcd is away. With one endpoint the channel reconnects by itself
        (unary calls recover once etcd is back); with several, drop it so the next call tries each in turn."""
        if len(self.endpoints) > 1:
            await self.reconnect()


class Backoff:
    """Exponential waits with jitter, from BACKOFF_S[0] up to BACKOFF_S[1]; `reset()` after a success."""

    def __init__(self, first: float = BACKOFF_S[0], longest: float = BACKOFF_S[1]):
        self.first, self.longest = first, longest
        self.next = first

    def reset(self) -> None:
        self.next = self.first

    async def wait(self) -> None:
        delay = self.next * random.uniform(0.8, 1.2)
        self.next = min(self.next * 2, self.longest)
        await asyncio.sleep(delay)


class LeaseKeeper:
    """A lease kept alive by refreshing it every ttl/3.

    When a refresh says the lease is gone (etcd was away longer than the TTL, or someone revoked it): with
    `regrant`, a new lease is granted and `on_new_lease(lease_id)` runs (to put the keys again) before it counts
    as held; without, `on_lost(reason)` runs and the keeper stops. While etcd is away `on_trouble(reason)` runs
    after each failure, and `on_trouble("")` once a refresh works again.

    `expires` is when the lease ends at the latest as far as this process knows (monotonic clock): when the last
    successful refresh was sent, plus the TTL. Whoever must stop acting on the lease's behalf (a leader)
    compares with it, so it steps down in time even when etcd cannot be reached to say so."""

    def __init__(self, client: EtcdClient, ttl_s: float, *, regrant: bool = True,
                 on_new_lease: Callable[[int], Awaitable[None]] | None = None,
                 on_trouble: Callable[[str], None] | None = None,
                 on_lost: Callable[[str], None] | None = None):
        if ttl_s < 2:
            raise ValueError(f"lease TTL must be at least 2 s, not {ttl_s}")
        self.client = client
        self.ttl = int(round(ttl_s))
        self.regrant = regrant
        self.on_new_lease, self.on_trouble, self.on_lost = on_new_lease, on_trouble, on_lost
        self.lease_id = 0  # 0 while none is held
        self.expires = 0.0
        self._task: asyncio.Task | None = None
        self._troubled = False

    async def grant(self) -> int:
        """Grant a new lease now and run `on_new_lease`; its id. Raises if etcd is away or `on_new_lease`
        fails (the new lease is then revoked, or left to expire)."""
        sent = time.monotonic()
        lease = await self.client.lease(self.ttl)
        if lease.ttl <= 0:
            raise exceptions.ClientError(f"etcd granted a lease of {lease.ttl} s")
        if self.on_new_lease is not None:
            try:
                await self.on_new_lease(lease.id)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.client.revoke_lease(lease.id)
                raise
        self.lease_id, self.expires = lease.id, sent + lease.ttl
        return lease.id

    def start(self) -> None:
        """Keep the lease alive in the background (granting one first if none is held)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"etcd lease keeper ({self.ttl} s)")

    async def _run(self) -> None:
        backoff = Backoff(longest=max(self.ttl / 6, BACKOFF_S[0]))
        while True:
            try:
                if not self.lease_id:
                    await self.grant()
                    log.info("etcd lease %x granted (TTL %d s)", self.lease_id, self.ttl)
                else:
                    sent = time.monotonic()
                    reply = await self.client.refresh_lease(self.lease_id)
                    if reply is None or reply.TTL <= 0:
                        lost = self.lease_id
                        self.lease_id, self.expires = 0, 0.0
                        if not self.regrant:
                            if self.on_lost is not None:
                                self.on_lost(f"etcd lease {lost:x} expired or was revoked")
                            return
                        log.warning("etcd lease %x expired or was revoked: granting a new one", lost)
                        continue
                    self.expires = sent + reply.TTL
                self._trouble("")
                backoff.reset()
                await asyncio.sleep(self.ttl / 3)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd away, or on_new_lease failed: retry either way
                stop_if_cancelled()
                self._trouble(describe(exc))
                await self.client.failed()
                await backoff.wait()

    def _trouble(self, reason: str) -> None:
        if not reason and not self._troubled:
            return
        if reason and not self._troubled:
            log.warning("etcd lease %x cannot be refreshed: %s", self.lease_id, reason)
        elif not reason:
            log.info("etcd lease %x refreshed again", self.lease_id)
        self._troubled = bool(reason)
        if self.on_trouble is not None:
            self.on_trouble(reason)

    async def stop(self, revoke: bool = True) -> None:
        """Stop refreshing; revoke the lease (its keys go at once) unless `revoke` is False."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if revoke and self.lease_id:
            try:
                await self.client.revoke_lease(self.lease_id)
            except Exception as exc:  # etcd away: the lease then ends at its TTL
                log.warning("etcd lease %x not revoked (%s): its keys go when it expires", self.lease_id,
                            describe(exc))
        self.lease_id, self.expires = 0, 0.0


class PrefixWatch:
    """Follow every key under `prefix` (only the key `prefix` itself with `exact`): `on_reset(kvs, revision)`
    with all of them at the start and after a gap that cannot be replayed (compaction); `on_event(event)` for
    each change since; `on_trouble(reason)` when the watch breaks, `on_trouble("")` once it follows again.
    Runs until stopped; callbacks must not block. `revision` is the last revision applied; `version` counts
    the callbacks, and `wait_change(version)` waits for the next.

    Owns its client: a watch stream that died with etcd is not reusable, so the channel is dropped and opened
    again, which also fails over to another endpoint."""

    def __init__(self, client: EtcdClient, prefix: bytes, *,
                 on_reset: Callable[[list[rtypes.KeyValue], int], None],
                 on_event: Callable[[rtypes.Event], None],
                 on_trouble: Callable[[str], None] | None = None,
                 exact: bool = False):
        self.client = client
        self.prefix = prefix
        self.exact = exact
        self.on_reset, self.on_event, self.on_trouble = on_reset, on_event, on_trouble
        self.revision = 0  # the last revision applied (0: none yet, read everything)
        self.ready = asyncio.Event()  # set once the first full read was applied
        self.trouble = ""  # why the watch is not following now ("" while it is)
        self.version = 0
        self._waiters: list[asyncio.Future] = []
        self._task: asyncio.Task | None = None

    async def wait_change(self, version: int, timeout: float) -> None:
        """Return once `version` is no longer current (a callback ran since), or after `timeout` seconds."""
        if self.version != version:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _changed(self) -> None:
        self.version += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"etcd watch {self.prefix!r}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self.client.close()

    async def _read(self, keys_only: bool = False) -> rtypes.GetRange:
        if self.exact:
            return await self.client.get_range(self.prefix, self.prefix + b"\0")
        return await self.client.get_prefix(self.prefix, keys_only=keys_only)

    async def _watch(self) -> rtypes.Watch:
        if self.exact:
            return await self.client.watch(self.prefix, start_revision=self.revision + 1)
        return await self.client.watch_prefix(self.prefix, start_revision=self.revision + 1)

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                if self.revision and (now := (await self._read(keys_only=True)).header.revision) < self.revision:
                    log.warning("etcd is at revision %d, behind the %d already seen: it was restored or replaced; "
                                "reading %r again", now, self.revision, self.prefix)
                    self.revision = 0
                if not self.revision:
                    got = await self._read()
                    self.on_reset(list(got), got.header.revision)
                    self.revision = got.header.revision
                    self.ready.set()
                    self._changed()
                watch = await self._watch()
                self._trouble("")
                backoff.reset()
                async for event in watch:
                    self.on_event(event)
                    self.revision = max(self.revision, event.kv.mod_revision)
                    self._changed()
                raise exceptions.ConnectionFailedError("watch stream ended")
            except asyncio.CancelledError:
                raise
            except exceptions.RevisionCompactedError as exc:
                log.warning("etcd history of %r compacted past revision %d (now %d): reading it all again",
                            self.prefix, self.revision + 1, exc.compacted_revision)
                self.revision = 0
            except Exception as exc:
                stop_if_cancelled()
                self._trouble(describe(exc))
                await self.client.reconnect()
                await backoff.wait()

    def _trouble(self, reason: str) -> None:
        if reason and not self.trouble:
            log.warning("etcd watch of %r broken (%s): resuming from revision %d when etcd answers",
                        self.prefix, reason, self.revision + 1)
        elif not reason and self.trouble:
            log.info("etcd watch of %r resumed from revision %d", self.prefix, self.revision + 1)
        changed, self.trouble = self.trouble != reason, reason
        if self.on_trouble is not None:
            self.on_trouble(reason)
        if changed:
            self._changed()
