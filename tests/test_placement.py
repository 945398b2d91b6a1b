"""Placement policies (federation/placement.py): each policy's order, the correction for jobs a hub has not counted
yet (no herding), and the policies through real daemons: round-robin, home-only, and an array spread by
earliest-start."""

from __future__ import annotations

import pytest

from federation.placement import LANE_MIN_HISTORY, POLICIES, UNSEEN_TTL_S, Candidate, Placer, Sizes
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


# -- the short-job lane -----------------------------------------------------------------------------------------

SMALL = Candidate("small", wait_s=0, free_gpus=4, total_gpus=4)
BIG = Candidate("big", wait_s=50, free_gpus=0, total_gpus=64)


def placer_that_saw(sizes: list[tuple[int, float]]) -> Placer:
    """A placer that has placed jobs of these (GPUs, walltime) shapes."""
    p = Placer()
    for gpus, walltime in sizes:
        p.order([BIG], gpus, walltime, now=0, lane="small")
    return p


def test_a_long_job_keeps_off_the_lane_hub_and_a_short_one_takes_it():
    p = placer_that_saw([(1, 600)] * (LANE_MIN_HISTORY - 1))
    busy_small = Candidate("small", wait_s=30, free_gpus=0, total_gpus=4)
    # Short (its size is the median's) or long: the lane hub is the earliest start.
    short = p.order([busy_small, BIG], 1, 600, now=0, lane="small")
    assert sites(short) == ["small", "big"] and not any(s.kept for s in short)
    long = p.order([busy_small, BIG], 2, 3600, now=0, lane="small")
    assert sites(long) == ["big", "small"] and [s.kept for s in long] == [False, True]
    assert long[1].score == 30  # ranked last, its estimate unchanged
    # Without a lane (one hub, or switched off), or under another policy, nothing is kept.
    assert sites(p.order([busy_small, BIG], 2, 3600, now=0)) == ["small", "big"]
    for policy in ("least-queue", "round-robin"):
        q = Placer(policy)
        for _ in range(LANE_MIN_HISTORY):
            q.order([BIG], 1, 60, now=0, lane="small")
        assert not any(s.kept for s in q.order([busy_small, BIG], 8, 10**5, now=0, lane="small"))


def test_a_long_job_takes_the_lane_hub_when_it_would_start_there_at_once_and_it_comes_first():
    p = placer_that_saw([(1, 600)] * LANE_MIN_HISTORY)
    assert sites(p.order([SMALL, BIG], 2, 3600, now=0, lane="small")) == ["small", "big"]  # idle capacity
    idle_big = Candidate("big", wait_s=0, free_gpus=32, total_gpus=64)
    # Both would start it at once: the big hub comes first (more GPUs free), so the lane is kept.
    assert sites(p.order([SMALL, idle_big], 2, 3600, now=0, lane="small")) == ["big", "small"]


def test_every_job_is_short_until_enough_jobs_were_placed_and_previews_are_not_counted():
    p = Placer()
    busy_small = Candidate("small", wait_s=30, free_gpus=0, total_gpus=4)
    for _ in range(LANE_MIN_HISTORY - 1):
        assert sites(p.order([busy_small, BIG], 8, 10**5, now=0, lane="small", turn=False))[0] == "small"
        p.order([BIG], 1, 60, now=0, lane="small")
    assert len(p.sizes) == LANE_MIN_HISTORY - 1  # previews (explain, dry runs) were not counted
    assert sites(p.order([busy_small, BIG], 8, 10**5, now=0, lane="small"))[0] == "big"  # the 50th: long


def test_the_median_is_of_the_last_jobs_placed_and_a_cpu_job_counts_as_one_gpu():
    sizes = Sizes(n=5)
    for size in (10, 1, 7, 3, 5):
        sizes.add(size)
    assert sizes.median() == 5
    for size in (100, 100, 100):  # 10, 1 and 7 leave the window
        sizes.add(size)
    assert len(sizes) == 5 and sizes.median() == 100
    p = placer_that_saw([(0, 600)] * LANE_MIN_HISTORY)
    assert p.sizes.median() == 600 and p.is_long(601) and not p.is_long(600)


def test_config_reads_the_short_job_lane_switch(test_pki, tmp_path):
    assert load_antenna(antenna_toml(test_pki, tmp_path, "")).short_job_lane is True
    assert load_antenna(antenna_toml(test_pki, tmp_path, "short_job_lane = false")).short_job_lane is False
    with pytest.raises(ConfigError) as err:
        load_antenna(antenna_toml(test_pki, tmp_path, 'short_job_lane = "no"'))
    assert err.value.key == "antenna.short_job_lane" and "must be a bool" in str(err.value)


def test_a_placement_decision_says_which_hub_was_kept_for_shorter_jobs():
    from antenna.core import _decision
    from federation.placement import Scored, Verdict
    ranked = [Scored(BIG, 50), Scored(SMALL, 0, kept=True)]
    text = _decision(ranked[0], "estimated wait 50s", ranked, [Verdict("big"), Verdict("small")], JobSpec(argv=("x",)))
    assert text == "placed on big (estimated wait 50s) | small #2 (wait 0s; kept for shorter jobs)"


async def test_the_antenna_keeps_the_hub_with_fewest_gpus_as_its_lane_unless_switched_off(test_pki, tmp_path):
    small = (PartitionConfig("booster", "A100", 2, 7200),)
    big = (PartitionConfig("booster", "A100", 8, 7200), PartitionConfig("gpu", "H100", 8, 7200))
    async with running_federation(test_pki, tmp_path / "on", {"leonardo": {"partitions": big},
                                                              "lumi": {"partitions": small}}, antenna={}) as f:
        core = f.antennas["antenna-a"].core
        assert core._lane() == "lumi"  # 2 GPUs against 16 in two partitions
        core.sites["lumi"].untrusted = "its certificate was revoked"
        assert core._lane() == ""  # one trusted hub left: no lane
    async with running_federation(test_pki, tmp_path / "off", {"leonardo": {"partitions": big},
                                                               "lumi": {"partitions": small}},
                                  antenna={"short_job_lane": False}) as f:
        assert f.antennas["antenna-a"].core._lane() == ""
