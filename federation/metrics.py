"""Prometheus metrics of a daemon, served over HTTPS with required client certificates (mutual TLS, like every
other aifed port; Prometheus scrapes with a certificate of the federation, e.g. an operator's).

Counters are updated where things happen (the RPC guard, the antenna's placer and forwarders); gauges that
describe state (jobs by state, journal size, advert age, certificate expiry, capacity) are computed when
Prometheus scrapes, from the daemon's own records, so they cannot drift. docs/operations.md lists them all.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from federation.tls import TlsFiles

log = logging.getLogger(__name__)

# A scrape-time gauge: (name, help, label names, a function giving [(label values, value)]).
GaugeSource = tuple[str, str, tuple[str, ...], Callable[[], Iterable[tuple[tuple[str, ...], float]]]]


class _Gauges(Collector):
    def __init__(self, sources: list[GaugeSource]):
        self.sources = sources

    def collect(self):
        for name, text, labels, values in self.sources:
            family = GaugeMetricFamily(name, text, labels=list(labels))
            try:
                for label_values, value in values():
                    family.add_metric(list(label_values), value)
            except Exception:  # noqa: BLE001 - one broken gauge must not hide the others from the scrape
                log.exception("metric %s could not be computed", name)
                continue
            yield family


class Metrics:
    """One daemon's registry: the counters it updates and the gauges computed at scrape time."""

    def __init__(self, role: str, site: str, version: str):
        self.registry = CollectorRegistry(auto_describe=False)
        # The usual process_* (CPU, resident memory, open files) and python_gc_* (collections by generation) series.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.rpcs = Counter("aifed_rpc_requests", "RPCs served, by method and final status code",
                            ["method", "code"], registry=self.registry)
        self.placements = Counter("aifed_placement_decisions", "jobs placed by the antenna, by chosen hub",
                                  ["site"], registry=self.registry)
        self.forwarded = Counter("aifed_forwarded_jobs", "jobs forwarded to a hub, by hub and outcome "
                                 "(accepted, refused)", ["site", "outcome"], registry=self.registry)
        self.forward_latency = Histogram("aifed_forward_latency_seconds", "duration of one ForwardJobs call, "
                                         "by hub", ["site"], registry=self.registry,
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.staged_bytes = Counter("aifed_staged_bytes", "bytes of jobs' input files sent to a hub (antenna), by "
                                    "hub", ["site"], registry=self.registry)
        self.uploaded_bytes = Counter("aifed_uploaded_bytes", "bytes of input files received and kept (an upload "
                                      "refused, such as a checksum mismatch, is not counted)",
                                      registry=self.registry)
        self.deleted = Counter("aifed_data_deleted", "data deleted after its retention, by kind: inputs (stored "
                               "files), outputs (a job's), working_files (a finished job's folder but its logs), "
                               "folders (with their logs)", ["kind"], registry=self.registry)
        self.dropped = Counter("aifed_dropped_events", "records that could not be written (audit log) or "
                               "published, by sink", ["sink"], registry=self.registry)
        self._sources: list[GaugeSource] = [
            ("aifed_info", "this daemon: role, site and version", ("role", "site", "version"),
             lambda: [((role, site, version), 1.0)])]
        self.registry.register(_Gauges(self._sources))
        self._server = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def gauge(self, name: str, text: str, labels: tuple[str, ...],
              values: Callable[[], Iterable[tuple[tuple[str, ...], float]]]) -> None:
        """Add a gauge computed at each scrape."""
        self._sources.append((name, text, labels, values))

    def serve(self, listen: str, tls: TlsFiles) -> int:
        """Serve /metrics on `listen` (HOST:PORT) over mutual TLS; return the bound port."""
        host, _, port = listen.rpartition(":")
        self._server, self._thread = start_http_server(
            int(port), addr=host.strip("[]"), registry=self.registry, certfile=str(tls.cert), keyfile=str(tls.key),
            client_cafile=str(tls.ca), client_auth_required=True, tls_min_version=ssl.TLSVersion.TLSv1_2)
        self.port = self._server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def register_journal_gauges(metrics: Metrics, journal, tls: TlsFiles) -> None:
    """What every daemon reports about its journal and its certificate."""
    from federation.model import JobState
    from federation.tls import cert_expires

    census: dict = {}

    def jobs():
        counts, census["bytes"] = journal.census()
        return [((state.name,), float(counts.get(state, 0))) for state in JobState]

    metrics.gauge("aifed_jobs", "jobs in this daemon's journal, by state", ("state",), jobs)
    metrics.gauge("aifed_journal_bytes", "size of the journal on disk (database and write-ahead log)", (),
                  lambda: [((), float(census.get("bytes", 0)))])
    metrics.gauge("aifed_cert_expiry_timestamp_seconds", "when this daemon's certificate expires (Unix time)", (),
                  lambda: [((), cert_expires(tls))])
