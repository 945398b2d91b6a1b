"""The antenna's view of each hub: an mTLS channel and a live subscription to its capacity adverts."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import grpc
from cryptography import x509

from federation.config import HubEndpoint
from federation.crl import Revocations
from federation.pb import hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel
from federation.tls import TlsFiles, spiffe_uri
from federation.watch import Signal, stop_tasks, stopping

log = logging.getLogger(__name__)

RENEW_GRACE_S = 60.0


class HubSite:
    """One hub: its stub, its last advert, and whether that advert can be trusted now."""

    def __init__(self, endpoint: HubEndpoint, tls: TlsFiles, changed: Signal, revocations: Revocations | None = None,
                 federation: str = ""):
        self.site = endpoint.site
        self.identity = f"spiffe://{federation}/hub/{endpoint.site}" if federation else ""
        self.endpoint = endpoint.endpoint
        self.tls = tls
        self.revocations = revocations
        self.untrusted = ""  # why this hub must not be used: its certificate is revoked, or not this hub's
        self.channel = secure_channel(endpoint.endpoint, tls)
        self.stub = hub_pb2_grpc.HubStub(self.channel)
        self.advert: jobs_pb2.Advert | None = None
        self.received_at = 0.0
        self.connected = False
        self.error = "not contacted yet"
        self.left = ""  # why the hub is not in the federation's membership now ("": it is; one that left gets no job)
        self._changed = changed
        self._task: asyncio.Task | None = None
        self._retired: list[grpc.aio.Channel] = []  # channels with the previous certificate, closing soon
        self._recheck: asyncio.Task | None = None

    @property
    def fresh(self) -> bool:
        """Connected, with an advert younger than its time-to-live."""
        return (self.connected and self.member and self.advert is not None and not self.untrusted
                and time.time() - self.received_at <= self.advert.ttl_s)

    @property
    def member(self) -> bool:
        return not self.left

    def leave(self, why: str) -> None:
        """The hub is no longer registered: no new job goes there; its jobs are still followed when it answers."""
        self.left = why
        self._changed.notify()

    def rejoin(self) -> None:
        self.left = ""
        self._changed.notify()

    def move(self, endpoint: str) -> None:
        """The hub answers at a new address (its standby took over, or it moved): new calls go there at once,
        calls on the old channel are cancelled and retried on the new one."""
        self.endpoint = endpoint
        self.renew_channel(self.tls, grace_s=0.0)

    async def check_certificate(self) -> None:
        """Look at the certificate the hub serves with; stop using the hub while it is revoked or is not this
        hub's (an endpoint from etcd, or a stale config, that answers as another site).

        gRPC gives a client no hook into certificate verification, so the antenna makes a TLS handshake of its
        own (same CA, same client certificate) whenever it (re)connects and whenever a new CRL arrives."""
        if not self.identity and (self.revocations is None or not self.revocations.serials):
            self.untrusted = ""
            return
        host, _, port = self.endpoint.rpartition(":")
        host = host.strip("[]")
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        context.set_alpn_protocols(["h2"])
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port), ssl=context,
                                                                       server_hostname=host), 5)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError):
            return  # unreachable now: the gRPC channel reports that; look again on the next connect
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            writer.close()
        cert = x509.load_der_x509_certificate(der)
        serial, uri = cert.serial_number, spiffe_uri(cert)
        was = self.untrusted
        if self.revocations is not None and self.revocations.revoked(serial):
            self.untrusted = f"hub {self.site}'s certificate (serial {serial:x}) has been revoked"
        elif self.identity and uri != self.identity:
            self.untrusted = (f"endpoint {self.endpoint} serves the certificate of {uri or 'no federation identity'}, "
                              f"not of hub {self.site}")
        else:
            self.untrusted = ""
        if self.untrusted and not was:
            log.error("%s: no job is forwarded there until it serves with a valid certificate", self.untrusted)
            self.error = self.untrusted
            self._changed.notify()
            if self._recheck is None or self._recheck.done():
                self._recheck = asyncio.create_task(self._recheck_while_revoked(), name=f"recheck {self.site}")
        elif was and not self.untrusted:
            log.info("hub %s serves with a valid certificate again", self.site)
            self.error = ""
            self._changed.notify()

    async def _recheck_while_revoked(self) -> None:
        """A revoked hub may come back with a renewed certificate on the same connection-less endpoint."""
        while self.untrusted:
            await asyncio.sleep(self.tls.reload_s)
            await self.check_certificate()

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
        tasks = [t for t in (self._task, self._recheck) if t]
        for task in tasks:
            task.cancel()
        await stop_tasks(tasks)
        for channel in (*self._retired, self.channel):
            await channel.close(None)
        self._retired.clear()

    async def _follow_adverts(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self.check_certificate()
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
            except asyncio.CancelledError:
                if stopping():
                    raise
                self.error = "its address changed: reconnecting"  # grpc cancelled the call on the old channel
            except grpc.aio.AioRpcError as exc:
                if self.connected:
                    log.warning("hub %s advert stream broke: %s", self.site, exc.details())
                self.error = f"{exc.code().name}: {exc.details()}"
            self.connected = False
            self._changed.notify()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
