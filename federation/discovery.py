"""Federation membership: which hubs exist, where they answer, and a summary of what they offer.

Two backends behind one interface (`Discovery`), checked by one contract suite (tests/test_discovery.py):

- `static`, the embedded default: the hubs listed in the daemon's config. Nobody joins or leaves.
- `etcd` (federation/etcd_discovery.py): each hub registers under `<prefix>/hubs/<site>` with a lease it keeps
  alive; antennas and peer hubs watch the prefix. A hub that dies disappears when its lease expires.

Consumers read `members()` and register a callback with `on_change`; callbacks run on the event loop, in order,
and must not block. A backend that lost its store keeps the last membership it knew and says why in `degraded`.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One hub as the federation sees it. `summary` is JSON-able: services, sectors, access modes, GPUs total and
    free, pending jobs; enough to show and pre-filter, while placement uses the hub's own live adverts."""

    site: str
    endpoint: str
    summary: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {"site": self.site, "endpoint": self.endpoint, "summary": self.summary}

    @classmethod
    def from_dict(cls, raw: dict) -> Member:
        """Raise ValueError naming the field when `raw` is not a member record."""
        if not isinstance(raw, dict):
            raise ValueError("a member record must be a JSON object")
        site, endpoint, summary = raw.get("site"), raw.get("endpoint"), raw.get("summary", {})
        if not isinstance(site, str) or not site:
            raise ValueError("member record without a site")
        if not isinstance(endpoint, str) or ":" not in endpoint:
            raise ValueError(f"member {site!r}: endpoint must be HOST:PORT")
        if not isinstance(summary, dict):
            raise ValueError(f"member {site!r}: summary must be an object")
        return cls(site, endpoint, summary)


class ChangeKind(enum.Enum):
    JOIN = "join"
    UPDATE = "update"  # endpoint or summary changed
    LEAVE = "leave"


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    member: Member


Listener = Callable[[Change], None]


class Discovery(abc.ABC):
    """Membership of a federation's hubs. Hubs `register` themselves; everyone reads and follows `members()`."""

    backend = "abstract"

    def __init__(self) -> None:
        self._members: dict[str, Member] = {}
        self._listeners: list[Listener] = []
        self.degraded = ""  # why membership may be out of date ("" while the backend is healthy)

    def members(self) -> dict[str, Member]:
        return dict(self._members)

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the current membership and begin following it; returns once `members()` is known."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop following. A registered hub leaves (its record is removed at once, not at lease expiry)."""

    @abc.abstractmethod
    async def register(self, member: Member) -> None:
        """Announce this hub and keep the announcement alive until `close`, re-registering after a loss."""

    @abc.abstractmethod
    async def update(self, summary: dict) -> None:
        """Replace this hub's summary (after `register`). Never raises for a store that is down: the latest
        summary is written when it returns."""

    # -- for backends ----------------------------------------------------------------------------

    def _set(self, members: Iterable[Member]) -> None:
        """Make `members` the whole membership, telling listeners what joined, changed and left."""
        new = {m.site: m for m in members}
        for site, old in list(self._members.items()):
            if site not in new:
                self._apply(Change(ChangeKind.LEAVE, old))
        for member in new.values():
            self._put(member)

    def _put(self, member: Member) -> None:
        old = self._members.get(member.site)
        if old is None:
            self._apply(Change(ChangeKind.JOIN, member))
        elif (old.endpoint, old.summary) != (member.endpoint, member.summary):
            self._apply(Change(ChangeKind.UPDATE, member))

    def _remove(self, site: str) -> None:
        if (old := self._members.get(site)) is not None:
            self._apply(Change(ChangeKind.LEAVE, old))

    def _apply(self, change: Change) -> None:
        if change.kind is ChangeKind.LEAVE:
            self._members.pop(change.member.site, None)
        else:
            self._members[change.member.site] = change.member
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # one broken listener must not stop membership for the others
                log.exception("membership listener failed on %s %s", change.kind.value, change.member.site)


class StaticDiscovery(Discovery):
    """The hubs named in config. `register` and `update` keep this hub's own record and tell nobody."""

    backend = "static"

    def __init__(self, members: Iterable[Member] = ()):
        super().__init__()
        self._initial = tuple(members)
        self._own: str | None = None

    async def start(self) -> None:
        self._set(self._initial)

    async def close(self) -> None:
        if self._own is not None:
            self._remove(self._own)
            self._own = None

    async def register(self, member: Member) -> None:
        self._own = member.site
        self._put(member)

    async def update(self, summary: dict) -> None:
        if self._own is None:
            raise RuntimeError("update() before register()")
        old = self._members[self._own]
        self._put(Member(old.site, old.endpoint, dict(summary)))


def make_discovery(federation: str, config, tls, static: Iterable[Member] = ()) -> Discovery:
    """The backend a daemon's `[discovery]` table names (`config` is a DiscoveryConfig)."""
    if config.backend == "static":
        return StaticDiscovery(static)
    if config.backend == "etcd":
        from federation.etcd_discovery import EtcdDiscovery
        return EtcdDiscovery(list(config.endpoints), tls, config.key_prefix(federation), lease_s=config.lease_s)
    raise ValueError(f"unknown discovery backend {config.backend!r}")
