"""The federation's certificate revocation list, as a daemon enforces it.

The operator revokes a certificate with `aifed certs revoke`, which signs a new CRL, and copies `crl.pem` to the
daemons. Each daemon re-reads the file named by `tls.crl` when it changes (checked every `tls.reload`), verifies
its signature against the federation CA, and from then on refuses every call made with a revoked certificate,
on connections old and new, without a restart.

A CRL that cannot be read or whose signature does not verify is logged and ignored: the daemon keeps the list it
had (never an empty one). A CRL past its next-update time is still enforced, with a warning: its revocations
remain true, only newer ones may be missing.
"""

from __future__ import annotations

import datetime as dt
import logging

from cryptography import x509

from federation.tls import TlsFiles

log = logging.getLogger(__name__)


class CrlError(Exception):
    """A CRL file that cannot be trusted: unreadable, not a CRL, or not signed by the federation CA."""


def load_crl(crl_pem: bytes, ca_pem: bytes) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise CrlError(f"not a PEM certificate revocation list: {exc}") from None
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):
        raise CrlError("not signed by the federation CA")
    return crl


class Revocations:
    """The serial numbers revoked by the CRL in `tls.crl` (none if the daemon has no CRL configured)."""

    def __init__(self, tls: TlsFiles):
        self.tls = tls
        self.serials: frozenset[int] = frozenset()
        self.number: int | None = None  # the CRL number of the list in force
        self.next_update: dt.datetime | None = None
        self._stamp: tuple | None = None
        self._stale_warned = False

    def revoked(self, serial: int) -> bool:
        return serial in self.serials

    def refresh(self) -> bool:
        """Re-read the CRL if its file changed; True if a new list is now in force."""
        if self.tls.crl is None:
            return False
        stamp = self.tls.stamp()
        if stamp == self._stamp:
            self._warn_if_stale()
            return False
        self._stamp = stamp  # a bad file is reported once, and read again when it changes
        try:
            crl = load_crl(self.tls.crl.read_bytes(), self.tls.ca.read_bytes())
        except (OSError, CrlError) as exc:
            log.error("CRL %s not loaded, keeping the %d revocation(s) in force: %s", self.tls.crl,
                      len(self.serials), exc)
            return False
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        if self.number is not None and number is not None and number < self.number:
            log.error("CRL %s has number %d, older than the list in force (%d): ignored", self.tls.crl, number,
                      self.number)
            return False
        self.serials = frozenset(r.serial_number for r in crl)
        self.number, self.next_update, self._stale_warned = number, crl.next_update_utc, False
        log.info("CRL %s loaded: %d revoked certificate(s), next update %s", self.tls.crl, len(self.serials),
                 f"{self.next_update:%Y-%m-%d %H:%M} UTC" if self.next_update else "not set")
        self._warn_if_stale()
        return True

    def _warn_if_stale(self) -> None:
        stale = self.next_update is not None and dt.datetime.now(dt.timezone.utc) > self.next_update
        if stale and not self._stale_warned:
            log.warning("the CRL %s is past its next update (%s UTC): still enforced, but revocations made since "
                        "may be missing; run `aifed certs crl` and copy crl.pem here", self.tls.crl,
                        f"{self.next_update:%Y-%m-%d %H:%M}")
            self._stale_warned = True
