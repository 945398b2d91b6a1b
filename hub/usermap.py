"""Which local account runs a forwarded job: the hub's user map.

A hub that serves many users names, in a TOML file, the local account each (antenna, user, project) runs as:

    [[map]]
    antenna = "antenna-a"
    user = "alice"          # "*": any user of that antenna
    project = "climate-7"   # "*": any project, including none; "" : jobs without a project
    account = "ext_alice"   # the local account (Slurm: --account)

Entries are tried in order; the first that matches wins, so put specific entries before wildcards. A job that
matches none is refused with PERMISSION_DENIED and a reason that names what to add. The file is re-read when it
changes (a bad edit is logged and the previous map kept). Without a user map (the embedded default) every job of
an antenna's own users is accepted and runs under the hub's account.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from federation.config import read_toml
from federation.errors import ConfigError, PermissionDenied
from federation.identity import check_site_name, check_user_name

log = logging.getLogger(__name__)

_ACCOUNT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class Entry:
    antenna: str
    user: str
    project: str
    account: str

    def matches(self, antenna: str, user: str, project: str) -> bool:
        return (self.antenna == antenna and self.user in ("*", user) and self.project in ("*", project))


def load(path: Path) -> tuple[Entry, ...]:
    """Parse a user map; raise ConfigError naming the entry and key that is wrong."""
    data = read_toml(path, "user map")
    unknown = sorted(set(data) - {"map"})
    if unknown:
        raise ConfigError(path, unknown[0], "is not a known setting; a user map has [[map]] tables only")
    raw = data.get("map", [])
    if not isinstance(raw, list):
        raise ConfigError(path, "map", "must be an array of tables: [[map]]")
    entries = []
    for i, item in enumerate(raw):
        where = f"map[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(path, where, "must be a table")
        extra = sorted(set(item) - {"antenna", "user", "project", "account"})
        if extra:
            raise ConfigError(path, f"{where}.{extra[0]}", "is not a known key (antenna, user, project, account)")
        values = {}
        for key in ("antenna", "user", "project", "account"):
            value = item.get(key, "*" if key in ("user", "project") else None)
            if not isinstance(value, str):
                raise ConfigError(path, f"{where}.{key}", "is required and must be a string")
            values[key] = value
        try:
            check_site_name(values["antenna"])
            if values["user"] != "*":
                check_user_name(values["user"])
        except ValueError as exc:
            raise ConfigError(path, where, str(exc)) from None
        if not values["account"] or not set(values["account"]) <= _ACCOUNT_CHARS or len(values["account"]) > 64:
            raise ConfigError(path, f"{where}.account", "must be 1-64 letters, digits, '.', '_' or '-'")
        if len(values["project"]) > 128:
            raise ConfigError(path, f"{where}.project", "is longer than 128 characters")
        entries.append(Entry(**values))
    return tuple(entries)


class UserMap:
    """The map in force, re-read when its file changes."""

    def __init__(self, path: Path, site: str):
        self.path, self.site = Path(path), site
        self.entries = load(self.path)
        self._stamp = self._stat()

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def refresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.entries = load(self.path)
        except ConfigError as exc:
            log.error("user map not reloaded, keeping the previous one (%d entries): %s", len(self.entries), exc)
            return
        log.info("user map %s reloaded: %d entries", self.path, len(self.entries))

    def account(self, antenna: str, user: str, project: str) -> str:
        """The local account, or PermissionDenied saying what the site would have to add."""
        for entry in self.entries:
            if entry.matches(antenna, user, project):
                return entry.account
        raise PermissionDenied(
            f"site {self.site} has no local account for user {user} of antenna {antenna}"
            + (f" in project {project!r}" if project else " without a project")
            + f"; ask the site's operators to add one to its user map ({self.path.name})")
