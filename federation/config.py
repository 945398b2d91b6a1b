"""Declarative TOML configuration for hubs, antennas and the CLI, validated at load.

Every error names the file, the key and the problem (`ConfigError`). Relative
paths in a file are taken relative to that file's folder. Unknown keys are
errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import datetime as dt
import math

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.errors import ConfigError
from federation.identity import check_federation_name, check_site_name
from federation.model import MAX_GPUS, MAX_JOB_INPUT_BYTES, AccessMode
from federation.timefmt import parse_duration
from federation.tls import TlsFiles


@dataclass(frozen=True)
class PartitionConfig:
    name: str
    gpu_model: str
    gpus: int
    max_walltime_s: int
    gflops_per_watt: float = 0.0  # energy efficiency, advertised (0: not given)


DEFAULT_RETENTION_S = 90 * 86400  # how long a finished job's record is kept; 0 keeps it for ever


DEFAULT_QUOTA_PERIOD_S = 30 * 86400


@dataclass(frozen=True)
class ModeLimits:
    """The most one job of an access mode may ask for at a hub (0: no cap beyond the partitions')."""

    mode: AccessMode
    max_gpus: int = 0
    max_walltime_s: int = 0
    max_gpu_hours: float = 0.0  # per project of an antenna, over the last `period_s` (0: no cap)
    period_s: int = DEFAULT_QUOTA_PERIOD_S

    def why_not(self, gpus: int, walltime_s: int) -> str:
        if self.max_gpus and gpus > self.max_gpus:
            return f"allows at most {self.max_gpus} GPU(s) per job in {self.mode.slug}"
        if self.max_walltime_s and walltime_s > self.max_walltime_s:
            from federation.timefmt import format_duration
            return f"allows at most {format_duration(self.max_walltime_s)} of walltime in {self.mode.slug}"
        return quota_why_not(self.mode, self.max_gpu_hours, self.period_s, gpus, walltime_s)


def quota_why_not(mode: AccessMode, max_gpu_hours: float, period_s: int, gpus: int, walltime_s: int) -> str:
    """Why one job alone is beyond a hub's GPU-hours per project and period in `mode` ("" if it is not)."""
    asks = gpus * walltime_s / 3600
    if max_gpu_hours and asks > max_gpu_hours + 1e-9:
        return (f"allows at most {max_gpu_hours:g} GPU-hours per project every {period_s / 86400:g} day(s) in "
                f"{mode.slug}; this job alone asks for {asks:g}")
    return ""


@dataclass(frozen=True)
class Maintenance:
    """An announced window (Unix times) in which the site runs no federated job."""

    start: float
    end: float
    reason: str = ""

    def overlaps(self, begin: float, finish: float) -> bool:
        return self.start < finish and begin < self.end


@dataclass(frozen=True)
class Limits:
    """What one peer may ask of a daemon: jobs submitted per second (a token bucket of `submit_burst` jobs,
    per user at an antenna, per antenna at a hub; 0 = no limit) and open streams at once."""

    submit_rate: float
    submit_burst: int
    max_streams: int = 1000
    min_burst: int = 1


ANTENNA_LIMITS = Limits(submit_rate=1000, submit_burst=20000)
HUB_LIMITS = Limits(submit_rate=10000, submit_burst=100000, min_burst=1000)


@dataclass(frozen=True)
class DiscoveryConfig:
    """`[discovery]`: where a daemon learns which hubs exist. `static` is the hubs in config; `etcd` is the
    federation's etcd cluster, reached over mutual TLS with the daemon's own certificate."""

    backend: str = "static"
    endpoints: tuple[str, ...] = ()
    prefix: str = ""  # "" is /aifed/<federation>
    lease_s: int = 10  # a hub's registration outlives its last keepalive by at most this long

    def key_prefix(self, federation: str) -> str:
        return self.prefix or f"/aifed/{federation}"


@dataclass(frozen=True)
class EventsConfig:
    """`[events]`: publish job, capacity and membership events to an MQTT broker ("" broker: publish nothing)."""

    broker: str = ""
    tls: bool = True  # mutual TLS to the broker with the daemon's own certificate
    buffer: int = 10_000  # events held while the broker is away; more are dropped and counted


@dataclass(frozen=True)
class DataConfig:
    """`[data]`: quotas and retention of staged input files and collected outputs (docs/data.md)."""

    retention_s: int = 7 * 86400         # staged content no unfinished job uses, unused this long, is deleted;
                                         # so are partial uploads untouched this long, and (hub) a finished job's
                                         # working folder, all but its logs, this long after the job ended
    outputs_retention_s: int = 30 * 86400  # (hub) collected outputs, kept this long after the job ended
    quota_mb: int = 0                    # what one uploader may hold here (a user at an antenna, an antenna at a
                                         # hub), complete and partial; 0: no quota but the disk's
    max_job_input_mb: int = 100_000      # (antenna) all inputs of one job
    max_output_mb: int = 10_240          # (hub) all collected outputs of one job
    outputs_quota_mb: int = 0            # (hub) all collected outputs one user keeps here; 0: no quota


@dataclass(frozen=True)
class BalanceConfig:
    """`[balance]`: hub-to-hub load balancing (hub/balance.py). A job expected to wait here longer than
    `threshold_s` is handed to a peer hub its antenna allowed, if the peer would start it within `gain` times
    that wait and at least `min_gain_s` sooner."""

    enabled: bool = False
    threshold_s: int = 600
    gain: float = 0.5
    min_gain_s: int = 300
    interval_s: int = 10
    max_per_peer: int = 20         # jobs handed to one peer per round
    breaker_failures: int = 3      # failed or refused hand-offs in a row that open a peer's circuit breaker
    breaker_cooldown_s: int = 60   # how long an open breaker keeps the peer out before one job is tried
    peers: tuple["HubEndpoint", ...] = ()  # listed here; with etcd discovery, also every other registered hub

    def worth_moving(self, wait_here_s: float, wait_there_s: float) -> bool:
        """Whether a job waiting `wait_here_s` here should move to a hub that would start it in `wait_there_s`."""
        return (wait_here_s > self.threshold_s and wait_there_s <= self.gain * wait_here_s
                and wait_here_s - wait_there_s >= self.min_gain_s)


@dataclass(frozen=True)
class HubConfig:
    path: Path
    site: str
    federation: str
    listen: str
    state_dir: Path
    tls: TlsFiles
    partitions: tuple[PartitionConfig, ...]
    services: tuple[str, ...] = ()
    sectors: tuple[str, ...] = ()
    access_modes: tuple[AccessMode, ...] = ()
    advert_ttl_s: int = 30
    backend: str = "local"
    kill_grace_s: int = 10
    cpu_slots: int = 64
    slurm_conf: Path | None = None
    poll_interval_s: int = 2
    capacity_interval_s: int = 10
    command_timeout_s: int = 30
    array_size: int = 256
    accounts: dict[str, str] = field(default_factory=dict)
    retention_s: int = DEFAULT_RETENTION_S
    limits: Limits = field(default_factory=lambda: HUB_LIMITS)
    audit_log: Path | None = None  # None: <state_dir>/audit.jsonl
    metrics_listen: str | None = None  # HOST:PORT for Prometheus (HTTPS, client certificates required)
    maintenance: tuple[Maintenance, ...] = ()
    mode_limits: tuple[ModeLimits, ...] = ()
    countries: tuple[str, ...] = ()  # users' countries served (ISO 3166 alpha-2); empty: all
    location: str = ""  # the country the hub's machines and storage are in (ISO 3166 alpha-2), for data residency
    min_free_disk_mb: int = 512  # below this much free space in state_dir, the hub takes no new jobs or inputs
    user_map: Path | None = None  # (antenna, user, project) -> local account; None: the hub's own account
    advertise: str = ""  # HOST:PORT antennas dial, registered in discovery; "" is the listen address
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    ha_instance: str = ""  # non-empty: one of several processes for this site; only the elected leader serves
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass(frozen=True)
class HubEndpoint:
    site: str
    endpoint: str


@dataclass(frozen=True)
class AntennaConfig:
    path: Path
    site: str
    federation: str
    listen: str
    state_dir: Path
    tls: TlsFiles
    hubs: tuple[HubEndpoint, ...] = field(default_factory=tuple)
    retention_s: int = DEFAULT_RETENTION_S
    country: str = ""  # where this antenna's users are (ISO 3166 alpha-2), vouched for on each job
    limits: Limits = field(default_factory=lambda: ANTENNA_LIMITS)
    audit_log: Path | None = None  # None: <state_dir>/audit.jsonl
    metrics_listen: str | None = None  # HOST:PORT for Prometheus (HTTPS, client certificates required)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    allocations: Path | None = None  # a TOML file of [[allocation]] GPU-hour budgets (antenna/allocations.py)
    placement: str = "earliest-start"  # the placement policy (federation/placement.py)
    short_job_lane: bool = True  # earliest-start keeps the smallest hub for short jobs (federation/placement.py)
    link_rate_mb_s: float = 100.0  # MB/s to each hub, for the transfer time of inputs until transfers measure it
    home: str = ""  # the home hub site, for the home-only policy
    data: DataConfig = field(default_factory=DataConfig)


@dataclass(frozen=True)
class ClientConfig:
    antenna: str
    tls: TlsFiles


class _Table:
    """Typed access to one TOML table that remembers which keys were read."""

    def __init__(self, path: Path, name: str, data: Any):
        self.path, self.name = path, name
        if not isinstance(data, dict):
            raise ConfigError(path, name, f"must be a table, not {type(data).__name__}")
        self.data = data
        self.seen: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.name}.{k}" if self.name else k

    def get(self, k: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        self.seen.add(k)
        if k not in self.data:
            if required or default is ...:
                near = difflib.get_close_matches(k, [str(x) for x in self.data], n=1)
                hint = f" (found {self.key(near[0])!r}: a typo?)" if near else ""
                raise ConfigError(self.path, self.key(k), "is required" + hint)
            return default
        value = self.data[k]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(t.__name__ for t in kind)
            raise ConfigError(self.path, self.key(k), f"must be a {want}, not {value!r}")
        return value

    def text(self, k: str, default: Any = ...) -> str:
        value = self.get(k, str, default)
        if isinstance(value, str) and not value.strip() and default is ...:
            raise ConfigError(self.path, self.key(k), "must not be empty")
        return value

    def strings(self, k: str) -> tuple[str, ...]:
        value = self.get(k, list, [])
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self.path, self.key(k), "must be a list of non-empty strings")
        return tuple(value)

    def duration(self, k: str, default: Any = ...) -> int:
        value = self.get(k, (str, int), default)
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(self.path, self.key(k), str(exc)) from None

    def checked(self, k: str, check, default: Any = ...) -> str:
        value = self.text(k, default)
        try:
            return check(value)
        except ValueError as exc:
            raise ConfigError(self.path, self.key(k), str(exc)) from None

    def path_(self, k: str, default: Any = ...) -> Path:
        text = self.text(k, default)
        if "\x00" in text:
            raise ConfigError(self.path, self.key(k), "contains a NUL character")
        try:
            p = Path(text).expanduser()
        except RuntimeError as exc:  # ~user of a user that does not exist
            raise ConfigError(self.path, self.key(k), f"{text!r}: {exc}") from None
        return p if p.is_absolute() else (self.path.parent / p)

    def table(self, k: str) -> "_Table":
        self.seen.add(k)
        return _Table(self.path, self.key(k), self.data.get(k, {}))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.path, self.key(unknown[0]), "is not a known setting (a typo?)")


def _read(path: str | Path) -> tuple[Path, _Table]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(p, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(p, "", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(p, "", f"is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(p, "", "is not valid TOML for aifed: arrays or tables are nested too deeply") from None
    return p, _Table(p, "", data)


def read_toml(path: str | Path, what: str) -> dict:
    """A TOML file that a config names (a user map, allocations) as a dict; ConfigError if it is missing or
    unreadable, saying which `what` it is."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(p, "", f"{what} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(p, "", f"cannot read the {what}: {exc}") from None
    except RecursionError:
        raise ConfigError(p, "", f"the {what} is not valid TOML for aifed: nested too deeply") from None


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # a name too long for the file system, for example
        return False


def _listen(t: _Table, k: str) -> str:
    value = t.text(k)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(t.path, t.key(k), f"{value!r} must be host:port, such as 127.0.0.1:50051")
    return value


def _tls(root: _Table, expected_identity: str | None = None, daemon: bool = False) -> TlsFiles:
    t = root.table("tls")
    crl, reload = None, 30
    if daemon:
        crl = t.path_("crl") if "crl" in t.data else None
        reload = t.duration("reload", "30s")
        if reload < 1:
            raise ConfigError(t.path, t.key("reload"), "must be at least 1 second")
    tls = TlsFiles(ca=t.path_("ca"), cert=t.path_("cert"), key=t.path_("key"), crl=crl, reload_s=reload)
    t.done()
    for k in ("ca", "cert", "key", "crl"):
        p = getattr(tls, k)
        if p is not None and not _is_file(p):
            raise ConfigError(t.path, t.key(k), f"{p} does not exist")
    if crl is not None:
        from federation.crl import CrlError, load_crl
        try:
            load_crl(crl.read_bytes(), tls.ca.read_bytes())
        except (OSError, CrlError) as exc:
            raise ConfigError(t.path, t.key("crl"), f"{crl}: {exc}") from None
    try:
        tls.check()
        uri = tls.identity_uri() if expected_identity else ""
    except (ValueError, PermissionError) as exc:
        raise ConfigError(t.path, "tls", str(exc)) from None
    if expected_identity and uri != expected_identity:
        raise ConfigError(t.path, "tls.cert", f"{tls.cert} is the certificate of {uri or 'no federation identity'}, "
                          f"but this config is {expected_identity}")
    return tls


def _limits(root: _Table, default: Limits) -> Limits:
    t = root.table("limits")
    rate = t.get("submit_rate", (int, float), default.submit_rate)
    burst = t.get("submit_burst", int, default.submit_burst)
    streams = t.get("max_streams", int, default.max_streams)
    t.done()
    if not 0 <= rate <= 1e9:
        raise ConfigError(t.path, t.key("submit_rate"), "must be between 0 (no limit) and 1e9 jobs per second")
    if burst < default.min_burst:
        raise ConfigError(t.path, t.key("submit_burst"), f"must be at least {default.min_burst} job(s)"
                          + (" (one batch an antenna forwards)" if default.min_burst > 1 else ""))
    if streams < 1:
        raise ConfigError(t.path, t.key("max_streams"), "must be at least 1")
    return Limits(float(rate), burst, streams, default.min_burst)


def _instant(t: _Table, k: str) -> float:
    value = t.get(k, (str, dt.datetime))
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(t.path, t.key(k), f"{value!r} is not a date and time such as "
                              "2026-12-01T08:00:00Z") from None
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise ConfigError(t.path, t.key(k), "needs a time zone, such as 2026-12-01T08:00:00Z or +01:00")
    return value.timestamp()


# The 27 Member States of the EU (ISO 3166 alpha-2), which `hub.countries` may name as "EU".
EU_MEMBER_STATES = ("AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT",
                    "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK")


def country_code(code: str) -> str:
    """An ISO 3166 alpha-2 code, checked (raise ValueError)."""
    if not (len(code) == 2 and code.isascii() and code.isalpha() and code.isupper()):
        raise ValueError(f"{code!r} is not an ISO 3166 alpha-2 country code such as SI or DE")
    return code


def _countries(h: _Table) -> tuple[str, ...]:
    out: list[str] = []
    for code in h.strings("countries"):
        try:
            new = EU_MEMBER_STATES if code == "EU" else (country_code(code),)
        except ValueError as exc:
            raise ConfigError(h.path, h.key("countries"), f"{exc}, or EU for the 27 Member States") from None
        out += [c for c in new if c not in out]
    return tuple(out)


def _mode_limits(root: _Table, accepted: tuple[AccessMode, ...]) -> tuple[ModeLimits, ...]:
    """`[modes.<slug>]` tables: caps per access mode, for modes the hub accepts."""
    t = root.table("modes")
    out = []
    for slug in list(t.data):
        try:
            mode = AccessMode.from_slug(slug)
        except ValueError as exc:
            raise ConfigError(t.path, t.key(slug), str(exc)) from None
        if accepted and mode not in accepted:
            raise ConfigError(t.path, t.key(slug), f"sets limits for {mode.slug}, which hub.access_modes does not "
                              "accept")
        m = t.table(slug)
        gpus = m.get("max_gpus", int, 0)
        walltime = m.duration("max_walltime", 0)
        gpu_hours = m.get("max_gpu_hours", (int, float), 0)
        period = m.duration("period", DEFAULT_QUOTA_PERIOD_S)
        m.done()
        if not 0 <= gpus <= MAX_GPUS:
            raise ConfigError(t.path, m.key("max_gpus"), f"must be between 0 (no cap) and {MAX_GPUS}")
        if not 0 <= gpu_hours <= 1e9:
            raise ConfigError(t.path, m.key("max_gpu_hours"), "must be between 0 (no cap) and 1e9 GPU-hours")
        if "period" in m.data and not gpu_hours:
            raise ConfigError(t.path, m.key("period"), "applies only with max_gpu_hours")
        if not 3600 <= period <= 3660 * 86400:
            raise ConfigError(t.path, m.key("period"), "must be between 1 hour and 10 years")
        out.append(ModeLimits(mode, gpus, walltime, float(gpu_hours), period))
    t.done()
    return tuple(out)


def _maintenance(root: _Table) -> tuple[Maintenance, ...]:
    root.seen.add("maintenance")
    raw = root.data.get("maintenance", [])
    if not isinstance(raw, list):
        raise ConfigError(root.path, "maintenance", "declare windows as [[maintenance]] tables")
    windows = []
    for i, item in enumerate(raw):
        t = _Table(root.path, f"maintenance[{i}]", item)
        start, end = _instant(t, "start"), _instant(t, "end")
        reason = t.text("reason", "")
        t.done()
        if end <= start:
            raise ConfigError(root.path, t.key("end"), "must be after start")
        windows.append(Maintenance(start, end, reason))
    return tuple(sorted(windows, key=lambda w: w.start))


def _metrics(root: _Table) -> str | None:
    t = root.table("metrics")
    listen = _listen(t, "listen") if "listen" in t.data else None
    t.done()
    return listen


DISCOVERY_BACKENDS = ("static", "etcd")


def _discovery(root: _Table, federation: str, is_hub: bool) -> DiscoveryConfig:
    t = root.table("discovery")
    backend = t.text("backend", "static")
    if backend not in DISCOVERY_BACKENDS:
        raise ConfigError(t.path, t.key("backend"), f"unknown backend {backend!r}; this version has: "
                          + ", ".join(DISCOVERY_BACKENDS))
    endpoints = t.strings("endpoints")
    for i, e in enumerate(endpoints):
        host, sep, port = e.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
            raise ConfigError(t.path, f"{t.key('endpoints')}[{i}]", f"{e!r} must be host:port, such as "
                              "etcd1.example.eu:2379")
    prefix = t.text("prefix", f"/aifed/{federation}")
    if not prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
        raise ConfigError(t.path, t.key("prefix"), f"{prefix!r} must start with '/' and not end with one, "
                          "such as /aifed/eurohpc.example")
    lease = t.duration("lease", "10s") if is_hub else 10
    t.done()
    if backend == "etcd" and not endpoints:
        raise ConfigError(t.path, t.key("endpoints"), "is required with backend = \"etcd\" (etcd's client URLs as "
                          "host:port)")
    if backend == "static" and endpoints:
        raise ConfigError(t.path, t.key("endpoints"), "applies only to backend = \"etcd\"")
    if not 2 <= lease <= 3600:
        raise ConfigError(t.path, t.key("lease"), "must be at least 2 seconds and at most 1 hour")
    return DiscoveryConfig(backend, endpoints, prefix, lease)


def _events(root: _Table) -> EventsConfig:
    t = root.table("events")
    broker = _listen(t, "broker") if "broker" in t.data else ""
    tls = t.get("tls", bool, True)
    buffer = t.get("buffer", int, 10_000)
    t.done()
    if not 1 <= buffer <= 10_000_000:
        raise ConfigError(t.path, t.key("buffer"), "must be between 1 and 10000000 events")
    if not broker and len(t.data) > 0:
        raise ConfigError(t.path, t.key("broker"), "is required when [events] sets anything (the MQTT broker as "
                          "host:port)")
    return EventsConfig(broker, tls, buffer)


def _daemon_basics(t: _Table) -> tuple[str, str, str, Path, int, Path]:
    """What every daemon's own table has: site, federation, listen, state_dir, retention, audit_log."""
    site = t.checked("site", check_site_name)
    federation = t.checked("federation", check_federation_name)
    listen = _listen(t, "listen")
    state_dir = t.path_("state_dir")
    retention = t.duration("retention", DEFAULT_RETENTION_S)
    audit_log = t.path_("audit_log") if "audit_log" in t.data else state_dir / "audit.jsonl"
    return site, federation, listen, state_dir, retention, audit_log


def load_hub(path: str | Path) -> HubConfig:
    p, root = _read(path)
    h = root.table("hub")
    site, federation, listen, state_dir, retention, audit_log = _daemon_basics(h)
    user_map = h.path_("user_map") if "user_map" in h.data else None
    if user_map is not None:
        from hub import usermap
        try:
            usermap.load(user_map)  # a broken map is reported now, not at the first job
        except ConfigError as exc:
            raise ConfigError(p, "hub.user_map", str(exc)) from None
    services, sectors = h.strings("services"), h.strings("sectors")
    countries = _countries(h)
    location = h.checked("location", country_code, "") if "location" in h.data else ""
    min_free_disk_mb = h.get("min_free_disk_mb", int, 512)
    if isinstance(min_free_disk_mb, bool) or min_free_disk_mb < 0:
        raise ConfigError(h.path, h.key("min_free_disk_mb"), "must be a whole number of megabytes, 0 or more")
    modes = []
    for m in h.strings("access_modes"):
        try:
            modes.append(AccessMode.from_slug(m))
        except ValueError as exc:
            raise ConfigError(p, "hub.access_modes", str(exc)) from None
    ttl = h.duration("advert_ttl", "30s")
    if ttl < 3:
        raise ConfigError(p, "hub.advert_ttl", "must be at least 3 seconds")
    advertise = _listen(h, "advertise") if "advertise" in h.data else ""
    h.done()
    b = root.table("backend")
    backend = b.text("type", "local")
    if backend not in ("local", "slurm", "hold"):
        raise ConfigError(p, "backend.type", f"unknown backend {backend!r}; this version has: local, slurm, hold")
    kill_grace = b.duration("kill_grace", "10s")
    cpu_slots = b.get("cpu_slots", int, 64)
    if cpu_slots < 1:
        raise ConfigError(p, "backend.cpu_slots", "must be at least 1")
    slurm_conf = b.path_("slurm_conf") if "slurm_conf" in b.data else None
    if slurm_conf is not None and not _is_file(slurm_conf):
        raise ConfigError(p, "backend.slurm_conf", f"{slurm_conf} does not exist")
    poll = b.duration("poll_interval", "2s")
    capacity = b.duration("capacity_interval", "10s")
    command_timeout = b.duration("command_timeout", "30s")
    for key, value in (("poll_interval", poll), ("capacity_interval", capacity), ("command_timeout", command_timeout)):
        if value < 1:
            raise ConfigError(p, f"backend.{key}", "must be at least 1 second")
    array_size = b.get("array_size", int, 256)
    if not 1 <= array_size <= 10_000:
        raise ConfigError(p, "backend.array_size", f"must be 1 to 10000 (1: one sbatch per job), not {array_size}")
    accounts_table = b.table("accounts")
    accounts = {k: accounts_table.text(k) for k in list(accounts_table.data)}
    if backend != "slurm":
        for key in ("slurm_conf", "poll_interval", "capacity_interval", "command_timeout", "array_size", "accounts"):
            if key in b.data:
                raise ConfigError(p, f"backend.{key}", "applies only to type = \"slurm\"")
    b.done()
    root.seen.add("partitions")
    raw_parts = root.data.get("partitions", [])
    if not isinstance(raw_parts, list) or not raw_parts:
        raise ConfigError(p, "partitions", "declare at least one [[partitions]] table")
    partitions = []
    for i, raw in enumerate(raw_parts):
        t = _Table(p, f"partitions[{i}]", raw)
        name = t.text("name")
        gpus = t.get("gpus", int, 0)
        if not 0 <= gpus <= MAX_GPUS:
            raise ConfigError(p, t.key("gpus"), f"must be between 0 and {MAX_GPUS}")
        model = t.text("gpu_model", "")
        if gpus and not model:
            raise ConfigError(p, t.key("gpu_model"), "is required when the partition has GPUs")
        max_wall = t.duration("max_walltime")
        if max_wall < 1:
            raise ConfigError(p, t.key("max_walltime"), "must be positive")
        efficiency = t.get("gflops_per_watt", (int, float), 0)
        if isinstance(efficiency, bool) or not math.isfinite(efficiency) or not 0 <= efficiency <= 1000:
            raise ConfigError(p, t.key("gflops_per_watt"), "must be a number of GFLOPS per watt between 0 and "
                                                            f"1000 (e.g. 52.3), not {efficiency!r}")
        t.done()
        if any(q.name == name for q in partitions):
            raise ConfigError(p, t.key("name"), f"partition {name!r} is declared twice")
        partitions.append(PartitionConfig(name, model, gpus, max_wall, float(efficiency)))
    maintenance = _maintenance(root)
    mode_limits = _mode_limits(root, tuple(modes))
    tls = _tls(root, f"spiffe://{federation}/hub/{site}", daemon=True)
    limits = _limits(root, HUB_LIMITS)
    metrics_listen = _metrics(root)
    discovery = _discovery(root, federation, is_hub=True)
    events = _events(root)
    ha = root.table("ha")
    ha_instance = ha.checked("instance", check_site_name, "") if "instance" in ha.data else ""
    ha.done()
    if ha_instance and discovery.backend != "etcd":
        raise ConfigError(p, "ha.instance", "needs [discovery] backend = \"etcd\": the leader is elected there")
    balance = _balance(root, discovery, site)
    data = _data(root, hub=True)
    if not advertise:
        host = listen.rpartition(":")[0].strip("[]")
        if discovery.backend == "etcd" and host in ("0.0.0.0", "::", ""):
            raise ConfigError(p, "hub.advertise", f"is required when listen is {listen!r}: antennas need the "
                              "address to dial, such as hub.leonardo.example.eu:7443")
    root.done()
    return HubConfig(path=p, site=site, federation=federation, listen=listen, state_dir=state_dir, tls=tls,
                     partitions=tuple(partitions), services=services, sectors=sectors, access_modes=tuple(modes),
                     advert_ttl_s=ttl, backend=backend, kill_grace_s=kill_grace, cpu_slots=cpu_slots,
                     slurm_conf=slurm_conf, poll_interval_s=poll, capacity_interval_s=capacity,
                     command_timeout_s=command_timeout, array_size=array_size, accounts=accounts, retention_s=retention,
                     limits=limits,
                     audit_log=audit_log, user_map=user_map, metrics_listen=metrics_listen,
                     maintenance=maintenance, mode_limits=mode_limits, countries=countries, location=location,
                     min_free_disk_mb=min_free_disk_mb, advertise=advertise,
                     discovery=discovery, events=events, ha_instance=ha_instance, balance=balance, data=data)


def _data(root: _Table, hub: bool) -> DataConfig:
    """`[data]`: the keys of the other kind of daemon are refused, so that a misplaced key does not go unnoticed."""
    p, d = root.path, root.table("data")
    only = ("outputs_retention", "max_output_mb", "outputs_quota_mb") if not hub else ("max_job_input_mb",)
    for key in only:
        if key in d.data:
            raise ConfigError(p, f"data.{key}", "is an antenna setting; this is a hub configuration" if hub
                              else "is a hub setting; this is an antenna configuration")
    retention = d.duration("retention", "7d")
    outputs_retention = d.duration("outputs_retention", "30d") if hub else DataConfig.outputs_retention_s
    for key, value in (("retention", retention), ("outputs_retention", outputs_retention)):
        if value < 3600:
            raise ConfigError(p, f"data.{key}", "must be at least 1h: jobs must find their inputs, and users their "
                              "outputs, for longer than that")
    sizes = {}
    for key, default, low, high in (("quota_mb", 0, 0, 10**9),
                                    ("max_job_input_mb", 100_000, 1, MAX_JOB_INPUT_BYTES // 1_000_000),
                                    ("max_output_mb", 10_240, 1, 1 << 20), ("outputs_quota_mb", 0, 0, 10**9)):
        value = d.get(key, int, default)
        if isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(p, f"data.{key}", f"must be a whole number of megabytes from {low} to {high}, not "
                              f"{value!r}")
        sizes[key] = value
    d.done()
    return DataConfig(retention, outputs_retention, sizes["quota_mb"], sizes["max_job_input_mb"],
                      sizes["max_output_mb"], sizes["outputs_quota_mb"])


def _balance(root: _Table, discovery: DiscoveryConfig, site: str) -> BalanceConfig:
    p = root.path
    b = root.table("balance")
    enabled = b.get("enabled", bool, False)
    threshold, min_gain = b.duration("threshold", "10m"), b.duration("min_gain", "5m")
    interval, cooldown = b.duration("interval", "10s"), b.duration("breaker_cooldown", "1m")
    for key, value in (("interval", interval), ("breaker_cooldown", cooldown)):
        if value < 1:
            raise ConfigError(p, f"balance.{key}", "must be at least 1 second")
    gain = b.get("gain", (int, float), 0.5)
    if not 0 < gain < 1:
        raise ConfigError(p, "balance.gain", f"must be between 0 and 1 (a peer must start a job within this "
                                              f"fraction of its wait here), not {gain!r}")
    counts = {}
    for key, default in (("max_per_peer", 20), ("breaker_failures", 3)):
        counts[key] = b.get(key, int, default)
        if not 1 <= counts[key] <= 10_000:
            raise ConfigError(p, f"balance.{key}", f"must be between 1 and 10000, not {counts[key]}")
    b.seen.add("peers")
    raw = b.data.get("peers", [])
    if not isinstance(raw, list):
        raise ConfigError(p, "balance.peers", "declare peers as [[balance.peers]] tables with site and endpoint")
    peers: list[HubEndpoint] = []
    for i, entry in enumerate(raw):
        t = _Table(p, f"balance.peers[{i}]", entry)
        peer = HubEndpoint(t.checked("site", check_site_name), _listen(t, "endpoint"))
        t.done()
        if peer.site == site:
            raise ConfigError(p, t.key("site"), f"{site!r} is this hub itself, not a peer")
        if any(q.site == peer.site for q in peers):
            raise ConfigError(p, t.key("site"), f"peer {peer.site!r} is listed twice")
        peers.append(peer)
    if enabled and not peers and discovery.backend == "static":
        raise ConfigError(p, "balance.peers", "balancing needs peers: declare [[balance.peers]] tables with site "
                          "and endpoint (or find peers through [discovery] backend = \"etcd\")")
    b.done()
    return BalanceConfig(enabled, threshold, float(gain), min_gain, interval, counts["max_per_peer"],
                         counts["breaker_failures"], cooldown, tuple(peers))


def _policy(name: str) -> str:
    from federation.placement import POLICIES
    if name not in POLICIES:
        raise ValueError(f"unknown placement policy {name!r}; policies: {', '.join(POLICIES)}")
    return name


def load_antenna(path: str | Path) -> AntennaConfig:
    p, root = _read(path)
    a = root.table("antenna")
    site, federation, listen, state_dir, retention, audit_log = _daemon_basics(a)
    country = a.checked("country", country_code, "") if "country" in a.data else ""
    allocations = a.path_("allocations") if "allocations" in a.data else None
    if allocations is not None:
        from antenna.allocations import load
        try:
            load(allocations)  # a broken file is reported now, not at the first job
        except ConfigError as exc:
            raise ConfigError(p, "antenna.allocations", str(exc)) from None
    placement = a.checked("placement", _policy, "earliest-start")
    home = a.checked("home", check_site_name, "") if "home" in a.data else ""
    if placement == "home-only" and not home:
        raise ConfigError(p, "antenna.home", "is required with placement = \"home-only\": the hub this antenna's "
                          "jobs all go to")
    short_job_lane = a.get("short_job_lane", bool, True)
    link_rate = a.get("link_rate_mb_s", (int, float), 100.0)
    if isinstance(link_rate, bool) or not 0.001 <= link_rate <= 1e6:
        raise ConfigError(p, "antenna.link_rate_mb_s", "must be a number of MB/s between 0.001 and 1000000")
    a.done()
    discovery = _discovery(root, federation, is_hub=False)
    root.seen.add("hubs")
    raw_hubs = root.data.get("hubs", [])
    if not isinstance(raw_hubs, list):
        raise ConfigError(p, "hubs", "declare hubs as [[hubs]] tables with site and endpoint")
    if discovery.backend == "static" and not raw_hubs:
        raise ConfigError(p, "hubs", "declare at least one [[hubs]] table with site and endpoint (or find hubs "
                          "through [discovery] backend = \"etcd\")")
    if discovery.backend != "static" and raw_hubs:
        raise ConfigError(p, "hubs", f"[[hubs]] are for backend = \"static\"; with {discovery.backend!r} the hubs "
                          "register themselves")
    hubs = []
    for i, raw in enumerate(raw_hubs):
        t = _Table(p, f"hubs[{i}]", raw)
        hub = HubEndpoint(t.checked("site", check_site_name), _listen(t, "endpoint"))
        t.done()
        if any(h.site == hub.site for h in hubs):
            raise ConfigError(p, t.key("site"), f"hub {hub.site!r} is listed twice")
        hubs.append(hub)
    if home and hubs and home not in {h.site for h in hubs}:
        raise ConfigError(p, "antenna.home", f"{home!r} is not one of the [[hubs]] (" + ", ".join(h.site for h in hubs)
                          + ")")
    tls = _tls(root, f"spiffe://{federation}/antenna/{site}", daemon=True)
    limits = _limits(root, ANTENNA_LIMITS)
    metrics_listen = _metrics(root)
    events = _events(root)
    data = _data(root, hub=False)
    root.done()
    return AntennaConfig(path=p, site=site, federation=federation, listen=listen, state_dir=state_dir, tls=tls,
                         hubs=tuple(hubs), retention_s=retention, limits=limits, audit_log=audit_log, country=country,
                         metrics_listen=metrics_listen, discovery=discovery, events=events,
                         allocations=allocations, placement=placement, home=home,
                         short_job_lane=short_job_lane, link_rate_mb_s=float(link_rate), data=data)


def load_client(path: str | Path) -> ClientConfig:
    p, root = _read(path)
    c = root.table("client")
    antenna = _listen(c, "antenna")
    c.done()
    tls = _tls(root)
    root.done()
    return ClientConfig(antenna, tls)
