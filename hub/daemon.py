"""The hub daemon: load state, take back unfinished jobs, serve the Hub service on one mTLS port, and tell the
federation about itself (membership in etcd, events on MQTT) when configured to.

With `[ha] instance`, several processes serve one site from the same state directory: each campaigns in etcd
and only the elected leader opens the journal, drives the backend and serves; the others wait their turn."""

from __future__ import annotations

import asyncio
import logging
import time

from federation.config import HubConfig
from federation.discovery import Discovery, Member, make_discovery
from federation.lifecycle import Daemon
from federation.pb import hub_pb2, hub_pb2_grpc
from federation.rpc import SecureServer
from federation.watch import stop_tasks
from hub.core import HubCore
from hub.service import HubService, access_rules

log = logging.getLogger(__name__)

SUMMARY_MIN_INTERVAL_S = 0.05  # capacity changes faster than this are written to the membership as one
SUMMARY_HEARTBEAT_S = 5.0  # look again this often even without a change (a backend's figures may drift)


class HubDaemon(Daemon):
    """`async with HubDaemon(config) as hub:` serves until the block ends. `port` is the bound port."""

    def __init__(self, config: HubConfig):
        super().__init__()
        self.config = config
        self.discovery: Discovery | None = None
        self.election = None
        self.events = None
        self._tasks: list[asyncio.Task] = []

    @property
    def endpoint(self) -> str:
        """The address antennas dial: `hub.advertise`, else the listen address with the bound port."""
        if self.config.advertise:
            return self.config.advertise
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def _start(self) -> None:
        cfg = self.config
        discovery = make_discovery(cfg.federation, cfg.discovery, cfg.tls)
        core = server = None
        try:
            await discovery.start()
            self.discovery = discovery
            if cfg.ha_instance:
                await self._campaign()
            core = HubCore(cfg)
            await core.recover()
            server = SecureServer(cfg.federation, cfg.tls, access_rules(cfg.site),
                                  audit=core.audit, max_streams=cfg.limits.max_streams,
                                  metrics=core.metrics)
            server.add(hub_pb2_grpc.add_HubServicer_to_server, HubService(core),
                       hub_pb2.DESCRIPTOR.services_by_name["Hub"].full_name)
            self.port = await server.start(cfg.listen)
            # Ready while the scheduler can be reached: load balancers and antennas may look at aifed.v1.Hub.
            server.watch_readiness(hub_pb2.DESCRIPTOR.services_by_name["Hub"].full_name,
                                   lambda: core.backend.health().ok)
            self.core, self.server = core, server
            core.metrics.gauge("aifed_membership_degraded", "1 while this hub's registration in the federation's "
                               "membership may be out of date (etcd away)", (),
                               lambda: [((), float(bool(discovery.degraded)))])
            await discovery.register(Member(cfg.site, self.endpoint, core.summary()))
            if cfg.balance.enabled or core.moving_jobs():
                from hub.balance import Balancer
                core.balancer = Balancer(core, discovery)
                core.balancer.start()
                server.on_renewed.append(core.balancer.renew_channels)
        except BaseException:
            self.core = self.server = None
            if server is not None:
                await server.stop(None)
            if core is not None:
                await core.close()
            await self._close_membership()
            raise
        self.events = self._start_events(core, self.endpoint, membership=True)
        if self.events is not None:
            self.events.membership("draining" if core.draining else "up")
            self.events.capacity(core.summary())
        self._tasks.append(asyncio.create_task(self._keep_summary(core, discovery), name="membership summary"))
        if self.election is not None:
            self._tasks.append(asyncio.create_task(self._step_down_when_lost(), name="leadership"))
        await self._serve_metrics()
        log.info("hub %s of federation %s serving on port %d with partitions %s%s", cfg.site, cfg.federation,
                 self.port, ", ".join(p.name for p in cfg.partitions),
                 f"; registered in {discovery.backend} as {self.endpoint}" if discovery.backend != "static" else "")

    async def _campaign(self) -> None:
        from federation.election import Election
        cfg = self.config
        self.election = Election(self.discovery.client, f"{cfg.discovery.key_prefix(cfg.federation)}/leaders/"
                                 f"{cfg.site}", cfg.ha_instance, ttl_s=cfg.discovery.lease_s)
        log.info("hub %s instance %s: standby, waiting to lead (leader now: %s)", cfg.site, cfg.ha_instance,
                 await self.election.leader() or "none")
        await self.election.campaign()
        log.info("hub %s instance %s leads now", cfg.site, cfg.ha_instance)

    async def _step_down_when_lost(self) -> None:
        await self.election.lost.wait()
        await self._end(f"hub {self.config.site} instance {self.config.ha_instance} lost its leadership (its etcd "
                        "lease could not be kept alive); it stopped serving so that another instance can lead")

    async def _keep_summary(self, core: HubCore, discovery: Discovery) -> None:
        """Keep this hub's record in the membership up to date with its capacity."""
        last = core.summary()
        while True:
            version = core.capacity.version
            await core.capacity.wait_past(version, SUMMARY_HEARTBEAT_S)
            summary = core.summary()
            if summary != last:
                if self.events is not None:
                    self.events.capacity(summary)
                    if summary["draining"] != last["draining"]:
                        self.events.membership("draining" if summary["draining"] else "up")
                last = summary
                await discovery.update({**summary, "at": time.time()})
                await asyncio.sleep(SUMMARY_MIN_INTERVAL_S)

    async def _close_membership(self) -> None:
        discovery, election = self.discovery, self.election
        self.discovery = self.election = None
        if election is not None:
            await election.close()  # resigns: a standby takes over at once, not after the lease
        if discovery is not None:
            await discovery.close()

    async def stop(self, grace: float = 5.0) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await stop_tasks(tasks)
        # Leave the membership first, so that antennas place nothing new here while the last calls are answered;
        # hand the leadership over last of all, once the journal is closed.
        discovery, self.discovery = self.discovery, None
        if discovery is not None:
            await discovery.close()
        await super().stop(grace)
        if self.events is not None:
            events, self.events = self.events, None
            events.membership("down", {"reason": self.end_reason or "stopped"})
            await events.close()
        await self._close_membership()
