"""Mutual TLS on every daemon port, identities from certificates, and who may call what."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from certs import pki
from federation.identity import Role
from federation.model import JobSpec
from federation.pb import antenna_pb2, antenna_pb2_grpc, hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel
from federation.tls import TlsFiles


def ports(fed) -> dict[str, int]:
    return {"hub": fed.hubs["leonardo"].port, "antenna": fed.antennas["antenna-a"].port}


@pytest.mark.parametrize("daemon", ["hub", "antenna"])
async def test_no_client_certificate_is_refused(fed, test_pki, daemon):
    creds = grpc.ssl_channel_credentials(root_certificates=test_pki.ca.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{ports(fed)[daemon]}", creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("daemon", ["hub", "antenna"])
async def test_certificate_from_another_ca_is_refused(fed, test_pki, daemon):
    """Same federation name, same identity, but signed by a CA the daemons do not trust."""
    other = test_pki.other_ca_root
    cert, key = pki.cert_paths(other, pki.identity_for("eurohpc.test", Role.USER, "antenna-a", "alice"))
    tls = TlsFiles(test_pki.ca, cert, key)  # trusts the real server, presents a foreign client cert
    async with secure_channel(f"127.0.0.1:{ports(fed)[daemon]}", tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_client_is_refused(fed):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports(fed)['hub']}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_that_does_not_trust_the_server_fails(fed, test_pki):
    foreign = TlsFiles(test_pki.other_ca_root / "ca.pem", *pki.cert_paths(
        test_pki.root, pki.identity_for("eurohpc.test", Role.USER, "antenna-a", "alice")))
    async with secure_channel(f"127.0.0.1:{ports(fed)['antenna']}", foreign) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("daemon,who", [("hub", (Role.ANTENNA, "antenna-a")), ("hub", (Role.USER, "antenna-a", "alice")),
                                        ("antenna", (Role.USER, "antenna-a", "alice")),
                                        ("antenna", (Role.HUB, "lumi"))])
async def test_health_answers_over_mtls_to_any_member(fed, test_pki, daemon, who):
    async with secure_channel(f"127.0.0.1:{ports(fed)[daemon]}", test_pki.tls(*who)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        overall = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        service = "aifed.v1.Hub" if daemon == "hub" else "aifed.v1.Antenna"
        named = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert overall.status == named.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(fed, test_pki):
    async with secure_channel(f"127.0.0.1:{ports(fed)['hub']}", test_pki.tls(Role.ANTENNA, "antenna-a")) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = [r async for r in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"aifed.v1.Hub", "grpc.health.v1.Health"} <= names


async def test_user_cannot_call_hub_rpcs(fed, test_pki):
    async with secure_channel(f"127.0.0.1:{ports(fed)['hub']}", test_pki.user("antenna-a", "alice")) as ch:
        stub = hub_pb2_grpc.HubStub(ch)
        for call in (stub.GetAdvert(hub_pb2.AdvertRequest(), timeout=5),
                     stub.ForwardJob(hub_pb2.ForwardJobRequest(idempotency_key="k"), timeout=5),
                     stub.GetJob(jobs_pb2.JobRef(job_id="x"), timeout=5)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "a user may not call" in err.value.details()


async def test_antenna_cannot_call_another_antennas_user_service(fed, test_pki):
    async with secure_channel(f"127.0.0.1:{ports(fed)['antenna']}", test_pki.tls(Role.ANTENNA, "antenna-b")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await antenna_pb2_grpc.AntennaStub(ch).ListSites(antenna_pb2.ListSitesRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_hub_cannot_call_antenna_user_service(fed, test_pki):
    async with secure_channel(f"127.0.0.1:{ports(fed)['antenna']}", test_pki.tls(Role.HUB, "lumi")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await antenna_pb2_grpc.AntennaStub(ch).ListJobs(antenna_pb2.ListJobsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_user_of_another_antenna_is_refused(fed):
    client = fed.client("carol")  # vouched for by antenna-b, talking to antenna-a
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.submit(JobSpec(argv=("true",)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to antenna antenna-b" in err.value.details()


async def test_users_see_only_their_own_jobs(fed):
    alice, bob = fed.client("alice"), fed.client("bob")
    job = await alice.submit(JobSpec(argv=("sleep", "5")))
    for call in (bob.get(job.id), bob.cancel(job.id)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in bob.logs(job.id):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await alice.cancel(job.id)).id == job.id


async def test_antenna_sees_only_jobs_it_forwarded(fed, test_pki):
    alice = fed.client("alice")
    job = await alice.wait((await alice.submit(JobSpec(argv=("true",), site="leonardo"))).id)
    async with secure_channel(f"127.0.0.1:{ports(fed)['hub']}", test_pki.tls(Role.ANTENNA, "antenna-b")) as ch:
        stub = hub_pb2_grpc.HubStub(ch)
        for call in (stub.GetJob(jobs_pb2.JobRef(job_id=job.id)), stub.CancelJob(jobs_pb2.JobRef(job_id=job.id))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_antenna_cannot_forward_for_another_antennas_user(fed, test_pki):
    from federation import convert
    from federation.model import Job, JobState
    job = Job(id="antenna-b-x", spec=JobSpec(argv=("true",)), state=JobState.PENDING,
              owner="spiffe://eurohpc.test/user/antenna-a/alice")
    async with secure_channel(f"127.0.0.1:{ports(fed)['hub']}", test_pki.tls(Role.ANTENNA, "antenna-b")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hub_pb2_grpc.HubStub(ch).ForwardJob(
                hub_pb2.ForwardJobRequest(idempotency_key="k", job=convert.job_to_pb(job)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert fed.hubs["leonardo"].core.journal.get("antenna-b-x") is None


async def test_certificate_without_identity_is_unauthenticated(fed, test_pki, tmp_path):
    """A certificate signed by the federation CA but with no spiffe URI SAN carries no identity."""
    import datetime as dt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    ca_cert, ca_key, _ = pki.load_ca(test_pki.root)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anon")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("anon.example")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "anon.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "anon.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    tls = TlsFiles(test_pki.ca, tmp_path / "anon.pem", tmp_path / "anon.key")
    async with secure_channel(f"127.0.0.1:{ports(fed)['hub']}", tls) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hub_pb2_grpc.HubStub(ch).GetAdvert(hub_pb2.AdvertRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "spiffe" in err.value.details()
