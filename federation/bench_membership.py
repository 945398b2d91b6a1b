"""`aifed bench membership`: how fast membership news travels through etcd, with the daemons' own discovery code.

A private etcd (mutual TLS, the federation's PKI) on loopback; H hubs register and A antennas follow the
membership, each with its own `EtcdDiscovery` and connections, as the daemons do. Then:

- **propagation**: one hub after another changes its capacity summary; for each change, the time until every
  antenna has it (and each antenna's own delay). Baseline in the same command: one hub and one antenna.
- **dead hub**: a hub registered from a separate process is SIGKILLed; the time until every antenna has seen it
  leave, against the configured lease.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

from certs import pki
from federation.bench import percentile, workdir
from federation.discovery import ChangeKind, Member
from federation.identity import Role

FEDERATION = "bench.test"
PREFIX = f"/aifed/{FEDERATION}"

# A hub in a process of its own: registers, says so, and waits to be killed.
_PEER = """
import asyncio, json, sys
from federation.discovery import Member
from federation.etcd_discovery import EtcdDiscovery
from federation.tls import TlsFiles
a = json.loads(sys.argv[1])
async def main():
    d = EtcdDiscovery(a["endpoints"], TlsFiles(*map(__import__("pathlib").Path, a["tls"])), a["prefix"], a["lease"])
    await d.start()
    await d.register(Member(a["site"], "127.0.0.1:1", {}))
    while d.degraded or d.members().get(a["site"]) is None:
        await asyncio.sleep(0.01)
    print("registered", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


class Antenna:
    """One antenna's view: when each (site, seq) summary and each leave arrived."""

    def __init__(self, discovery):
        self.discovery = discovery
        self.seen: dict[tuple[str, int], float] = {}
        self.left: dict[str, float] = {}
        discovery.on_change(self._changed)

    def _changed(self, change) -> None:
        now = time.time()
        if change.kind is ChangeKind.LEAVE:
            self.left[change.member.site] = now
        elif "seq" in change.member.summary:
            self.seen.setdefault((change.member.site, change.member.summary["seq"]), now)


def _make_pki(root: Path, hubs: int, antennas: int) -> None:
    pki.init_ca(root, FEDERATION)
    for i in range(hubs + 1):  # one more: the hub that is killed
        pki.issue(root, Role.HUB, f"hub{i}")
    for i in range(antennas):
        pki.issue(root, Role.ANTENNA, f"antenna{i}")


def _tls(root: Path, role: Role, site: str):
    from federation.tls import TlsFiles
    cert, key = pki.cert_paths(root, pki.identity_for(FEDERATION, role, site))
    return TlsFiles(root / pki.CA_CERT, cert, key)


async def _propagation(root: Path, endpoint: str, hubs: int, antennas: int, changes: int) -> dict:
    from federation.etcd_discovery import EtcdDiscovery

    prefix = f"{PREFIX}/{hubs}x{antennas}"
    hub_d = [EtcdDiscovery([endpoint], _tls(root, Role.HUB, f"hub{i}"), prefix, 10) for i in range(hubs)]
    ant = [Antenna(EtcdDiscovery([endpoint], _tls(root, Role.ANTENNA, f"antenna{i}"), prefix, 10))
           for i in range(antennas)]
    try:
        await asyncio.gather(*(a.discovery.start() for a in ant), *(d.start() for d in hub_d))
        for i, d in enumerate(hub_d):
            await d.register(Member(f"hub{i}", f"127.0.0.1:{7000 + i}", {"seq": -1}))
        deadline = time.monotonic() + 30
        while any(len(a.discovery.members()) < hubs for a in ant):
            if time.monotonic() > deadline:
                raise TimeoutError("the antennas did not see every hub join within 30 s")
            await asyncio.sleep(0.01)
        every, each, missed = [], [], 0
        for k in range(changes):
            site = f"hub{k % hubs}"
            sent = time.time()
            await hub_d[k % hubs].update({"seq": k, "gpus_free": k, "at": sent})
            deadline = time.monotonic() + 5
            while not all((site, k) in a.seen for a in ant) and time.monotonic() < deadline:
                await asyncio.sleep(0.0005)
            arrived = [a.seen[(site, k)] - sent for a in ant if (site, k) in a.seen]
            if len(arrived) < len(ant):
                missed += 1
                continue
            every.append(max(arrived) * 1000)
            each.extend(x * 1000 for x in arrived)
            await asyncio.sleep(0.01)
        return {"hubs": hubs, "antennas": antennas, "changes": changes, "missed": missed,
                "p50_ms": statistics.median(every), "p99_ms": percentile(every, 0.99), "max_ms": max(every),
                "each_p50_ms": statistics.median(each), "each_p99_ms": percentile(each, 0.99)}
    finally:
        await asyncio.gather(*(d.close() for d in hub_d), *(a.discovery.close() for a in ant))


async def _dead_hub(root: Path, endpoint: str, antennas: int, lease: int, trials: int) -> dict:
    from federation.etcd_discovery import EtcdDiscovery

    prefix = f"{PREFIX}/dead"
    ant = [Antenna(EtcdDiscovery([endpoint], _tls(root, Role.ANTENNA, f"antenna{i}"), prefix, 10))
           for i in range(antennas)]
    await asyncio.gather(*(a.discovery.start() for a in ant))
    drops = []
    try:
        for trial in range(trials):
            site = "hub0"
            tls = _tls(root, Role.HUB, site)
            args = json.dumps({"endpoints": [endpoint], "tls": [str(tls.ca), str(tls.cert), str(tls.key)],
                               "prefix": prefix, "lease": lease, "site": site})
            peer = subprocess.Popen([sys.executable, "-c", _PEER, args], stdout=subprocess.PIPE,
                                    env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
            line = await asyncio.to_thread(peer.stdout.readline)
            if b"registered" not in line:
                peer.kill()
                raise RuntimeError("the hub process did not register")
            deadline = time.monotonic() + 10
            while not all(site in a.discovery.members() for a in ant):
                if time.monotonic() > deadline:
                    raise TimeoutError("the antennas did not see the hub join")
                await asyncio.sleep(0.005)
            await asyncio.sleep(lease * (0.3 + 0.2 * trial))  # kill at different points of the keepalive cycle
            for a in ant:
                a.left.pop(site, None)
            peer.send_signal(signal.SIGKILL)
            killed = time.time()
            await asyncio.to_thread(peer.wait)
            deadline = time.monotonic() + lease + 10
            while not all(site in a.left for a in ant):
                if time.monotonic() > deadline:
                    raise TimeoutError("the antennas did not see the killed hub leave")
                await asyncio.sleep(0.005)
            drops.append(max(a.left[site] for a in ant) - killed)
    finally:
        await asyncio.gather(*(a.discovery.close() for a in ant))
    return {"lease_s": lease, "trials": trials, "drop_s": [round(d, 3) for d in drops],
            "median_drop_s": statistics.median(drops), "median_ratio_to_lease": statistics.median(drops) / lease}


async def membership_run(root: Path, hubs: int, antennas: int, changes: int, lease: int, trials: int) -> dict:
    from federation.etcdlab import EtcdServer

    print(f"PKI for {hubs} hubs and {antennas} antennas...", file=sys.stderr)
    _make_pki(root / "pki", hubs, antennas)
    cert, key = pki.issue_service(root / "pki", "etcd")
    etcd = EtcdServer(root / "etcd", root / "pki" / pki.CA_CERT, cert, key)
    etcd.start()
    try:
        print("baseline: 1 hub, 1 antenna...", file=sys.stderr)
        baseline = await _propagation(root / "pki", etcd.endpoint, 1, 1, changes)
        print(f"{hubs} hubs, {antennas} antennas...", file=sys.stderr)
        full = await _propagation(root / "pki", etcd.endpoint, hubs, antennas, changes)
        print(f"dead hub, lease {lease} s, {trials} trials...", file=sys.stderr)
        dead = await _dead_hub(root / "pki", etcd.endpoint, antennas, lease, trials)
    finally:
        etcd.stop()
    return {"baseline": baseline, "federation": full, "ratio_p50": full["p50_ms"] / baseline["p50_ms"],
            "ratio_p99": full["p99_ms"] / baseline["p99_ms"], "dead_hub": dead}


def run_membership_bench(hubs: int, antennas: int, changes: int, lease: int, trials: int, as_json: bool,
                         keep: Path | None = None) -> int:
    if min(hubs, antennas, changes, trials) < 1 or lease < 2:
        print("aifed: --hubs, --antennas, --changes and --trials must be at least 1, --lease at least 2",
              file=sys.stderr)
        return 2
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    with workdir(keep, "aifed-bench-membership-") as root:
        r = runner(membership_run(root, hubs, antennas, changes, lease, trials))
    for name in ("baseline", "federation"):
        x = r[name]
        print(f"{name:>10}: {x['hubs']} hub(s) x {x['antennas']} antenna(s), {x['changes']} changes: capacity change "
              f"at every antenna p50 {x['p50_ms']:.1f} ms p99 {x['p99_ms']:.1f} ms max {x['max_ms']:.1f} ms "
              f"(each antenna p50 {x['each_p50_ms']:.1f} ms p99 {x['each_p99_ms']:.1f} ms; missed {x['missed']})")
    print(f"     ratio: p50 {r['ratio_p50']:.2f}, p99 {r['ratio_p99']:.2f} (federation / baseline)")
    d = r["dead_hub"]
    print(f"  dead hub: dropped at every antenna after {', '.join(f'{s:.2f}' for s in d['drop_s'])} s "
          f"(median {d['median_drop_s']:.2f} s = {d['median_ratio_to_lease']:.2f} x the {d['lease_s']} s lease)")
    if as_json:
        print(orjson.dumps(r).decode())
    return 0
