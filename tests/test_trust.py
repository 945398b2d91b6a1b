"""Operating the federation's trust: certificates renewed without a restart, CRLs refreshed, expiry warned of,
the audit log, per-caller submission limits, and the settings for all of these.

Whenever a test renews or revokes, it does so in a private PKI under tmp_path, never in the shared test_pki.
Attacks (revoked certificates refused, replays, floods) are in test_attacks.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from certs import pki
from federation import audit as audit_mod
from federation import convert
from federation.config import ANTENNA_LIMITS, HUB_LIMITS, Limits, load_antenna, load_hub
from federation.crl import Revocations
from federation.errors import ConfigError, ResourceExhausted
from federation.identity import Role
from federation.limits import SubmitLimiter
from federation.model import Job, JobSpec, JobState
from federation.pb import antenna_pb2, hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel
from federation.tls import TlsFiles
from tests.conftest import FEDERATION, Federation, Pki, eventually

ALICE = f"spiffe://{FEDERATION}/user/antenna-a/alice"
ANTENNA_A = f"spiffe://{FEDERATION}/antenna/antenna-a"


# -- a private PKI whose daemons look for renewed files every second -----------------------------------------

@dataclass
class FastPki(Pki):
    """A Pki (as conftest's Federation uses it) whose TlsFiles reload every second and may name the CRL."""

    reload_s: int = 1
    with_crl: bool = False

    def tls(self, role: Role, site: str, name: str = "") -> TlsFiles:
        files = super().tls(role, site, name)
        return replace(files, reload_s=self.reload_s, crl=self.root / pki.CRL if self.with_crl else None)


def make_pki(root: Path, other: Path | None = None, **kw) -> FastPki:
    pki.init_ca(root, FEDERATION)
    pki.issue(root, Role.HUB, "leonardo")
    pki.issue(root, Role.ANTENNA, "antenna-a")
    pki.issue(root, Role.USER, "antenna-a", "alice")
    if other is not None:
        pki.init_ca(other, FEDERATION)
    return FastPki(root, root / pki.CA_CERT, other or root, **kw)


@pytest.fixture
def own_pki(tmp_path) -> FastPki:
    return make_pki(tmp_path / "pki", tmp_path / "other-pki")


@pytest.fixture
async def own_fed(own_pki, tmp_path):
    f = Federation(own_pki, tmp_path / "state")
    try:
        yield f
    finally:
        await f.close()


def _served_serial(port: int, tls: TlsFiles) -> int:
    """The serial of the certificate a daemon presents to a new TLS connection (made with a client certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as s:
            der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def served_serial(port: int, tls: TlsFiles) -> int:
    return await asyncio.to_thread(_served_serial, port, tls)


def file_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number


def file_serial_of(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


async def health_check(port: int, tls: TlsFiles) -> int:
    async with secure_channel(f"127.0.0.1:{port}", tls) as ch:
        return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


def file_not_after(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc


async def get_advert(port: int, tls: TlsFiles) -> jobs_pb2.Advert:
    async with secure_channel(f"127.0.0.1:{port}", tls) as ch:
        return await hub_pb2_grpc.HubStub(ch).GetAdvert(hub_pb2.AdvertRequest(), timeout=5)


def sh(script: str, **kw) -> JobSpec:
    return JobSpec(argv=("sh", "-c", script), **{"walltime_s": 60, **kw})


# -- 1. renewal without a restart ----------------------------------------------------------------------------

async def test_renewed_hub_certificate_is_served_to_new_connections_without_restart(own_fed, own_pki):
    """pki.renew over the hub's files: new connections get the new certificate (and GetAdvert its expiry), a
    channel opened before keeps working, and the daemon was never restarted."""
    root = own_pki.root
    pki.issue(root, Role.HUB, "leonardo", days=10)  # start with a short-lived certificate, then renew it
    hub = await own_fed.start_hub("leonardo")
    hub_tls = own_pki.tls(Role.HUB, "leonardo")
    antenna_tls = own_pki.tls(Role.ANTENNA, "antenna-a")
    s1 = file_serial(hub_tls.cert)
    assert await served_serial(hub.port, antenna_tls) == s1

    old_channel = secure_channel(f"127.0.0.1:{hub.port}", antenna_tls)
    try:
        old_stub = hub_pb2_grpc.HubStub(old_channel)
        before = await old_stub.GetAdvert(hub_pb2.AdvertRequest(), timeout=5)
        assert before.cert_expires_at.ToDatetime(dt.timezone.utc) == file_not_after(hub_tls.cert)

        issued = pki.renew(root, Role.HUB, "leonardo", days=365)
        s2 = int(issued.serial, 16)
        assert issued.replaced == format(s1, "x") and s2 != s1
        await asyncio.sleep(1.2)  # the server re-reads its files at most once a second

        assert await served_serial(hub.port, antenna_tls) == s2
        fresh = await get_advert(hub.port, antenna_tls)  # a new grpc connection: handshake with the new cert
        assert fresh.site == "leonardo"
        assert fresh.cert_expires_at.ToDatetime(dt.timezone.utc) == issued.not_after.replace(microsecond=0) \
            == file_not_after(hub_tls.cert)
        assert fresh.cert_expires_at.ToDatetime(dt.timezone.utc) > \
            before.cert_expires_at.ToDatetime(dt.timezone.utc) + dt.timedelta(days=300)

        # The connection made before the renewal still serves calls.
        again = await old_stub.GetAdvert(hub_pb2.AdvertRequest(), timeout=5)
        assert again.site == "leonardo"
        assert old_channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await old_channel.close(None)
    assert own_fed.hubs["leonardo"] is hub and hub.server is not None  # same daemon throughout


async def test_mismatched_renewal_is_ignored_and_logged(own_fed, own_pki, caplog):
    """A certificate that does not belong to the key on disk (a half-done copy), or a half-written one, is not
    taken up: the server
    keeps serving the old certificate, new connections succeed, an error is logged. A correct renewal after
    that is taken up."""
    caplog.set_level(logging.INFO, logger="federation.tls")
    root = own_pki.root
    hub = await own_fed.start_hub("leonardo")
    hub_tls = own_pki.tls(Role.HUB, "leonardo")
    antenna_tls = own_pki.tls(Role.ANTENNA, "antenna-a")
    s1 = file_serial(hub_tls.cert)
    good_cert = hub_tls.cert.read_bytes()

    # A valid certificate of the same CA, but for another key: what a copy of the new cert without its key is.
    renewed_elsewhere = pki.issue(root, Role.HUB, "lumi")  # same CA, other key
    tmp = hub_tls.cert.with_name("swap.tmp")
    tmp.write_bytes(renewed_elsewhere.cert.read_bytes())
    os.replace(tmp, hub_tls.cert)
    await asyncio.sleep(1.2)
    assert await served_serial(hub.port, antenna_tls) == s1
    assert (await get_advert(hub.port, antenna_tls)).site == "leonardo"
    await eventually(lambda: "renewed TLS files not taken up" in caplog.text, timeout=5)
    assert any(r.levelno == logging.ERROR and "does not belong to certificate" in r.getMessage()
               for r in caplog.records)

    # A half-written file (cut in the middle of the PEM body).
    hub_tls.cert.write_bytes(good_cert[: len(good_cert) // 2])
    caplog.clear()
    await asyncio.sleep(1.2)
    assert await served_serial(hub.port, antenna_tls) == s1
    assert await health_check(hub.port, antenna_tls) == health_pb2.HealthCheckResponse.SERVING
    await eventually(lambda: "renewed TLS files not taken up" in caplog.text, timeout=5)

    # The operator then renews properly: taken up.
    hub_tls.cert.write_bytes(good_cert)  # restore, so renew can read the old one
    issued = pki.renew(root, Role.HUB, "leonardo")
    await asyncio.sleep(1.2)
    assert await served_serial(hub.port, antenna_tls) == int(issued.serial, 16)
    assert (await get_advert(hub.port, antenna_tls)).site == "leonardo"
    assert "TLS certificate reloaded" in caplog.text


async def test_half_written_certificate_does_not_break_adverts(own_fed, own_pki):
    hub = await own_fed.start_hub("leonardo")
    hub_tls = own_pki.tls(Role.HUB, "leonardo")
    antenna_tls = own_pki.tls(Role.ANTENNA, "antenna-a")
    good = hub_tls.cert.read_bytes()
    before = await get_advert(hub.port, antenna_tls)
    hub_tls.cert.write_bytes(good[: len(good) // 2])
    await asyncio.sleep(1.2)
    assert await served_serial(hub.port, antenna_tls) == file_serial_of(good)
    advert = await get_advert(hub.port, antenna_tls)  # fails: INTERNAL "internal error in /aifed.v1.Hub/GetAdvert"
    assert advert.cert_expires_at == before.cert_expires_at  # the expiry of the certificate still served


async def test_antenna_renews_its_hub_channels_and_jobs_still_flow(tmp_path):
    """The antenna's own certificate is renewed (reload every second): its hub channels are replaced, the hub
    sees the new certificate (the old one is even revoked), and a job still runs end to end."""
    own = make_pki(tmp_path / "pki", with_crl=True)
    fed = Federation(own, tmp_path / "state")
    try:
        hub = await fed.start_hub("leonardo")
        antenna = await fed.start_antenna("antenna-a")
        await fed.wait_sites()
        site = antenna.core.sites["leonardo"]
        old_channel = site.channel
        first = await fed.client("alice").submit(sh("echo before"))
        assert (await fed.client("alice").wait(first.id)).state is JobState.COMPLETED

        issued = pki.renew(own.root, Role.ANTENNA, "antenna-a")
        await eventually(lambda: site.channel is not old_channel, timeout=10)
        assert old_channel in site._retired  # kept a grace period for calls in flight, then closed

        # Revoke the certificate the antenna had: only calls made with the new one can pass now.
        assert pki.revoke(own.root, issued.replaced) == [issued.replaced]
        await eventually(lambda: hub.server.revocations.revoked(int(issued.replaced, 16)), timeout=10)

        client = fed.client("alice")
        job = await client.submit(sh("echo after"))
        done = await asyncio.wait_for(client.wait(job.id), 30)
        assert done.state is JobState.COMPLETED, done.reason
        assert done.site == "leonardo"
    finally:
        await fed.close()


async def test_mismatched_antenna_renewal_keeps_the_working_hub_channels(own_fed, own_pki):
    await own_fed.start_hub("leonardo")
    antenna = await own_fed.start_antenna("antenna-a")
    await own_fed.wait_sites()
    site = antenna.core.sites["leonardo"]
    old_channel = site.channel
    stray = pki.issue(own_pki.root, Role.ANTENNA, "antenna-b")  # same CA, another key
    _swap(own_pki.tls(Role.ANTENNA, "antenna-a").cert, stray.cert.read_bytes())
    await asyncio.sleep(2.5)  # two rounds of the antenna's TLS watch
    client = own_fed.client("alice")
    job = await client.submit(sh("true"))
    done = await asyncio.wait_for(client.wait(job.id), 8)  # times out: ForwardJobs "Failed to create security
    assert done.state is JobState.COMPLETED              # handshaker" on the new channel, retried for ever
    assert site.channel is old_channel


# -- 4. Revocations ------------------------------------------------------------------------------------------

def _crl_bytes(root: Path) -> bytes:
    return (root / pki.CRL).read_bytes()


def _swap(path: Path, data: bytes) -> None:
    """Replace a file the way a copy tool would (new inode, new mtime)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _crl_number(data: bytes) -> int:
    return x509.load_pem_x509_crl(data).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_revocations_without_a_crl(own_pki):
    r = Revocations(replace(own_pki.tls(Role.HUB, "leonardo"), crl=None))
    assert r.refresh() is False
    assert r.serials == frozenset() and r.number is None and not r.revoked(1)


def test_revocations_load_and_follow_the_crl(own_pki, tmp_path):
    root = own_pki.root
    crl_path = tmp_path / "daemon-crl.pem"
    _swap(crl_path, _crl_bytes(root))
    tls = replace(own_pki.tls(Role.HUB, "leonardo"), crl=crl_path)
    r = Revocations(tls)
    assert r.refresh() is True and r.serials == frozenset()
    assert r.refresh() is False  # unchanged file: nothing re-read
    alice = file_serial(own_pki.user("antenna-a", "alice").cert)
    pki.revoke(root, format(alice, "x"))
    _swap(crl_path, _crl_bytes(root))
    assert r.refresh() is True and r.revoked(alice)
    assert r.number == _crl_number(_crl_bytes(root))
    assert r.next_update is not None and r.next_update > dt.datetime.now(dt.timezone.utc)


def test_crl_of_another_ca_or_not_a_crl_is_ignored_and_the_old_list_kept(own_pki, tmp_path, caplog):
    root, other = own_pki.root, own_pki.other_ca_root
    alice = file_serial(own_pki.user("antenna-a", "alice").cert)
    pki.revoke(root, format(alice, "x"))
    crl_path = tmp_path / "daemon-crl.pem"
    _swap(crl_path, _crl_bytes(root))
    r = Revocations(replace(own_pki.tls(Role.HUB, "leonardo"), crl=crl_path))
    assert r.refresh() and r.revoked(alice)
    number = r.number

    caplog.set_level(logging.INFO, logger="federation.crl")
    for bad, why in ((_crl_bytes(other), "not signed by the federation CA"),
                     (b"this is not a CRL\n", "not a PEM certificate revocation list"),
                     ((root / pki.CA_CERT).read_bytes(), "not a PEM certificate revocation list"),
                     (_crl_bytes(root)[:120], "not a PEM certificate revocation list")):
        caplog.clear()
        _swap(crl_path, bad)
        assert r.refresh() is False
        assert r.revoked(alice) and r.serials == frozenset({alice}) and r.number == number
        assert why in caplog.text and "keeping the 1 revocation(s) in force" in caplog.text
        assert any(rec.levelno == logging.ERROR for rec in caplog.records)

    crl_path.unlink()  # a missing file too
    assert r.refresh() is False and r.revoked(alice)

    # A good CRL afterwards is taken up again.
    _swap(crl_path, _crl_bytes(root))
    assert r.refresh() is True and r.revoked(alice)


def test_crl_with_a_lower_number_is_ignored(own_pki, tmp_path, caplog):
    root = own_pki.root
    alice = file_serial(own_pki.user("antenna-a", "alice").cert)
    antenna = file_serial(own_pki.tls(Role.ANTENNA, "antenna-a").cert)
    pki.revoke(root, format(alice, "x"))
    older = _crl_bytes(root)
    pki.revoke(root, format(antenna, "x"))
    newer = _crl_bytes(root)
    assert _crl_number(older) < _crl_number(newer)

    crl_path = tmp_path / "daemon-crl.pem"
    _swap(crl_path, newer)
    r = Revocations(replace(own_pki.tls(Role.HUB, "leonardo"), crl=crl_path))
    assert r.refresh() and r.serials == frozenset({alice, antenna})

    caplog.set_level(logging.INFO, logger="federation.crl")
    _swap(crl_path, older)  # an old copy put back (a stale backup, a replay)
    assert r.refresh() is False
    assert r.serials == frozenset({alice, antenna}) and r.number == _crl_number(newer)
    assert "older than the list in force" in caplog.text


def _stale_crl(root: Path, serial: int, number: int) -> bytes:
    """A CRL signed by the CA of `root`, revoking `serial`, whose next update was yesterday."""
    ca_cert, ca_key, _ = pki.load_ca(root)
    now = dt.datetime.now(dt.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
           .last_update(now - dt.timedelta(days=8)).next_update(now - dt.timedelta(days=1))
           .add_extension(x509.CRLNumber(number), critical=False)
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                    .revocation_date(now - dt.timedelta(days=8)).build())
           .sign(ca_key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.PEM)


def test_crl_past_next_update_is_enforced_with_a_warning(own_pki, tmp_path, caplog):
    root = own_pki.root
    alice = file_serial(own_pki.user("antenna-a", "alice").cert)
    crl_path = tmp_path / "daemon-crl.pem"
    _swap(crl_path, _stale_crl(root, alice, 50))
    r = Revocations(replace(own_pki.tls(Role.HUB, "leonardo"), crl=crl_path))
    caplog.set_level(logging.INFO, logger="federation.crl")
    assert r.refresh() is True
    assert r.revoked(alice) and r.number == 50  # still enforced
    assert r.next_update < dt.datetime.now(dt.timezone.utc)
    # The stale check runs at the start of a refresh, so the warning comes at the next round (a daemon's watch
    # does that right after start, then every tls.reload).
    r.refresh()
    stale = [rec for rec in caplog.records if "past its next update" in rec.getMessage()]
    assert len(stale) == 1 and stale[0].levelno == logging.WARNING and str(crl_path) in stale[0].getMessage()
    r.refresh()  # warned once, not every round
    assert len([rec for rec in caplog.records if "past its next update" in rec.getMessage()]) == 1
    assert r.revoked(alice)


async def test_daemon_warns_at_start_about_a_stale_crl_and_enforces_it(tmp_path, caplog):
    own = make_pki(tmp_path / "pki", with_crl=True)
    alice = file_serial(own.user("antenna-a", "alice").cert)
    _swap(own.root / pki.CRL, _stale_crl(own.root, alice, 99))
    fed = Federation(own, tmp_path / "state")
    caplog.set_level(logging.INFO)
    try:
        hub = await fed.start_hub("leonardo")
        assert hub.server.revocations.revoked(alice)
        await eventually(lambda: "past its next update" in caplog.text, timeout=5)
    finally:
        await fed.close()


# -- 5. expiry -----------------------------------------------------------------------------------------------

def test_expiry_warning(test_pki, own_pki):
    year = test_pki.tls(Role.HUB, "leonardo")
    assert year.expiry_warning() == ""
    short = pki.issue(own_pki.root, Role.HUB, "lumi", days=10)
    tls = TlsFiles(own_pki.ca, short.cert, short.key)
    warning = tls.expiry_warning()
    assert str(short.cert) in warning and "expires in 9 day(s)" in warning and "renew" in warning
    assert tls.expiry_warning(days=5) == ""
    assert tls.not_after() == short.not_after.replace(microsecond=0) == file_not_after(short.cert)


async def test_advert_and_list_sites_carry_certificate_expiry(fed, test_pki):
    hub_cert = test_pki.tls(Role.HUB, "leonardo").cert
    advert = await get_advert(fed.hubs["leonardo"].port, test_pki.tls(Role.ANTENNA, "antenna-a"))
    assert advert.cert_expires_at.ToDatetime(dt.timezone.utc) == file_not_after(hub_cert)
    sites = await fed.client("alice").stub.ListSites(antenna_pb2.ListSitesRequest(), timeout=5)
    assert sites.cert_expires_at.ToDatetime(dt.timezone.utc) == \
        file_not_after(test_pki.tls(Role.ANTENNA, "antenna-a").cert)
    # The adverts the antenna relays carry each hub's own expiry.
    relayed = {s.site: s.advert.cert_expires_at.ToDatetime(dt.timezone.utc) for s in sites.sites}
    assert relayed["leonardo"] == file_not_after(hub_cert)
    assert relayed["lumi"] == file_not_after(test_pki.tls(Role.HUB, "lumi").cert)


async def test_daemon_with_a_short_lived_certificate_warns_at_start(own_fed, own_pki, caplog):
    caplog.set_level(logging.WARNING)
    short = pki.issue(own_pki.root, Role.HUB, "leonardo", days=10)
    await own_fed.start_hub("leonardo")
    await eventually(lambda: [r for r in caplog.records if "expires in" in r.getMessage()], timeout=5)
    record = next(r for r in caplog.records if "expires in" in r.getMessage())
    assert record.levelno == logging.WARNING and record.name == "federation.rpc"
    assert str(short.cert) in record.getMessage() and "aifed certs renew" in record.getMessage()


# -- 6. the audit log ----------------------------------------------------------------------------------------

async def audit_records(path: Path, predicate, timeout: float = 10) -> list[dict]:
    """The audit records once `predicate(records)` holds (the daemon flushes every quarter second)."""
    def ready():
        if not path.exists():
            return None
        records = audit_mod.read(path)
        return records if predicate(records) else None
    return await eventually(ready, timeout=timeout)


def events(records: list[dict], job_id: str | None = None) -> list[str]:
    return [r["event"] for r in records if job_id is None or r.get("job") == job_id]


async def test_audit_log_of_antenna_and_hub(test_pki, tmp_path):
    fed = Federation(test_pki, tmp_path)
    try:
        await fed.start_hub("leonardo")
        antenna = await fed.start_antenna("antenna-a")
        await fed.wait_sites()
        client = fed.client("alice")
        antenna_log = tmp_path / "antenna-a" / "audit.jsonl"
        hub_log = tmp_path / "leonardo" / "audit.jsonl"
        assert antenna.core.audit.path == antenna_log

        finished = await client.submit(sh("true"))
        assert (await client.wait(finished.id)).state is JobState.COMPLETED
        running = await client.submit(sh("sleep 30"))
        await eventually(lambda: _state_is(client, running.id, JobState.RUNNING))
        await client.cancel(running.id)
        assert (await client.wait(running.id)).state is JobState.CANCELLED

        records = await audit_records(antenna_log, lambda rs: "cancelled" in events(rs, running.id)
                                      and "forwarded" in events(rs, finished.id))
        assert events(records, finished.id) == ["accepted", "forwarded"]
        assert events(records, running.id) == ["accepted", "forwarded", "cancelled"]
        for r in records:
            ts = dt.datetime.fromisoformat(r["ts"])
            assert ts.tzinfo is not None and abs(ts - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=1)
            assert r.get("site") == "leonardo"
            assert ALICE in (r.get("who"), r.get("owner"))
        for r in records:
            if r["event"] in ("accepted", "cancelled"):  # made by the user's call
                assert r["who"] == ALICE
                assert r["peer"].startswith("ipv4:127.0.0.1:") or r["peer"].startswith("ipv6:")
            if r["event"] == "forwarded":
                assert r["owner"] == ALICE
        cancelled = next(r for r in records if r["event"] == "cancelled")
        assert cancelled["owner"] == ALICE and cancelled["job"] == running.id

        hub_records = await audit_records(hub_log, lambda rs: "cancelled" in events(rs, running.id))
        accepted = [r for r in hub_records if r["event"] == "accepted"]
        assert {r["job"] for r in accepted} == {finished.id, running.id}
        for r in accepted:
            assert r["who"] == ANTENNA_A and r["owner"] == ALICE and r["partition"]
            assert r["peer"].startswith("ipv4:127.0.0.1:") or r["peer"].startswith("ipv6:")
        hub_cancel = next(r for r in hub_records if r["event"] == "cancelled")
        assert hub_cancel["who"] == ANTENNA_A and hub_cancel["owner"] == ALICE and hub_cancel["job"] == running.id

        # A submission no hub can run is refused, and recorded with its reason.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.submit(sh("true", gpus=8))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        records = await audit_records(antenna_log, lambda rs: "rejected" in events(rs))
        rejected = next(r for r in records if r["event"] == "rejected")
        assert rejected["who"] == ALICE and "no hub can run this job" in rejected["reason"]
        assert "leonardo has at most 4 GPUs in a partition" in rejected["reason"]
        assert rejected["peer"].startswith("ipv")

        # A job the hub refuses: recorded there with the antenna as who.
        job = Job(id="antenna-a-toobig", spec=sh("true", gpus=64), state=JobState.PENDING, owner=ALICE)
        async with secure_channel(f"127.0.0.1:{fed.hubs['leonardo'].port}",
                                  test_pki.tls(Role.ANTENNA, "antenna-a")) as ch:
            response = await hub_pb2_grpc.HubStub(ch).ForwardJobs(hub_pb2.ForwardJobsRequest(jobs=[
                hub_pb2.ForwardJobRequest(idempotency_key=job.id, job=convert.job_to_pb(job))]), timeout=10)
        assert response.results[0].HasField("error")
        hub_records = await audit_records(hub_log, lambda rs: "rejected" in events(rs))
        hub_rejected = next(r for r in hub_records if r["event"] == "rejected")
        assert hub_rejected["who"] == ANTENNA_A and "the most GPUs is 4" in hub_rejected["reason"]

        # The operator moves the file away (logrotate without copytruncate): the next flush opens a new one.
        rotated = antenna_log.with_name("audit.jsonl.1")
        os.rename(antenna_log, rotated)
        later = await client.submit(sh("true"))
        new = await audit_records(antenna_log, lambda rs: "accepted" in events(rs, later.id))
        assert events(new)[0] == "accepted" and all(r.get("job") != finished.id for r in new)
        assert "accepted" not in events(audit_mod.read(rotated), later.id)
        assert (os.stat(antenna_log).st_mode & 0o777) == 0o600
    finally:
        await fed.close()


async def _state_is(client, job_id: str, state: JobState) -> bool:
    return (await client.get(job_id)).state is state


def test_audit_log_rotation_and_configured_path(tmp_path):
    """AuditLog on its own: records reach the file on flush; a moved file is re-created; an unknown event is a
    programming error."""
    path = tmp_path / "logs" / "audit.jsonl"
    log = audit_mod.AuditLog(path, peer=lambda: "ipv4:127.0.0.1:1234")
    log.record("accepted", who=ALICE, job="antenna-a-1", site="", reason=None)
    assert not path.exists()  # nothing before a flush
    log.flush()
    (first,) = audit_mod.read(path)
    assert first["event"] == "accepted" and first["peer"] == "ipv4:127.0.0.1:1234"
    assert "site" not in first and "reason" not in first  # empty fields are left out
    os.rename(path, tmp_path / "logs" / "audit.jsonl.1")
    log.record("cancelled", who=ALICE, job="antenna-a-1")
    log.flush()
    assert events(audit_mod.read(path)) == ["cancelled"]
    assert events(audit_mod.read(tmp_path / "logs" / "audit.jsonl.1")) == ["accepted"]
    path.write_bytes(b"")  # copytruncate: same file, emptied
    log.record("forwarded", owner=ALICE, job="antenna-a-1", site="leonardo")
    log.close()
    assert events(audit_mod.read(path)) == ["forwarded"]
    with pytest.raises(ValueError):
        log.record("deleted", job="x")


# -- 7. SubmitLimiter ----------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_burst_then_refusal_then_refill():
    clock = Clock()
    lim = SubmitLimiter(rate=2, burst=4, clock=clock)
    for _ in range(4):
        lim.take("alice", 1)
    with pytest.raises(ResourceExhausted) as err:
        lim.take("alice", 1)
    assert "retry in 0.5 s" in err.value.message and "alice" in err.value.message
    assert "2 jobs per second (burst 4)" in err.value.message
    clock.now += 0.5
    lim.take("alice", 1)  # one token back after half a second
    with pytest.raises(ResourceExhausted):
        lim.take("alice", 1)
    clock.now += 100  # refills up to the burst, never beyond
    lim.take("alice", 4)
    with pytest.raises(ResourceExhausted):
        lim.take("alice", 1)


def test_limiter_call_larger_than_burst_is_refused_clearly():
    lim = SubmitLimiter(rate=10, burst=5, clock=Clock())
    with pytest.raises(ResourceExhausted) as err:
        lim.take("antenna-a", 6)
    assert "6 jobs in one call is more than the 5" in err.value.message and "split" in err.value.message
    lim.take("antenna-a", 5)  # and it took nothing


def test_limiter_rate_zero_is_unlimited():
    lim = SubmitLimiter(rate=0, burst=1, clock=Clock())
    for _ in range(1000):
        lim.take("alice", 10**6)
    SubmitLimiter(rate=5, burst=5, clock=Clock()).take("alice", 0)


def test_limiter_callers_have_their_own_buckets():
    lim = SubmitLimiter(rate=1, burst=3, clock=Clock())
    lim.take("mallory", 3)
    for _ in range(10):
        with pytest.raises(ResourceExhausted):
            lim.take("mallory", 1)
    lim.take("alice", 3)  # untouched by mallory's flood


def test_limiter_refusal_takes_no_tokens():
    clock = Clock()
    lim = SubmitLimiter(rate=1, burst=10, clock=clock)
    lim.take("alice", 8)
    for _ in range(5):
        with pytest.raises(ResourceExhausted) as err:
            lim.take("alice", 5)  # 2 left: refused whole
    assert "retry in 3.0 s" in err.value.message
    lim.take("alice", 2)  # the 2 are still there
    clock.now += 3
    lim.take("alice", 3)


def test_limiter_message_names_what_is_limited():
    lim = SubmitLimiter(rate=1.5, burst=1, what="forwarded jobs", clock=Clock())
    lim.take("x", 1)
    with pytest.raises(ResourceExhausted) as err:
        lim.take("x", 1)
    assert "1.5 forwarded jobs per second" in err.value.message
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- 8. configuration ----------------------------------------------------------------------------------------

HUB_TOML = """
[hub]
site = "leonardo"
federation = "eurohpc.test"
listen = "127.0.0.1:50051"
state_dir = "state/leonardo"

[[partitions]]
name = "booster"
gpu_model = "A100"
gpus = 4
max_walltime = "1-00:00:00"

[tls]
ca = "pki/ca.pem"
cert = "pki/hubs/leonardo.pem"
key = "pki/hubs/leonardo.key"
"""

ANTENNA_TOML = """
[antenna]
site = "antenna-a"
federation = "eurohpc.test"
listen = "127.0.0.1:50060"
state_dir = "state/antenna-a"

[[hubs]]
site = "leonardo"
endpoint = "127.0.0.1:50051"

[tls]
ca = "pki/ca.pem"
cert = "pki/antennas/antenna-a.pem"
key = "pki/antennas/antenna-a.key"
"""


@pytest.fixture(scope="module")
def config_pkis(tmp_path_factory) -> tuple[Path, Path]:
    """A PKI (CA, hub, antenna) and another CA, each with its crl.pem."""
    root = tmp_path_factory.mktemp("config-pki")
    make_pki(root / "pki")
    other = root / "other"
    pki.init_ca(other, FEDERATION)
    return root, other


def write_config(folder: Path, text: str, name: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def load_error(loader, path: Path, key: str, *words: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loader(path)
    message = str(info.value)
    assert info.value.key == key, message
    assert key in message and str(path) in message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    return info.value


@pytest.mark.parametrize("loader,text", [(load_hub, HUB_TOML), (load_antenna, ANTENNA_TOML)], ids=["hub", "antenna"])
def test_tls_crl_and_reload_settings(config_pkis, loader, text):
    folder, other = config_pkis
    name = f"{loader.__name__}.toml"
    config = loader(write_config(folder, text, name))
    assert config.tls.crl is None and config.tls.reload_s == 30

    config = loader(write_config(folder, text + 'crl = "pki/crl.pem"\nreload = "5s"\n', name))
    assert config.tls.crl == folder / "pki" / "crl.pem" and config.tls.reload_s == 5

    path = write_config(folder, text + 'crl = "pki/missing-crl.pem"\n', name)
    load_error(loader, path, "tls.crl", "does not exist")
    path = write_config(folder, text + 'crl = "pki/ca.pem"\n', name)  # a certificate, not a CRL
    load_error(loader, path, "tls.crl", "not a PEM certificate revocation list")
    (folder / "junk.pem").write_text("junk\n")
    path = write_config(folder, text + 'crl = "junk.pem"\n', name)
    load_error(loader, path, "tls.crl", "not a PEM certificate revocation list")
    path = write_config(folder, text + f'crl = "{other / pki.CRL}"\n', name)
    load_error(loader, path, "tls.crl", "not signed by the federation CA")

    for bad in ('"0s"', "0", '"soon"'):
        path = write_config(folder, text + f"reload = {bad}\n", name)
        load_error(loader, path, "tls.reload")


def test_client_config_has_no_crl(config_pkis):
    from federation.config import load_client
    folder, _ = config_pkis
    text = ('[client]\nantenna = "127.0.0.1:50060"\n[tls]\nca = "pki/ca.pem"\ncert = "pki/users/antenna-a-alice.pem"\n'
            'key = "pki/users/antenna-a-alice.key"\n')
    assert load_client(write_config(folder, text, "client.toml")).tls.crl is None
    load_error(load_client, write_config(folder, text + 'crl = "pki/crl.pem"\n', "client.toml"), "tls.crl",
               "not a known setting")


def test_limits_defaults_and_audit_log_default(config_pkis):
    folder, _ = config_pkis
    hub = load_hub(write_config(folder, HUB_TOML, "hub.toml"))
    assert (hub.limits.submit_rate, hub.limits.submit_burst, hub.limits.max_streams) == (10000, 100000, 1000)
    assert hub.limits == HUB_LIMITS
    assert hub.audit_log == folder / "state" / "leonardo" / "audit.jsonl"
    antenna = load_antenna(write_config(folder, ANTENNA_TOML, "antenna.toml"))
    assert (antenna.limits.submit_rate, antenna.limits.submit_burst, antenna.limits.max_streams) == (1000, 20000, 1000)
    assert antenna.limits == ANTENNA_LIMITS
    assert antenna.audit_log == folder / "state" / "antenna-a" / "audit.jsonl"

    hub = load_hub(write_config(folder, HUB_TOML.replace('state_dir = "state/leonardo"',
                                                         'state_dir = "state/leonardo"\naudit_log = "logs/hub.jsonl"')
                                + "[limits]\nsubmit_rate = 0\nsubmit_burst = 1000\nmax_streams = 7\n", "hub.toml"))
    assert hub.audit_log == folder / "logs" / "hub.jsonl"
    assert hub.limits == Limits(0.0, 1000, 7, 1000)
    antenna = load_antenna(write_config(folder, ANTENNA_TOML + "[limits]\nsubmit_rate = 2.5\nsubmit_burst = 1\n",
                                        "antenna.toml"))
    assert (antenna.limits.submit_rate, antenna.limits.submit_burst) == (2.5, 1)


@pytest.mark.parametrize("loader,text,limits,key,words", [
    (load_hub, HUB_TOML, "submit_rate = -1", "limits.submit_rate", ("between 0",)),
    (load_antenna, ANTENNA_TOML, "submit_rate = -0.5", "limits.submit_rate", ("between 0",)),
    (load_hub, HUB_TOML, "submit_rate = 1e12", "limits.submit_rate", ("1e9",)),
    (load_hub, HUB_TOML, "submit_burst = 999", "limits.submit_burst", ("1000", "one batch an antenna forwards")),
    (load_antenna, ANTENNA_TOML, "submit_burst = 0", "limits.submit_burst", ("at least 1",)),
    (load_hub, HUB_TOML, "max_streams = 0", "limits.max_streams", ("at least 1",)),
    (load_antenna, ANTENNA_TOML, "max_stream = 10", "limits.max_stream", ("not a known setting",)),
    (load_hub, HUB_TOML, 'submit_rate = "fast"', "limits.submit_rate", ("must be a",)),
    (load_hub, HUB_TOML, "submit_burst = 1500.5", "limits.submit_burst", ("must be a int",)),
    (load_antenna, ANTENNA_TOML, "submit_rate = true", "limits.submit_rate", ("must be a",)),
])
def test_bad_limits_are_refused(config_pkis, loader, text, limits, key, words):
    folder, _ = config_pkis
    path = write_config(folder, text + f"[limits]\n{limits}\n", f"limits-{loader.__name__}.toml")
    load_error(loader, path, key, *words)
