"""Shared fixtures: a test PKI, and real hub and antenna daemons in-process on port 0 over mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

import federation  # noqa: F401  (sets gRPC's fork mode before grpc is imported)
from certs import pki
from federation.client import AntennaClient
from federation.config import AntennaConfig, ClientConfig, HubConfig, HubEndpoint, PartitionConfig
from federation.identity import Role
from federation.model import AccessMode
from federation.tls import TlsFiles

pytest_plugins = ("tests.etcd_server", "tests.mqtt_broker")  # fixtures: a private etcd and Mosquitto

FEDERATION = "eurohpc.test"
HUB_SITES = ("leonardo", "lumi")
ANTENNA_SITES = ("antenna-a", "antenna-b")
USERS = (("antenna-a", "alice"), ("antenna-a", "bob"), ("antenna-b", "carol"))


@dataclass
class Pki:
    root: Path
    ca: Path
    other_ca_root: Path

    def tls(self, role: Role, site: str, name: str = "") -> TlsFiles:
        identity = pki.identity_for(FEDERATION, role, site, name)
        cert, key = pki.cert_paths(self.root, identity)
        return TlsFiles(self.ca, cert, key)

    def user(self, antenna: str, name: str) -> TlsFiles:
        return self.tls(Role.USER, antenna, name)


def make_federation_pki(root: Path) -> Path:
    """A federation CA in `root` with certificates for two hubs, two antennas and three users; its CA file."""
    pki.init_ca(root, FEDERATION)
    for site in HUB_SITES:
        pki.issue(root, Role.HUB, site)
    for site in ANTENNA_SITES:
        pki.issue(root, Role.ANTENNA, site)
    for antenna, name in USERS:
        pki.issue(root, Role.USER, antenna, name)
    return root / pki.CA_CERT


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory) -> Pki:
    """A federation CA with certificates for two hubs, two antennas and three users, plus a foreign CA."""
    root = tmp_path_factory.mktemp("pki")
    make_federation_pki(root)
    other = tmp_path_factory.mktemp("other-pki")
    pki.init_ca(other, FEDERATION)  # same federation name, different key: must still be refused
    pki.issue(other, Role.USER, "antenna-a", "alice")
    pki.issue(other, Role.HUB, "leonardo")
    return Pki(root, root / pki.CA_CERT, other)


def hub_config(test_pki: Pki, state: Path, site: str = "leonardo", partitions=None, **kw) -> HubConfig:
    parts = partitions or (PartitionConfig("booster", "A100", 4, 3600), PartitionConfig("dcgp", "", 0, 600))
    kw.setdefault("access_modes", (AccessMode.PLAYGROUND, AccessMode.FAST_LANE))
    return HubConfig(path=state / f"{site}.toml", site=site, federation=FEDERATION, listen="127.0.0.1:0",
                     state_dir=state / site, tls=test_pki.tls(Role.HUB, site), partitions=tuple(parts),
                     advert_ttl_s=6, kill_grace_s=1, **kw)


def antenna_config(test_pki: Pki, state: Path, hubs: dict[str, int], site: str = "antenna-a") -> AntennaConfig:
    return AntennaConfig(path=state / f"{site}.toml", site=site, federation=FEDERATION, listen="127.0.0.1:0",
                         state_dir=state / site, tls=test_pki.tls(Role.ANTENNA, site),
                         hubs=tuple(HubEndpoint(s, f"127.0.0.1:{p}") for s, p in hubs.items()))


@dataclass
class Federation:
    """Running daemons and a way to get clients for them."""

    test_pki: Pki
    state: Path
    hubs: dict = field(default_factory=dict)
    antennas: dict = field(default_factory=dict)
    clients: list = field(default_factory=list)

    def client(self, user: str = "alice", antenna: str = "antenna-a", tls: TlsFiles | None = None) -> AntennaClient:
        who = next((a, n) for a, n in USERS if n == user) if tls is None else None
        c = AntennaClient(ClientConfig(f"127.0.0.1:{self.antennas[antenna].port}",
                                       tls or self.test_pki.user(*who)))
        self.clients.append(c)
        return c

    async def start_hub(self, site: str = "leonardo", **kw):
        from hub.daemon import HubDaemon
        config = kw.pop("config", None) or hub_config(self.test_pki, self.state, site, **kw)
        if site in self.hubs:  # a restart keeps the port, so antennas find it again
            config = replace(config, listen=f"127.0.0.1:{self.hubs[site].port}")
        daemon = await HubDaemon(config).start()
        self.hubs[site] = daemon
        return daemon

    async def start_antenna(self, site: str = "antenna-a", hubs: tuple[str, ...] | None = None):
        from antenna.daemon import AntennaDaemon
        ports = {s: self.hubs[s].port for s in (hubs or tuple(self.hubs))}
        config = antenna_config(self.test_pki, self.state, ports, site)
        if site in self.antennas and self.antennas[site].port:
            config = replace(config, listen=f"127.0.0.1:{self.antennas[site].port}")
        daemon = await AntennaDaemon(config).start()
        self.antennas[site] = daemon
        return daemon

    async def wait_sites(self, antenna: str = "antenna-a", timeout: float = 15) -> None:
        """Until the antenna holds a fresh advert from each of its hubs."""
        core = self.antennas[antenna].core
        deadline = time.monotonic() + timeout
        while not all(s.fresh for s in core.sites.values()):
            if time.monotonic() > deadline:
                raise TimeoutError({s.site: s.error for s in core.sites.values()})
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        for d in [*self.antennas.values(), *self.hubs.values()]:
            await stopped(d.stop(grace=0.5), f"{type(d).__name__} {d.config.site}")


STOP_LIMIT_S = 60.0  # a daemon's stop is bounded (each wait in it is): far past this, it hangs


async def stopped(stop, what: str) -> None:
    """Await a daemon's stop; if it hangs, fail with what every task of the loop was waiting for."""
    task = asyncio.ensure_future(stop)
    done, _ = await asyncio.wait([task], timeout=STOP_LIMIT_S)
    if done:
        return task.result()
    stacks = io.StringIO()
    for t in asyncio.all_tasks():
        print(f"--- task {t.get_name()}: {t.get_coro()!r}", file=stacks)
        t.print_stack(limit=25, file=stacks)
    task.cancel()
    raise AssertionError(f"{what} did not stop within {STOP_LIMIT_S:g} s; the loop's tasks:\n{stacks.getvalue()}")


@contextlib.asynccontextmanager
async def running_federation(test_pki: Pki, state: Path, hubs: dict[str, dict], antenna: dict | None = None):
    """A federation of the given hubs, each from `hub_config` with its keyword changes (`{"leonardo": {...}}`),
    and, unless `antenna` is None, antenna-a with these changes to its config; stopped at the end."""
    from antenna.daemon import AntennaDaemon

    f = Federation(test_pki, state)
    try:
        for site, changes in hubs.items():
            await f.start_hub(site, config=hub_config(test_pki, state, site, **changes))
        if antenna is not None:
            config = antenna_config(test_pki, state, {s: d.port for s, d in f.hubs.items()})
            f.antennas["antenna-a"] = await AntennaDaemon(replace(config, **antenna)).start()
            await f.wait_sites()
        yield f
    finally:
        await f.close()


@pytest.fixture
async def fed(test_pki, tmp_path):
    """Two hubs (leonardo: booster 4 GPUs/1h + dcgp CPU-only/10min; lumi: the same) and antenna-a."""
    f = Federation(test_pki, tmp_path)
    try:
        await f.start_hub("leonardo")
        await f.start_hub("lumi")
        await f.start_antenna("antenna-a")
        await f.wait_sites()
        yield f
    finally:
        await f.close()


async def eventually(predicate, timeout: float = 15.0, interval: float = 0.05):
    """Poll an (async or plain) predicate until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)



@pytest.fixture(scope="session")
def slurm_lab(tmp_path_factory):
    """A private single-node Slurm (8 fake GPUs, partitions gpu and debug), for the whole session."""
    from hub.slurmlab import SlurmLab
    lab = SlurmLab(tmp_path_factory.mktemp("slurm"), partitions={"gpu": 0, "debug": 0}, gpus=8, cpus=16)
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


def slurm_hub_config(test_pki: Pki, state: Path, lab, site: str = "leonardo", partitions=None) -> HubConfig:
    parts = partitions or (PartitionConfig("gpu", "A100", 8, 3600), PartitionConfig("debug", "", 0, 3600))
    return replace(hub_config(test_pki, state, site, parts), backend="slurm", slurm_conf=lab.conf,
                   poll_interval_s=1, capacity_interval_s=2, cpu_slots=16, command_timeout_s=20)


@pytest.fixture
async def slurm_fed(test_pki, tmp_path, slurm_lab):
    """Hub leonardo on the private Slurm, and antenna-a."""
    f = Federation(test_pki, tmp_path)
    try:
        await f.start_hub("leonardo", config=slurm_hub_config(test_pki, tmp_path, slurm_lab))
        await f.start_antenna("antenna-a")
        await f.wait_sites()
        yield f
    finally:
        await f.close()


# -- the attack suite's summary (tests marked `attack`, see tests/test_attacks.py) -------------------------------

_attack_results: dict[str, bool] = {}  # node id -> refused (the attack test passed), for attack tests that ran


def pytest_runtest_logreport(report):
    """Remember each attack test that ran and whether the attack was refused (its test passed)."""
    if "attack" not in report.keywords:
        return
    if report.when == "call" and report.skipped and hasattr(report, "wasxfail"):
        _attack_results[report.nodeid] = False  # a known hole (xfail): it ran and was not refused
        return
    if report.skipped and report.nodeid not in _attack_results:
        return  # skipped: it did not run
    if report.when == "call" or report.failed:  # the outcome, or a failed setup or teardown
        _attack_results[report.nodeid] = _attack_results.get(report.nodeid, True) and report.passed


# -- stops that needed their bounds (federation.watch warns): shown at the end, so that a slow stop is noticed ---

_slow_stops: list[str] = []


class _SlowStops(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " within " in message and not _current_test.startswith("tests/test_watch.py"):  # that one hangs on purpose
            _slow_stops.append(f"{_current_test}: {message}")


_current_test = ""


def pytest_configure(config):
    logging.getLogger("federation.watch").addHandler(_SlowStops(logging.WARNING))


def pytest_runtest_setup(item):
    global _current_test
    _current_test = item.nodeid


def pytest_terminal_summary(terminalreporter):
    for line in _slow_stops:
        terminalreporter.write_line(f"slow stop: {line}")
    if _attack_results:
        ran, refused = len(_attack_results), sum(_attack_results.values())
        terminalreporter.write_line(f"attack suite: {ran} attacks, {refused} refused")
