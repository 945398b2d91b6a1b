"""TLS material for daemons and clients: one CA, one certificate and its key, all PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsFiles:
    """Paths to the federation CA certificate, this party's certificate and its private key."""

    ca: Path
    cert: Path
    key: Path

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

        cert = x509.load_pem_x509_certificate(self.read()[1])
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return ""
        uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
        return uris[0] if len(uris) == 1 else ""

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require and verify a client certificate from the federation CA."""
        ca, cert, key = self.read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self.read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
