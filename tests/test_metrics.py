"""Prometheus metrics: served over mutual TLS, parsed with Prometheus' own text parser, and true to the daemon."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from federation.identity import Role
from federation.model import JobSpec, JobState
from federation.tls import cert_expires
from tests.conftest import running_federation


def scrape(port: int, tls=None) -> dict[tuple[str, tuple], float]:
    """Every sample of https://127.0.0.1:PORT/metrics, keyed by (name, sorted labels)."""
    context = ssl.create_default_context(cafile=str(tls.ca) if tls else None)
    context.check_hostname = False
    if tls is not None:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=context, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
async def watched(test_pki, tmp_path):
    """leonardo and antenna-a, both with a metrics endpoint on a free port."""
    metrics = {"metrics_listen": "127.0.0.1:0"}
    async with running_federation(test_pki, tmp_path, {"leonardo": metrics}, antenna=metrics) as f:
        yield f


async def test_metrics_describe_what_the_daemons_did(watched, test_pki):
    operator = test_pki.tls(Role.HUB, "leonardo")  # any certificate of the federation may scrape
    hub, antenna = watched.hubs["leonardo"], watched.antennas["antenna-a"]
    alice = watched.client("alice")
    done = [await alice.wait((await alice.submit(JobSpec(argv=("true",)))).id) for _ in range(3)]
    assert all(j.state is JobState.COMPLETED for j in done)
    with pytest.raises(Exception):
        await alice.submit(JobSpec(argv=("true",), gpus=64))  # refused: no partition has 64 GPUs

    a = await asyncio.to_thread(scrape, antenna.metrics_port, operator)
    assert a[("aifed_info", (("role", "antenna"), ("site", "antenna-a"), ("version", "0.1.0")))] == 1
    assert a[("aifed_jobs", (("state", "COMPLETED"),))] == 3
    assert a[("aifed_jobs", (("state", "RUNNING"),))] == 0
    assert a[("aifed_rpc_requests_total", (("code", "OK"), ("method", "/aifed.v1.Antenna/SubmitJob")))] == 3
    assert a[("aifed_rpc_requests_total", (("code", "FAILED_PRECONDITION"),
                                           ("method", "/aifed.v1.Antenna/SubmitJob")))] == 1
    assert a[("aifed_placement_decisions_total", (("site", "leonardo"),))] == 3
    assert a[("aifed_forwarded_jobs_total", (("outcome", "accepted"), ("site", "leonardo")))] == 3
    assert a[("aifed_forward_latency_seconds_count", (("site", "leonardo"),))] >= 1
    assert a[("aifed_hub_up", (("site", "leonardo"),))] == 1
    assert 0 <= a[("aifed_advert_age_seconds", (("site", "leonardo"),))] < 10
    assert a[("aifed_journal_bytes", ())] > 0
    assert a[("aifed_cert_expiry_timestamp_seconds", ())] == pytest.approx(cert_expires(antenna.config.tls))
    # The standard series of the process (these daemons run in the test's own process).
    assert a[("process_resident_memory_bytes", ())] > 10 * 2**20
    assert a[("process_cpu_seconds_total", ())] > 0
    assert a[("python_gc_collections_total", (("generation", "0"),))] >= 0

    h = await asyncio.to_thread(scrape, hub.metrics_port, operator)
    assert h[("aifed_jobs", (("state", "COMPLETED"),))] == 3
    assert h[("aifed_backend_up", ())] == 1
    assert h[("aifed_gpus", (("kind", "total"), ("partition", "booster")))] == 4
    assert h[("aifed_gpus", (("kind", "free"), ("partition", "booster")))] == 4
    assert h[("aifed_rpc_requests_total", (("code", "OK"), ("method", "/aifed.v1.Hub/ForwardJobs")))] >= 1
    assert h[("aifed_partition_jobs", (("kind", "running"), ("partition", "booster")))] == 0


async def test_metrics_refuse_a_scraper_without_a_federation_certificate(watched, test_pki):
    port = watched.hubs["leonardo"].metrics_port
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        await asyncio.to_thread(scrape, port, None)  # no client certificate
    foreign = test_pki.tls(Role.HUB, "leonardo")
    foreign = replace(foreign, cert=test_pki.other_ca_root / "hubs" / "leonardo.pem",
                      key=test_pki.other_ca_root / "hubs" / "leonardo.key")
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        await asyncio.to_thread(scrape, port, foreign)  # a certificate from another CA


def test_audit_records_that_cannot_be_written_are_counted_as_dropped(tmp_path):
    from federation.audit import AuditLog
    from federation.metrics import Metrics
    metrics = Metrics("hub", "leonardo", "0.1.0")
    audit = AuditLog(tmp_path, on_drop=metrics.dropped.labels("audit").inc)  # a folder: every write fails
    audit.record("accepted", job="antenna-a-1")
    audit.record("rejected", job="antenna-a-2", reason="no")
    audit.flush()
    assert metrics.registry.get_sample_value("aifed_dropped_events_total", {"sink": "audit"}) == 2


async def test_hub_readiness_follows_its_backend_and_liveness_does_not(watched, test_pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from federation.rpc import secure_channel
    from hub.backend import Health
    from tests.conftest import eventually

    hub = watched.hubs["leonardo"]
    async with secure_channel(f"127.0.0.1:{hub.port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def status(service: str) -> int:
            return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("aifed.v1.Hub") == serving
        original = hub.core.backend.health
        hub.core.backend.health = lambda: Health(False, "slurmctld does not answer")  # the scheduler is away
        try:
            assert await eventually(lambda: _is(status("aifed.v1.Hub"), not_serving), timeout=5)
            assert await status("") == serving  # alive all the same
        finally:
            hub.core.backend.health = original
        assert await eventually(lambda: _is(status("aifed.v1.Hub"), serving), timeout=5)


async def _is(value, expected) -> bool:
    return (await value) == expected
