"""The antenna's view of each hub: an mTLS channel and a live subscription to its capacity adverts."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from federation.config import HubEndpoint
from federation.pb import hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel
from federation.tls import TlsFiles
from federation.watch import Signal

log = logging.getLogger(__name__)

RENEW_GRACE_S = 60.0


class HubSite:
    """One hub: its stub, its last advert, and whether that advert can be trusted now."""

    def __init__(self, endpoint: HubEndpoint, tls: TlsFiles, changed: Signal):
        self.site = endpoint.site
        self.endpoint = endpoint.endpoint
        self.channel = secure_channel(endpoint.endpoint, tls)
        self.stub = hub_pb2_grpc.HubStub(self.channel)
        self.advert: jobs_pb2.Advert | None = None
        self.received_at = 0.0
        self.connected = False
        self.error = "not contacted yet"
        self._changed = changed
        self._task: asyncio.Task | None = None
        self._retired: list[grpc.aio.Channel] = []  # channels with the previous certificate, closing soon

    @property
    def fresh(self) -> bool:
        """Connected, with an advert younger than its time-to-live."""
        return (self.connected and self.advert is not None
                and time.time() - self.received_at <= self.advert.ttl_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow_adverts(), name=f"adverts {self.site}")

    def renew_channel(self, tls: TlsFiles, grace_s: float = RENEW_GRACE_S) -> None:
        """Use new TLS files for new calls; calls and streams on the old channel get `grace_s` to finish, then
        it closes and they reconnect on the new one."""
        old = self.channel
        self.channel = secure_channel(self.endpoint, tls)
        self.stub = hub_pb2_grpc.HubStub(self.channel)
        self._retired.append(old)
        asyncio.get_running_loop().call_later(grace_s, lambda: asyncio.ensure_future(self._retire(old)))

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        if channel in self._retired:
            self._retired.remove(channel)
            await channel.close(None)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for channel in (*self._retired, self.channel):
            await channel.close(None)
        self._retired.clear()

    async def _follow_adverts(self) -> None:
        backoff = 0.2
        while True:
            try:
                async for advert in self.stub.WatchAdverts(hub_pb2.AdvertRequest()):
                    if advert.site != self.site:
                        self.error = f"endpoint {self.endpoint} answers as site {advert.site!r}, not {self.site!r}"
                        log.error("hub %s: %s", self.site, self.error)
                        self.connected = False
                        break
                    if not self.connected:
                        log.info("hub %s is reachable at %s", self.site, self.endpoint)
                    self.advert, self.received_at, self.connected, self.error = advert, time.time(), True, ""
                    self._changed.notify()
                    backoff = 0.2
            except grpc.aio.AioRpcError as exc:
                if self.connected:
                    log.warning("hub %s advert stream broke: %s", self.site, exc.details())
                self.error = f"{exc.code().name}: {exc.details()}"
            self.connected = False
            self._changed.notify()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
