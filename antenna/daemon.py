"""The antenna daemon's lifecycle: resume unfinished jobs, serve users on one mTLS port, stop cleanly."""

from __future__ import annotations

import logging

from federation.config import AntennaConfig
from federation.pb import antenna_pb2, antenna_pb2_grpc
from federation.rpc import SecureServer
from antenna.core import AntennaCore
from antenna.service import AntennaService, access_rules

log = logging.getLogger(__name__)


class AntennaDaemon:
    """`async with AntennaDaemon(config) as antenna:` serves until the block ends."""

    def __init__(self, config: AntennaConfig):
        self.config = config
        self.core: AntennaCore | None = None
        self.server: SecureServer | None = None
        self.port = 0

    async def start(self) -> "AntennaDaemon":
        if self.core is not None:
            return self
        self.core = AntennaCore(self.config)
        try:
            self.server = SecureServer(self.config.federation, self.config.tls, access_rules(self.config.site))
            self.server.add(antenna_pb2_grpc.add_AntennaServicer_to_server, AntennaService(self.core),
                            antenna_pb2.DESCRIPTOR.services_by_name["Antenna"].full_name)
            self.port = await self.server.start(self.config.listen)
            await self.core.start()
        except BaseException:
            if self.server is not None:
                await self.server.stop(None)
            await self.core.close()
            self.core = self.server = None
            raise
        log.info("antenna %s of federation %s serving on port %d, hubs: %s", self.config.site,
                 self.config.federation, self.port, ", ".join(h.site for h in self.config.hubs))
        return self

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving and following; unfinished jobs resume at the next start. Safe to call twice."""
        server, core = self.server, self.core
        self.server = self.core = None
        if server is not None:
            await server.stop(grace)
        if core is not None:
            await core.close()

    async def __aenter__(self) -> "AntennaDaemon":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
