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
        await self._serve_metrics()
        log.info("antenna %s of federation %s serving on port %d, hubs: %s", self.config.site,
                 self.config.federation, self.port, ", ".join(h.site for h in self.config.hubs))
