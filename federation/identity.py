"""Federation identities: who a peer is, read from the URI SAN of its certificate.

Identities are SPIFFE-style URIs on the federation's trust domain:
`spiffe://<federation>/hub/<site>`, `spiffe://<federation>/antenna/<site>` and
`spiffe://<federation>/user/<antenna>/<name>` and `spiffe://<federation>/operator/<site>/<name>`.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_USER = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class Role(enum.Enum):
    HUB = "hub"
    ANTENNA = "antenna"
    USER = "user"
    OPERATOR = "operator"

    @property
    def named(self) -> bool:
        """Users and operators are people: their identity names a site and a person."""
        return self in (Role.USER, Role.OPERATOR)


@dataclass(frozen=True)
class Identity:
    """A typed federation identity. For a user, `site` is the antenna that vouches for them; for an operator,
    the hub or antenna site they run."""

    federation: str
    role: Role
    site: str
    name: str = ""

    @functools.cached_property  # asked several times per job; the identity never changes
    def uri(self) -> str:
        tail = f"{self.site}/{self.name}" if self.role.named else self.site
        return f"spiffe://{self.federation}/{self.role.value}/{tail}"

    def __str__(self) -> str:
        return self.uri


def check_site_name(name: str) -> str:
    """Site names are DNS-label-like: lower-case letters, digits and dashes."""
    if not _LABEL.fullmatch(name):
        raise ValueError(f"site name {name!r} is not valid: use 1-63 lower-case letters, digits and '-'")
    return name


def check_user_name(name: str) -> str:
    if not _USER.fullmatch(name):
        raise ValueError(f"user name {name!r} is not valid: use lower-case letters, digits, '.', '_' and '-'")
    return name


def check_federation_name(name: str) -> str:
    if not _DOMAIN.fullmatch(name):
        raise ValueError(f"federation name {name!r} is not valid: use a lower-case domain such as eurohpc.example")
    return name


@functools.lru_cache(maxsize=4096)
def parse_identity(uri: str) -> Identity:
    """Parse a SPIFFE URI into an Identity; raise ValueError saying what is wrong."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri!r} is not a spiffe:// URI")
    federation, _, path = uri[len(prefix):].partition("/")
    parts = path.split("/")
    check_federation_name(federation)
    try:
        role = Role(parts[0])
    except ValueError:
        raise ValueError(f"{uri!r} names an unknown role {parts[0]!r}") from None
    if role.named:
        if len(parts) != 3:
            where = "antenna" if role is Role.USER else "site"
            raise ValueError(f"{uri!r}: {article(role.value)} identity is "
                             f"spiffe://<federation>/{role.value}/<{where}>/<name>")
        return Identity(federation, role, check_site_name(parts[1]), check_user_name(parts[2]))
    if len(parts) != 2:
        raise ValueError(f"{uri!r}: {article(role.value)} identity is spiffe://<federation>/{role.value}/<site>")
    return Identity(federation, role, check_site_name(parts[1]))


def article(noun: str) -> str:
    """"a hub", "an antenna", "an operator", "a user"."""
    return ("an " if noun[:1] in "aeio" else "a ") + noun
