"""Access mode limits per hub, enforced at the antenna (early) and the hub (always), and `submit --dry-run`."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from federation.cli import main
from federation.config import ModeLimits
from federation.model import AccessMode, JobSpec, JobState
from tests.conftest import running_federation

PLAY = AccessMode.PLAYGROUND


@pytest.fixture
async def capped(test_pki, tmp_path):
    """leonardo caps playground jobs at 1 GPU and 1 hour; lumi has no caps."""
    async with running_federation(test_pki, tmp_path, {"leonardo": {"mode_limits": (ModeLimits(PLAY, 1, 3600),)},
                                               "lumi": {}}, antenna={}) as f:
        yield f


async def test_mode_limits_are_advertised_and_placement_respects_them(capped):
    (limits,) = capped.antennas["antenna-a"].core.sites["leonardo"].advert.mode_limits
    assert (limits.mode, limits.max_gpus, limits.max_walltime_s) == (PLAY, 1, 3600)
    alice = capped.client("alice")
    big = [await alice.submit(JobSpec(argv=("true",), gpus=2, partition="booster", access_mode=PLAY))
           for _ in range(3)]
    assert {(j.state, j.site) for j in [await alice.wait(j.id) for j in big]} == {(JobState.COMPLETED, "lumi")}
    # At the boundary: exactly 1 GPU and 1 hour is allowed at leonardo.
    edge = await alice.submit(JobSpec(argv=("true",), gpus=1, walltime_s=3600, access_mode=PLAY, site="leonardo"))
    assert (await alice.wait(edge.id)).state is JobState.COMPLETED


@pytest.mark.parametrize("spec, says", [
    (JobSpec(argv=("true",), gpus=2, access_mode=PLAY, site="leonardo"), "allows at most 1 GPU(s) per job in playground"),
    (JobSpec(argv=("true",), walltime_s=3601, access_mode=PLAY, site="leonardo"),
     "allows at most 01:00:00 of walltime in playground"),
])
async def test_a_job_beyond_a_pinned_hubs_mode_limits_is_refused_before_anything_is_stored(capped, spec, says):
    alice = capped.client("alice")
    before = capped.antennas["antenna-a"].core.journal.count()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alice.submit(spec)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and says in err.value.details()
    assert capped.antennas["antenna-a"].core.journal.count() == before


async def test_the_hub_enforces_its_limits_whatever_the_antenna_says(capped):
    hub = capped.hubs["leonardo"]
    from federation.identity import parse_identity
    from federation.model import Job
    from tests.conftest import FEDERATION
    antenna = parse_identity(f"spiffe://{FEDERATION}/antenna/antenna-a")
    job = Job(id="antenna-a-00ff00ff00ff", spec=JobSpec(argv=("true",), gpus=2, access_mode=PLAY),
              state=JobState.PENDING, owner=f"spiffe://{FEDERATION}/user/antenna-a/alice")
    ((refusal, _),) = await hub.core.forward_many(antenna, [(job.id, job)])
    assert refusal.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "site leonardo allows at most 1 GPU(s) per job in playground" in refusal.message
    assert hub.core.journal.get(job.id) is None


async def test_dry_run_says_where_a_job_would_go_and_stores_nothing(capped, test_pki, capsys):
    tls = test_pki.user("antenna-a", "alice")
    base = ["submit", "--antenna", f"127.0.0.1:{capped.antennas['antenna-a'].port}", "--ca", str(tls.ca),
            "--cert", str(tls.cert), "--key", str(tls.key), "--dry-run"]
    before = capped.antennas["antenna-a"].core.journal.count()
    assert await asyncio.to_thread(main, [*base, "-G", "2", "--mode", "playground", "--", "true"]) == 0
    assert capsys.readouterr().out.startswith("dry run: would be forwarded to lumi")
    assert await asyncio.to_thread(main, [*base, "--array", "0-9", "--", "true"]) == 0
    assert "(each of the 10 array tasks)" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [*base, "-G", "2", "--mode", "playground", "--site", "leonardo",
                                          "--", "true"]) == 7  # refused, as the real submission would be
    assert "leonardo allows at most 1 GPU(s) per job in playground" in capsys.readouterr().err
    assert capped.antennas["antenna-a"].core.journal.count() == before
    assert capped.hubs["leonardo"].core.journal.count() == capped.hubs["lumi"].core.journal.count() == 0


# -- eligibility by country ---------------------------------------------------------------------------------------

def country_federation(test_pki, tmp_path, antenna_country: str):
    """leonardo serves DE and SI, lumi FI; antenna-a's users are from `antenna_country`."""
    return running_federation(test_pki, tmp_path, {"leonardo": {"countries": ("DE", "SI")}, "lumi": {"countries": ("FI",)}},
                      antenna={"country": antenna_country})


async def test_hubs_serve_only_the_countries_they_allow(test_pki, tmp_path):
    async with country_federation(test_pki, tmp_path, "SI") as f:
        leonardo = f.antennas["antenna-a"].core.sites["leonardo"]
        assert list(leonardo.advert.countries) == ["DE", "SI"]
        alice = f.client("alice")
        jobs = [await alice.submit(JobSpec(argv=("true",))) for _ in range(3)]
        done = [await alice.wait(j.id) for j in jobs]
        assert {(j.state, j.site, j.country) for j in done} == {(JobState.COMPLETED, "leonardo", "SI")}
        assert f.hubs["leonardo"].core.journal.get(done[0].id).country == "SI"  # the hub records it
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await alice.submit(JobSpec(argv=("true",), site="lumi"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "lumi serves users from FI only, and this job is from SI" in err.value.details()


async def test_a_projects_or_users_country_decides_eligibility_and_members_only_projects_refuse_others(
        test_pki, tmp_path):
    """antenna-a is in SI; its allocations file says project fi-lab is Finnish and open to alice only, and user
    bob is from FI. lumi serves FI only."""
    people = tmp_path / "people.toml"
    people.write_text('[[project]]\nname = "fi-lab"\ncountry = "FI"\nmembers = ["alice"]\n\n'
                      '[[user]]\nname = "bob"\ncountry = "FI"\n')
    async with running_federation(test_pki, tmp_path, {"leonardo": {"countries": ("DE", "SI")},
                                                       "lumi": {"countries": ("FI",)}},
                                  antenna={"country": "SI", "allocations": people}) as f:
        alice, bob = f.client("alice"), f.client("bob")
        by_project = await alice.wait((await alice.submit(JobSpec(argv=("true",), project="fi-lab",
                                                                  site="lumi"))).id)
        by_user = await bob.wait((await bob.submit(JobSpec(argv=("true",), site="lumi"))).id)
        for done in (by_project, by_user):
            assert (done.state, done.site, done.country) == (JobState.COMPLETED, "lumi", "FI")
            assert f.hubs["lumi"].core.journal.get(done.id).country == "FI"  # what the hub checked
        # Without a site, placement only considers the hubs that serve the job's country.
        free = await bob.wait((await bob.submit(JobSpec(argv=("true",)))).id)
        assert (free.site, free.country) == ("lumi", "FI")
        # alice's own country is the antenna's (SI), which lumi does not serve.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await alice.submit(JobSpec(argv=("true",), site="lumi"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "lumi serves users from FI only, and this job is from SI" in err.value.details()
        # bob may not charge the members-only project, by submission or dry run; nothing is stored.
        before = f.antennas["antenna-a"].core.journal.count()
        for dry in (True, False):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bob.submit(JobSpec(argv=("true",), project="fi-lab"), dry_run=dry)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "project fi-lab is open to its members only at antenna antenna-a, and bob is not one" \
                in err.value.details()
        assert f.antennas["antenna-a"].core.journal.count() == before


async def test_a_hub_refuses_a_forwarded_job_of_a_country_it_does_not_serve(test_pki, tmp_path):
    async with country_federation(test_pki, tmp_path, "SI") as f:
        from federation.identity import parse_identity
        from federation.model import Job
        from tests.conftest import FEDERATION
        antenna = parse_identity(f"spiffe://{FEDERATION}/antenna/antenna-a")
        owner = f"spiffe://{FEDERATION}/user/antenna-a/alice"
        for country, refused in (("US", True), ("", True), ("FI", False)):
            job = Job(id=f"antenna-a-{country.lower() or 'none'}0000", spec=JobSpec(argv=("true",)),
                      state=JobState.PENDING, owner=owner, country=country)
            ((outcome, _),) = await f.hubs["lumi"].core.forward_many(antenna, [(job.id, job)])
            if refused:
                assert outcome.code == grpc.StatusCode.PERMISSION_DENIED
                assert f"serves users from FI only; this job is from {country or 'no declared country'} (as antenna antenna-a" \
                    in outcome.message
            else:
                assert isinstance(outcome, Job) and outcome.country == "FI"


# -- strategic sectors ------------------------------------------------------------------------------------------

@pytest.fixture
async def sectors(test_pki, tmp_path):
    """leonardo specialises in health, lumi in climate; both accept every job."""
    async with running_federation(test_pki, tmp_path, {"leonardo": {"sectors": ("health",)}, "lumi": {"sectors": ("climate",)}},
                          antenna={}) as f:
        yield f


async def test_placement_prefers_hubs_of_the_jobs_sector_and_can_require_one(sectors):
    alice = sectors.client("alice")
    for sector, site in (("climate", "lumi"), ("health", "leonardo")):
        jobs = [await alice.submit(JobSpec(argv=("true",), sector=sector)) for _ in range(3)]
        assert {(j.state, j.site) for j in [await alice.wait(j.id) for j in jobs]} == {(JobState.COMPLETED, site)}
    # Preferred only: a sector no hub has still runs somewhere.
    anywhere = await alice.wait((await alice.submit(JobSpec(argv=("true",), sector="space"))).id)
    assert anywhere.state is JobState.COMPLETED
    # Required: refused before anything is stored when no hub has it, or when the pinned hub lacks it.
    for spec, says in ((JobSpec(argv=("true",), sector="space", sector_required=True),
                        "does not specialise in sector space"),
                       (JobSpec(argv=("true",), sector="health", sector_required=True, site="lumi"),
                        "lumi does not specialise in sector health")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await alice.submit(spec)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and says in err.value.details()


async def test_a_hub_refuses_a_job_that_requires_a_sector_it_lacks(sectors):
    from federation.identity import parse_identity
    from federation.model import Job
    from tests.conftest import FEDERATION
    antenna = parse_identity(f"spiffe://{FEDERATION}/antenna/antenna-a")
    job = Job(id="antenna-a-5ec7005ec700", spec=JobSpec(argv=("true",), sector="health", sector_required=True),
              state=JobState.PENDING, owner=f"spiffe://{FEDERATION}/user/antenna-a/alice")
    ((refusal, _),) = await sectors.hubs["lumi"].core.forward_many(antenna, [(job.id, job)])
    assert refusal.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "site lumi does not specialise in sector health; its sectors: climate" in refusal.message


def test_sector_values_are_checked():
    from federation.errors import InvalidArgument
    for bad in (JobSpec(argv=("true",), sector="Health"), JobSpec(argv=("true",), sector_required=True)):
        with pytest.raises(InvalidArgument):
            bad.validate()
