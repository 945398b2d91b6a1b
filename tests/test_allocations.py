"""Allocations (GPU-hour budgets per project) enforced by the antenna, and `aifed usage`.

Unit tests of antenna/allocations.py (loading, selection, window, budget, charging), then end-to-end through real
daemons: a job charged its real runtime, `aifed usage --json`, a refusal that says what is left, and two
submissions racing for the last GPU-hours.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from antenna.allocations import Allocation, Allocations, cost_s, load, retention_s, runtime_s
from federation.cli import main
from federation.config import load_antenna
from federation.errors import ConfigError, FailedPrecondition, PermissionDenied
from federation.identity import Identity, Role
from federation.model import AccessMode, Job, JobSpec, JobState, Transition
from tests.conftest import FEDERATION, running_federation

LARGE, SCIENCE, PLAY = AccessMode.LARGE_SCALE, AccessMode.AI_FOR_SCIENCE, AccessMode.PLAYGROUND
START = dt.datetime(2026, 9, 1, tzinfo=dt.timezone.utc).timestamp()
END = dt.datetime(2027, 2, 28, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp()
ALICE = f"spiffe://{FEDERATION}/user/antenna-a/alice"
BOB = f"spiffe://{FEDERATION}/user/antenna-a/bob"
GOOD = """
[[allocation]]
project = "ai-health-2026"
gpu_hours = 5000
start = 2026-09-01T00:00:00Z
end = 2027-02-28T23:59:59Z
modes = ["large-scale", "ai-for-science"]

[[allocation]]
project = "climate-dt"
gpu_hours = 12.5
start = 2026-09-01
end = "2026-12-01T00:00:00+01:00"
hub = "leonardo"
"""
PEOPLE = """
[[project]]
name = "ai-health-2026"
country = "SI"
members = ["ana", "bojan"]

[[project]]
name = "open-science"

[[user]]
name = "marta"
country = "HR"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "allocations.toml"
    path.write_text(text)
    return path


def book(*allocations: Allocation) -> Allocations:
    return Allocations([replace(a, index=i) for i, a in enumerate(allocations)], "antenna-a")


def alloc(project="p", gpu_hours=10.0, start=START, end=END, modes=(), hub="") -> Allocation:
    return Allocation(0, project, gpu_hours, start, end, tuple(modes), hub)


def spec(gpus=1, walltime_s=3600, mode=LARGE, project="p", site="") -> JobSpec:
    return JobSpec(argv=("true",), gpus=gpus, walltime_s=walltime_s, access_mode=mode, project=project, site=site)


def job(s: JobSpec, at: float, job_id: str = "", owner: str = ALICE) -> Job:
    return Job(id=job_id or f"antenna-a-{int(at * 1000) % 10**12:012x}", spec=s, state=JobState.PENDING,
               owner=owner, created_at=at, updated_at=at, history=(Transition(JobState.PENDING, at),))


def submit(b: Allocations, s: JobSpec, now: float, tasks: int = 1, owner: str = ALICE) -> tuple[JobSpec, list[Job]]:
    """What the antenna does: assess before storing, then reserve in the storing transaction."""
    s, a = b.assess(s, now, tasks)
    jobs = [job(s, now, f"antenna-a-{now:.0f}{i:04d}{len(b._jobs):06d}", owner) for i in range(tasks)]
    if a is not None and (refusal := b.reserve(a, jobs, s)) is not None:
        raise refusal
    return s, jobs


def used(b: Allocations, index: int = 0) -> tuple[float, float, int]:
    usage = b.usage()[0][index]
    return usage.used_s / 3600, usage.reserved_s / 3600, usage.jobs


# -- loading ---------------------------------------------------------------------------------------------------

def test_a_good_file_loads_with_dates_strings_and_zones(tmp_path):
    health, climate = load(write(tmp_path, GOOD)).allocations
    assert (health.project, health.gpu_hours, health.start, health.end, health.modes, health.hub) == \
        ("ai-health-2026", 5000.0, START, END, (LARGE, SCIENCE), "")
    assert climate.start == START  # a plain date is midnight UTC
    assert climate.end == dt.datetime(2026, 11, 30, 23, tzinfo=dt.timezone.utc).timestamp()
    assert (climate.gpu_hours, climate.modes, climate.hub) == (12.5, (), "leonardo")


@pytest.mark.parametrize("text, key, says", [
    ('[[allocation]]\ngpu_hours = 1\nstart = 2026-09-01\nend = 2026-10-01\n', "allocation[0].project", "is required"),
    ('[[allocation]]\nproject = "p"\nstart = 2026-09-01\nend = 2026-10-01\n', "allocation[0].gpu_hours",
     "is required"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = 0\nstart = 2026-09-01\nend = 2026-10-01\n',
     "allocation[0].gpu_hours", "above 0"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = -5.5\nstart = 2026-09-01\nend = 2026-10-01\n',
     "allocation[0].gpu_hours", "above 0"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = true\nstart = 2026-09-01\nend = 2026-10-01\n',
     "allocation[0].gpu_hours", "a number of GPU-hours"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = "100"\nstart = 2026-09-01\nend = 2026-10-01\n',
     "allocation[0].gpu_hours", "a number of GPU-hours"),
    ('[[allocation]]\nproject = ""\ngpu_hours = 1\nstart = 2026-09-01\nend = 2026-10-01\n',
     "allocation[0].project", "1-128 printable"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = 1\nstart = 2026-09-01T00:00:00\nend = 2026-10-01\n',
     "allocation[0].start", "needs a time zone"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = 1\nstart = "next monday"\nend = 2026-10-01\n',
     "allocation[0].start", "not a date and time"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = 1\nstart = 2026-09-01\nend = 2026-09-01\n',
     "allocation[0].end", "must be after start (2026-09-01T00:00:00Z)"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = 1\nstart = 2026-09-01\nend = 2026-10-01\nmodes = ["huge"]\n',
     "allocation[0].modes", "unknown access mode 'huge'"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = 1\nstart = 2026-09-01\nend = 2026-10-01\nmodes = "large-scale"\n',
     "allocation[0].modes", "must be a list"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = 1\nstart = 2026-09-01\nend = 2026-10-01\nhub = "Leo nardo"\n',
     "allocation[0].hub", "Leo nardo"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = 1\nstart = 2026-09-01\nend = 2026-10-01\nbudget = 3\n',
     "allocation[0].budget", "is not a known key"),
    ('[allocation]\nproject = "p"\n', "allocation", "[[allocation]]"),
    ('[[allocations]]\nproject = "p"\n', "allocations", "[[allocation]], [[project]] and [[user]] tables only"),
    ('[[project]]\ncountry = "SI"\n', "project[0].name", "is required"),
    ('[[project]]\nname = "p"\ncountry = "Slovenia"\n', "project[0].country", "not an ISO 3166 alpha-2"),
    ('[[project]]\nname = "p"\ncountry = "si"\n', "project[0].country", "not an ISO 3166 alpha-2"),
    ('[[project]]\nname = "p"\nmembers = "ana"\n', "project[0].members", "must be a list of user names"),
    ('[[project]]\nname = "p"\nmembers = ["Ana Novak"]\n', "project[0].members", "user name 'Ana Novak'"),
    ('[[project]]\nname = "p"\nowner = "ana"\n', "project[0].owner", "is not a known key"),
    ('[[project]]\nname = "p"\n[[project]]\nname = "p"\n', "project[1]", "project p is described twice"),
    ('[[user]]\nname = "ana"\n', "user[0].country", "is required"),
    ('[[user]]\nname = "../ana"\ncountry = "SI"\n', "user[0].name", "is not valid"),
    ('[[user]]\nname = 7\ncountry = "SI"\n', "user[0].name", "must be a string"),
    ('[[user]]\nname = "ana"\ncountry = "SI"\n[[user]]\nname = "ana"\ncountry = "HR"\n', "user[1]",
     "user ana is described twice"),
    ('[[allocation]]\nproject = "p"\ngpu_hours = 1\nstart = 2026-09-01\nend = 2026-10-01\n'
     '[[allocation]]\nproject = "p"\ngpu_hours = 2\nstart = 2026-09-30\nend = 2026-12-01\nmodes = ["playground"]\n',
     "allocation[1]", "overlaps allocation[0]"),
])
def test_a_bad_file_is_refused_naming_the_allocation_and_key(tmp_path, text, key, says):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == key and says in str(err.value) and str(path) in str(err.value)


def test_projects_and_users_say_where_a_job_is_from_and_who_may_charge_a_project(tmp_path):
    access = load(write(tmp_path, GOOD + PEOPLE))
    assert [(p.name, p.country, sorted(p.members)) for p in access.projects] == \
        [("ai-health-2026", "SI", ["ana", "bojan"]), ("open-science", "", [])]
    assert access.users == (("marta", "HR"),)
    book = Allocations(access, "antenna-a")
    user = lambda name: Identity(FEDERATION, Role.USER, "antenna-a", name)  # noqa: E731
    operator = Identity(FEDERATION, Role.OPERATOR, "antenna-a", "marta")
    health, open_science, other = spec(project="ai-health-2026"), spec(project="open-science"), spec(project="x")
    # The project's country first, then the user's, then the antenna's.
    assert book.country_of(health, user("marta"), "AT") == "SI"
    assert book.country_of(open_science, user("marta"), "AT") == "HR"
    assert book.country_of(other, user("ana"), "AT") == "AT"
    assert book.country_of(other, operator, "AT") == "AT"  # an operator is not the user of the same name
    # Members only, for a project that lists them; anyone for one that does not; operators always.
    book.check_member(health, user("ana"))
    book.check_member(open_science, user("marta"))
    book.check_member(health, operator)
    with pytest.raises(PermissionDenied, match="project ai-health-2026 is open to its members only at antenna "
                                               "antenna-a, and marta is not one"):
        book.check_member(health, user("marta"))


def test_allocations_that_do_not_overlap_or_differ_in_hub_or_modes_load(tmp_path):
    text = "".join(f'[[allocation]]\nproject = "p"\ngpu_hours = 1\nstart = {s}\nend = {e}\n{extra}\n'
                   for s, e, extra in (
        ("2026-01-01", "2026-06-30", ""), ("2026-07-01", "2026-12-31", ""),  # one after the other
        ("2026-01-01", "2026-12-31", 'hub = "leonardo"'),  # the same dates at one hub
        ("2027-01-01", "2027-12-31", 'modes = ["large-scale"]'), ("2027-01-01", "2027-12-31", 'modes = ["playground"]'),
    ))
    assert len(load(write(tmp_path, text)).allocations) == 5


def antenna_toml(test_pki, tmp_path: Path, extra: str) -> Path:
    cert = test_pki.tls(Role.ANTENNA, "antenna-a")
    path = tmp_path / "antenna.toml"
    path.write_text(f'[antenna]\nsite = "antenna-a"\nfederation = "{FEDERATION}"\nlisten = "127.0.0.1:0"\n'
                    f'state_dir = "state"\n{extra}\n[[hubs]]\nsite = "leonardo"\nendpoint = "127.0.0.1:1"\n'
                    f'[tls]\nca = "{cert.ca}"\ncert = "{cert.cert}"\nkey = "{cert.key}"\n')
    return path


def test_the_antenna_config_names_the_file_and_checks_it_at_load(test_pki, tmp_path):
    write(tmp_path, GOOD)
    assert load_antenna(antenna_toml(test_pki, tmp_path, 'allocations = "allocations.toml"')).allocations == \
        tmp_path / "allocations.toml"  # relative to the config file
    assert load_antenna(antenna_toml(test_pki, tmp_path, "")).allocations is None
    write(tmp_path, GOOD.replace("gpu_hours = 5000", "gpu_hours = 0"))
    with pytest.raises(ConfigError) as err:
        load_antenna(antenna_toml(test_pki, tmp_path, 'allocations = "allocations.toml"'))
    assert err.value.key == "antenna.allocations" and "allocation[0].gpu_hours: must be a number" in str(err.value)
    with pytest.raises(ConfigError, match="allocations file not found"):
        load_antenna(antenna_toml(test_pki, tmp_path, 'allocations = "missing.toml"'))


def test_finished_jobs_are_kept_as_long_as_the_longest_allocation_lasts():
    a = alloc(start=START, end=START + 200 * 86400)
    assert retention_s(90 * 86400, [a]) == 200 * 86400
    assert retention_s(400 * 86400, [a]) == 400 * 86400
    assert retention_s(0, [a]) == 0  # kept for ever already
    assert retention_s(90 * 86400, []) == 90 * 86400


# -- which jobs need and get an allocation ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [LARGE, SCIENCE])
def test_large_scale_and_ai_for_science_need_an_allocation_of_the_project(mode):
    b = book(alloc(project="other"))
    with pytest.raises(FailedPrecondition, match=f"{mode.slug} jobs need an approved allocation, and project p has "
                                                 "none at antenna antenna-a"):
        b.assess(spec(mode=mode), START + 10)
    with pytest.raises(FailedPrecondition, match="give the job's project"):
        b.assess(spec(mode=mode, project=""), START + 10)
    with pytest.raises(FailedPrecondition, match="has none"):
        Allocations().assess(spec(mode=mode), START + 10)  # an antenna without allocations refuses them too
    assert Allocations().assess(spec(mode=PLAY), START + 10) == (spec(mode=PLAY), None)  # others need none


def test_the_modes_an_allocation_grants_are_respected():
    b = book(alloc(modes=(SCIENCE,)))
    with pytest.raises(FailedPrecondition, match="project p's allocations grant ai-for-science only"):
        b.assess(spec(mode=LARGE), START + 10)
    assert b.assess(spec(mode=SCIENCE), START + 10)[1] is b.all[0]
    assert b.assess(spec(mode=PLAY), START + 10)[1] is None  # not granted: not charged either
    assert book(alloc()).assess(spec(mode=PLAY), START + 10)[1] is not None  # no modes: any mode is charged


def test_start_and_end_are_boundaries_of_the_window():
    b = book(alloc(end=START + 7200))
    with pytest.raises(FailedPrecondition, match="allocation 2026-09-01T00:00:00Z..2026-09-01T02:00:00Z starts on "
                                                 "2026-09-01T00:00:00Z"):
        b.assess(spec(walltime_s=60), START - 1)
    assert b.assess(spec(walltime_s=60), START)[1] is not None  # from its first second
    assert b.assess(spec(walltime_s=60), START + 7200 - 60)[1] is not None  # ends exactly at the end
    with pytest.raises(FailedPrecondition, match="ended on 2026-09-01T02:00:00Z"):
        b.assess(spec(walltime_s=60), START + 7201)
    assert b.assess(spec(walltime_s=60, mode=PLAY), START + 7201)[1] is None  # no longer charged, not refused


def test_a_job_whose_walltime_would_run_past_the_end_is_refused():
    b = book(alloc(end=START + 7200))
    with pytest.raises(FailedPrecondition) as err:
        b.assess(spec(walltime_s=3600), START + 5400)
    assert "would run past the allocation's end on 2026-09-01T02:00:00Z" in err.value.message
    assert "at most 0.5 hours of walltime left" in err.value.message
    with pytest.raises(FailedPrecondition, match="run past"):  # in every mode charged to it
        b.assess(spec(walltime_s=3600, mode=PLAY), START + 5400)


def test_a_hub_allocation_pins_a_job_that_needs_it_to_its_hub():
    b = book(alloc(hub="leonardo"))
    pinned, a = b.assess(spec(), START + 10)
    assert (pinned.site, a.hub) == ("leonardo", "leonardo")
    assert b.assess(spec(site="leonardo"), START + 10)[1] is a
    with pytest.raises(FailedPrecondition, match="allocations for large-scale are for hub\\(s\\) leonardo only; "
                                                 "this job is pinned to lumi"):
        b.assess(spec(site="lumi"), START + 10)
    # A job that does not need an allocation is charged to a hub's only if it can only run there.
    assert b.assess(spec(mode=PLAY), START + 10) == (spec(mode=PLAY), None)
    assert b.assess(spec(mode=PLAY, site="leonardo"), START + 10)[1] is a


def test_a_job_is_pinned_to_the_first_hub_allocation_with_room_and_a_pinned_job_prefers_its_hubs():
    b = book(alloc(hub="leonardo", gpu_hours=1), alloc(hub="lumi", gpu_hours=4), alloc(gpu_hours=100))
    assert b.assess(spec(site="lumi"), START)[1].hub == "lumi"  # pinned: that hub's allocation first
    assert b.assess(spec(site="jupiter"), START)[1].hub == ""  # no allocation there: the federation's
    assert b.assess(spec(), START)[1].hub == ""  # free to go anywhere: federation-wide, not pinned
    hubs_only = book(alloc(hub="leonardo", gpu_hours=1), alloc(hub="lumi", gpu_hours=4))
    assert hubs_only.assess(spec(gpus=1), START)[0].site == "leonardo"
    assert hubs_only.assess(spec(gpus=2), START)[0].site == "lumi"  # leonardo's has no room for it
    with pytest.raises(FailedPrecondition, match="project p has 1 GPU-hours left of 1 in allocation .* at hub "
                                                 "leonardo"):
        hubs_only.assess(spec(gpus=8), START)


# -- the budget ---------------------------------------------------------------------------------------------------

def test_the_budget_can_be_used_exactly_and_then_not_one_gpu_second_more():
    b = book(alloc(gpu_hours=3))
    submit(b, spec(gpus=2, walltime_s=3600), START)
    submit(b, spec(gpus=1, walltime_s=3600), START)  # exactly what is left
    assert used(b) == (0, 3, 2)
    with pytest.raises(FailedPrecondition) as err:
        submit(b, spec(gpus=1, walltime_s=1), START)
    assert err.value.message == (
        "project p has 0 GPU-hours left of 3 in allocation 2026-09-01T00:00:00Z..2027-02-28T23:59:59Z (3 reserved "
        "by running or queued jobs); this job asks for 0.0003 (1 GPUs × 0.0003 h)")
    assert submit(b, spec(gpus=0, walltime_s=3600), START)  # CPU jobs cost nothing
    assert used(b)[:2] == (0, 3)


def test_a_job_that_ended_is_charged_its_real_runtime_not_its_walltime():
    b = book(alloc(gpu_hours=10))
    _, (j,) = submit(b, spec(gpus=4, walltime_s=3600), START)
    assert used(b) == (0, 4, 1)
    running = j.moved(JobState.RUNNING, at=START + 60)
    b.observe(running)
    assert used(b) == (0, 4, 1)  # still reserved in full while it runs
    done = running.moved(JobState.COMPLETED, at=START + 60 + 900)
    assert runtime_s(done) == 900 and cost_s(done) == 4 * 900
    b.observe(done)
    assert used(b) == (1, 0, 1)  # 4 GPUs x 15 minutes
    b.observe(running)  # a stale copy never undoes the end
    assert used(b) == (1, 0, 1)
    _, (never,) = submit(b, spec(gpus=4), START + 100)
    b.observe(never.moved(JobState.CANCELLED, at=START + 200))  # it never ran: nothing charged
    assert used(b) == (1, 0, 2)
    assert b.assess(spec(gpus=9, walltime_s=3600), START + 300)[1] is not None  # 9 of the 9 left


def test_an_array_is_charged_for_every_task():
    b = book(alloc(gpu_hours=2.5))
    with pytest.raises(FailedPrecondition, match=r"this array asks for 3 \(3 tasks × 1 GPUs × 1 h\)"):
        submit(b, spec(gpus=1), START, tasks=3)
    assert used(b) == (0, 0, 0)  # refused as a whole
    submit(b, spec(gpus=1), START, tasks=2)
    assert used(b) == (0, 2, 2)


def test_reserve_refuses_what_assess_let_through_when_another_submission_took_the_room_first():
    """The check at `assess` is early advice; `reserve`, in the storing transaction, is the one that counts."""
    b = book(alloc(gpu_hours=1))
    first, second = (b.assess(spec(), START) for _ in range(2))  # both see 1 GPU-hour left
    assert b.reserve(first[1], [job(first[0], START, "antenna-a-000000000001")], first[0]) is None
    refusal = b.reserve(second[1], [job(second[0], START, "antenna-a-000000000002")], second[0])
    assert isinstance(refusal, FailedPrecondition) and "has 0 GPU-hours left of 1" in refusal.message
    b.release(["antenna-a-000000000001"])  # its transaction was undone
    assert used(b) == (0, 0, 0)


def test_usage_shows_users_only_the_projects_they_have_jobs_under_and_their_own_consumption():
    b = book(alloc(project="p"), alloc(project="q"))
    submit(b, spec(project="p"), START, owner=ALICE)
    submit(b, spec(project="p", gpus=2), START, owner=BOB)
    submit(b, spec(project="q", mode=PLAY), START, owner=BOB)
    allocations, users = b.usage(ALICE)
    assert [u.allocation.project for u in allocations] == ["p"]
    assert allocations[0].reserved_s == 3 * 3600 and allocations[0].jobs == 2  # the project's, everyone's jobs
    assert [(u.project, u.owner, u.reserved_s) for u in users] == [("p", ALICE, 3600)]
    allocations, users = b.usage(None)  # an operator
    assert [u.allocation.project for u in allocations] == ["p", "q"]
    assert {(u.project, u.owner) for u in users} == {("p", ALICE), ("p", BOB), ("q", BOB)}
    assert b.usage(f"spiffe://{FEDERATION}/user/antenna-a/carol") == ([], [])


def test_usage_is_rebuilt_from_the_journals_jobs():
    b = book(alloc(gpu_hours=10))
    _, (a,) = submit(b, spec(gpus=2), START)
    done = a.moved(JobState.RUNNING, at=START + 1).moved(JobState.COMPLETED, at=START + 1801)
    _, (c,) = submit(b, spec(gpus=1), START + 5)
    fresh = book(alloc(gpu_hours=10))
    fresh.rebuild([done, c, job(spec(project="elsewhere"), START)])
    assert used(fresh) == (1, 1, 2)


# -- end to end --------------------------------------------------------------------------------------------------

MODES = (PLAY, LARGE, SCIENCE)
E2E = """
[[allocation]]
project = "ai-health"
gpu_hours = 1.5
start = {start}
end = {end}
modes = ["large-scale"]

[[allocation]]
project = "race"
gpu_hours = 1
start = {start}
end = {end}
"""


@pytest.fixture
async def budgeted(test_pki, tmp_path):
    """leonardo and lumi accept large-scale; antenna-a has allocations valid from an hour ago to a day ahead."""
    now = time.time()
    stamp = lambda t: dt.datetime.fromtimestamp(int(t), dt.timezone.utc).isoformat()  # noqa: E731
    path = write(tmp_path, E2E.format(start=stamp(now - 3600), end=stamp(now + 86400)))
    async with running_federation(test_pki, tmp_path, {"leonardo": {"access_modes": MODES},
                                                      "lumi": {"access_modes": MODES}},
                                  antenna={"allocations": path}) as f:
        yield f


def cli(f, test_pki, user: str, *args: str) -> list[str]:
    tls = test_pki.user("antenna-a", user)
    return [*args, "--antenna", f"127.0.0.1:{f.antennas['antenna-a'].port}", "--ca", str(tls.ca),
            "--cert", str(tls.cert), "--key", str(tls.key)]


async def test_a_job_is_charged_its_runtime_and_usage_shows_it(budgeted, test_pki, capsys):
    alice = budgeted.client("alice")
    job = await alice.submit(JobSpec(argv=("sleep", "1"), gpus=1, walltime_s=1800, access_mode=LARGE,
                                     project="ai-health"))
    done = await alice.wait(job.id)
    assert done.state is JobState.COMPLETED
    ran = runtime_s(done)
    assert 0.9 < ran < 30  # real runtime, far below the 30 minutes of walltime reserved

    async def usage(user: str) -> dict:
        assert await asyncio.to_thread(main, cli(budgeted, test_pki, user, "usage", "--json")) == 0
        return json.loads(capsys.readouterr().out)

    mine = await usage("alice")
    (health,) = mine["allocations"]  # not project race: alice has no job there
    assert (health["project"], health["hub"], health["modes"], health["gpu_hours"], health["jobs"]) == \
        ("ai-health", "federation", ["large-scale"], 1.5, 1)
    assert health["used"] == pytest.approx(ran / 3600) and health["reserved"] == 0
    assert health["remaining"] == pytest.approx(1.5 - ran / 3600)
    assert [(u["project"], u["user"]) for u in mine["users"]] == [("ai-health", ALICE)]
    assert await usage("bob") == {"allocations": [], "users": []}
    assert await asyncio.to_thread(main, cli(budgeted, test_pki, "alice", "usage")) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["PROJECT", "HUB", "MODES", "START", "END", "GPU_HOURS", "USED",
                                             "RESERVED", "REMAINING", "JOBS"]
    assert "ai-health  federation  large-scale" in table and "alice" in table
    operator = Identity(FEDERATION, Role.OPERATOR, "antenna-a", "olga")
    allocations, _ = budgeted.antennas["antenna-a"].core.usage(operator)
    assert [a.allocation.project for a in allocations] == ["ai-health", "race"]

    # Over budget: refused before anything is stored, saying what is left.
    before = budgeted.antennas["antenna-a"].core.journal.count()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alice.submit(JobSpec(argv=("true",), gpus=2, walltime_s=3600, access_mode=LARGE, project="ai-health"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"project ai-health has {1.5 - ran / 3600:.4f}".rstrip("0") in err.value.details()
    assert "GPU-hours left of 1.5 in allocation" in err.value.details()
    assert "this job asks for 2 (2 GPUs × 1 h)" in err.value.details()
    assert budgeted.antennas["antenna-a"].core.journal.count() == before
    # No allocation for the mode: refused too.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alice.submit(JobSpec(argv=("true",), access_mode=SCIENCE, project="ai-health"))
    assert "ai-for-science jobs need an approved allocation, and project ai-health's allocations grant large-scale " \
           "only" in err.value.details()


async def test_dry_run_says_what_is_left_and_an_array_may_use_up_the_rest(budgeted, test_pki, capsys):
    args = cli(budgeted, test_pki, "alice", "submit", "--dry-run", "-G", "1", "-t", "30:00", "--mode",
               "large-scale")
    assert await asyncio.to_thread(main, [*args, "-A", "ai-health", "--", "true"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: would be forwarded to")
    assert "charged to project ai-health's allocation" in out and "1.5 GPU-hours left of 1.5" in out
    assert "this job asks for 0.5" in out
    assert await asyncio.to_thread(main, [*args, "-A", "nothing", "--", "true"]) == 7
    assert "project nothing has none" in capsys.readouterr().err
    # An array of 3 tasks x 1 GPU x 30 minutes is exactly the 1.5 GPU-hours: accepted; then not one more task.
    alice = budgeted.client("alice")
    task = JobSpec(argv=("sleep", "30"), gpus=1, walltime_s=1800, access_mode=LARGE, project="ai-health")
    results = await alice.submit_many([(task, "", "0-2")])
    assert [r.array_task for r in results] == [0, 1, 2]
    (refused,) = await alice.submit_many([(task, "", "7")])
    assert isinstance(refused, FailedPrecondition)
    assert "has 0 GPU-hours left of 1.5" in refused.message and "(1.5 reserved by running or queued jobs)" in \
        refused.message


async def test_two_submissions_racing_for_the_last_gpu_hours_cannot_both_win(budgeted):
    """Project race has 1 GPU-hour; two users each ask for all of it at the same time: exactly one is stored."""
    core = budgeted.antennas["antenna-a"].core
    race = JobSpec(argv=("sleep", "30"), gpus=1, walltime_s=3600, project="race")
    outcomes = await asyncio.gather(budgeted.client("alice").submit(race), budgeted.client("bob").submit(race),
                                    return_exceptions=True)
    accepted = [o for o in outcomes if isinstance(o, Job)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(accepted) == 1 and len(refused) == 1, outcomes
    assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "project race has 0 GPU-hours left of 1" in refused[0].details()
    assert "(1 reserved by running or queued jobs)" in refused[0].details()
    assert [j.id for j in core.journal.list() if j.spec.project == "race"] == [accepted[0].id]
    # Once it ends (cancelled here), its reservation gives way to what it really used.
    winner = budgeted.client("alice") if accepted[0].owner == ALICE else budgeted.client("bob")
    await winner.cancel(accepted[0].id)
    ended = await winner.wait(accepted[0].id)
    (usage,) = [u for u in core.usage(Identity(FEDERATION, Role.OPERATOR, "antenna-a", "olga"))[0]
                if u.allocation.project == "race"]
    assert usage.reserved_s == 0 and usage.used_s == pytest.approx(runtime_s(ended))
    assert usage.used_s < 60
    assert await winner.submit(replace(race, walltime_s=3000))  # 0.83 of the ~1 GPU-hour left
