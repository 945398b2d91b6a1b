"""The antenna daemon: serve users on one mTLS port, resume unfinished jobs, follow the hubs."""

from __future__ import annotations

import logging

from federation.config import AntennaConfig
from federation.lifecycle import Daemon
from federation.pb import antenna_pb2, antenna_pb2_grpc
from federation.rpc import SecureServer
from antenna.core import AntennaCore
from antenna.service import AntennaService, access_rules

log = logging.getLogger(__name__)


class AntennaDaemon(Daemon):
    """`async with AntennaDaemon(config) as antenna:` serves until the block ends."""

    def __init__(self, config: AntennaConfig):
        super().__init__()
        self.config = config
        self.events = None

    async def stop(self, grace: float = 5.0) -> None:
        await super().stop(grace)
        if self.events is not None:
            events, self.events = self.events, None
            await events.close()

    async def _start(self) -> None:
        core = AntennaCore(self.config)
        server = None
        try:
            server = SecureServer(self.config.federation, self.config.tls, access_rules(self.config.site),
                                  audit=core.audit, max_streams=self.config.limits.max_streams,
                                  revocations=core.revocations, metrics=core.metrics)
            server.on_renewed.append(core.renew_channels)
            server.on_crl.append(core.recheck_hubs)
            server.add(antenna_pb2_grpc.add_AntennaServicer_to_server, AntennaService(core),
                       antenna_pb2.DESCRIPTOR.services_by_name["Antenna"].full_name)
            self.port = await server.start(self.config.listen)
            await core.start()
        except BaseException:
            if server is not None:
                await server.stop(None)
            await core.close()
            raise
        self.core, self.server = core, server
        self.events = self._start_events(core, f"{self.config.listen.rpartition(':')[0]}:{self.port}",
                                         membership=False)
        await self._serve_metrics()
        log.info("antenna %s of federation %s serving on port %d, hubs (%s): %s", self.config.site,
                 self.config.federation, self.port, core.discovery.backend, ", ".join(sorted(core.sites)) or "none yet")
