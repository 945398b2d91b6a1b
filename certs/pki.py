"""Create a federation root CA, issue, renew and revoke certificates for hubs, antennas, users and operators.

Every certificate is EC P-256, signed directly by the root CA (no intermediates), and carries its federation
identity as a single spiffe:// URI SAN. Daemon certificates (hub, antenna) also name the hosts they serve on
(DNS and IP SANs) and may act as TLS server and client; user and operator certificates are client-only.
Private keys are written 0600 in a 0700 folder.

The PKI folder holds:

    ca.pem, ca.key          the root CA (ca.key stays with the operator, offline)
    crl.pem                 the certificate revocation list, signed by the CA (goes to every daemon)
    index.json              one entry per certificate ever issued: serial, identity, validity, revocation
    hubs/ antennas/ users/ operators/   the current certificate and key of each identity
    services/               certificates of services the daemons use (etcd, MQTT): `issue_service`

Folders made before index.json existed still work: certificates found on disk but missing from the index are
added to it (if the CA signed them) the first time the index is read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.identity import Identity, Role, check_federation_name, check_site_name, check_user_name

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CRL = "crl.pem"
INDEX = "index.json"
LOCK = ".lock"
SERVICE = "service"  # the OU and identity path of service certificates (etcd, MQTT): not a federation role
SERVICES = "services"  # their folder
EXPIRING_WITHIN = dt.timedelta(days=30)  # `list` calls a certificate "expiring" this close to its end
CRL_DAYS = 7
STATUSES = ("valid", "expiring", "expired", "revoked")
# RFC 5280 reason codes an operator may give (certificateHold and removeFromCRL are not supported: a revocation
# here is final).
REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "ca_compromise": x509.ReasonFlags.ca_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "privilege_withdrawn": x509.ReasonFlags.privilege_withdrawn,
}
# Roles whose identity names a person under a site (user/<antenna>/<name>, operator/<site>/<name>). They get
# client-only certificates. OPERATOR comes from federation.identity; the guard keeps older trees importable.
NAMED_ROLES = frozenset(r for r in (Role.USER, getattr(Role, "OPERATOR", None)) if r is not None)
_HEX = re.compile(r"^(0x)?[0-9a-f:]+$")


class PkiError(Exception):
    """A PKI operation cannot be done; the message says why and what to do."""


class PkiNotFound(PkiError):
    """The certificate, serial or identity named does not exist in this PKI folder."""


@dataclass(frozen=True)
class Issued:
    identity: Identity
    cert: Path
    key: Path
    not_after: dt.datetime
    serial: str = ""  # hex, lower case
    replaced: str = ""  # renew: the serial of the certificate this one replaced (it stays valid until it expires)


@dataclass(frozen=True)
class CertInfo:
    """One issued certificate, as `list_certs` reports it."""

    path: Path  # where it was written; a renewed certificate's file now holds its successor (current is False)
    identity: str  # the spiffe:// URI
    serial: str  # hex, lower case
    not_after: dt.datetime
    status: str  # one of STATUSES
    role: str = ""
    not_before: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    reason: str | None = None
    current: bool = True  # the file at `path` holds this certificate (False once it was renewed)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _hex(serial: int) -> str:
    return format(serial, "x")


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _atomic_write(path, _key_bytes(key), 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _check_days(days: int | float, what: str = "--days") -> None:
    if not days > 0:
        raise ValueError(f"{what} must be at least 1, not {days}")


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """Serialise `aifed certs` commands on one PKI folder (index and CRL number are read-modify-write)."""
    fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the index ---------------------------------------------------------------------------------------------

def _empty_index(crl_number: int = 0) -> dict:
    return {"version": 1, "crl_number": crl_number, "certs": []}


def _entry(d: Path, cert: x509.Certificate, path: Path) -> dict:
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return {"serial": _hex(cert.serial_number), "identity": uris[0] if uris else "",
            "role": str(ou[0].value) if ou else "", "cert": path.relative_to(d).as_posix(),
            "not_before": _iso(cert.not_valid_before_utc), "not_after": _iso(cert.not_valid_after_utc),
            "revoked_at": None, "reason": None}


def _cert_files(d: Path) -> list[Path]:
    return sorted(p for folder in (*(f"{r.value}s" for r in Role), SERVICES) for p in (d / folder).glob("*.pem"))


def _load_ca_cert(d: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
    except FileNotFoundError:
        raise PkiError(f"no federation CA in {d} ({d / CA_CERT} is missing): run `aifed certs init` first") from None


def _load_index(d: Path, ca_cert: x509.Certificate) -> dict:
    """The index, completed with any certificate on disk that the CA signed but the index does not list (a
    folder made before index.json existed). Without index.json, revocations are recovered from crl.pem."""
    try:
        index = json.loads((d / INDEX).read_text())
    except FileNotFoundError:
        index = _empty_index()
    except ValueError as exc:
        raise PkiError(f"{d / INDEX} is corrupt ({exc}): restore it from a backup (if you move it away, it is "
                       "rebuilt from the certificates on disk and the revocations still listed in crl.pem)") from None
    revoked = {} if (d / INDEX).exists() else _crl_revocations(d, ca_cert)
    known = {int(e["serial"], 16) for e in index["certs"]}
    for path in _cert_files(d):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            continue
        if cert.serial_number in known:
            continue
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):  # another CA's (e.g. from before `init --force`)
            continue
        entry = _entry(d, cert, path)
        if cert.serial_number in revoked:
            entry["revoked_at"], entry["reason"] = revoked[cert.serial_number]
        index["certs"].append(entry)
        known.add(cert.serial_number)
    for serial, (revoked_at, reason) in revoked.items():
        if serial not in known:  # a revoked certificate whose file was since renewed: keep it revoked, and in
            # the CRL until the CA itself expires (its own expiry is not known any more)
            index["certs"].append({"serial": _hex(serial), "identity": "", "role": "", "cert": "", "not_before": None,
                                   "not_after": _iso(ca_cert.not_valid_after_utc), "revoked_at": revoked_at,
                                   "reason": reason})
    return index


def _crl_revocations(d: Path, ca_cert: x509.Certificate) -> dict[int, tuple[str, str]]:
    """serial -> (revoked_at, reason) from the CA's current crl.pem, if there is a valid one."""
    try:
        crl = x509.load_pem_x509_crl((d / CRL).read_bytes())
    except (OSError, ValueError):
        return {}
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        return {}
    names = {flag: name for name, flag in REASONS.items()}
    out = {}
    for r in crl:
        try:
            reason = names.get(r.extensions.get_extension_for_class(x509.CRLReason).value.reason, "unspecified")
        except x509.ExtensionNotFound:
            reason = "unspecified"
        out[r.serial_number] = (_iso(r.revocation_date_utc), reason)
    return out


def _save_index(d: Path, index: dict) -> None:
    _atomic_write(d / INDEX, json.dumps(index, indent=1).encode() + b"\n", 0o600)


def _status(entry: dict, now: dt.datetime) -> str:
    if entry.get("revoked_at"):
        return "revoked"
    left = _parse_iso(entry["not_after"]) - now
    if left <= dt.timedelta(0):
        return "expired"
    return "expiring" if left <= EXPIRING_WITHIN else "valid"


# -- the CA and the CRL ------------------------------------------------------------------------------------

def init_ca(directory: str | Path, federation: str, days: int = 3650, force: bool = False) -> Path:
    """Create the federation root CA in `directory` (and an empty CRL); refuse to replace an existing one unless
    forced. Forcing starts a new index: the previous one is kept as index.json.replaced-<time>."""
    check_federation_name(federation)
    _check_days(days)
    d = _private_dir(Path(directory))
    if (d / CA_KEY).exists() and not force:
        raise PkiError(f"{d / CA_KEY} already exists; a new CA would orphan every certificate it issued "
                       "(use --force to replace it anyway)")
    with _locked(d):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"aifed root CA for {federation}")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        crl_number = _last_crl_number(d)
        if (d / INDEX).exists():
            try:
                crl_number = max(crl_number, int(json.loads((d / INDEX).read_text()).get("crl_number", 0)))
            except (ValueError, AttributeError):
                pass
            os.replace(d / INDEX, d / f"{INDEX}.replaced-{now:%Y%m%dT%H%M%SZ}")
        _write_key(d / CA_KEY, key)
        _write_cert(d / CA_CERT, cert)
        index = _empty_index(crl_number)
        _sign_crl(d, cert, key, index, CRL_DAYS)
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


def _last_crl_number(d: Path) -> int:
    try:
        crl = x509.load_pem_x509_crl((d / CRL).read_bytes())
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return 0


def _sign_crl(d: Path, ca_cert: x509.Certificate, ca_key, index: dict, days: int | float) -> Path:
    """Sign a CRL of every revoked, unexpired certificate in `index`, with the next CRL number; save the index
    (which holds the counter), then the CRL."""
    now = _now()
    number = max(int(index.get("crl_number", 0)), _last_crl_number(d)) + 1
    index["crl_number"] = number
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now).next_update(now + dt.timedelta(days=days))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(aki, critical=False))
    for e in index["certs"]:
        if not e.get("revoked_at") or _parse_iso(e["not_after"]) <= now:
            continue
        revoked = (x509.RevokedCertificateBuilder().serial_number(int(e["serial"], 16))
                   .revocation_date(_parse_iso(e["revoked_at"])))
        if e.get("reason") and e["reason"] != "unspecified":  # RFC 5280: omit the reason code when unspecified
            revoked = revoked.add_extension(x509.CRLReason(REASONS[e["reason"]]), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    _save_index(d, index)
    _atomic_write(d / CRL, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return d / CRL


def write_crl(directory: str | Path, days: int = CRL_DAYS) -> Path:
    """(Re)sign `<dir>/crl.pem`: every revoked certificate that has not expired, valid for `days` (next_update),
    with a CRL number one above the last. Run it again before next_update (e.g. from a systemd timer)."""
    _check_days(days)
    d = Path(directory)
    ca_cert, ca_key, _ = load_ca(d)
    with _locked(d):
        index = _load_index(d, ca_cert)
        return _sign_crl(d, ca_cert, ca_key, index, days)


def read_crl(directory: str | Path) -> x509.CertificateRevocationList:
    """The CRL currently in `<dir>/crl.pem`."""
    path = Path(directory) / CRL
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        raise PkiNotFound(f"{path} does not exist: run `aifed certs crl --dir {directory}`") from None


# -- issuing and renewing ----------------------------------------------------------------------------------

def identity_for(federation: str, role: Role, site: str, name: str = "") -> Identity:
    check_site_name(site)
    if role in NAMED_ROLES:
        check_user_name(name)
    elif name:
        raise PkiError(f"a {role.value} certificate takes no user name")
    return Identity(federation, role, site, name)


def cert_paths(directory: str | Path, identity: Identity) -> tuple[Path, Path]:
    """Where the certificate and key of an identity live under the PKI folder."""
    stem = f"{identity.site}-{identity.name}" if identity.role in NAMED_ROLES else identity.site
    folder = Path(directory) / f"{identity.role.value}s"
    return folder / f"{stem}.pem", folder / f"{stem}.key"


def _sign(ca_cert: x509.Certificate, ca_key, federation: str, identity: Identity, dns: tuple[str, ...],
          ips: tuple[str, ...], days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    role, site, name = identity.role, identity.site, identity.name
    return _sign_uri(ca_cert, ca_key, federation, identity.uri, role.value, f"{site}/{name}" if name else site,
                     role not in NAMED_ROLES, dns, ips, days)


def _sign_uri(ca_cert: x509.Certificate, ca_key, federation: str, uri: str, ou: str, cn: str, server: bool,
              dns: tuple[str, ...], ips: tuple[str, ...], days: int
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and its certificate for the identity `uri`, issued for the role `ou`; a `server` certificate
    may also act as TLS server and names its hosts."""
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        sans += [x509.DNSName(h) for h in dns]
        try:
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        except ValueError as exc:
            raise PkiError(str(exc)) from None
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
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
    return cert, key


def _store(d: Path, ca_cert: x509.Certificate, identity: Identity, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey, replaced: str = "") -> Issued:
    """Write key then certificate (each atomically, key first: a daemon that reloads when the certificate
    changes finds the new key already there), and record the certificate in the index."""
    cert_path, key_path = cert_paths(d, identity)
    serial = _write_pair(d, ca_cert, cert_path, key_path, cert, key)
    return Issued(identity, cert_path, key_path, cert.not_valid_after_utc, serial, replaced)


def _write_pair(d: Path, ca_cert: x509.Certificate, cert_path: Path, key_path: Path, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> str:
    """Write key then certificate and record the certificate in the index; its serial (hex)."""
    _private_dir(cert_path.parent)
    index = _load_index(d, ca_cert)
    key_tmp = key_path.with_name(key_path.name + ".tmp")
    cert_tmp = cert_path.with_name(cert_path.name + ".tmp")
    _atomic_write(key_tmp, _key_bytes(key), 0o600)  # both files ready before either is replaced
    _atomic_write(cert_tmp, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    os.replace(key_tmp, key_path)
    os.replace(cert_tmp, cert_path)
    index["certs"].append(_entry(d, cert, cert_path))
    _save_index(d, index)
    return _hex(cert.serial_number)


def issue(directory: str | Path, role: Role, site: str, name: str = "", *, dns: tuple[str, ...] = ("localhost",),
          ips: tuple[str, ...] = ("127.0.0.1", "::1"), days: int = 365) -> Issued:
    """Issue a certificate for a hub, an antenna, a user or an operator, signed by the CA in `directory`, and
    record it in the index. An existing certificate of the same identity is replaced on disk but stays valid
    until it expires (revoke it if it must not)."""
    d = Path(directory)
    ca_cert, ca_key, federation = load_ca(d)
    identity = identity_for(federation, role, site, name)
    _check_days(days)
    cert, key = _sign(ca_cert, ca_key, federation, identity, dns, ips, days)
    with _locked(d):
        issued = _store(d, ca_cert, identity, cert, key)
        if not (d / CRL).exists():  # a folder from before CRLs: give its daemons one to load
            index = _load_index(d, ca_cert)
            _sign_crl(d, ca_cert, ca_key, index, CRL_DAYS)
    return issued


def issue_service(directory: str | Path, name: str, *, dns: tuple[str, ...] = ("localhost",),
                  ips: tuple[str, ...] = ("127.0.0.1",), days: int = 365) -> tuple[Path, Path]:
    """Issue a certificate for a service the daemons use but that is not a federation party (the etcd server,
    an MQTT broker), signed by the CA in `directory` and recorded in the index: identity
    spiffe://<federation>/service/<name>, subject OU "service", TLS server and client (etcd's gateway dials
    itself with its server certificate), SANs `dns` and `ips`. Daemons refuse it as a caller: "service" is no
    role (federation.identity). Returns the certificate and key paths, services/<name>.pem and .key."""
    d = Path(directory)
    ca_cert, ca_key, federation = load_ca(d)
    check_site_name(name)
    _check_days(days)
    cert, key = _sign_uri(ca_cert, ca_key, federation, f"spiffe://{federation}/{SERVICE}/{name}", SERVICE, name,
                          True, tuple(dns), tuple(ips), days)
    cert_path, key_path = d / SERVICES / f"{name}.pem", d / SERVICES / f"{name}.key"
    with _locked(d):
        _write_pair(d, ca_cert, cert_path, key_path, cert, key)
    return cert_path, key_path


def renew(directory: str | Path, role: Role, site: str, name: str = "", days: int = 365) -> Issued:
    """A new key and certificate for an identity that has one, with the same DNS and IP SANs, written over the
    same paths (daemons watching the files take it up). The previous certificate stays valid until it expires;
    `Issued.replaced` names its serial, to revoke it if needed."""
    d = Path(directory)
    ca_cert, ca_key, federation = load_ca(d)
    identity = identity_for(federation, role, site, name)
    _check_days(days)
    cert_path, _ = cert_paths(d, identity)
    try:
        old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise PkiNotFound(f"there is no certificate for {identity.uri} to renew ({cert_path} does not exist): "
                          "issue one with `aifed certs issue`") from None
    except ValueError as exc:
        raise PkiError(f"cannot read {cert_path} to renew it ({exc}): issue a new one with `aifed certs issue`") \
            from None
    try:
        sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(sans.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    cert, key = _sign(ca_cert, ca_key, federation, identity, dns, ips, days)
    with _locked(d):
        return _store(d, ca_cert, identity, cert, key, replaced=_hex(old.serial_number))


# -- revoking and listing ----------------------------------------------------------------------------------

def _reason(reason: str) -> str:
    r = reason.strip().replace("-", "_").lower()
    r = {"keycompromise": "key_compromise", "cacompromise": "ca_compromise",
         "affiliationchanged": "affiliation_changed", "cessationofoperation": "cessation_of_operation",
         "privilegewithdrawn": "privilege_withdrawn"}.get(r, r)
    if r not in REASONS:
        raise ValueError(f"revocation reason {reason!r} is not one of: {', '.join(REASONS)}")
    return r


def _select(d: Path, index: dict, target: str) -> list[dict]:
    """The index entries a revoke target names: a certificate file, a serial (hex) or a spiffe:// identity."""
    entries = index["certs"]
    if target.startswith("spiffe://"):
        found = [e for e in entries if e["identity"] == target]
        if not found:
            raise PkiNotFound(f"no certificate for identity {target} was issued by the CA in {d}")
        return found
    for candidate in (Path(target), d / target):
        if candidate.is_file():
            try:
                cert = x509.load_pem_x509_certificate(candidate.read_bytes())
            except ValueError:
                raise PkiError(f"{target} is not a PEM certificate") from None
            found = [e for e in entries if int(e["serial"], 16) == cert.serial_number]
            if not found:
                raise PkiNotFound(f"certificate {target} (serial {_hex(cert.serial_number)}) was not issued by "
                                  f"the CA in {d}")
            return found
    text = target.strip().lower()
    if _HEX.fullmatch(text) and text.replace(":", "").removeprefix("0x"):
        serial = int(text.replace(":", "").removeprefix("0x"), 16)
        found = [e for e in entries if int(e["serial"], 16) == serial]
        if not found:
            raise PkiNotFound(f"no certificate with serial {target} was issued by the CA in {d}")
        return found
    if "/" in target or target.endswith(".pem"):
        raise PkiNotFound(f"there is no certificate file {target} (nor {d / target})")
    raise PkiNotFound(f"unknown revoke target {target!r}: give a certificate file, a serial number (hex, as "
                      "`aifed certs list` shows it) or a spiffe:// identity")


def revoke(directory: str | Path, target: str, reason: str = "unspecified", *, crl_days: int = CRL_DAYS) -> list[str]:
    """Revoke the certificate(s) `target` names, then re-sign the CRL. `target` is a certificate path, a serial
    (hex) or an identity URI (every unexpired, unrevoked certificate of that identity). Returns the serials
    revoked now; certificates already revoked are left as they were (so revoking twice returns [])."""
    reason = _reason(reason)
    d = Path(directory)
    ca_cert, ca_key, _ = load_ca(d)
    with _locked(d):
        index = _load_index(d, ca_cert)
        now = _now()
        chosen = _select(d, index, str(target))
        if str(target).startswith("spiffe://"):
            chosen = [e for e in chosen if _parse_iso(e["not_after"]) > now]
        done = []
        for e in chosen:
            if e.get("revoked_at"):
                continue
            e["revoked_at"], e["reason"] = _iso(now), reason
            done.append(e["serial"])
        _sign_crl(d, ca_cert, ca_key, index, crl_days)
    return done


def list_certs(directory: str | Path) -> list[CertInfo]:
    """Every certificate the CA issued (from the index; certificates only on disk are included too), oldest
    first per identity, with its status: valid, expiring (within 30 days), expired or revoked."""
    d = Path(directory)
    if not d.is_dir():
        raise PkiError(f"{d} is not a PKI folder: run `aifed certs init` first")
    index = _load_index(d, _load_ca_cert(d))
    on_disk = {}
    for path in _cert_files(d):
        try:
            on_disk[path.relative_to(d).as_posix()] = x509.load_pem_x509_certificate(path.read_bytes()).serial_number
        except ValueError:
            pass
    now = _now()
    rows = [CertInfo(path=d / e["cert"], identity=e["identity"] or "(unknown)", serial=e["serial"],
                     not_after=_parse_iso(e["not_after"]), status=_status(e, now), role=e.get("role", ""),
                     not_before=_parse_iso(e["not_before"]) if e.get("not_before") else None,
                     revoked_at=_parse_iso(e["revoked_at"]) if e.get("revoked_at") else None,
                     reason=e.get("reason"), current=on_disk.get(e["cert"]) == int(e["serial"], 16))
            for e in index["certs"]]
    return sorted(rows, key=lambda r: (r.identity, r.not_after, r.serial))
