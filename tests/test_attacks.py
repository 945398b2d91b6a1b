"""The attack suite: every way we know to misuse a daemon, each of which must fail for the attacker with the
documented gRPC status while nothing changes (no job stored, cancelled or revealed) and the daemon keeps serving.

Each attack is one test (or one parametrized case) marked `attack`; the terminal summary counts them
("attack suite: N attacks, R refused", from tests/conftest.py). Positive controls are not marked. An attack found to
succeed is added as a strict xfail until the product is fixed: it counts as an attack not refused.

Certificates for identities this suite revokes or needs beyond the shared ones (fresh users, operators, forged
certificates) are issued here; the shared certificates of the session PKI are never revoked.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import secrets
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certs import pki
from federation import audit, convert
from federation.config import ANTENNA_LIMITS, HUB_LIMITS, Limits
from federation.identity import Identity, Role
from federation.model import InputFile, Job, JobSpec, JobState
from federation.pb import antenna_pb2, antenna_pb2_grpc, hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import MAX_MESSAGE_BYTES, secure_channel
from federation.tls import TlsFiles
from tests.conftest import FEDERATION, Federation, antenna_config, eventually, hub_config

C = grpc.StatusCode
attack = pytest.mark.attack

STREAMING = {"WatchAdverts", "WatchChanges", "WatchJob", "StreamLogs", "FetchOutput"}
SOME_ID = "antenna-a-0123456789ab"  # well formed, never stored
OPERATORS = {"antenna-a": "atk-olga", "antenna-b": "atk-oscar", "leonardo": "atk-leo", "lumi": "atk-luna"}


def uri(spec: str) -> str:
    return f"spiffe://{FEDERATION}/{spec}"


def fresh(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


# -- daemons ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def operators(test_pki) -> dict[str, str]:
    """One operator per site, issued once into the shared PKI (new names, never revoked)."""
    for site, name in OPERATORS.items():
        pki.issue(test_pki.root, Role.OPERATOR, site, name)
    return OPERATORS


@pytest.fixture
async def bare(test_pki, tmp_path):
    """A federation with nothing started: each test starts the daemons it needs, as configured."""
    f = Federation(test_pki, tmp_path)
    try:
        yield f
    finally:
        await f.close()


@pytest.fixture
async def afed(bare):
    """Hubs leonardo and lumi on the hold backend (jobs stay QUEUED, nothing runs), antennas a and b."""
    for site in ("leonardo", "lumi"):
        await start_hub(bare, site)
    for site in ("antenna-a", "antenna-b"):
        await start_antenna(bare, site)
        await bare.wait_sites(site)
    return bare


@pytest.fixture
async def lfed(bare):
    """Hub leonardo on the local backend (jobs really run), antennas a and b. Jobs still running at the end are
    cancelled, so no process outlives the test."""
    await start_hub(bare, "leonardo", backend="local")
    for site in ("antenna-a", "antenna-b"):
        await start_antenna(bare, site)
        await bare.wait_sites(site)
    try:
        yield bare
    finally:
        for site, hub in bare.hubs.items():
            for job, _ in hub.core.journal.unfinished():
                try:
                    await hub.core.cancel(Identity(FEDERATION, Role.OPERATOR, site, "cleanup"), job.id)
                except Exception:  # noqa: BLE001 - best effort
                    pass


async def start_hub(fed: Federation, site: str = "leonardo", *, backend: str = "hold", crl: bool = False,
                    limits: Limits | None = None):
    config = hub_config(fed.test_pki, fed.state, site, backend=backend)
    if crl:
        config = replace(config, tls=replace(config.tls, crl=fed.test_pki.root / pki.CRL, reload_s=1))
    if limits is not None:
        config = replace(config, limits=limits)
    return await fed.start_hub(site, config=config)


async def start_antenna(fed: Federation, site: str = "antenna-a", *, crl: bool = False,
                        limits: Limits | None = None):
    from antenna.daemon import AntennaDaemon
    config = antenna_config(fed.test_pki, fed.state, {s: h.port for s, h in fed.hubs.items()}, site)
    if crl:
        config = replace(config, tls=replace(config.tls, crl=fed.test_pki.root / pki.CRL, reload_s=1))
    if limits is not None:
        config = replace(config, limits=limits)
    daemon = await AntennaDaemon(config).start()
    fed.antennas[site] = daemon
    return daemon


def daemon(fed: Federation, site: str):
    return fed.hubs.get(site) or fed.antennas[site]


def connect(fed: Federation, site: str, tls: TlsFiles, options=()) -> grpc.aio.Channel:
    """An mTLS channel to a daemon of `fed`, closed with the federation."""
    channel = secure_channel(f"127.0.0.1:{daemon(fed, site).port}", tls, options)
    fed.clients.append(channel)
    return channel


def tls_of(test_pki, who: str) -> TlsFiles:
    """The shared certificate of 'user/antenna-a/alice', 'hub/lumi', 'antenna/antenna-b', 'operator/lumi/x'."""
    role, *rest = who.split("/")
    return test_pki.tls(Role(role), *rest)


def snapshot(fed: Federation) -> dict[str, list[Job]]:
    """Every job every daemon has stored, as stored."""
    return {site: d.core.journal.list(limit=10**6) for site, d in [*fed.hubs.items(), *fed.antennas.items()]}


def audit_path(fed: Federation, site: str) -> Path:
    return fed.state / site / "audit.jsonl"


async def audit_records(fed: Federation, site: str, match, at_least: int = 1, timeout: float = 5.0) -> list[dict]:
    """The audit records of a daemon that satisfy `match`, once there are `at_least` (flushed every 0.25 s)."""
    path = audit_path(fed, site)

    def found():
        records = [r for r in audit.read(path) if match(r)] if path.exists() else []
        return records if len(records) >= at_least else None
    return await eventually(found, timeout)


# -- calls -----------------------------------------------------------------------------------------------------

def forwarded(job_id: str = SOME_ID, owner: str = uri("user/antenna-a/alice"), argv=("true",), **spec) -> Job:
    return Job(id=job_id, spec=JobSpec(argv=tuple(argv), **spec), state=JobState.PENDING, owner=owner)


def forward_request(key: str, job: Job) -> hub_pb2.ForwardJobRequest:
    return hub_pb2.ForwardJobRequest(idempotency_key=key, job=convert.job_to_pb(job))


def submit_request(spec: JobSpec | None = None, request_id: str = "") -> antenna_pb2.SubmitJobRequest:
    return antenna_pb2.SubmitJobRequest(spec=convert.spec_to_pb(spec or JobSpec(argv=("true",))),
                                        request_id=request_id)


def request(service: str, method: str, job_id: str = SOME_ID):
    ref = jobs_pb2.JobRef(job_id=job_id)
    logs = jobs_pb2.LogsRequest(job_id=job_id)
    if service == "hub":
        return {"GetAdvert": hub_pb2.AdvertRequest(), "WatchAdverts": hub_pb2.AdvertRequest(),
                "ForwardJob": forward_request("k", forwarded()),
                "ForwardJobs": hub_pb2.ForwardJobsRequest(jobs=[forward_request("k", forwarded())]),
                "HandOffJobs": hub_pb2.ForwardJobsRequest(jobs=[forward_request("k", forwarded())]),
                "WatchChanges": hub_pb2.WatchChangesRequest(), "GetJob": ref, "WatchJob": ref, "CancelJob": ref,
                "StreamLogs": logs, "SetDrain": hub_pb2.SetDrainRequest(drain=True),
                "GetUsage": hub_pb2.HubUsageRequest(), "PutBlob": upload(b"x"),
                "StatBlob": jobs_pb2.BlobRef(sha256=sha(b"x")), "ListOutputs": ref,
                "FetchOutput": jobs_pb2.FetchRequest(job_id=job_id, name="x")}[method]
    return {"SubmitJob": submit_request(), "SubmitJobs": antenna_pb2.SubmitJobsRequest(jobs=[submit_request()]),
            "GetJob": ref, "ListJobs": antenna_pb2.ListJobsRequest(), "WatchJob": ref, "CancelJob": ref,
            "StreamLogs": logs, "ListSites": antenna_pb2.ListSitesRequest(), "PutBlob": upload(b"x"),
            "StatBlob": jobs_pb2.BlobRef(sha256=sha(b"x")), "ListOutputs": ref,
            "FetchOutput": jobs_pb2.FetchRequest(job_id=job_id, name="x")}[method]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(data: bytes, claimed: str | None = None):
    """The messages of an upload of `data` in one piece, under its own SHA-256 or a `claimed` one."""
    return iter([jobs_pb2.BlobChunk(sha256=claimed or sha(data), size=len(data), offset=0, data=data)])


def stored_content(fed: Federation) -> dict[str, list[str]]:
    """Every content (and partial upload) every daemon holds."""
    return {site: sorted(str(p.relative_to(d.core.blobs.root)) for sub in ("sha256", "partial")
                         for p in (d.core.blobs.root / sub).iterdir())
            for site, d in [*fed.hubs.items(), *fed.antennas.items()]}


async def call(channel: grpc.aio.Channel, service: str, method: str, message, timeout: float = 5):
    """One call: a unary response, or the first message of a stream (the stream is then closed)."""
    stub = (hub_pb2_grpc.HubStub if service == "hub" else antenna_pb2_grpc.AntennaStub)(channel)
    rpc = getattr(stub, method)(message, timeout=timeout)
    if method not in STREAMING:
        return await rpc
    try:
        return await rpc.read()
    finally:
        rpc.cancel()


async def refused(code: grpc.StatusCode, coro, words: str = "") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    assert err.value.code() == code, f"{err.value.code()}: {err.value.details()}"
    assert words in (err.value.details() or ""), err.value.details()
    return err.value


async def health(channel: grpc.aio.Channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def still_serves(fed: Federation, site: str) -> None:
    """A legitimate member is still answered by the daemon."""
    who = "antenna/antenna-a" if site in fed.hubs else "user/antenna-a/alice"
    assert await health(connect(fed, site, tls_of(fed.test_pki, who))) == health_pb2.HealthCheckResponse.SERVING


async def held_job(fed: Federation, user: str = "alice", antenna: str = "antenna-a", site: str = "leonardo",
                   argv=("true",)) -> Job:
    """A job submitted by a user through an antenna, once the hub holds it and the antenna knows it is there."""
    client = fed.client(user, antenna)
    job = await client.submit(JobSpec(argv=argv, site=site))
    want = JobState.QUEUED if fed.hubs[site].config.backend == "hold" else JobState.RUNNING
    await eventually(lambda: fed.hubs[site].core.journal.state(job.id) is want)
    return await eventually(lambda: (j := fed.antennas[antenna].core.journal.get(job.id)).state is want and j)


def forge(directory: Path, test_pki, *, uris=(), ou=("user",), days=(-1, 1), ca_root: Path | None = None,
          stem: str = "forged") -> TlsFiles:
    """A client certificate built by hand and signed with the key of a CA (the federation's by default)."""
    ca_cert, ca_key, _ = pki.load_ca(ca_root or test_pki.root)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, FEDERATION),
                         *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, o) for o in ou),
                         x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + dt.timedelta(days=days[0])).not_valid_after(now + dt.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    sans = [x509.UniformResourceIdentifier(u) for u in uris] or [x509.DNSName(f"{stem}.example")]
    cert = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(ca_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return TlsFiles(test_pki.ca, cert_path, key_path)


# == 1-3: the handshake =========================================================================================

@attack
@pytest.mark.parametrize("site", ["leonardo", "antenna-a"])
@pytest.mark.parametrize("how", ["no client certificate", "plaintext"])
async def test_connection_without_a_client_certificate_is_refused(afed, test_pki, site, how):
    target = f"127.0.0.1:{daemon(afed, site).port}"
    if how == "plaintext":
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(test_pki.ca.read_bytes()))
    afed.clients.append(channel)
    before = snapshot(afed)
    await refused(C.UNAVAILABLE, health(channel))
    service = "hub" if site in afed.hubs else "antenna"
    await refused(C.UNAVAILABLE, call(channel, service, "GetJob" if service == "hub" else "ListJobs",
                                      request(service, "GetJob" if service == "hub" else "ListJobs")))
    assert snapshot(afed) == before
    await still_serves(afed, site)


@attack
@pytest.mark.parametrize("site", ["leonardo", "antenna-a"])
@pytest.mark.parametrize("who", ["user/antenna-a/alice", "hub/leonardo"])
async def test_certificate_from_another_ca_is_refused_at_handshake(afed, test_pki, site, who):
    """Same federation name, same identity, but signed by a CA the daemons do not trust."""
    role, *rest = who.split("/")
    cert, key = pki.cert_paths(test_pki.other_ca_root, pki.identity_for(FEDERATION, Role(role), *rest))
    channel = connect(afed, site, TlsFiles(test_pki.ca, cert, key))
    await refused(C.UNAVAILABLE, health(channel))
    await still_serves(afed, site)


@attack
@pytest.mark.parametrize("site", ["leonardo", "antenna-a"])
@pytest.mark.parametrize("validity", ["expired", "not yet valid"])
async def test_certificate_outside_its_validity_is_refused_at_handshake(afed, test_pki, tmp_path, site, validity):
    """Signed by the real CA, a proper identity and role, but expired (or not valid yet)."""
    days = (-30, -1) if validity == "expired" else (1, 30)
    who = "user/antenna-a/alice" if site == "antenna-a" else "antenna/antenna-a"
    tls = forge(tmp_path / "forged", test_pki, uris=(uri(who),), ou=(who.split("/")[0],), days=days)
    channel = connect(afed, site, tls)
    before = snapshot(afed)
    await refused(C.UNAVAILABLE, health(channel))
    assert snapshot(afed) == before
    await still_serves(afed, site)


# == 4: revocation ==============================================================================================

@attack
@pytest.mark.parametrize("site", ["antenna-a", "leonardo"])
async def test_revoked_certificate_is_refused_on_its_open_connection(bare, test_pki, site):
    """A daemon with tls.crl follows the CRL: once the certificate is revoked, the same open channel is refused
    (UNAUTHENTICATED, 'revoked') within a few seconds, without a restart, while everyone else is still served."""
    if site == "antenna-a":
        await start_hub(bare, "leonardo")
        await start_antenna(bare, "antenna-a", crl=True)
        name = fresh("atk-eve")
        pki.issue(test_pki.root, Role.USER, "antenna-a", name)
        victim, service, method = f"user/antenna-a/{name}", "antenna", "ListJobs"
        bystander = "user/antenna-a/bob"
    else:
        await start_hub(bare, "leonardo", crl=True)
        name = fresh("atk-oleg")
        pki.issue(test_pki.root, Role.OPERATOR, "leonardo", name)
        victim, service, method = f"operator/leonardo/{name}", "hub", "GetAdvert"
        bystander = "antenna/antenna-a"
    channel = connect(bare, site, tls_of(test_pki, victim))
    await call(channel, service, method, request(service, method))  # served before the revocation
    before = snapshot(bare)

    assert pki.revoke(test_pki.root, uri(victim), "key_compromise")

    async def refusal():
        try:
            await call(channel, service, method, request(service, method))
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    started = time.monotonic()
    err = await eventually(refusal, timeout=10, interval=0.2)
    assert err.code() == C.UNAUTHENTICATED, err.details()
    assert "revoked" in err.details() and uri(victim) in err.details()
    assert time.monotonic() - started < 10
    # Every method, health included, and new connections too.
    await refused(C.UNAUTHENTICATED, health(channel), "revoked")
    await refused(C.UNAUTHENTICATED, health(connect(bare, site, tls_of(test_pki, victim))), "revoked")
    other = connect(bare, site, tls_of(test_pki, bystander))
    await call(other, service, method, request(service, method))
    assert snapshot(bare) == before


# == 5: identities the certificate was not issued for ==========================================================

@attack
@pytest.mark.parametrize("site,claim,ou,words", [
    ("leonardo", ["antenna/antenna-a"], ["user"], "claims to be an antenna"),
    ("leonardo", ["hub/leonardo"], ["user"], "claims to be a hub"),
    ("antenna-a", ["hub/leonardo"], ["user"], "claims to be a hub"),
    ("antenna-a", ["operator/antenna-a/atk-mallory"], ["user"], "claims to be an operator"),
    ("antenna-a", ["user/antenna-a/alice"], ["antenna"], "was issued for the role antenna"),
    ("leonardo", ["antenna/antenna-a"], [], "was issued for the role none"),
    ("leonardo", ["antenna/antenna-a"], ["antenna", "user"], "was issued for the role antenna/user"),
    ("antenna-a", ["user/antenna-a/alice", "antenna/antenna-a"], ["user"], "exactly one spiffe:// URI SAN"),
    ("leonardo", [], ["antenna"], "exactly one spiffe:// URI SAN"),
    ("antenna-a", ["spiffe://other.test/user/antenna-a/alice"], ["user"], "belongs to federation 'other.test'"),
    ("antenna-a", ["spiffe://eurohpc.test/admin/antenna-a"], ["user"], "unknown role 'admin'"),
], ids=lambda v: ("+".join(v) or "none") if isinstance(v, list) else None)
async def test_certificate_claiming_an_identity_it_was_not_issued_for(afed, test_pki, tmp_path, site, claim, ou,
                                                                     words):
    """Signed by the federation CA, valid, but the URI SAN does not match the role the CA issued it for (the
    subject OU), or is not one identity of this federation: UNAUTHENTICATED, whatever the method."""
    uris = [c if c.startswith("spiffe://") else uri(c) for c in claim]
    tls = forge(tmp_path / "forged", test_pki, uris=uris, ou=ou)
    service = "hub" if site in afed.hubs else "antenna"
    job = await held_job(afed)
    before = snapshot(afed)
    channel = connect(afed, site, tls)
    methods = ("GetAdvert", "ForwardJob", "GetJob", "CancelJob") if service == "hub" else \
        ("ListJobs", "SubmitJob", "GetJob", "CancelJob")
    for method in methods:
        await refused(C.UNAUTHENTICATED, call(channel, service, method, request(service, method, job.id)), words)
    await refused(C.UNAUTHENTICATED, health(channel), words)
    assert snapshot(afed) == before


# == 6, 7 and the rest of the role table: authenticated, but this role may not call this ======================

ROLE_ATTACKS = [
    # 7: users never call a hub
    *[("user/antenna-a/alice", "leonardo", m) for m in
      ("GetAdvert", "WatchAdverts", "ForwardJob", "ForwardJobs", "WatchChanges", "GetJob", "CancelJob",
       "HandOffJobs")],
    # 6: the hub-to-hub RPC (load balancing) is for peer hubs only: not an antenna, not an operator, not a hub
    # calling itself; and a peer hub may not act as an antenna (forward, follow an antenna's changes)
    ("antenna/antenna-a", "leonardo", "HandOffJobs"),
    ("antenna/antenna-b", "leonardo", "HandOffJobs"),
    ("operator/leonardo/atk-leo", "leonardo", "HandOffJobs"),
    ("hub/leonardo", "leonardo", "HandOffJobs"),
    *[("hub/lumi", "leonardo", m) for m in ("ForwardJobs", "ForwardJob", "WatchChanges", "WatchJob", "StreamLogs",
                                            "SetDrain", "GetUsage")],
    ("hub/leonardo", "leonardo", "ForwardJobs"),
    # daemons calling an antenna's user service
    ("hub/leonardo", "antenna-a", "ListJobs"),
    ("hub/leonardo", "antenna-a", "SubmitJob"),
    ("antenna/antenna-b", "antenna-a", "ListSites"),
    ("antenna/antenna-b", "antenna-a", "GetJob"),
    ("antenna/antenna-a", "antenna-a", "SubmitJob"),
    # input files: users upload to their antenna only; antennas (and peer hubs, for jobs they hand over) stage
    # them at hubs
    ("user/antenna-a/alice", "leonardo", "PutBlob"),
    ("hub/leonardo", "leonardo", "PutBlob"),
    ("antenna/antenna-b", "antenna-a", "PutBlob"),
    ("hub/leonardo", "antenna-a", "StatBlob"),
    ("user/antenna-a/alice", "leonardo", "FetchOutput"),
    ("hub/lumi", "leonardo", "ListOutputs"),
    # a user vouched for by another antenna
    ("user/antenna-b/carol", "antenna-a", "SubmitJob"),
    ("user/antenna-b/carol", "antenna-a", "GetJob"),
    ("user/antenna-b/carol", "antenna-a", "CancelJob"),
]


@attack
@pytest.mark.parametrize("who,site,method", ROLE_ATTACKS)
async def test_role_may_not_call_method(afed, test_pki, who, site, method):
    job = await denied_call(afed, test_pki, who, site, method)
    assert (await afed.client("alice").get(job.id)).state is JobState.QUEUED


@attack
@pytest.mark.parametrize("method", ["GetJob", "CancelJob"])
async def test_a_peer_hub_sees_only_the_jobs_it_handed_over(afed, test_pki, method):
    """A peer hub may look at and cancel the jobs it moved to this hub (load balancing), no others: NOT_FOUND,
    and their existence is not disclosed."""
    job = await held_job(afed)
    before = snapshot(afed)
    channel = connect(afed, "leonardo", tls_of(test_pki, "hub/lumi"))
    await refused(C.NOT_FOUND, call(channel, "hub", method, request("hub", method, job.id)))
    assert snapshot(afed) == before


async def denied_call(fed: Federation, test_pki, who: str, site: str, method: str) -> Job:
    """`who` calls `method` at `site` about one of alice's jobs: PERMISSION_DENIED, and nothing changes."""
    service = "hub" if site in fed.hubs else "antenna"
    job = await held_job(fed)
    before = snapshot(fed)
    channel = connect(fed, site, tls_of(test_pki, who))
    await refused(C.PERMISSION_DENIED, call(channel, service, method, request(service, method, job.id)))
    assert snapshot(fed) == before
    return job


# == 8: an antenna and another antenna's jobs at a hub ==========================================================

async def _b_job(fed: Federation) -> Job:
    """A long job carol submitted through antenna-b, running at leonardo."""
    return await held_job(fed, "carol", "antenna-b", argv=("sleep", "30"))


@attack
@pytest.mark.parametrize("method", ["GetJob", "WatchJob", "StreamLogs", "CancelJob", "ListOutputs", "FetchOutput"])
async def test_antenna_cannot_touch_jobs_another_antenna_forwarded(lfed, test_pki, method):
    job = await _b_job(lfed)
    before = snapshot(lfed)
    channel = connect(lfed, "leonardo", tls_of(test_pki, "antenna/antenna-a"))
    err = await refused(C.NOT_FOUND, call(channel, "hub", method, request("hub", method, job.id)))
    # Not found exactly as a job that does not exist: its existence is not disclosed.
    unknown = "antenna-b-ffffffffffff"
    other = await refused(C.NOT_FOUND, call(channel, "hub", method, request("hub", method, unknown)))
    assert err.details().replace(job.id, "ID") == other.details().replace(unknown, "ID")
    assert snapshot(lfed) == before
    assert lfed.hubs["leonardo"].core.journal.state(job.id) is JobState.RUNNING
    # Its own antenna still sees it.
    b = connect(lfed, "leonardo", tls_of(test_pki, "antenna/antenna-b"))
    assert (await call(b, "hub", "GetJob", request("hub", "GetJob", job.id))).state == JobState.RUNNING


@attack
async def test_antenna_change_feed_never_shows_another_antennas_jobs(lfed, test_pki):
    b_job = await _b_job(lfed)
    a_job = await held_job(lfed, "alice", "antenna-a", argv=("sleep", "30"))  # so that A's feed is not empty
    stub = hub_pb2_grpc.HubStub(connect(lfed, "leonardo", tls_of(test_pki, "antenna/antenna-a")))
    seen: set[str] = set()
    feed = stub.WatchChanges(hub_pb2.WatchChangesRequest(), timeout=10)
    async for batch in feed:
        seen.update(j.id for j in batch.jobs)
        if batch.caught_up:
            break
    feed.cancel()
    assert a_job.id in seen
    assert b_job.id not in seen
    assert all(i.startswith("antenna-a-") for i in seen)


@attack
async def test_antenna_cannot_cancel_another_antennas_job_before_it_arrives(afed, test_pki):
    """A cancel for a job that has not reached the hub yet leaves a tombstone, but only for the caller's own job
    ids: antenna-a cannot pre-cancel an id of antenna-b."""
    target = "antenna-b-" + secrets.token_hex(6)
    channel = connect(afed, "leonardo", tls_of(test_pki, "antenna/antenna-a"))
    await refused(C.NOT_FOUND, call(channel, "hub", "CancelJob", request("hub", "CancelJob", target)))
    assert afed.hubs["leonardo"].core.journal.get(target) is None
    b = connect(afed, "leonardo", tls_of(test_pki, "antenna/antenna-b"))
    response = await hub_pb2_grpc.HubStub(b).ForwardJob(
        forward_request(target, forwarded(target, uri("user/antenna-b/carol"))), timeout=5)
    assert not response.duplicate and response.job.state == JobState.QUEUED


# == 9: a user and another user's jobs at the antenna ===========================================================

@attack
@pytest.mark.parametrize("method", ["GetJob", "WatchJob", "StreamLogs", "CancelJob", "ListOutputs", "FetchOutput"])
async def test_user_cannot_touch_another_users_job(lfed, test_pki, method):
    job = await held_job(lfed, "alice", argv=("sleep", "30"))
    before = snapshot(lfed)
    bob = connect(lfed, "antenna-a", tls_of(test_pki, "user/antenna-a/bob"))
    err = await refused(C.NOT_FOUND, call(bob, "antenna", method, request("antenna", method, job.id)))
    unknown = "antenna-a-ffffffffffff"
    other = await refused(C.NOT_FOUND, call(bob, "antenna", method, request("antenna", method, unknown)))
    assert err.details().replace(job.id, "ID") == other.details().replace(unknown, "ID")
    listed = await call(bob, "antenna", "ListJobs", antenna_pb2.ListJobsRequest())
    assert job.id not in {j.id for j in listed.jobs}
    assert snapshot(lfed) == before
    assert (await lfed.client("alice").get(job.id)).state is JobState.RUNNING


# == 10: forwarding jobs of someone else's users ================================================================

@attack
@pytest.mark.parametrize("owner", [
    "user/antenna-a/alice",         # a user of another antenna
    "operator/antenna-b/atk-oscar",  # not a user
    "antenna/antenna-b",            # the antenna itself
    "spiffe://other.test/user/antenna-b/carol",  # another federation
])
@pytest.mark.parametrize("how", ["ForwardJob", "ForwardJobs"])
async def test_antenna_cannot_forward_jobs_of_users_it_does_not_vouch_for(afed, test_pki, owner, how):
    owner = owner if owner.startswith("spiffe://") else uri(owner)
    job_id = "antenna-b-" + secrets.token_hex(6)
    job = forwarded(job_id, owner)
    before = snapshot(afed)
    stub = hub_pb2_grpc.HubStub(connect(afed, "leonardo", tls_of(test_pki, "antenna/antenna-b")))
    if how == "ForwardJob":
        await refused(C.PERMISSION_DENIED, stub.ForwardJob(forward_request(job_id, job), timeout=5),
                      "may only forward jobs of its own users")
    else:
        # In a batch with a legitimate job: only that one is stored.
        good = forwarded("antenna-b-" + secrets.token_hex(6), uri("user/antenna-b/carol"))
        response = await stub.ForwardJobs(hub_pb2.ForwardJobsRequest(
            jobs=[forward_request(job_id, job), forward_request(good.id, good)]), timeout=5)
        bad, ok = response.results
        assert bad.job_id == job_id and bad.HasField("error")
        assert bad.error.code == C.PERMISSION_DENIED.value[0]
        assert "may only forward jobs of its own users" in bad.error.message
        assert ok.HasField("accepted")
        assert afed.hubs["leonardo"].core.journal.get(good.id) is not None
    assert afed.hubs["leonardo"].core.journal.get(job_id) is None
    after = snapshot(afed)
    assert after["antenna-a"] == before["antenna-a"] and after["lumi"] == before["lumi"]


# == 11: replays ================================================================================================

@attack
@pytest.mark.parametrize("change", ["spec", "owner", "job id"])
@pytest.mark.parametrize("how", ["ForwardJob", "ForwardJobs"])
async def test_replayed_forward_key_with_another_body_is_refused(afed, test_pki, how, change):
    hub = afed.hubs["leonardo"].core
    stub = hub_pb2_grpc.HubStub(connect(afed, "leonardo", tls_of(test_pki, "antenna/antenna-a")))
    key = "replay-" + secrets.token_hex(4)
    first = forwarded("antenna-a-" + secrets.token_hex(6), argv=("echo", "hello"))
    accepted = (await stub.ForwardJob(forward_request(key, first), timeout=5)).job
    stored = hub.journal.get(first.id)
    other = {"spec": replace(first, spec=JobSpec(argv=("rm", "-rf", "/"))),
             "owner": replace(first, owner=uri("user/antenna-a/bob")),
             "job id": replace(first, id="antenna-a-" + secrets.token_hex(6))}[change]
    if how == "ForwardJob":
        await refused(C.ALREADY_EXISTS, stub.ForwardJob(forward_request(key, other), timeout=5),
                      "with a different body")
    else:
        response = await stub.ForwardJobs(hub_pb2.ForwardJobsRequest(jobs=[forward_request(key, other)]), timeout=5)
        (result,) = response.results
        assert result.HasField("error") and result.error.code == C.ALREADY_EXISTS.value[0]
        assert "with a different body" in result.error.message
    assert hub.journal.get(first.id) == stored
    assert hub.journal.get(other.id) == (stored if other.id == first.id else None)
    # The honest retry is still answered with the first job, as a duplicate.
    again = await stub.ForwardJob(forward_request(key, first), timeout=5)
    assert again.duplicate and again.job.id == accepted.id and list(again.job.spec.argv) == ["echo", "hello"]
    assert hub.journal.count() == 1


@attack
async def test_forward_of_a_stored_job_id_under_a_new_key_is_refused(afed, test_pki):
    hub = afed.hubs["leonardo"].core
    stub = hub_pb2_grpc.HubStub(connect(afed, "leonardo", tls_of(test_pki, "antenna/antenna-a")))
    first = forwarded("antenna-a-" + secrets.token_hex(6), argv=("echo", "hello"))
    await stub.ForwardJob(forward_request("k1", first), timeout=5)
    stored = hub.journal.get(first.id)
    evil = replace(first, spec=JobSpec(argv=("evil",)))
    await refused(C.ALREADY_EXISTS, stub.ForwardJob(forward_request("k2", evil), timeout=5),
                  "under another idempotency key")
    assert hub.journal.get(first.id) == stored and hub.journal.count() == 1


@attack
@pytest.mark.parametrize("how", ["SubmitJob", "SubmitJobs"])
async def test_replayed_request_id_with_another_spec_is_refused(afed, how):
    antenna = afed.antennas["antenna-a"].core
    alice = afed.client("alice")
    spec = JobSpec(argv=("echo", "hello"))
    first = await alice.submit(spec, request_id="rid-1")
    evil = JobSpec(argv=("rm", "-rf", "/"))
    if how == "SubmitJob":
        await refused(C.ALREADY_EXISTS, alice.submit(evil, request_id="rid-1"), "different job")
    else:
        (result,) = await alice.submit_many([(evil, "rid-1", "")])
        assert result.code == C.ALREADY_EXISTS and "different job" in result.message
    assert (await alice.get(first.id)).spec == spec
    # The same spec replayed is answered with the same job, and nothing new is stored.
    assert (await alice.submit(spec, request_id="rid-1")).id == first.id
    assert [j.id for j in antenna.journal.list(owner=uri("user/antenna-a/alice"))] == [first.id]


@attack
async def test_another_users_request_id_reveals_nothing(afed):
    """Request ids are scoped to their user: bob replaying alice's request id gets a job of his own."""
    spec = JobSpec(argv=("echo", "hello"))
    mine = await afed.client("alice").submit(spec, request_id="rid-shared")
    theirs = await afed.client("bob").submit(spec, request_id="rid-shared")
    assert theirs.id != mine.id and theirs.owner == uri("user/antenna-a/bob")
    await refused(C.NOT_FOUND, afed.client("bob").get(mine.id))


# == 12: oversized messages =====================================================================================

@attack
@pytest.mark.parametrize("site", ["antenna-a", "leonardo"])
async def test_oversized_message_is_refused_and_the_daemon_still_serves(afed, test_pki, site):
    big = (("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
           ("grpc.max_receive_message_length", 4 * MAX_MESSAGE_BYTES))
    padding = "x" * (MAX_MESSAGE_BYTES + 1024)
    before = snapshot(afed)
    if site == "antenna-a":
        channel = connect(afed, site, tls_of(test_pki, "user/antenna-a/alice"), big)
        stub = antenna_pb2_grpc.AntennaStub(channel)
        await refused(C.RESOURCE_EXHAUSTED, stub.SubmitJob(submit_request(JobSpec(argv=("echo", padding))), timeout=20))
        assert snapshot(afed) == before
        job = await stub.SubmitJob(submit_request(), timeout=5)  # the same channel is still served
        assert afed.antennas[site].core.journal.get(job.id) is not None
    else:
        channel = connect(afed, site, tls_of(test_pki, "antenna/antenna-a"), big)
        stub = hub_pb2_grpc.HubStub(channel)
        job = forwarded("antenna-a-" + secrets.token_hex(6), argv=("echo", padding))
        await refused(C.RESOURCE_EXHAUSTED, stub.ForwardJob(forward_request(job.id, job), timeout=20))
        assert snapshot(afed) == before
        small = forwarded("antenna-a-" + secrets.token_hex(6))
        assert not (await stub.ForwardJob(forward_request(small.id, small), timeout=5)).duplicate
    await still_serves(afed, site)


# == 13: submission floods ======================================================================================

@attack
async def test_submission_flood_at_an_antenna_is_refused(bare):
    await start_hub(bare, "leonardo")
    antenna = (await start_antenna(bare, "antenna-a", limits=Limits(submit_rate=5, submit_burst=10))).core
    await bare.wait_sites()
    alice, bob = bare.client("alice"), bare.client("bob")
    mine = lambda: {j.id for j in antenna.journal.list(owner=uri("user/antenna-a/alice"), limit=1000)}  # noqa: E731

    # One call asking for more than the burst (an array counts in full) is refused whole.
    await refused(C.RESOURCE_EXHAUSTED, alice.submit_many([(JobSpec(argv=("true",)), "", "0-10")]),
                  "split the submission")
    assert mine() == set()

    started = time.monotonic()
    results = await asyncio.gather(*(alice.submit(JobSpec(argv=("true",))) for _ in range(40)),
                                   return_exceptions=True)
    elapsed = time.monotonic() - started
    accepted = [r for r in results if isinstance(r, Job)]
    errors = [r for r in results if not isinstance(r, Job)]
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors), errors
    assert 10 <= len(accepted) <= 10 + 5 * elapsed + 1
    for e in errors:
        assert e.code() == C.RESOURCE_EXHAUSTED and "retry in" in e.details(), e.details()
    assert mine() == {j.id for j in accepted}  # nothing stored beyond what was acknowledged
    # Another user of the same antenna is unaffected.
    assert (await bob.submit(JobSpec(argv=("true",)))).owner == uri("user/antenna-a/bob")


@attack
async def test_forward_flood_at_a_hub_is_refused(bare, test_pki):
    hub = (await start_hub(bare, "leonardo", limits=replace(HUB_LIMITS, submit_rate=5, submit_burst=10))).core
    b = hub_pb2_grpc.HubStub(connect(bare, "leonardo", tls_of(test_pki, "antenna/antenna-b")))
    jobs = [forwarded("antenna-b-" + secrets.token_hex(6), uri("user/antenna-b/carol")) for _ in range(10)]
    batch = hub_pb2.ForwardJobsRequest(jobs=[forward_request(j.id, j) for j in jobs])
    assert all(r.HasField("accepted") for r in (await b.ForwardJobs(batch, timeout=5)).results)
    extra = forwarded("antenna-b-" + secrets.token_hex(6), uri("user/antenna-b/carol"))
    await refused(C.RESOURCE_EXHAUSTED, b.ForwardJob(forward_request(extra.id, extra), timeout=5), "retry in")
    assert hub.journal.get(extra.id) is None and hub.journal.count() == 10
    # Retries of jobs already accepted cost nothing: they are answered as duplicates.
    assert all(r.duplicate for r in (await b.ForwardJobs(batch, timeout=5)).results)
    # Another antenna is unaffected.
    a = hub_pb2_grpc.HubStub(connect(bare, "leonardo", tls_of(test_pki, "antenna/antenna-a")))
    own = forwarded("antenna-a-" + secrets.token_hex(6))
    assert (await a.ForwardJob(forward_request(own.id, own), timeout=5)).job.id == own.id


# == 14: stream floods ==========================================================================================

async def open_stream(stub, method: str, message):
    """A server stream, once its first message arrived (the daemon counts it as open)."""
    stream = getattr(stub, method)(message)
    await stream.read()
    return stream


@attack
async def test_stream_flood_at_an_antenna_is_refused(bare, test_pki):
    await start_hub(bare, "leonardo")
    await start_antenna(bare, "antenna-a", limits=replace(ANTENNA_LIMITS, max_streams=2))
    await bare.wait_sites()
    alice_job, bob_job = await held_job(bare, "alice"), await held_job(bare, "bob")
    alice = antenna_pb2_grpc.AntennaStub(connect(bare, "antenna-a", tls_of(test_pki, "user/antenna-a/alice")))
    bob = antenna_pb2_grpc.AntennaStub(connect(bare, "antenna-a", tls_of(test_pki, "user/antenna-a/bob")))
    ref = jobs_pb2.JobRef(job_id=alice_job.id)
    streams = [await open_stream(alice, "WatchJob", ref) for _ in range(2)]
    try:
        await refused(C.RESOURCE_EXHAUSTED, open_stream(alice, "WatchJob", ref), "already has 2 open streams")
        await refused(C.RESOURCE_EXHAUSTED, open_stream(
            alice, "StreamLogs", jobs_pb2.LogsRequest(job_id=alice_job.id, follow=True)), "open streams")
        assert (await alice.GetJob(ref, timeout=5)).id == alice_job.id  # unary calls are not capped
        streams.append(await open_stream(bob, "WatchJob", jobs_pb2.JobRef(job_id=bob_job.id)))  # others are fine
        # Closing one stream frees its slot.
        streams.pop(0).cancel()

        async def reopened():
            try:
                return await open_stream(alice, "WatchJob", ref)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == C.RESOURCE_EXHAUSTED
                return None
        streams.append(await eventually(reopened, timeout=5))
    finally:
        for s in streams:
            s.cancel()


@attack
async def test_stream_flood_at_a_hub_is_refused(bare, test_pki):
    await start_hub(bare, "leonardo", limits=replace(HUB_LIMITS, max_streams=2))
    b = hub_pb2_grpc.HubStub(connect(bare, "leonardo", tls_of(test_pki, "antenna/antenna-b")))
    streams = [await open_stream(b, "WatchAdverts", hub_pb2.AdvertRequest()) for _ in range(2)]
    try:
        await refused(C.RESOURCE_EXHAUSTED, open_stream(b, "WatchChanges", hub_pb2.WatchChangesRequest()),
                      "already has 2 open streams")
        assert (await b.GetAdvert(hub_pb2.AdvertRequest(), timeout=5)).site == "leonardo"
        for who in ("antenna/antenna-a", "operator/leonardo/atk-leo"):
            other = hub_pb2_grpc.HubStub(connect(bare, "leonardo", tls_of(test_pki, who)))
            streams.append(await open_stream(other, "WatchAdverts", hub_pb2.AdvertRequest()))
        streams.pop(0).cancel()

        async def reopened():
            try:
                return await open_stream(b, "WatchChanges", hub_pb2.WatchChangesRequest())
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == C.RESOURCE_EXHAUSTED
                return None
        streams.append(await eventually(reopened, timeout=5))
    finally:
        for s in streams:
            s.cancel()


# == 15: operators ==============================================================================================

OPERATOR_ATTACKS = [
    # an operator of another antenna
    ("antenna-b", "antenna-a", "GetJob"),
    ("antenna-b", "antenna-a", "ListJobs"),
    ("antenna-b", "antenna-a", "CancelJob"),
    # an antenna's own operator submits nothing: a job belongs to a user
    ("antenna-a", "antenna-a", "SubmitJob"),
    ("antenna-a", "antenna-a", "SubmitJobs"),
    # an operator of another hub
    ("lumi", "leonardo", "GetJob"),
    ("lumi", "leonardo", "CancelJob"),
    ("lumi", "leonardo", "GetAdvert"),
    # a hub's own operator forwards nothing and reads no antenna's change feed
    ("leonardo", "leonardo", "ForwardJob"),
    ("leonardo", "leonardo", "WatchChanges"),
    # an operator of one kind of site at another
    ("antenna-a", "leonardo", "GetJob"),
    ("leonardo", "antenna-a", "ListJobs"),
]


@attack
@pytest.mark.parametrize("operator_of,site,method", OPERATOR_ATTACKS)
async def test_operator_may_not(afed, test_pki, operator_of, site, method):
    await denied_call(afed, test_pki, f"operator/{operator_of}/{OPERATORS[operator_of]}", site, method)


async def test_control_operators_see_every_job_of_their_own_site(afed, test_pki):
    """Not an attack: what operators may do, so that the refusals above are not vacuous."""
    jobs = [await held_job(afed, "alice"), await held_job(afed, "bob")]
    op = antenna_pb2_grpc.AntennaStub(connect(afed, "antenna-a", tls_of(test_pki, "operator/antenna-a/atk-olga")))
    assert {j.id for j in jobs} <= {j.id for j in (await op.ListJobs(antenna_pb2.ListJobsRequest(), timeout=5)).jobs}
    for job in jobs:
        assert (await op.GetJob(jobs_pb2.JobRef(job_id=job.id), timeout=5)).owner == job.owner
    hub_op = hub_pb2_grpc.HubStub(connect(afed, "leonardo", tls_of(test_pki, "operator/leonardo/atk-leo")))
    assert (await hub_op.GetJob(jobs_pb2.JobRef(job_id=jobs[0].id), timeout=5)).state == JobState.QUEUED
    assert (await hub_op.GetAdvert(hub_pb2.AdvertRequest(), timeout=5)).site == "leonardo"


# == 16: the audit log ==========================================================================================

@attack
@pytest.mark.parametrize("who,site,method,words", [
    ("user/antenna-b/carol", "antenna-a", "ListJobs", "belongs to antenna antenna-b"),
    ("operator/antenna-a/atk-olga", "antenna-a", "SubmitJob", "an operator may not call SubmitJob"),
    ("user/antenna-a/alice", "leonardo", "GetAdvert", "a user may not call"),
    ("hub/lumi", "leonardo", "ForwardJobs", "a hub may not call"),
])
async def test_refused_identity_is_audited(afed, test_pki, who, site, method, words):
    service = "hub" if site in afed.hubs else "antenna"
    channel = connect(afed, site, tls_of(test_pki, who))
    await refused(C.PERMISSION_DENIED, call(channel, service, method, request(service, method)), words)
    full = f"/aifed.v1.{'Hub' if service == 'hub' else 'Antenna'}/{method}"
    (record,) = await audit_records(afed, site, lambda r: r["event"] == "denied" and r.get("method") == full)
    assert record["who"] == uri(who)
    assert words in record["reason"]
    assert record.get("peer", "").startswith(("ipv4:", "ipv6:"))


@attack
async def test_unauthenticated_caller_is_audited(afed, test_pki, tmp_path):
    tls = forge(tmp_path / "forged", test_pki, uris=(uri("antenna/antenna-a"),), ou=("user",))
    await refused(C.UNAUTHENTICATED, call(connect(afed, "leonardo", tls), "hub", "GetAdvert",
                                          hub_pb2.AdvertRequest()), "claims to be an antenna")
    (record,) = await audit_records(afed, "leonardo", lambda r: r["event"] == "denied")
    assert "claims to be an antenna" in record["reason"] and uri("antenna/antenna-a") in record["reason"]
    assert record["method"] == "/aifed.v1.Hub/GetAdvert" and record.get("peer")
    assert record.get("who", "") != uri("antenna/antenna-a")  # a claim that was refused is not an identity


@attack
async def test_submission_flood_is_audited(bare):
    await start_hub(bare, "leonardo")
    await start_antenna(bare, "antenna-a", limits=Limits(submit_rate=1, submit_burst=2))
    await bare.wait_sites()
    alice = bare.client("alice")
    await refused(C.RESOURCE_EXHAUSTED, alice.submit_many([(JobSpec(argv=("true",)), "", "0-2")]), "split")
    await alice.submit(JobSpec(argv=("true",)))
    await alice.submit(JobSpec(argv=("true",)))
    await refused(C.RESOURCE_EXHAUSTED, alice.submit(JobSpec(argv=("true",))), "retry in")
    rejected = await audit_records(bare, "antenna-a", lambda r: r["event"] == "rejected"
                                   and r.get("who") == uri("user/antenna-a/alice"), at_least=2)
    assert [("split" in r["reason"], "retry in" in r["reason"]) for r in rejected] == [(True, False), (False, True)]
    assert rejected[0]["jobs"] == 3 and rejected[1]["jobs"] == 1
    assert all(r.get("peer") for r in rejected)


# == holes this suite found, now closed ========================================================================

@attack
async def test_open_stream_is_cut_when_its_certificate_is_revoked(bare, test_pki):
    await start_hub(bare, "leonardo", crl=True)
    name = fresh("atk-stream")
    pki.issue(test_pki.root, Role.OPERATOR, "leonardo", name)
    stub = hub_pb2_grpc.HubStub(connect(bare, "leonardo", tls_of(test_pki, f"operator/leonardo/{name}")))
    stream = await open_stream(stub, "WatchAdverts", hub_pb2.AdvertRequest())
    try:
        assert pki.revoke(test_pki.root, uri(f"operator/leonardo/{name}"), "key_compromise")

        async def revoked():
            try:
                await stub.GetAdvert(hub_pb2.AdvertRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code() == C.UNAUTHENTICATED
            return False
        await eventually(revoked, timeout=10, interval=0.2)  # the CRL is in force for new calls
        # The stream opened before must end too, within a reload period or two, rather than carry on.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                await asyncio.wait_for(stream.read(), 5)
        assert err.value.code() == C.UNAUTHENTICATED
    finally:
        stream.cancel()


@attack
async def test_health_watch_streams_count_against_the_stream_cap(bare, test_pki):
    await start_hub(bare, "leonardo", limits=replace(HUB_LIMITS, max_streams=2))
    stub = health_pb2_grpc.HealthStub(connect(bare, "leonardo", tls_of(test_pki, "antenna/antenna-b")))
    streams = [await open_stream(stub, "Watch", health_pb2.HealthCheckRequest()) for _ in range(2)]
    try:
        await refused(C.RESOURCE_EXHAUSTED, open_stream(stub, "Watch", health_pb2.HealthCheckRequest()))
    finally:
        for s in streams:
            s.cancel()


@attack
async def test_antenna_whose_name_prefixes_another_cannot_claim_its_job_ids(afed, test_pki):
    if not pki.cert_paths(test_pki.root, pki.identity_for(FEDERATION, Role.ANTENNA, "antenna"))[0].exists():
        pki.issue(test_pki.root, Role.ANTENNA, "antenna")
    rogue = hub_pb2_grpc.HubStub(connect(afed, "leonardo", test_pki.tls(Role.ANTENNA, "antenna")))
    target = "antenna-a-" + secrets.token_hex(6)  # a job antenna-a is about to forward
    # Pre-cancelling it would leave a tombstone that makes antenna-a's forward fail.
    await refused(C.NOT_FOUND, rogue.CancelJob(jobs_pb2.JobRef(job_id=target), timeout=5))
    assert afed.hubs["leonardo"].core.journal.get(target) is None
    # Forwarding under antenna-a's ids is refused (and so cannot tell which of them exist).
    await refused(C.INVALID_ARGUMENT, rogue.ForwardJob(
        forward_request("k", forwarded(target, uri("user/antenna/mallory"))), timeout=5))
    a = hub_pb2_grpc.HubStub(connect(afed, "leonardo", tls_of(test_pki, "antenna/antenna-a")))
    assert not (await a.ForwardJob(forward_request(target, forwarded(target)), timeout=5)).duplicate


# == input files: nobody uses or learns of content another uploaded; names stay in the working directory ==========

@attack
async def test_user_cannot_use_or_learn_of_content_another_user_uploaded(afed):
    secret = b"carol's health records"
    assert (await afed.client("bob").stub.PutBlob(upload(secret))).complete
    alice = afed.client("alice")
    before = snapshot(afed)
    held = await alice.stub.StatBlob(jobs_pb2.BlobRef(sha256=sha(secret)), timeout=5)
    assert (held.held, held.complete) == (0, False)  # as for content nobody uploaded
    spec = JobSpec(argv=("cat", "x"), inputs=(InputFile("x", sha(secret), len(secret)),))
    await refused(C.FAILED_PRECONDITION, alice.submit(spec), "has not been uploaded")
    assert snapshot(afed) == before


@attack
@pytest.mark.parametrize("name", ["../../../etc/cron.d/x", "/etc/passwd", "data/../../x"])
async def test_input_name_escaping_the_working_directory_is_refused(afed, name):
    client = afed.client("alice")
    assert (await client.stub.PutBlob(upload(b"payload"))).complete
    before = snapshot(afed)
    spec = JobSpec(argv=("true",), inputs=(InputFile(name, sha(b"payload"), 7),))
    await refused(C.INVALID_ARGUMENT, client.stub.SubmitJob(submit_request(spec), timeout=5), "input name")
    assert snapshot(afed) == before


@attack
@pytest.mark.parametrize("who,site", [("user/antenna-a/alice", "antenna-a"), ("antenna/antenna-a", "leonardo")])
async def test_content_under_a_false_hash_is_refused_and_nothing_kept(afed, test_pki, who, site):
    before = stored_content(afed)
    service = "hub" if site in afed.hubs else "antenna"
    channel = connect(afed, site, tls_of(test_pki, who))
    await refused(C.INVALID_ARGUMENT, call(channel, service, "PutBlob", upload(b"malware", claimed=sha(b"model"))),
                  "checksum mismatch")
    assert stored_content(afed) == before


# == job folders: a job cannot make the hub read files outside its folder for it ===================================

@attack
@pytest.mark.parametrize("swap", ["ln -s {secret} stdout", "mkfifo stdout"])
async def test_a_job_cannot_turn_its_log_into_a_window_on_the_hubs_files(lfed, swap):
    secret = lfed.state / "hub-secret.txt"
    secret.write_text("the hub's private key\n")
    client = lfed.client("alice")
    script = f"echo before; rm stdout; {swap.format(secret=secret)}; echo after >&2"
    job = await client.submit(JobSpec(argv=("sh", "-c", script), site="leonardo", walltime_s=60))
    assert (await client.wait(job.id)).state is JobState.COMPLETED
    out = b"".join([c.data async for c in client.logs(job.id, jobs_pb2.LOG_STREAM_STDOUT)])
    err = b"".join([c.data async for c in client.logs(job.id, jobs_pb2.LOG_STREAM_STDERR)])
    assert b"private key" not in out and out == b"" and err == b"after\n"  # served nothing, and did not hang
