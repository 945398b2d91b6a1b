"""certs.pki: the federation CA and the certificates it issues, through the API and the `aifed certs` CLI."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs import pki
from certs.pki import PkiError
from federation.identity import Role

REPO = Path(__file__).resolve().parents[1]
FED = "f.test"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def ekus(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    pki.init_ca(d, FED)
    return d


# -- the CA ------------------------------------------------------------------------------------------

def test_init_ca_writes_a_private_ca(tmp_path):
    """init_ca writes ca.pem and ca.key, the key 0600 in a 0700 folder, and the cert is a CA for the federation."""
    d = tmp_path / "new" / "pki"
    path = pki.init_ca(d, FED)
    assert path == d / "ca.pem"
    assert (d / "ca.pem").is_file() and (d / "ca.key").is_file()
    assert mode(d / "ca.key") == 0o600
    assert mode(d) == 0o700
    cert = load_cert(d / "ca.pem")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.verify_directly_issued_by(cert) is None  # self-signed
    key = load_key(d / "ca.key")
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert pki.load_ca(d)[2] == FED
    assert not list(d.glob("*.tmp"))


def test_init_ca_tightens_an_existing_folder(tmp_path):
    """An existing, world-readable folder is made 0700."""
    d = tmp_path / "pki"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    pki.init_ca(d, FED)
    assert mode(d) == 0o700


def test_second_init_is_refused_without_force(ca_dir):
    """A second init would orphan every certificate: PkiError, and the CA is unchanged."""
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        pki.init_ca(ca_dir, FED)
    assert (ca_dir / "ca.key").read_bytes() == before
    pki.init_ca(ca_dir, FED, force=True)
    assert (ca_dir / "ca.key").read_bytes() != before


def test_init_ca_rejects_a_bad_federation_name(tmp_path):
    with pytest.raises(ValueError):
        pki.init_ca(tmp_path / "pki", "Not A Domain")
    assert not (tmp_path / "pki" / "ca.key").exists()


# -- issuing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("role, site, name, uri, folder", [
    (Role.HUB, "h1", "", f"spiffe://{FED}/hub/h1", "hubs"),
    (Role.ANTENNA, "a1", "", f"spiffe://{FED}/antenna/a1", "antennas"),
])
def test_issue_daemon_certificate(ca_dir, role, site, name, uri, folder):
    """Hub and antenna certs: P-256, key 0600, one spiffe URI SAN, server+client auth, localhost SANs."""
    issued = pki.issue(ca_dir, role, site, name)
    assert issued.identity.uri == uri
    assert issued.cert == ca_dir / folder / f"{site}.pem"
    assert issued.key == ca_dir / folder / f"{site}.key"
    assert mode(issued.key) == 0o600
    assert mode(issued.cert.parent) == 0o700
    key = load_key(issued.key)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = load_cert(issued.cert)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    san = sans(cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert set(ekus(cert)) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ca_cert = load_cert(ca_dir / "ca.pem")
    cert.verify_directly_issued_by(ca_cert)
    assert cert.not_valid_after_utc == issued.not_after.replace(microsecond=0)  # X.509 times are in seconds


def test_issue_user_certificate(ca_dir):
    """User certs: P-256, one URI SAN spiffe://<fed>/user/<antenna>/<name>, client auth only, no host SANs."""
    issued = pki.issue(ca_dir, Role.USER, "a1", "alice")
    uri = f"spiffe://{FED}/user/a1/alice"
    assert issued.identity.uri == uri
    assert issued.cert == ca_dir / "users" / "a1-alice.pem"
    assert mode(issued.key) == 0o600
    assert load_key(issued.key).curve.name == "secp256r1"
    cert = load_cert(issued.cert)
    san = sans(cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == []
    assert ekus(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))


def test_issue_with_custom_hosts(ca_dir):
    """--dns/--ip replace the default host SANs."""
    cert = load_cert(pki.issue(ca_dir, Role.HUB, "h2", dns=("hub.example",), ips=("10.0.0.1",)).cert)
    assert sans(cert).get_values_for_type(x509.DNSName) == ["hub.example"]
    assert sans(cert).get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    with pytest.raises(PkiError):
        pki.issue(ca_dir, Role.HUB, "h3", ips=("not-an-ip",))


def test_certificate_from_another_ca_does_not_verify(ca_dir, tmp_path):
    """Same federation name, different CA key: the signature check fails."""
    other = tmp_path / "other"
    pki.init_ca(other, FED)
    cert = load_cert(pki.issue(other, Role.HUB, "h1").cert)
    with pytest.raises(Exception):
        cert.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))


@pytest.mark.parametrize("site", ["", "Leonardo", "h_1", "h 1", "-h1", "h1-", "a" * 64, "h1/x", "h1\n"])
def test_invalid_site_names_are_refused(ca_dir, site):
    """Site names must be DNS labels; nothing is written for a refused name."""
    with pytest.raises(ValueError):
        pki.issue(ca_dir, Role.HUB, site)
    assert not (ca_dir / "hubs").exists() or not list((ca_dir / "hubs").iterdir())


@pytest.mark.parametrize("name", ["", "Alice", "al ice", "alice/x", ".alice", "alice-", "a" * 65, "alice\n"])
def test_invalid_user_names_are_refused(ca_dir, name):
    with pytest.raises(ValueError):
        pki.issue(ca_dir, Role.USER, "a1", name)
    assert not (ca_dir / "users").exists() or not list((ca_dir / "users").iterdir())


def test_daemon_certificate_takes_no_user_name(ca_dir):
    with pytest.raises(PkiError, match="no user name"):
        pki.issue(ca_dir, Role.HUB, "h1", "alice")


def test_issue_without_a_ca(tmp_path):
    """Issuing before `aifed certs init` says to run it."""
    with pytest.raises(PkiError, match="aifed certs init"):
        pki.issue(tmp_path / "empty", Role.HUB, "h1")


def test_list_certs(ca_dir):
    """list_certs lists every issued certificate (not the CA) with its identity and expiry."""
    assert pki.list_certs(ca_dir) == []
    hub = pki.issue(ca_dir, Role.HUB, "h1")
    ant = pki.issue(ca_dir, Role.ANTENNA, "a1")
    usr = pki.issue(ca_dir, Role.USER, "a1", "bob", days=10)
    listed = {path: (uri, expiry) for path, uri, expiry in pki.list_certs(ca_dir)}
    assert listed == {
        hub.cert: (f"spiffe://{FED}/hub/h1", hub.not_after.replace(microsecond=0)),
        ant.cert: (f"spiffe://{FED}/antenna/a1", ant.not_after.replace(microsecond=0)),
        usr.cert: (f"spiffe://{FED}/user/a1/bob", usr.not_after.replace(microsecond=0)),
    }


def test_cert_lifetime_is_capped_by_the_ca(tmp_path):
    """A certificate never outlives its CA."""
    d = tmp_path / "pki"
    pki.init_ca(d, FED, days=30)
    issued = pki.issue(d, Role.HUB, "h1", days=365)
    assert load_cert(issued.cert).not_valid_after_utc <= load_cert(d / "ca.pem").not_valid_after_utc


# -- the CLI -----------------------------------------------------------------------------------------

def aifed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "federation.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_cli_init_issue_list(tmp_path):
    """`aifed certs init / issue / list` create a working PKI and report it."""
    d = tmp_path / "pki"
    proc = aifed("certs", "init", "--dir", str(d), "--federation", FED)
    assert proc.returncode == 0, proc.stderr
    assert FED in proc.stdout
    assert mode(d / "ca.key") == 0o600

    proc = aifed("certs", "issue", "--dir", str(d), "hub", "h1")
    assert proc.returncode == 0, proc.stderr
    assert f"spiffe://{FED}/hub/h1" in proc.stdout
    load_cert(d / "hubs" / "h1.pem").verify_directly_issued_by(load_cert(d / "ca.pem"))

    proc = aifed("certs", "issue", "--dir", str(d), "user", "a1", "carol")
    assert proc.returncode == 0, proc.stderr
    assert (d / "users" / "a1-carol.pem").is_file()

    proc = aifed("certs", "list", "--dir", str(d))
    assert proc.returncode == 0, proc.stderr
    assert f"spiffe://{FED}/hub/h1" in proc.stdout
    assert f"spiffe://{FED}/user/a1/carol" in proc.stdout
    assert str(d / "hubs" / "h1.pem") in proc.stdout


def test_cli_user_without_name_is_a_usage_error(tmp_path):
    """`aifed certs issue user ANTENNA` without NAME exits 2 and writes nothing."""
    d = tmp_path / "pki"
    pki.init_ca(d, FED)
    proc = aifed("certs", "issue", "--dir", str(d), "user", "a1")
    assert proc.returncode == 2
    assert "user ANTENNA NAME" in proc.stderr
    assert not (d / "users").exists()


def test_cli_errors(tmp_path):
    """Bad names are usage errors (2); a second init and issuing without a CA are refused (7)."""
    d = tmp_path / "pki"
    proc = aifed("certs", "issue", "--dir", str(d), "hub", "h1")
    assert proc.returncode == 7
    assert "aifed certs init" in proc.stderr
    assert aifed("certs", "init", "--dir", str(d), "--federation", FED).returncode == 0
    proc = aifed("certs", "init", "--dir", str(d), "--federation", FED)
    assert proc.returncode == 7
    assert "already exists" in proc.stderr
    proc = aifed("certs", "issue", "--dir", str(d), "hub", "Bad!")
    assert proc.returncode == 2
    assert "'Bad!'" in proc.stderr
