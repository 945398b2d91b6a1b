"""The hub daemon: load state, take back unfinished jobs, serve the Hub service on one mTLS port."""

from __future__ import annotations

import logging

from federation.config import HubConfig
from federation.lifecycle import Daemon
from federation.pb import hub_pb2, hub_pb2_grpc
from federation.rpc import SecureServer
from hub.core import HubCore
from hub.service import HubService, access_rules

log = logging.getLogger(__name__)


class HubDaemon(Daemon):
    """`async with HubDaemon(config) as hub:` serves until the block ends. `port` is the bound port."""

    def __init__(self, config: HubConfig):
        super().__init__()
        self.config = config

    async def _start(self) -> None:
        core = HubCore(self.config)
        try:
            await core.recover()
            server = SecureServer(self.config.federation, self.config.tls, access_rules(self.config.site),
                                  audit=core.audit, max_streams=self.config.limits.max_streams,
                                  metrics=core.metrics)
            server.add(hub_pb2_grpc.add_HubServicer_to_server, HubService(core),
                       hub_pb2.DESCRIPTOR.services_by_name["Hub"].full_name)
            self.port = await server.start(self.config.listen)
            # Ready while the scheduler can be reached: load balancers and antennas may look at aifed.v1.Hub.
            server.watch_readiness(hub_pb2.DESCRIPTOR.services_by_name["Hub"].full_name,
                                   lambda: core.backend.health().ok)
        except BaseException:
            await core.close()
            raise
        self.core, self.server = core, server
        await self._serve_metrics()
        log.info("hub %s of federation %s serving on port %d with partitions %s", self.config.site,
                 self.config.federation, self.port, ", ".join(p.name for p in self.config.partitions))
