"""A hub process for etcd tests, to be killed for real: registers in etcd discovery, or campaigns in an
election, prints READY once done, then runs until killed.

    python -m tests.etcd_peer hub ENDPOINT CA CERT KEY PREFIX SITE LEASE_S
    python -m tests.etcd_peer leader ENDPOINT CA CERT KEY ELECTION_KEY INSTANCE TTL_S
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from federation.discovery import Member
from federation.election import Election
from federation.etcd_client import EtcdClient
from federation.etcd_discovery import EtcdDiscovery
from federation.tls import TlsFiles


async def main(role: str, endpoint: str, ca: str, cert: str, key: str, where: str, name: str, ttl: str) -> None:
    tls = TlsFiles(Path(ca), Path(cert), Path(key))
    if role == "hub":
        discovery = EtcdDiscovery([endpoint], tls, where, float(ttl))
        await discovery.start()
        await discovery.register(Member(name, "127.0.0.1:4001", {"pid": "child"}))
        if name not in discovery.members():
            raise SystemExit(f"not registered: {discovery.degraded}")
    else:
        election = Election(EtcdClient([endpoint], tls), where, name, float(ttl))
        await election.campaign()
    print("READY", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
