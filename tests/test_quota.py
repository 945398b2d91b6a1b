"""GPU-hours per project and period at a hub (`[modes.<mode>] max_gpu_hours`, `period`): the ledger at its
boundaries, the config, the antenna's pre-flight check, and the refusal through real daemons."""

from __future__ import annotations

import asyncio

import pytest

from federation.config import ModeLimits, load_hub
from federation.errors import ConfigError
from federation.identity import Role
from federation.model import AccessMode, Job, JobSpec, JobState
from hub.quota import Quotas, consumption, cost_s
from tests.conftest import running_federation
from tests.test_config import HUB, write

FAST = AccessMode.FAST_LANE
DAY = 86400


def job(job_id: str, gpus: int, walltime_s: int, at: float, project: str = "p1", antenna: str = "antenna-a",
        mode: AccessMode = FAST) -> Job:
    spec = JobSpec(argv=("true",), gpus=gpus, walltime_s=walltime_s, access_mode=mode, project=project)
    return Job(id=job_id, spec=spec, state=JobState.PENDING, owner="spiffe://x/user/antenna-a/alice",
               antenna=antenna, site="leonardo", created_at=at, updated_at=at)


def quotas(gpu_hours: float = 10, period_s: int = 7 * DAY) -> Quotas:
    return Quotas([ModeLimits(FAST, max_gpu_hours=gpu_hours, period_s=period_s)], "leonardo")


def test_exactly_the_cap_is_accepted_and_the_next_gpu_second_is_not():
    q, now = quotas(10), 1_000_000.0
    assert q.admit(job("a-1", 4, 2 * 3600, now)) is None     # 8 GPU-hours
    assert q.admit(job("a-2", 2, 3600, now)) is None          # 10: exactly the cap
    refusal = q.admit(job("a-3", 1, 1, now))
    assert refusal is not None and refusal.code.name == "FAILED_PRECONDITION"
    assert refusal.message == ("project p1 of antenna antenna-a has 0 of its 10 GPU-hours left in fast-lane at site "
                               "leonardo over the last 7 day(s); this job asks for 0.0002778")
    # Another project, another antenna with the same project name, another mode, a CPU job: not this budget.
    assert q.admit(job("a-4", 1, 3600, now, project="p2")) is None
    assert q.admit(job("b-1", 1, 3600, now, antenna="antenna-b")) is None
    assert q.admit(job("a-5", 8, 3600, now, mode=AccessMode.PLAYGROUND)) is None
    assert q.admit(job("a-6", 0, 3600, now)) is None


def test_a_job_that_ended_counts_its_real_runtime_and_old_jobs_leave_the_window():
    q, now = quotas(10, period_s=DAY), 1_000_000.0
    first = job("a-1", 4, 2 * 3600, now)
    assert q.admit(first) is None                              # reserves 8
    ran = first.moved(JobState.RUNNING, "", at=now + 10).moved(JobState.COMPLETED, "", at=now + 10 + 900)
    assert cost_s(ran) == 4 * 900
    q.observe(ran)                                             # charged 1 GPU-hour, not 8
    assert q.admit(job("a-2", 9, 3600, now + 1000)) is None    # 1 + 9 = 10
    assert q.admit(job("a-3", 1, 60, now + 1000)) is not None
    # A day later the first two are out of the window: the budget is whole again.
    assert q.admit(job("a-4", 10, 3600, now + DAY + 1001)) is None
    never_ran = job("a-5", 4, 3600, now).moved(JobState.CANCELLED, "", at=now + 5)
    assert cost_s(never_ran) == 0


def test_the_ledger_is_rebuilt_from_the_journal():
    now = 1_000_000.0
    jobs = [job("a-1", 4, 3600, now - 100), job("a-2", 4, 3600, now - 8 * DAY)]  # the second is too old
    q = quotas(10)
    q.rebuild(jobs, now=now)
    assert q.admit(job("a-3", 6, 3600, now)) is None
    assert q.admit(job("a-4", 1, 3600, now)) is not None
    q.forget(["a-3"])
    assert q.admit(job("a-4", 1, 3600, now)) is None


@pytest.fixture
def cfg_folder(tmp_path, test_pki):
    """A folder with the files tests.test_config.HUB names: pki/ca.pem, pki/cert.pem, pki/cert.key."""
    tls = test_pki.tls(Role.HUB, "leonardo")
    (tmp_path / "pki").mkdir()
    for src, name in ((tls.ca, "ca.pem"), (tls.cert, "cert.pem"), (tls.key, "cert.key")):
        (tmp_path / "pki" / name).write_bytes(src.read_bytes())
    return tmp_path


def test_config_reads_and_checks_the_caps(cfg_folder):
    config = load_hub(write(cfg_folder, HUB + '\n[modes.fast-lane]\nmax_gpu_hours = 500\nperiod = "30d"\n'))
    (limits,) = config.mode_limits
    assert (limits.mode, limits.max_gpu_hours, limits.period_s) == (FAST, 500.0, 30 * DAY)
    assert load_hub(write(cfg_folder, HUB + '\n[modes.fast-lane]\nmax_gpu_hours = 1.5\n')).mode_limits[0].period_s \
        == 30 * DAY
    for extra, key, says in (('max_gpu_hours = -1', "modes.fast-lane.max_gpu_hours", "between 0"),
                             ('period = "7d"', "modes.fast-lane.period", "only with max_gpu_hours"),
                             ('max_gpu_hours = 5\nperiod = "10m"', "modes.fast-lane.period", "between 1 hour")):
        with pytest.raises(ConfigError) as err:
            load_hub(write(cfg_folder, HUB + f"\n[modes.fast-lane]\n{extra}\n"))
        assert err.value.key == key and says in err.value.problem


async def test_a_hub_refuses_a_project_over_its_gpu_hours_and_antennas_see_the_cap(test_pki, tmp_path):
    caps = (ModeLimits(FAST, max_gpu_hours=3, period_s=DAY),)
    async with running_federation(test_pki, tmp_path, {"leonardo": {"mode_limits": caps}}, antenna={}) as fed:
        client = fed.client("alice")
        spec = JobSpec(argv=("sleep", "20"), gpus=2, walltime_s=3600, access_mode=FAST, project="p1")
        # One job alone beyond the cap is refused before anything is stored, from the advert.
        with pytest.raises(Exception) as err:
            await client.submit(JobSpec(argv=("true",), gpus=4, walltime_s=3600, access_mode=FAST, project="p1"))
        assert "allows at most 3 GPU-hours per project every 1 day(s) in fast-lane" in str(err.value)
        first = await client.submit(spec)                      # reserves 2 of 3
        second = await client.submit(spec)                     # would make 4: refused by the hub
        done = await asyncio.wait_for(client.wait(second.id), 30)
        assert done.state is JobState.FAILED
        assert "project p1 of antenna antenna-a has 1 of its 3 GPU-hours left in fast-lane" in done.reason
        other = await client.submit(JobSpec(argv=("true",), gpus=1, walltime_s=3600, access_mode=FAST,
                                            project="p2"))
        assert (await asyncio.wait_for(client.wait(other.id), 30)).state is JobState.COMPLETED
        await client.cancel(first.id)


# -- consumption per antenna: `aifed usage --hub` ---------------------------------------------------------------

def test_consumption_sums_gpu_hours_per_antenna_project_and_mode():
    now = 1_000_000.0
    done = job("a-1", 2, 3600, now).moved(JobState.RUNNING, "", at=now + 10).moved(JobState.COMPLETED, "", at=now + 910)
    never_ran = job("a-2", 4, 3600, now).moved(JobState.CANCELLED, "", at=now + 5)
    queued = job("a-3", 1, 7200, now, project="p2")
    other = job("b-1", 8, 600, now, antenna="antenna-b", mode=AccessMode.PLAYGROUND)
    rows = consumption([other, queued, never_ran, done])
    assert [(r.antenna, r.project, r.mode, r.used_s, r.reserved_s, r.jobs) for r in rows] == [
        ("antenna-a", "p1", FAST, 2 * 900.0, 0.0, 2),          # real runtime; a job that never ran costs nothing
        ("antenna-a", "p2", FAST, 0.0, 7200.0, 1),             # not ended: its walltime is reserved
        ("antenna-b", "p1", AccessMode.PLAYGROUND, 0.0, 4800.0, 1)]


async def test_a_hubs_operator_sees_every_antennas_consumption_and_an_antenna_its_own(test_pki, tmp_path, capsys):
    from federation.cli import main
    from federation.pb import hub_pb2, hub_pb2_grpc
    from federation.rpc import secure_channel
    from tests.test_drain import operator

    async with running_federation(test_pki, tmp_path, {"leonardo": {}}, antenna={}) as f:
        await f.start_antenna("antenna-b")
        await f.wait_sites("antenna-b")
        jobs = [(f.client("alice"), JobSpec(argv=("sleep", "1"), gpus=1, walltime_s=600, project="p1")),
                (f.client("bob"), JobSpec(argv=("true",), walltime_s=600)),
                (f.client("carol", "antenna-b"), JobSpec(argv=("sleep", "1"), gpus=2, walltime_s=600,
                                                          project="p9"))]
        done = [await c.wait((await c.submit(s)).id) for c, s in jobs]
        assert {j.state for j in done} == {JobState.COMPLETED}
        hub = f"127.0.0.1:{f.hubs['leonardo'].port}"
        olga = operator(test_pki, "leonardo")
        argv = ["usage", "--hub", hub, "--ca", str(olga.ca), "--cert", str(olga.cert), "--key", str(olga.key)]
        assert await asyncio.to_thread(main, [*argv, "--json"]) == 0
        out = __import__("json").loads(capsys.readouterr().out)
        assert out["site"] == "leonardo"
        rows = {(r["antenna"], r["project"]): r for r in out["rows"]}
        assert set(rows) == {("antenna-a", "p1"), ("antenna-a", ""), ("antenna-b", "p9")}
        journal = f.hubs["leonardo"].core.journal
        for j in done:  # GPUs x the runtime the hub recorded
            assert rows[(j.antenna, j.spec.project)]["used"] == pytest.approx(cost_s(journal.get(j.id)) / 3600)
        assert rows[("antenna-b", "p9")]["used"] > 0.0005 and rows[("antenna-b", "p9")]["reserved"] == 0
        assert rows[("antenna-a", "")]["jobs"] == 1 and rows[("antenna-a", "")]["mode"] == "unspecified"
        assert await asyncio.to_thread(main, argv) == 0
        table = capsys.readouterr().out
        assert table.startswith("hub leonardo, jobs accepted since ")
        assert ["ANTENNA", "USED", "RESERVED", "JOBS"] == table.strip().split("\n\n")[-1].splitlines()[0].split()
        assert await asyncio.to_thread(main, [*argv, "--days", "0"]) == 2
        assert "--days must be between 1 and 3660" in capsys.readouterr().err

        # An antenna sees its own consumption only; a user nothing at all.
        async with secure_channel(hub, test_pki.tls(Role.ANTENNA, "antenna-b")) as channel:
            reply = await hub_pb2_grpc.HubStub(channel).GetUsage(hub_pb2.HubUsageRequest(), timeout=30)
        assert [(r.antenna, r.project) for r in reply.rows] == [("antenna-b", "p9")]
        async with secure_channel(hub, test_pki.tls(Role.USER, "antenna-a", "alice")) as channel:
            with pytest.raises(__import__("grpc").aio.AioRpcError) as err:
                await hub_pb2_grpc.HubStub(channel).GetUsage(hub_pb2.HubUsageRequest(), timeout=30)
        assert err.value.code().name == "PERMISSION_DENIED"
