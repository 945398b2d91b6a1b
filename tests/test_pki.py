"""certs.pki: the federation CA and the certificates it issues, through the API and the `aifed certs` CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import pki
from certs.pki import PkiError
from federation import cli
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
    """list_certs lists every issued certificate (not the CA) with its identity, serial, expiry and status."""
    assert pki.list_certs(ca_dir) == []
    hub = pki.issue(ca_dir, Role.HUB, "h1")
    ant = pki.issue(ca_dir, Role.ANTENNA, "a1")
    usr = pki.issue(ca_dir, Role.USER, "a1", "bob", days=10)
    listed = {c.path: (c.identity, c.not_after, c.serial, c.status) for c in pki.list_certs(ca_dir)}
    assert listed == {
        hub.cert: (f"spiffe://{FED}/hub/h1", hub.not_after.replace(microsecond=0), hub.serial, "valid"),
        ant.cert: (f"spiffe://{FED}/antenna/a1", ant.not_after.replace(microsecond=0), ant.serial, "valid"),
        usr.cert: (f"spiffe://{FED}/user/a1/bob", usr.not_after.replace(microsecond=0), usr.serial, "expiring"),
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


# -- operators ---------------------------------------------------------------------------------------

def test_issue_operator_certificate(ca_dir):
    """Operator certs: spiffe://<fed>/operator/<site>/<name>, client auth only, stored as operators/<site>-<name>."""
    issued = pki.issue(ca_dir, Role.OPERATOR, "h1", "olga")
    uri = f"spiffe://{FED}/operator/h1/olga"
    assert issued.identity.uri == uri
    assert (issued.cert, issued.key) == (ca_dir / "operators" / "h1-olga.pem", ca_dir / "operators" / "h1-olga.key")
    assert pki.cert_paths(ca_dir, pki.identity_for(FED, Role.OPERATOR, "h1", "olga")) == (issued.cert, issued.key)
    cert = load_cert(issued.cert)
    assert sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert sans(cert).get_values_for_type(x509.DNSName) == []
    assert sans(cert).get_values_for_type(x509.IPAddress) == []
    assert ekus(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert mode(issued.key) == 0o600
    cert.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))
    with pytest.raises(ValueError):
        pki.issue(ca_dir, Role.OPERATOR, "h1", "")


# -- the index ---------------------------------------------------------------------------------------

def read_index(d: Path) -> dict:
    return json.loads((d / "index.json").read_text())


def test_index_records_each_issue(ca_dir):
    """Each issue appends an entry: serial (lower-case hex), identity, role, relative path, validity, revocation."""
    assert read_index(ca_dir)["certs"] == []
    hub = pki.issue(ca_dir, Role.HUB, "h1")
    usr = pki.issue(ca_dir, Role.USER, "a1", "alice")
    assert mode(ca_dir / "index.json") == 0o600
    entries = read_index(ca_dir)["certs"]
    assert len(entries) == 2
    e = entries[0]
    cert = load_cert(hub.cert)
    assert e["serial"] == format(cert.serial_number, "x") == hub.serial
    assert e["serial"] == e["serial"].lower()
    assert e["identity"] == f"spiffe://{FED}/hub/h1"
    assert e["role"] == "hub"
    assert e["cert"] == "hubs/h1.pem"
    assert dt.datetime.fromisoformat(e["not_before"]) == cert.not_valid_before_utc
    assert dt.datetime.fromisoformat(e["not_after"]) == cert.not_valid_after_utc
    assert e["not_after"].endswith("Z")
    assert e["revoked_at"] is None and e["reason"] is None
    assert entries[1]["identity"] == f"spiffe://{FED}/user/a1/alice" and entries[1]["serial"] == usr.serial
    assert not list(ca_dir.rglob("*.tmp"))


def test_folder_without_an_index_still_works(ca_dir, tmp_path):
    """A PKI folder from before index.json: list, revoke and issue rebuild the index from the certificates on disk,
    and skip a certificate another CA signed."""
    hub = pki.issue(ca_dir, Role.HUB, "h1")
    usr = pki.issue(ca_dir, Role.USER, "a1", "alice")
    other = tmp_path / "other"
    pki.init_ca(other, FED)
    (ca_dir / "hubs" / "stray.pem").write_bytes(pki.issue(other, Role.HUB, "stray").cert.read_bytes())
    (ca_dir / "index.json").unlink()
    (ca_dir / "crl.pem").unlink()
    assert {(c.identity, c.serial) for c in pki.list_certs(ca_dir)} == {
        (f"spiffe://{FED}/hub/h1", hub.serial), (f"spiffe://{FED}/user/a1/alice", usr.serial)}
    assert not (ca_dir / "index.json").exists()  # listing writes nothing
    assert pki.revoke(ca_dir, hub.serial) == [hub.serial]
    assert {e["serial"] for e in read_index(ca_dir)["certs"]} == {hub.serial, usr.serial}
    assert load_crl(ca_dir).get_revoked_certificate_by_serial_number(int(hub.serial, 16)) is not None


def test_lost_index_keeps_revocations_from_the_crl(ca_dir):
    """If index.json is lost, revocations still listed in crl.pem are kept, also for certificates renewed since."""
    first = pki.issue(ca_dir, Role.HUB, "h1")
    pki.revoke(ca_dir, first.serial, reason="key_compromise")
    renewed = pki.renew(ca_dir, Role.HUB, "h1")
    user = pki.issue(ca_dir, Role.USER, "a1", "alice")
    pki.revoke(ca_dir, user.serial)
    (ca_dir / "index.json").unlink()
    status = {c.serial: c.status for c in pki.list_certs(ca_dir)}
    assert status == {first.serial: "revoked", renewed.serial: "valid", user.serial: "revoked"}
    pki.write_crl(ca_dir)
    assert revoked_serials(ca_dir) == {first.serial, user.serial}
    entry = load_crl(ca_dir).get_revoked_certificate_by_serial_number(int(first.serial, 16))
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise


def test_issue_in_a_folder_without_a_crl_writes_one(ca_dir):
    (ca_dir / "crl.pem").unlink()
    pki.issue(ca_dir, Role.HUB, "h1")
    assert len(load_crl(ca_dir)) == 0


# -- renewing ----------------------------------------------------------------------------------------

def test_renew_replaces_key_and_certificate(ca_dir):
    """Renew: a new key and serial for the same identity and host SANs, written over the same paths."""
    first = pki.issue(ca_dir, Role.HUB, "h1", dns=("hub.example", "h1.example"), ips=("10.0.0.1",))
    old_cert, old_key = load_cert(first.cert), first.key.read_bytes()
    renewed = pki.renew(ca_dir, Role.HUB, "h1", days=30)
    assert (renewed.cert, renewed.key) == (first.cert, first.key)
    assert renewed.serial != first.serial and renewed.replaced == first.serial
    cert = load_cert(renewed.cert)
    assert format(cert.serial_number, "x") == renewed.serial
    assert renewed.key.read_bytes() != old_key
    assert cert.public_key().public_numbers() == load_key(renewed.key).public_key().public_numbers()
    assert sans(cert) == sans(old_cert)
    assert set(ekus(cert)) == set(ekus(old_cert))
    assert cert.subject == old_cert.subject
    cert.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))
    assert mode(renewed.key) == 0o600
    assert not list(ca_dir.rglob("*.tmp"))
    rows = {c.serial: c for c in pki.list_certs(ca_dir)}
    assert rows[first.serial].status == "valid" and not rows[first.serial].current  # still valid until it expires
    assert rows[renewed.serial].status == "expiring" and rows[renewed.serial].current
    assert [e["serial"] for e in read_index(ca_dir)["certs"]] == [first.serial, renewed.serial]


def test_renew_user_and_operator(ca_dir):
    for role, site, name in ((Role.USER, "a1", "alice"), (Role.OPERATOR, "h1", "olga")):
        first = pki.issue(ca_dir, role, site, name)
        renewed = pki.renew(ca_dir, role, site, name)
        cert = load_cert(renewed.cert)
        assert renewed.cert == first.cert and renewed.serial != first.serial
        assert sans(cert).get_values_for_type(x509.DNSName) == []
        assert ekus(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_renew_without_a_certificate(ca_dir):
    with pytest.raises(PkiError, match="no certificate for spiffe://f.test/hub/h9 to renew"):
        pki.renew(ca_dir, Role.HUB, "h9")
    assert not (ca_dir / "hubs" / "h9.key").exists()


# -- revoking and the CRL ----------------------------------------------------------------------------

def load_crl(d: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((d / "crl.pem").read_bytes())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def revoked_serials(d: Path) -> set[str]:
    return {format(r.serial_number, "x") for r in load_crl(d)}


def forge(d: Path, site: str, not_after: dt.datetime) -> x509.Certificate:
    """A hub certificate signed by the CA in `d` with the given expiry, put where a hub's certificate lives."""
    ca_cert, ca_key, _ = pki.load_ca(d)
    key = ec.generate_private_key(ec.SECP256R1())
    uri = f"spiffe://{FED}/hub/{site}"
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, FED),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "hub"),
                      x509.NameAttribute(NameOID.COMMON_NAME, site)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_after - dt.timedelta(days=30)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "hubs").mkdir(exist_ok=True)
    (d / "hubs" / f"{site}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def test_init_writes_an_empty_signed_crl(ca_dir):
    """Daemons always have a CRL to load: init writes one, signed by the CA, with a CRL number and the CA's AKI."""
    crl = load_crl(ca_dir)
    ca = load_cert(ca_dir / "ca.pem")
    assert len(crl) == 0
    assert crl.is_signature_valid(ca.public_key())
    assert crl.issuer == ca.subject
    assert crl_number(crl) == 1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert mode(ca_dir / "crl.pem") == 0o644


@pytest.mark.parametrize("how", ["path", "relative path", "serial", "upper-case serial", "uri"])
def test_revoke_puts_the_serial_in_a_signed_crl(ca_dir, how):
    hub = pki.issue(ca_dir, Role.HUB, "h1")
    other = pki.issue(ca_dir, Role.HUB, "h2")
    before = crl_number(load_crl(ca_dir))
    target = {"path": str(hub.cert), "relative path": "hubs/h1.pem", "serial": hub.serial,
              "upper-case serial": hub.serial.upper(), "uri": f"spiffe://{FED}/hub/h1"}[how]
    assert pki.revoke(ca_dir, target, reason="key_compromise") == [hub.serial]
    crl = load_crl(ca_dir)
    assert crl.is_signature_valid(load_cert(ca_dir / "ca.pem").public_key())
    assert revoked_serials(ca_dir) == {hub.serial}
    assert other.serial not in revoked_serials(ca_dir)
    entry = crl.get_revoked_certificate_by_serial_number(int(hub.serial, 16))
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl_number(crl) > before
    now = dt.datetime.now(dt.timezone.utc)
    assert abs(crl.last_update_utc - now) < dt.timedelta(minutes=1)
    assert abs(crl.next_update_utc - (now + dt.timedelta(days=7))) < dt.timedelta(minutes=1)
    e = next(e for e in read_index(ca_dir)["certs"] if e["serial"] == hub.serial)
    assert e["revoked_at"] and e["reason"] == "key_compromise"
    status = {c.serial: c.status for c in pki.list_certs(ca_dir)}
    assert status == {hub.serial: "revoked", other.serial: "valid"}


def test_revoke_by_uri_takes_every_unrevoked_certificate(ca_dir):
    """An identity's renewed certificates are all revoked by its URI; revoking again is a no-op."""
    first = pki.issue(ca_dir, Role.USER, "a1", "alice")
    second = pki.renew(ca_dir, Role.USER, "a1", "alice")
    uri = f"spiffe://{FED}/user/a1/alice"
    assert sorted(pki.revoke(ca_dir, uri)) == sorted([first.serial, second.serial])
    n = crl_number(load_crl(ca_dir))
    assert pki.revoke(ca_dir, uri) == []
    assert pki.revoke(ca_dir, first.serial) == []
    assert revoked_serials(ca_dir) == {first.serial, second.serial}
    assert crl_number(load_crl(ca_dir)) > n
    third = pki.renew(ca_dir, Role.USER, "a1", "alice")
    assert pki.revoke(ca_dir, uri) == [third.serial]


def test_revoke_unknown_targets(ca_dir, tmp_path):
    pki.issue(ca_dir, Role.HUB, "h1")
    crl_before = (ca_dir / "crl.pem").read_bytes()
    for target in ("deadbeef", f"spiffe://{FED}/hub/h9", "no-such-thing", str(tmp_path / "missing.pem")):
        with pytest.raises(PkiError, match=re.escape(target)):
            pki.revoke(ca_dir, target)
    other = tmp_path / "other"
    pki.init_ca(other, FED)
    foreign = pki.issue(other, Role.HUB, "h1")
    with pytest.raises(PkiError, match="was not issued by the CA"):
        pki.revoke(ca_dir, str(foreign.cert))
    with pytest.raises(ValueError, match="reason"):
        pki.revoke(ca_dir, "hubs/h1.pem", reason="because")
    assert (ca_dir / "crl.pem").read_bytes() == crl_before
    assert all(c.status == "valid" for c in pki.list_certs(ca_dir))


def test_expired_certificates_leave_the_crl(ca_dir):
    """A revoked certificate appears in the CRL only until it expires."""
    now = dt.datetime.now(dt.timezone.utc)
    expired = forge(ca_dir, "old", now - dt.timedelta(days=1))
    soon = forge(ca_dir, "soon", now + dt.timedelta(seconds=3))
    live = pki.issue(ca_dir, Role.HUB, "h1")
    serials = [format(c.serial_number, "x") for c in (expired, soon)]
    assert pki.revoke(ca_dir, serials[0]) == [serials[0]]  # recorded, though expired
    assert pki.revoke(ca_dir, serials[1]) == [serials[1]]
    assert pki.revoke(ca_dir, live.serial) == [live.serial]
    assert revoked_serials(ca_dir) == {serials[1], live.serial}
    time.sleep(max(0.0, (soon.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 1.1)
    n = crl_number(load_crl(ca_dir))
    assert pki.write_crl(ca_dir, days=2) == ca_dir / "crl.pem"
    crl = load_crl(ca_dir)
    assert revoked_serials(ca_dir) == {live.serial}
    assert crl_number(crl) == n + 1
    assert crl.is_signature_valid(load_cert(ca_dir / "ca.pem").public_key())
    assert abs(crl.next_update_utc - (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2))) < dt.timedelta(
        minutes=1)
    assert {c.serial: c.status for c in pki.list_certs(ca_dir)} == {
        serials[0]: "revoked", serials[1]: "revoked", live.serial: "revoked"}


def test_list_statuses(ca_dir):
    """valid, expiring (within 30 days), expired, revoked."""
    valid = pki.issue(ca_dir, Role.HUB, "h1")
    expiring = pki.issue(ca_dir, Role.USER, "a1", "bob", days=10)
    revoked = pki.issue(ca_dir, Role.ANTENNA, "a1")
    expired = forge(ca_dir, "old", dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
    pki.revoke(ca_dir, str(revoked.cert))
    rows = {c.serial: c for c in pki.list_certs(ca_dir)}
    assert {s: c.status for s, c in rows.items()} == {
        valid.serial: "valid", expiring.serial: "expiring", revoked.serial: "revoked",
        format(expired.serial_number, "x"): "expired"}
    assert set(pki.STATUSES) == {"valid", "expiring", "expired", "revoked"}
    assert rows[revoked.serial].identity == f"spiffe://{FED}/antenna/a1"
    assert rows[revoked.serial].path == revoked.cert


def test_crl_number_survives_a_lost_index(ca_dir):
    """The CRL number never goes back, even if index.json is lost."""
    pki.write_crl(ca_dir)
    pki.write_crl(ca_dir)
    n = crl_number(load_crl(ca_dir))
    (ca_dir / "index.json").unlink()
    pki.write_crl(ca_dir)
    assert crl_number(load_crl(ca_dir)) == n + 1


def test_write_crl_needs_the_ca_key(ca_dir):
    (ca_dir / "ca.key").unlink()
    with pytest.raises(PkiError, match="aifed certs init"):
        pki.write_crl(ca_dir)


# -- the CLI, in process -----------------------------------------------------------------------------

def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lifecycle(tmp_path, capsys):
    """init, issue operator, list, renew, revoke (twice), crl, and the errors, through federation.cli.main."""
    d = str(tmp_path / "pki")
    assert run(capsys, "certs", "init", "--dir", d, "--federation", FED)[0] == 0
    code, out, err = run(capsys, "certs", "issue", "--dir", d, "operator", "h1", "olga")
    assert code == 0, err
    assert f"spiffe://{FED}/operator/h1/olga" in out
    code, _, err = run(capsys, "certs", "issue", "--dir", d, "operator", "h1")
    assert code == 2 and "operator SITE NAME" in err
    assert run(capsys, "certs", "issue", "--dir", d, "hub", "h1", "--dns", "hub.example")[0] == 0
    first = load_cert(Path(d) / "hubs" / "h1.pem")
    old_serial = format(first.serial_number, "x")

    code, out, err = run(capsys, "certs", "renew", "--dir", d, "hub", "h1", "--days", "20")
    assert code == 0, err
    new = load_cert(Path(d) / "hubs" / "h1.pem")
    new_serial = format(new.serial_number, "x")
    assert new_serial != old_serial and new_serial in out and old_serial in out
    assert sans(new).get_values_for_type(x509.DNSName) == ["hub.example"]

    code, out, _ = run(capsys, "certs", "list", "--dir", d)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["IDENTITY", "SERIAL", "EXPIRES", "STATUS", "PATH"]
    row = next(line.split() for line in lines if new_serial in line)
    assert row[0] == f"spiffe://{FED}/hub/h1" and row[3] == "expiring" and row[4] == str(Path(d) / "hubs" / "h1.pem")
    assert any(old_serial in line and "valid" in line for line in lines)

    code, out, err = run(capsys, "certs", "revoke", "--dir", d, old_serial, "--reason", "superseded")
    assert code == 0, err
    assert f"Revoked serial {old_serial}" in out and "crl.pem" in out and "tls.crl" in out
    assert revoked_serials(Path(d)) == {old_serial}
    code, out, _ = run(capsys, "certs", "revoke", "--dir", d, old_serial)
    assert code == 0 and "Nothing new revoked" in out

    code, out, err = run(capsys, "certs", "revoke", "--dir", d, f"spiffe://{FED}/hub/h1")
    assert code == 0, err
    assert new_serial in out and old_serial not in out.split("Wrote")[0]
    n = crl_number(load_crl(Path(d)))
    code, out, err = run(capsys, "certs", "crl", "--dir", d, "--days", "3")
    assert code == 0, err
    assert crl_number(load_crl(Path(d))) == n + 1 and "systemd timer" in out
    assert revoked_serials(Path(d)) == {old_serial, new_serial}

    code, out, _ = run(capsys, "certs", "list", "--dir", d)
    assert [line.split()[3] for line in out.splitlines()[1:] if "/hub/h1" in line] == ["revoked", "revoked"]

    code, _, err = run(capsys, "certs", "revoke", "--dir", d, "cafe0123")
    assert code == 6 and "cafe0123" in err
    code, _, err = run(capsys, "certs", "revoke", "--dir", d, "hubs/h1.pem", "--reason", "whim")
    assert code == 2 and "whim" in err
    code, _, err = run(capsys, "certs", "renew", "--dir", d, "antenna", "a9")
    assert code == 6 and "aifed certs issue" in err
    code, _, err = run(capsys, "certs", "crl", "--dir", str(tmp_path / "nothing"))
    assert code == 7 and "aifed certs init" in err
