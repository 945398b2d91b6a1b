"""Leader election between the hub processes of one site, through etcd.

The leader holds `<prefix>/leaders/<site>` (its instance name) under a lease it refreshes. A candidate creates the
key only if it does not exist (a transaction on create_revision == 0); otherwise it watches the key and tries
again when it is deleted: by `resign()`, or by etcd when the leader's lease expired.

A leader steps down on its own when it could not refresh its lease for the TTL, measured from the last refresh
that succeeded: etcd may then have handed the key to another candidate, and a leader cut off from etcd cannot
hear it. It also steps down if its key is deleted or taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aetcd import exceptions, rtypes

from federation.etcd_client import Backoff, EtcdClient, LeaseKeeper, PrefixWatch, describe, stop_if_cancelled

log = logging.getLogger(__name__)

LOOKUP_S = 3.0  # leader() waits this long for etcd's first answer


class Election:
    """One candidate. `await campaign()` returns once this instance leads; `lost` is set if it then stops
    leading other than by `resign()`. `await leader()` is the instance leading now, as far as the watch knows.

    Uses `client` for its lease and transactions, and a second connection (same endpoints and certificate) to
    watch the key. `close()` resigns and closes that second connection; `client` stays the caller's."""

    def __init__(self, client: EtcdClient, key: str, instance: str, ttl_s: float = 10):
        if not instance:
            raise ValueError("an election candidate needs an instance name")
        self.client = client
        self.key = key.encode()
        self.instance = instance
        self.ttl_s = ttl_s
        self.lost = asyncio.Event()
        self.why_lost = ""
        self._current: rtypes.KeyValue | None = None  # the key as the watch last saw it
        self._watch = PrefixWatch(EtcdClient(client.endpoints, client.tls, server_name=client.server_name),
                                  self.key, exact=True, on_reset=self._on_reset, on_event=self._on_event)
        self._keeper: LeaseKeeper | None = None
        self._held = 0  # create_revision of the key while this instance leads, else 0
        self._monitor: asyncio.Task | None = None
        self._stepping: asyncio.Task | None = None

    @property
    def is_leader(self) -> bool:
        return bool(self._held) and not self.lost.is_set()

    @property
    def known_leader(self) -> str:
        """The instance holding the key as the watch last saw it ("" when none, or before it first answered)."""
        return self._current.value.decode(errors="replace") if self._current is not None else ""

    async def leader(self) -> str:
        """The instance leading now ("" when none): this one if it leads, else as the watch last saw the key.
        Follows the key from now on; waits at most LOOKUP_S for etcd the first time (and then says "" if it did
        not answer)."""
        await self.start()
        if self.is_leader:  # it won the key itself: the watch may not have seen that event yet
            return self.instance
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._watch.ready.wait(), LOOKUP_S)
        return self.known_leader

    async def start(self) -> None:
        """Begin following the key (campaign() and leader() do this too)."""
        self._watch.start()

    async def campaign(self) -> None:
        """Return once this instance leads. Retries while etcd is away; cancel it to give up."""
        if self.is_leader:
            return
        await self.start()
        self.lost.clear()
        self.why_lost = ""
        backoff = Backoff()
        while True:
            await self._watch.ready.wait()
            leads, held_at = await self._try()
            if leads:
                return
            if not held_at:  # etcd away
                await backoff.wait()
                continue
            backoff.reset()
            # held by another: wait until the watch has seen that and then sees the key free (look again now and
            # then anyway, in case the watch is behind)
            deadline = time.monotonic() + self.ttl_s
            while (left := deadline - time.monotonic()) > 0 and not self._watch.trouble:
                if self._watch.revision >= held_at and self._current is None:
                    break
                await self._watch.wait_change(self._watch.version, left)

    async def _try(self) -> tuple[bool, int]:
        """One attempt to create the key under a new lease. (True, its revision) when this instance now leads;
        (False, the revision at which another held it); (False, 0) when etcd did not answer."""
        keeper = LeaseKeeper(self.client, self.ttl_s, regrant=False, on_lost=self._lease_lost)
        t = self.client.transactions
        try:
            lease = await keeper.grant()
            ok, replies = await self.client.transaction(
                compare=[t.create(self.key) == 0],
                success=[t.put(self.key, self.instance.encode(), lease=lease), t.get(self.key)],
                failure=[t.get(self.key)])
        except (exceptions.ClientError, asyncio.TimeoutError) as exc:
            stop_if_cancelled()
            log.warning("election %s: etcd did not answer (%s); trying again", self.key.decode(), describe(exc))
            if keeper.lease_id:
                await keeper.stop(revoke=True)
            return False, 0
        got = [kv for value, kv in replies[-1]] if replies else []
        if not ok:
            await keeper.stop(revoke=True)
            return False, max((kv.mod_revision for kv in got), default=1)
        self._held = got[0].create_revision
        self._keeper = keeper
        keeper.start()
        self._monitor = asyncio.create_task(self._watch_over(), name=f"election {self.key.decode()}")
        log.info("election %s: %s leads (lease %x, TTL %d s)", self.key.decode(), self.instance, lease, keeper.ttl)
        return True, self._held

    async def _watch_over(self) -> None:
        """While leading: step down when the lease was not refreshed in time, or the key is no longer ours."""
        keeper = self._keeper
        while keeper is not None:
            version = self._watch.version
            left = keeper.expires - time.monotonic()
            if left <= 0:
                return await self._step_down(f"lease not refreshed for {keeper.ttl} s (etcd unreachable?)")
            current = self._current
            if self._watch.revision >= self._held and (current is None or current.create_revision != self._held):
                return await self._step_down("the leader key was deleted or taken over")
            await self._watch.wait_change(version, left)

    def _lease_lost(self, reason: str) -> None:
        if self._held and not self.lost.is_set():
            self._stepping = asyncio.get_running_loop().create_task(self._step_down(reason))

    async def _step_down(self, reason: str) -> None:
        if not self._held or self.lost.is_set():
            return
        log.warning("election %s: %s no longer leads: %s", self.key.decode(), self.instance, reason)
        self.why_lost = reason
        self.lost.set()
        await self._release(monitor=asyncio.current_task() is not self._monitor)

    async def _release(self, monitor: bool = True) -> None:
        self._held = 0
        if monitor and self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
        self._monitor = None
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            await keeper.stop(revoke=True)  # fails harmlessly when etcd is away: the lease expires anyway

    async def resign(self) -> None:
        """Stop leading: the key is deleted at once, and another candidate can take it."""
        if self._held:
            log.info("election %s: %s resigns", self.key.decode(), self.instance)
        await self._release()

    async def close(self) -> None:
        """Resign if leading, and stop following the key."""
        await self.resign()
        await self._watch.stop()

    def _on_reset(self, kvs: list[rtypes.KeyValue], revision: int) -> None:
        self._current = kvs[0] if kvs else None

    def _on_event(self, event: rtypes.Event) -> None:
        self._current = event.kv if event.kind == rtypes.EventKind.PUT else None
