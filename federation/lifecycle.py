"""The lifecycle every aifed daemon shares: idempotent start, bounded graceful stop, `async with`."""

from __future__ import annotations

import abc
import asyncio
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
        self.ended = asyncio.Event()  # set when the daemon stopped by itself (a hub that lost its leadership)
        self.end_reason = ""

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

    def _start_events(self, core, endpoint: str, membership: bool):
        """Publish the core's job state changes to the MQTT broker the config names (`[events]`), if any; with
        `membership`, the broker also says "down" for this site if the daemon dies (MQTT last will)."""
        cfg = self.config
        if not cfg.events.broker:
            return None
        from federation.events import EventPublisher
        events = EventPublisher(cfg.events.broker, cfg.federation, cfg.site, tls=cfg.tls if cfg.events.tls else None,
                                buffer=cfg.events.buffer, will={"endpoint": endpoint}, last_will=membership,
                                on_drop=core.metrics.dropped.labels("events").inc)
        events.start()
        core.jobs.taps.append(lambda _, job: events.job_state(job.id, job_event(job)))
        core.metrics.gauge("aifed_events_connected", "1 while the MQTT broker is connected", (),
                           lambda: [((), float(events.connected))])
        core.metrics.gauge("aifed_events_queued", "events waiting for the MQTT broker", (),
                           lambda: [((), float(events.queued))])
        log.info("publishing events to the MQTT broker at %s", cfg.events.broker)
        return events

    async def _end(self, reason: str) -> None:
        """Stop serving at once, from inside: the runner exits non-zero with `reason`."""
        log.error("%s", reason)
        self.end_reason = reason
        await self.stop(0)
        self.ended.set()

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


def job_event(job) -> dict:
    """A job's state change as an event payload (docs/membership.md#events-on-mqtt)."""
    out = {"state": job.state.name, "site": job.site, "antenna": job.antenna, "reason": job.reason,
           "at": job.updated_at}
    if job.exit_code is not None:
        out["exit_code"] = job.exit_code
    return out
