"""The hub daemon's lifecycle: load state, take back jobs, serve on one mTLS port, stop cleanly."""

from __future__ import annotations

import logging

from federation.config import HubConfig
from federation.pb import hub_pb2, hub_pb2_grpc
from federation.rpc import SecureServer
from hub.core import HubCore
from hub.service import HubService, access_rules

log = logging.getLogger(__name__)


class HubDaemon:
    """`async with HubDaemon(config) as hub:` serves until the block ends. `port` is the bound port."""

    def __init__(self, config: HubConfig):
        self.config = config
        self.core: HubCore | None = None
        self.server: SecureServer | None = None
        self.port = 0

    async def start(self) -> "HubDaemon":
        if self.core is not None:
            return self
        self.core = HubCore(self.config)
        try:
            await self.core.recover()
            self.server = SecureServer(self.config.federation, self.config.tls, access_rules())
            self.server.add(hub_pb2_grpc.add_HubServicer_to_server, HubService(self.core),
                            hub_pb2.DESCRIPTOR.services_by_name["Hub"].full_name)
            self.port = await self.server.start(self.config.listen)
        except BaseException:
            await self.core.close()
            self.core = None
            raise
        log.info("hub %s of federation %s serving on port %d with partitions %s", self.config.site,
                 self.config.federation, self.port, ", ".join(p.name for p in self.config.partitions))
        return self

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds) and close the journal. Safe to call twice."""
        server, core = self.server, self.core
        self.server = self.core = None
        if server is not None:
            await server.stop(grace)
        if core is not None:
            await core.close()

    async def __aenter__(self) -> "HubDaemon":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
