"""A hub whose certificate is revoked: the antenna stops forwarding there as soon as the new CRL is in force."""

from __future__ import annotations

from dataclasses import replace

import pytest

from certs import pki
from federation.identity import Role
from federation.model import JobSpec, JobState
from tests.conftest import FEDERATION, HUB_SITES, Federation, Pki, antenna_config, eventually, make_federation_pki


@pytest.fixture
def private_pki(tmp_path) -> Pki:
    """A PKI of this test's own: it revokes and renews a hub certificate."""
    root = tmp_path / "pki"
    return Pki(root, make_federation_pki(root), root)


async def test_a_revoked_hub_gets_no_more_jobs_without_restarting_the_antenna(private_pki, tmp_path):
    crl = private_pki.root / pki.CRL
    fed = Federation(private_pki, tmp_path / "state")
    try:
        for site in HUB_SITES:
            await fed.start_hub(site)
        ports = {s: fed.hubs[s].port for s in HUB_SITES}
        config = antenna_config(private_pki, fed.state, ports)
        config = replace(config, tls=replace(config.tls, crl=crl, reload_s=1))
        from antenna.daemon import AntennaDaemon
        fed.antennas["antenna-a"] = antenna = await AntennaDaemon(config).start()
        await fed.wait_sites()
        alice = fed.client("alice")
        before = await alice.submit(JobSpec(argv=("true",), site="lumi"))
        assert (await alice.wait(before.id)).state is JobState.COMPLETED

        pki.revoke(private_pki.root, f"spiffe://{FEDERATION}/hub/lumi", "key_compromise")
        lumi = antenna.core.sites["lumi"]
        await eventually(lambda: lumi.untrusted, timeout=10)
        assert "lumi's certificate" in lumi.untrusted and not lumi.fresh
        assert not antenna.core.sites["leonardo"].untrusted
        sites = {s.site: s for s in await alice.sites()}
        assert "revoked" in sites["lumi"].error and not sites["lumi"].reachable

        jobs = [await alice.submit(JobSpec(argv=("true",))) for _ in range(5)]
        for job in jobs:
            done = await alice.wait(job.id)
            assert (done.state, done.site) == (JobState.COMPLETED, "leonardo")
        pinned = await alice.submit(JobSpec(argv=("true",), site="lumi"))  # waits: never sent to lumi
        assert (await alice.get(pinned.id)).state is JobState.PENDING
        assert fed.hubs["lumi"].core.journal.get(pinned.id) is None

        # The hub gets a new certificate (new serial): it is trusted again, and the held job goes there.
        pki.renew(private_pki.root, Role.HUB, "lumi")
        await eventually(lambda: not lumi.untrusted, timeout=20, interval=0.5)
        assert (await alice.wait(pinned.id)).state is JobState.COMPLETED
    finally:
        await fed.close()
