"""Create a federation root CA and issue certificates for hubs, antennas and users.

Every certificate is EC P-256 and carries its federation identity as a single
spiffe:// URI SAN. Daemon certificates (hub, antenna) also name the hosts they
serve on (DNS and IP SANs) and may act as TLS server and client; user
certificates are client-only. Private keys are written 0600 in a 0700 folder.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.identity import Identity, Role, check_federation_name, check_site_name, check_user_name

CA_CERT = "ca.pem"
CA_KEY = "ca.key"


class PkiError(Exception):
    """A PKI operation cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Issued:
    identity: Identity
    cert: Path
    key: Path
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def init_ca(directory: str | Path, federation: str, days: int = 3650, force: bool = False) -> Path:
    """Create the federation root CA in `directory`; refuse to replace an existing one unless forced."""
    check_federation_name(federation)
    d = _private_dir(Path(directory))
    if (d / CA_KEY).exists() and not force:
        raise PkiError(f"{d / CA_KEY} already exists; a new CA would orphan every certificate it issued "
                       "(use --force to replace it anyway)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"aifed root CA for {federation}")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(d / CA_KEY, key)
    _write_cert(d / CA_CERT, cert)
    return d / CA_CERT


def load_ca(directory: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
    d = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"no federation CA in {d} ({exc.filename} is missing): run `aifed certs init` first") from None
    federation = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    return cert, key, str(federation)


def identity_for(federation: str, role: Role, site: str, name: str = "") -> Identity:
    check_site_name(site)
    if role is Role.USER:
        check_user_name(name)
    elif name:
        raise PkiError(f"a {role.value} certificate takes no user name")
    return Identity(federation, role, site, name)


def cert_paths(directory: str | Path, identity: Identity) -> tuple[Path, Path]:
    """Where the certificate and key of an identity live under the PKI folder."""
    stem = f"{identity.site}-{identity.name}" if identity.role is Role.USER else identity.site
    folder = Path(directory) / f"{identity.role.value}s"
    return folder / f"{stem}.pem", folder / f"{stem}.key"


def issue(directory: str | Path, role: Role, site: str, name: str = "", *, dns: tuple[str, ...] = ("localhost",),
          ips: tuple[str, ...] = ("127.0.0.1", "::1"), days: int = 365) -> Issued:
    """Issue a certificate for a hub, an antenna or a user, signed by the CA in `directory`."""
    ca_cert, ca_key, federation = load_ca(directory)
    identity = identity_for(federation, role, site, name)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role is not Role.USER:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        sans += [x509.DNSName(h) for h in dns]
        try:
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        except ValueError as exc:
            raise PkiError(str(exc)) from None
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{site}/{name}" if name else site)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = cert_paths(directory, identity)
    _private_dir(cert_path.parent)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return Issued(identity, cert_path, key_path, not_after)


def list_certs(directory: str | Path) -> list[tuple[Path, str, dt.datetime]]:
    """Every issued certificate under the PKI folder: path, identity URI, expiry."""
    out = []
    for path in sorted(Path(directory).glob("*s/*.pem")):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        out.append((path, uris[0] if uris else "", cert.not_valid_after_utc))
    return out
