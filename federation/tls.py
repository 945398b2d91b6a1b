"""TLS material for daemons and clients: one CA, one certificate and its key, all PEM files, and optionally the
federation's certificate revocation list (CRL).

Daemons pick up renewed files without a restart: a server hands new certificates to every new connection
(`ReloadingServerCredentials`), and `TlsFiles.stamp()` tells a client when to build new channels.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class TlsFiles:
    """Paths to the federation CA certificate, this party's certificate and its private key."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None  # the federation's CRL (PEM), re-read when it changes
    reload_s: int = 30  # how often a daemon looks for renewed certificates and a new CRL

    def stamp(self) -> tuple:
        """Changes whenever one of the files is replaced or rewritten (a renewal, a new CRL)."""
        out = []
        for path in (self.ca, self.cert, self.key, self.crl):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st else None)
        return tuple(out)

    def not_after(self) -> dt.datetime:
        """When this party's certificate expires."""
        from cryptography import x509

        return x509.load_pem_x509_certificate(self.read()[1]).not_valid_after_utc

    def expiry_warning(self, days: int = EXPIRY_WARNING_DAYS) -> str:
        """A warning if the certificate or the CA expires within `days`, else ""."""
        from cryptography import x509

        ca_pem, cert_pem, _ = self.read()
        now = dt.datetime.now(dt.timezone.utc)
        for label, pem, path in (("certificate", cert_pem, self.cert), ("federation CA", ca_pem, self.ca)):
            left = x509.load_pem_x509_certificate(pem).not_valid_after_utc - now
            if left < dt.timedelta(days=days):
                return (f"{label} {path} expires in {max(left.days, 0)} day(s), on "
                        f"{now + left:%Y-%m-%d %H:%M} UTC: renew it (aifed certs renew) before it does")
        return ""

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Read all three, or raise FileNotFoundError/PermissionError naming the missing one."""
        out = []
        for label, path in (("CA certificate", self.ca), ("certificate", self.cert), ("private key", self.key)):
            try:
                data = Path(path).read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"{label} {path} does not exist") from None
            except PermissionError:
                raise PermissionError(f"{label} {path} is not readable") from None
            if b"-----BEGIN" not in data:
                raise ValueError(f"{label} {path} is not a PEM file")
            out.append(data)
        return out[0], out[1], out[2]

    def check(self) -> None:
        """Raise ValueError if the key does not belong to the certificate or the certificate is not valid now."""
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        _, cert_pem, key_pem = self.read()
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot load {self.cert} or {self.key}: {exc}") from None
        pub = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*pub) != cert.public_key().public_bytes(*pub):
            raise ValueError(f"private key {self.key} does not belong to certificate {self.cert}")
        now = dt.datetime.now(dt.timezone.utc)
        if now > cert.not_valid_after_utc:
            raise ValueError(f"certificate {self.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        if now < cert.not_valid_before_utc:
            raise ValueError(f"certificate {self.cert} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}")

    def identity_uri(self) -> str:
        """The certificate's spiffe:// URI SAN ("" if it has none)."""
        from cryptography import x509

        return spiffe_uri(x509.load_pem_x509_certificate(self.read()[1]))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require and verify a client certificate from the federation CA, and that take up
        renewed files for every new connection."""
        return ReloadingServerCredentials(self).credentials()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self.read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


_expiry: dict[Path, tuple[tuple | None, float]] = {}  # certificate path -> (file stamp, expiry)


def cert_expires(tls: TlsFiles) -> float:
    """When the certificate in `tls.cert` expires (Unix time), re-read only when the file changes. While the file
    cannot be read (a renewal half-written), the last expiry read stands (0.0 if none ever was)."""
    from cryptography import x509

    stamp = tls.stamp()[1]
    known = _expiry.get(tls.cert)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        value = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return known[1] if known is not None else 0.0
    _expiry[tls.cert] = (stamp, value)
    return value


class ReloadingServerCredentials:
    """Server credentials that follow the files: grpc calls `fetch` before each new TLS handshake, and gets a
    new configuration when the CA, certificate or key changed (checked at most once a second). A half-written or
    mismatched set is logged and ignored: the server keeps serving with what it had."""

    def __init__(self, tls: TlsFiles):
        self.tls = tls
        self._stamp = tls.stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _configuration(self):
        ca, cert, key = self.tls.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._configuration(), self.fetch,
                                                   require_client_authentication=True)

    def fetch(self):
        now = time.monotonic()
        with self._lock:
            if now - self._checked < 1.0:
                return None
            self._checked = now
            stamp = self.tls.stamp()
            if stamp[:3] == self._stamp[:3]:
                return None
            try:
                self.tls.check()
                configuration = self._configuration()
            except (OSError, ValueError) as exc:
                log.error("renewed TLS files not taken up, still serving with the previous ones: %s", exc)
                return None
            self._stamp = stamp
        log.info("TLS certificate reloaded from %s (expires %s)", self.tls.cert, f"{self.tls.not_after():%Y-%m-%d}")
        return configuration


def spiffe_uri(cert) -> str:
    """The one spiffe:// URI SAN of an x509.Certificate ("" if it has none, or several)."""
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else ""
