"""Certificates for services the daemons use (etcd, MQTT): issued by the federation CA, usable as TLS server and
client, recorded and revocable like the others, and never accepted by a daemon as a caller."""

from __future__ import annotations

import ipaddress
import os
import stat

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import pki
from federation.identity import parse_identity
from federation.pb import hub_pb2, hub_pb2_grpc
from federation.rpc import secure_channel
from federation.tls import TlsFiles

FEDERATION = "eurohpc.test"


@pytest.fixture
def ca_dir(tmp_path):
    pki.init_ca(tmp_path / "pki", FEDERATION)
    return tmp_path / "pki"


def test_service_certificate_is_server_and_client_for_its_names(ca_dir):
    cert_path, key_path = pki.issue_service(ca_dir, "etcd", dns=("localhost", "etcd.eurohpc.test"),
                                            ips=("127.0.0.1", "10.0.0.7"), days=30)
    assert (cert_path, key_path) == (ca_dir / "services" / "etcd.pem", ca_dir / "services" / "etcd.key")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate((ca_dir / pki.CA_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{FEDERATION}/service/etcd"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "etcd.eurohpc.test"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                         ipaddress.ip_address("10.0.0.7")]
    usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages and ExtendedKeyUsageOID.CLIENT_AUTH in usages
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == ["service"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    left = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 29 < left.days <= 31
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    pub = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*pub) == cert.public_key().public_bytes(*pub)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600


def test_service_certificate_is_recorded_and_revocable(ca_dir):
    cert_path, _ = pki.issue_service(ca_dir, "mqtt")
    serial = format(x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number, "x")
    rows = [r for r in pki.list_certs(ca_dir) if r.serial == serial]
    assert len(rows) == 1
    assert (rows[0].identity, rows[0].role, rows[0].status, rows[0].current) == (
        f"spiffe://{FEDERATION}/service/mqtt", "service", "valid", True)
    assert pki.revoke(ca_dir, f"spiffe://{FEDERATION}/service/mqtt", "key_compromise") == [serial]
    assert int(serial, 16) in {r.serial_number for r in pki.read_crl(ca_dir)}


@pytest.mark.parametrize("name", ["", "Etcd", "etcd/../hub", "-etcd"])
def test_service_name_must_be_a_label(ca_dir, name):
    with pytest.raises(ValueError, match="not valid"):
        pki.issue_service(ca_dir, name)
    assert not (ca_dir / "services").exists() or not list((ca_dir / "services").iterdir())


def test_service_identity_is_no_federation_role():
    with pytest.raises(ValueError, match="unknown role 'service'"):
        parse_identity(f"spiffe://{FEDERATION}/service/etcd")


async def test_daemon_refuses_a_service_certificate_as_caller(fed, test_pki):
    """Signed by the federation CA, so the TLS handshake passes: the hub's guard must refuse the identity."""
    cert, key = pki.issue_service(test_pki.root, "etcd")
    tls = TlsFiles(test_pki.ca, cert, key)
    async with secure_channel(f"127.0.0.1:{fed.hubs['leonardo'].port}", tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hub_pb2_grpc.HubStub(channel).GetAdvert(hub_pb2.AdvertRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown role 'service'" in err.value.details()
