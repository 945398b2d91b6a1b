"""The federation PKI: a root CA and certificates that carry federation identities."""
