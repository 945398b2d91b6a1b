"""A hub on real Slurm hands its waiting jobs to a peer: Slurm's own start estimates (squeue's start_time) say
which jobs wait too long; a job is held in Slurm (`scontrol hold`) before it is handed over, cancelled there once
the peer took it, released when the peer refuses it, and released after a restart that came before its move was
journaled. It never runs at both hubs."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest

from federation.balance import Move, Waiting
from federation.model import JobSpec, JobState
from hub.slurm import keyed
from tests.conftest import Federation, eventually, slurm_hub_config
from tests.test_balance import HOUR, _at, balance, operator


def squeue(lab) -> dict[str, dict]:
    return _squeue_env(lab.env)


def _squeue_env(env) -> dict[str, dict]:
    """squeue's entries by Slurm id (an array task's `<array id>_<task index>` included)."""
    out = subprocess.run(["squeue", "--json"], env={**env}, capture_output=True, check=True, text=True)
    return keyed(json.loads(out.stdout)["jobs"])


def sbatched(queue: dict[str, dict], job_id: str, slurm_id: str) -> list[str]:
    """The Slurm ids under which a job is in Slurm: by its own name (an sbatch of its own), or `slurm_id`."""
    return sorted(key for key, e in queue.items() if e.get("name") == job_id or key == slurm_id)


@pytest.fixture
async def slurm_crowded(test_pki, tmp_path, slurm_lab):
    """leonardo on the private Slurm (8 GPUs), balancing towards lumi (local, 8 GPUs, draining at first so that
    the antenna places everything on leonardo), and antenna-a."""
    from federation.config import PartitionConfig
    f = Federation(test_pki, tmp_path)
    try:
        await f.start_hub("lumi", partitions=(PartitionConfig("gpu", "A100", 8, 7200),))
        f.hubs["lumi"].core.set_drain(operator("lumi"), True, "not yet")
        config = slurm_hub_config(test_pki, tmp_path, slurm_lab)
        await f.start_hub("leonardo", config=replace(config, balance=balance(f.hubs["lumi"].port)))
        await f.start_antenna("antenna-a")
        await f.wait_sites()
        await eventually(lambda: f.antennas["antenna-a"].core.sites["lumi"].advert.draining)
        yield f
    finally:
        await f.close()
        # Whatever a failed test left in Slurm would hold the GPUs the next test fills.
        subprocess.run(["scancel", "--partition=gpu"], env={**slurm_lab.env}, capture_output=True, timeout=30)


async def _fill(f: Federation, n: int = 3, together: bool = False) -> list:
    """`n` jobs of 8 GPUs for an hour on leonardo: one runs, the others wait, with Slurm's estimates. Returns
    them in the order Slurm will run them (the hub submits concurrently: not necessarily the order sent).
    `together`: in one call, so that they reach Slurm as the tasks of one job array."""
    alice = f.client("alice")
    spec = JobSpec(argv=("sh", "-c", "echo ran at $AIFED_SITE; sleep 60"), gpus=8, walltime_s=HOUR)
    if together:
        receipts = await alice.submit_many([(spec, "", "") for _ in range(n)])
        jobs = [await alice.get(r.id) for r in receipts]
    else:
        jobs = [await alice.submit(spec) for _ in range(n)]
    leonardo = f.hubs["leonardo"].core

    def running():
        return [j for j in jobs if leonardo.journal.state(j.id) is JobState.RUNNING]

    first = (await eventually(running, 30))[0]
    waiting = await eventually(lambda: _waits(leonardo, {j.id for j in jobs} - {first.id}), 30)
    assert all(wait > HOUR / 2 for wait in waiting.values()), waiting  # behind an hour-long job
    return [first, *sorted((j for j in jobs if j.id in waiting), key=lambda j: waiting[j.id])]


async def _restart_leonardo(f: Federation, test_pki, tmp_path, slurm_lab, lumi_port: int):
    """Stop leonardo at once (as a crash would leave Slurm) and start it again; its core."""
    await f.hubs["leonardo"].stop(grace=0)
    config = slurm_hub_config(test_pki, tmp_path, slurm_lab)
    await f.start_hub("leonardo", config=replace(config, balance=balance(lumi_port)))
    return f.hubs["leonardo"].core


async def _waits(core, ids):
    waits = dict(await core.backend.waiting())
    return waits if ids <= set(waits) else None


@pytest.mark.parametrize("together", [False, True], ids=["jobs", "array"])
async def test_a_job_waiting_in_slurm_moves_to_the_idle_peer_and_runs_only_there(slurm_crowded, slurm_lab, together):
    f = slurm_crowded
    jobs = await _fill(f, together=together)
    if together:  # the tasks of one job array: the one that waits longest is the array's last
        assert len({f.hubs["leonardo"].core.journal.backend_ref(j.id).split("_")[0] for j in jobs}) == 1
    leonardo, lumi = f.hubs["leonardo"].core, f.hubs["lumi"].core
    slurm_id = leonardo.backend._tracked[jobs[2].id].slurm_id
    lumi.set_drain(operator("lumi"), False)
    await eventually(lambda: not leonardo.balancer.peers["lumi"].advert.draining)
    moves = await leonardo.balancer.round()
    assert [m.job.key for m in moves] == [jobs[2].id]  # the longest wait
    assert leonardo.journal.get(jobs[2].id).state is JobState.MOVED
    alice = f.client("alice")
    await eventually(lambda: _at(alice, jobs[2].id, "lumi", JobState.RUNNING))
    # In Slurm it was held, then cancelled: it can never start there.
    queue = squeue(slurm_lab)
    assert queue[slurm_id]["job_state"] == "CANCELLED", queue[slurm_id]
    assert sbatched(queue, jobs[2].id, slurm_id) == [slurm_id]  # sent to Slurm once
    assert not (leonardo.backend.folder(jobs[2].id) / "withdrawn").exists()
    # The other waiting job is still Slurm's, pending and not held.
    assert queue[leonardo.backend._tracked[jobs[1].id].slurm_id]["state_reason"] != "JobHeldAdmin"
    for job in jobs:
        await alice.cancel(job.id)


@pytest.mark.parametrize("together", [False, True], ids=["jobs", "array"])
async def test_a_refused_hand_off_releases_the_held_slurm_job(slurm_crowded, slurm_lab, together):
    f = slurm_crowded
    jobs = await _fill(f, 2, together)
    leonardo = f.hubs["leonardo"].core
    slurm_id = leonardo.backend._tracked[jobs[1].id].slurm_id
    job = leonardo.journal.get(jobs[1].id)
    # lumi still drains: it refuses the job per job (UNAVAILABLE), a definite no.
    await leonardo.balancer._move("lumi", [(job, Move(Waiting(job.id, 8, HOUR, HOUR, ("lumi",)), "lumi", 0.0))])
    back = leonardo.journal.get(job.id)
    assert back.state is JobState.QUEUED and "did not take it" in back.reason
    entry = squeue(slurm_lab)[slurm_id]  # the same Slurm job, released: no second sbatch
    assert entry["job_state"] == "PENDING" and entry["state_reason"] != "JobHeldAdmin", entry
    assert sbatched(squeue(slurm_lab), job.id, slurm_id) == [slurm_id]
    assert job.id in dict(await eventually(lambda: _waits(leonardo, {job.id}), 30))
    for j in jobs:
        await f.client("alice").cancel(j.id)


async def test_a_hold_left_by_a_crash_before_the_move_was_journaled_is_released(slurm_crowded, slurm_lab,
                                                                                 test_pki, tmp_path):
    f = slurm_crowded
    jobs = await _fill(f, 2)
    leonardo = f.hubs["leonardo"].core
    slurm_id = leonardo.backend._tracked[jobs[1].id].slurm_id
    assert await leonardo.backend.withdraw(jobs[1].id)  # held in Slurm; the hub "dies" before journaling MOVING
    assert squeue(slurm_lab)[slurm_id]["state_reason"] == "JobHeldAdmin"
    # A job that started since the hub last looked (it still thinks it waits) cannot be withdrawn: Slurm accepts
    # the hold, but the hub sees it running and lifts the hold again.
    running = leonardo.backend._tracked[jobs[0].id]
    running.state = JobState.QUEUED
    assert not await leonardo.backend.withdraw(jobs[0].id)
    entry = squeue(slurm_lab)[running.slurm_id]
    assert entry["job_state"] == "RUNNING" and entry["state_reason"] != "JobHeldAdmin", entry
    assert not (leonardo.backend.folder(jobs[0].id) / "withdrawn").exists()
    leonardo = await _restart_leonardo(f, test_pki, tmp_path, slurm_lab, f.hubs["lumi"].port)
    assert leonardo.journal.get(jobs[1].id).state is JobState.QUEUED
    entry = squeue(slurm_lab)[slurm_id]
    assert entry["job_state"] == "PENDING" and entry["state_reason"] != "JobHeldAdmin", entry
    assert not (leonardo.backend.folder(jobs[1].id) / "withdrawn").exists()
    for j in jobs:
        await f.client("alice").cancel(j.id)


async def test_a_hand_off_left_unanswered_by_a_restart_ends_with_the_slurm_job_cancelled(slurm_crowded, slurm_lab,
                                                                                         test_pki, tmp_path):
    from federation.config import PartitionConfig
    f = slurm_crowded
    jobs = await _fill(f, 2)
    leonardo = f.hubs["leonardo"].core
    slurm_id = leonardo.backend._tracked[jobs[1].id].slurm_id
    job = leonardo.journal.get(jobs[1].id)
    lumi_port = f.hubs["lumi"].port
    await f.hubs["lumi"].stop(grace=0)  # lumi dies before the hand-off reaches it: no answer
    await leonardo.balancer._move("lumi", [(job, Move(Waiting(job.id, 8, HOUR, HOUR, ("lumi",)), "lumi", 0.0))])
    assert leonardo.journal.get(job.id).state is JobState.MOVING
    assert squeue(slurm_lab)[slurm_id]["state_reason"] == "JobHeldAdmin"  # held meanwhile: it cannot start here
    leonardo = await _restart_leonardo(f, test_pki, tmp_path, slurm_lab, lumi_port)
    assert squeue(slurm_lab)[slurm_id]["state_reason"] == "JobHeldAdmin"  # still held after the restart
    await f.start_hub("lumi", partitions=(PartitionConfig("gpu", "A100", 8, 7200),))
    f.hubs["lumi"].core.set_drain(operator("lumi"), False)
    await eventually(lambda: leonardo.balancer.peers["lumi"].fresh)
    await leonardo.balancer.settle_unknown()  # offered again: lumi takes it, and the held Slurm job is cancelled
    assert leonardo.journal.get(job.id).state is JobState.MOVED
    assert squeue(slurm_lab)[slurm_id]["job_state"] == "CANCELLED"
    alice = f.client("alice")
    await eventually(lambda: _at(alice, job.id, "lumi", JobState.RUNNING))
    for j in jobs:
        await alice.cancel(j.id)


async def test_a_cancel_of_a_job_held_for_a_hand_off_cancels_it_in_slurm(slurm_crowded, slurm_lab):
    f = slurm_crowded
    jobs = await _fill(f, 2)
    leonardo = f.hubs["leonardo"].core
    slurm_id = leonardo.backend._tracked[jobs[1].id].slurm_id
    assert await leonardo.backend.withdraw(jobs[1].id)  # held; the cancel comes before the move is journaled
    cancelled = await f.client("alice").cancel(jobs[1].id)
    assert cancelled.state is JobState.CANCELLED
    assert squeue(slurm_lab)[slurm_id]["job_state"] == "CANCELLED"  # not left held in Slurm for ever
    assert jobs[1].id not in leonardo.backend._withdrawn
    assert not (leonardo.backend.folder(jobs[1].id) / "withdrawn").exists()
    await f.client("alice").cancel(jobs[0].id)
