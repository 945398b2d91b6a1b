"""Placement policies (federation/placement.py): each policy's order, the correction for jobs a hub has not counted
yet (no herding), and the policies through real daemons: round-robin, home-only, and an array spread by
earliest-start."""

from __future__ import annotations

import pytest

from federation.placement import POLICIES, UNSEEN_TTL_S, Candidate, Placer
from federation.config import load_antenna
from federation.errors import ConfigError
from federation.model import JobSpec, JobState
from federation.config import PartitionConfig
from tests.conftest import eventually, running_federation
from tests.test_allocations import antenna_toml


def sites(order) -> list[str]:
    return [s.site for s in order]


A = Candidate("a", wait_s=100, free_gpus=0, total_gpus=8, pending_jobs=5)
B = Candidate("b", wait_s=0, free_gpus=2, total_gpus=4, pending_jobs=1)
C = Candidate("c", wait_s=0, free_gpus=6, total_gpus=16, pending_jobs=0)


def test_unknown_policies_and_home_only_without_a_home_are_refused():
    with pytest.raises(ValueError, match="unknown placement policy 'fastest'; policies: earliest-start, "):
        Placer("fastest")
    with pytest.raises(ValueError, match="home-only needs the antenna's home site"):
        Placer("home-only")
    assert POLICIES[0] == "earliest-start"


def test_earliest_start_orders_by_estimated_wait():
    order = Placer().order([A, B, C], gpus=1, walltime_s=600, now=0)
    assert sites(order)[-1] == "a" and order[-1].score == 100
    assert {s.site for s in order[:2]} == {"b", "c"}


def test_what_this_antenna_just_sent_counts_against_a_hub_until_it_has_landed():
    p = Placer()
    # 4 GPUs x 1000 s sent to c (16 GPUs): its wait counts 250 s more, so a (100 s) comes first now.
    p.sent("c", "j1", gpus=4, walltime_s=1000, now=0)
    p.sent("b", "j2", gpus=4, walltime_s=1000, now=0)  # b (4 GPUs): 1000 s more
    order = p.order([A, B, C], gpus=1, walltime_s=600, now=1)
    assert sites(order) == ["a", "c", "b"] and [s.score for s in order] == [100, 250, 1000]
    p.landed("c", ["j1"])  # the hub acknowledged it: its own estimates count it from now on
    assert sites(p.order([A, B, C], 1, 600, now=2))[0] == "c"
    p.landed("b", before=0)  # an advert issued at 0 shows what was sent up to 0
    assert p.unseen_gpu_s("b", now=3) == 0.0


def test_a_job_sent_long_ago_no_longer_counts_even_if_never_acknowledged():
    p = Placer()
    p.sent("b", "j1", gpus=1, walltime_s=10_000, now=0)
    assert p.unseen_gpu_s("b", now=UNSEEN_TTL_S - 1) == 10_000
    assert p.unseen_gpu_s("b", now=UNSEEN_TTL_S + 1) == 0


def test_least_queue_orders_by_jobs_waiting_including_those_just_sent():
    p = Placer("least-queue")
    assert sites(p.order([A, B, C], 1, 60, now=0)) == ["c", "b", "a"]
    p.sent("c", "j1", 1, 60, now=0)
    p.sent("c", "j2", 1, 60, now=0)
    # c: 0 + 2 sent; b: 1 waiting. Ties go to the most free GPUs.
    assert sites(p.order([A, B, C], 1, 60, now=1)) == ["b", "c", "a"]


def test_round_robin_takes_each_hub_in_turn_and_a_preview_does_not_move_it():
    p = Placer("round-robin")
    firsts = [p.order([C, A, B], 1, 60, now=0)[0].site for _ in range(4)]
    assert firsts == ["a", "b", "c", "a"]
    assert p.order([A, B, C], 1, 60, now=0, turn=False)[0].site == "b"
    assert p.order([A, B, C], 1, 60, now=0)[0].site == "b"


def test_random_is_seeded_and_uses_every_hub():
    picks = [[p.order([A, B, C], 1, 60)[0].site for _ in range(10)] for p in (Placer("random", seed=7),
                                                                          Placer("random", seed=7))]
    assert picks[0] == picks[1]  # the same seed, the same choices
    p = Placer("random", seed=7)
    assert {p.order([A, B, C], 1, 60)[0].site for _ in range(60)} == {"a", "b", "c"}


def test_home_only_keeps_to_the_home_site_and_says_why_others_are_out():
    p = Placer("home-only", home="a")
    assert sites(p.order([A, B, C], 1, 60)) == ["a"]
    assert p.order([B, C], 1, 60) == []
    assert p.excludes("b") == "is not this antenna's home site a (placement policy home-only)"
    assert p.excludes("a") == ""


@pytest.mark.parametrize("policy", POLICIES)
def test_hubs_of_the_jobs_sector_come_first_under_every_policy(policy):
    special = Candidate("s", wait_s=5000, free_gpus=0, total_gpus=4, pending_jobs=50, specialised=True)
    p = Placer(policy, home="s")
    assert p.order([A, B, C, special], 1, 60, now=0)[0].site == "s"


def test_config_reads_and_checks_the_policy_and_home(test_pki, tmp_path):
    config = load_antenna(antenna_toml(test_pki, tmp_path, 'placement = "round-robin"'))
    assert (config.placement, config.home) == ("round-robin", "")
    assert load_antenna(antenna_toml(test_pki, tmp_path, "")).placement == "earliest-start"
    for extra, key, says in (('placement = "fastest"', "antenna.placement", "unknown placement policy 'fastest'"),
                             ('placement = "home-only"', "antenna.home", "is required with placement"),
                             ('placement = "home-only"\nhome = "nowhere"', "antenna.home",
                              "'nowhere' is not one of the [[hubs]]"),
                             ('home = "Leo"', "antenna.home", "Leo")):
        with pytest.raises(ConfigError) as err:
            load_antenna(antenna_toml(test_pki, tmp_path, extra))
        assert err.value.key == key and says in str(err.value), (extra, str(err.value))


# -- through real daemons ---------------------------------------------------------------------------------------

async def test_round_robin_alternates_between_hubs(test_pki, tmp_path):
    async with running_federation(test_pki, tmp_path, {"leonardo": {}, "lumi": {}},
                                  antenna={"placement": "round-robin"}) as f:
        alice = f.client("alice")
        done = [await alice.wait((await alice.submit(JobSpec(argv=("true",)))).id) for _ in range(4)]
        assert [(j.state, j.site) for j in done] == [(JobState.COMPLETED, "leonardo"), (JobState.COMPLETED, "lumi")] * 2


async def test_home_only_sends_everything_home_and_refuses_a_job_pinned_elsewhere(test_pki, tmp_path):
    async with running_federation(test_pki, tmp_path, {"leonardo": {}, "lumi": {}},
                                  antenna={"placement": "home-only", "home": "lumi"}) as f:
        alice = f.client("alice")
        done = [await alice.wait((await alice.submit(JobSpec(argv=("true",)))).id) for _ in range(3)]
        assert {(j.state, j.site) for j in done} == {(JobState.COMPLETED, "lumi")}
        import grpc
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await alice.submit(JobSpec(argv=("true",), site="leonardo"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "leonardo is not this antenna's home site lumi (placement policy home-only)" in err.value.details()
        explanation = await alice.explain(done[0].id)
        verdicts = {v.site: v for v in explanation.sites}
        assert "home-only" in verdicts["leonardo"].reason and verdicts["lumi"].rank == 1


async def test_an_array_is_spread_over_hubs_rather_than_herded_onto_the_idlest(test_pki, tmp_path):
    """Two idle hubs with 4 GPUs each; 8 one-GPU tasks of an hour. Each task placed counts against its hub, so
    the tasks split between the hubs instead of all going to the one that looked idle first."""
    async with running_federation(test_pki, tmp_path, {"leonardo": {}, "lumi": {}}, antenna={}) as f:
        alice = f.client("alice")
        receipts = await alice.submit_many([(JobSpec(argv=("true",), gpus=1, walltime_s=3600), "", "0-7")])
        done = [await alice.wait(r.id) for r in receipts]
        by_site = {site: sum(1 for j in done if j.site == site) for site in ("leonardo", "lumi")}
        assert by_site == {"leonardo": 4, "lumi": 4}, by_site


def test_between_hubs_equal_in_wait_and_free_gpus_the_more_energy_efficient_comes_first():
    green = Candidate("green", wait_s=0, free_gpus=2, total_gpus=4, gflops_per_watt=65.0)
    grey = Candidate("grey", wait_s=0, free_gpus=2, total_gpus=4, gflops_per_watt=30.0)
    for policy in ("earliest-start", "least-queue"):
        assert sites(Placer(policy).order([grey, green], 1, 60, now=0)) == ["green", "grey"]
    roomier = Candidate("roomier", wait_s=0, free_gpus=3, total_gpus=4, gflops_per_watt=10.0)
    assert sites(Placer().order([green, roomier], 1, 60, now=0))[0] == "roomier"  # free GPUs come first


async def test_hubs_advertise_their_partitions_energy_efficiency(test_pki, tmp_path):
    from federation.config import PartitionConfig
    parts = (PartitionConfig("booster", "A100", 4, 3600, gflops_per_watt=52.3),)
    async with running_federation(test_pki, tmp_path, {"leonardo": {"partitions": parts}}, antenna={}) as f:
        advert = f.antennas["antenna-a"].core.sites["leonardo"].advert
        assert [(p.name, p.gflops_per_watt) for p in advert.partitions] == [("booster", pytest.approx(52.3))]


# -- the user's preferred and excluded hubs ---------------------------------------------------------------------

def test_the_first_preferred_hub_that_would_start_the_job_in_time_goes_first_else_the_policy_decides():
    p = Placer()
    ranked = p.order([A, B, C], gpus=1, walltime_s=600, now=0)  # b, c (0 s), then a (100 s)
    assert sites(p.preferred_first(ranked, ("a", "b"), overflow_after_s=100, now=0))[0] == "a"
    assert sites(p.preferred_first(ranked, ("a", "b"), overflow_after_s=99, now=0))[0] == "b"  # a overflows to b
    assert sites(p.preferred_first(ranked, ("a",), overflow_after_s=99, now=0)) == sites(ranked)  # the policy's
    assert sites(p.preferred_first(ranked, ("gone", "c"), overflow_after_s=0, now=0))[0] == "c"  # not a candidate
    # What this antenna just sent to a counts: 8 GPUs x 100 s over its 8 GPUs is 100 s more, beyond 150 s.
    p.sent("a", "j1", gpus=8, walltime_s=100, now=0)
    assert sites(p.preferred_first(ranked, ("a",), overflow_after_s=150, now=1))[0] != "a"


@pytest.mark.parametrize("changes, says", [
    ({"prefer": ("lumi",), "exclude": ("lumi",)}, "site lumi is both preferred and excluded"),
    ({"prefer": ("lumi",), "site": "lumi"}, "a job pinned to a site (--site) takes no preferred or excluded"),
    ({"exclude": ("Lumi!",)}, "excluded site 'Lumi!' is not a site name"),
    ({"prefer": ("lumi", "lumi")}, "a site is listed twice among the preferred sites"),
    ({"prefer": tuple(f"s{i}" for i in range(17))}, "at most 16 preferred sites"),
])
def test_preferred_and_excluded_sites_are_checked(changes, says):
    from federation.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match=says.replace("(", r"\(").replace(")", r"\)")):
        JobSpec(argv=("true",), **changes).validate()


async def test_preferred_sites_with_overflow_and_excluded_sites_through_daemons(test_pki, tmp_path):
    import grpc
    parts = (PartitionConfig("booster", "A100", 4, 7200),)
    async with running_federation(test_pki, tmp_path, {"leonardo": {"partitions": parts}, "lumi": {"partitions": parts}},
                                  antenna={}) as f:
        alice = f.client("alice")
        # Both idle: leonardo wins the tie by name, unless lumi is preferred, or leonardo excluded.
        plain = await alice.wait((await alice.submit(JobSpec(argv=("true",)))).id)
        preferred = await alice.wait((await alice.submit(JobSpec(argv=("true",), prefer=("lumi",)))).id)
        excluded = await alice.wait((await alice.submit(JobSpec(argv=("true",), exclude=("leonardo",)))).id)
        assert [j.site for j in (plain, preferred, excluded)] == ["leonardo", "lumi", "lumi"]
        assert f.hubs["lumi"].core.journal.get(excluded.id).alternatives == ()  # never moved to leonardo either
        assert f.hubs["lumi"].core.journal.get(preferred.id).alternatives == ("leonardo",)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await alice.submit(JobSpec(argv=("true",), exclude=("leonardo", "lumi")))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "leonardo is excluded by the job's owner (--exclude)" in err.value.details()
        # lumi full for two hours: a job preferring it overflows to leonardo unless it would wait that long.
        busy = await alice.submit(JobSpec(argv=("sleep", "60"), gpus=4, walltime_s=7200, site="lumi"))
        await eventually(lambda: f.hubs["lumi"].core.journal.state(busy.id) is JobState.RUNNING)
        await eventually(lambda: f.antennas["antenna-a"].core.sites["lumi"].advert.partitions[0].gpus_free == 0)
        overflow = await alice.submit(JobSpec(argv=("true",), gpus=4, prefer=("lumi",), overflow_after_s=600))
        patient = await alice.submit(JobSpec(argv=("true",), gpus=4, prefer=("lumi",), overflow_after_s=7200))
        assert (await alice.wait(overflow.id)).site == "leonardo"
        assert (await alice.get(patient.id)).site == "lumi"
        await alice.cancel(patient.id)
        await alice.cancel(busy.id)
