"""The lifecycle every aifed daemon shares: idempotent start, bounded graceful stop, `async with`."""

from __future__ import annotations

import abc
import logging

from federation.rpc import SecureServer

log = logging.getLogger(__name__)


class Daemon(abc.ABC):
    """Subclasses build `self.core` and `self.server` in `_start` and bind `self.port`."""

    def __init__(self) -> None:
        self.core = None
        self.server: SecureServer | None = None
        self.port = 0
        self.metrics_port = 0  # the Prometheus endpoint's port, when the config asks for one

    @abc.abstractmethod
    async def _start(self) -> None:
        """Build the core and the server and start serving; clean up after itself if it fails."""

    async def _serve_metrics(self) -> None:
        """Serve the core's Prometheus metrics when the config names a `metrics.listen` address."""
        listen = self.config.metrics_listen
        if not listen:
            return
        try:
            self.metrics_port = self.core.metrics.serve(listen, self.config.tls)
        except OSError as exc:
            await self.stop(0)
            raise OSError(f"cannot serve metrics on {listen}: {exc}") from None
        log.info("metrics for Prometheus on https://%s:%d/metrics (client certificates required)",
                 listen.rpartition(":")[0], self.metrics_port)

    async def start(self):
        """Start serving. Calling it on a started daemon does nothing."""
        if self.core is None:
            await self._start()
        return self

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds), then close the core. Safe to call twice."""
        server, core = self.server, self.core
        self.server = self.core = None
        if server is not None:
            await server.stop(grace)
        if core is not None:
            await core.close()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
