"""Batching: group commit in the journal, bulk submission and job arrays, batched forwarding, the change feed."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import time

import grpc
import orjson
import pytest

from tests.conftest import eventually
from federation import convert
from federation.client import Receipt
from federation.errors import AifedError, InvalidArgument
from federation.identity import Role
from federation.journal import Journal
from federation.model import Job, JobSpec, JobState, Transition
from federation.pb import antenna_pb2, hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel
from federation.sbatch import parse_array


def make_job(job_id: str, state: JobState = JobState.PENDING, antenna: str = "antenna-a", at: float = 0) -> Job:
    now = at or time.time()
    return Job(id=job_id, spec=JobSpec(argv=("true",)), state=state, owner="o", antenna=antenna, created_at=now,
               updated_at=now, history=(Transition(state, now, ""),))


# -- the journal ---------------------------------------------------------------------------------

async def test_group_commit_gathers_concurrent_writers_and_isolates_a_failing_one(tmp_path):
    commits = []
    journal = Journal(tmp_path / "j.sqlite", on_commit=lambda: commits.append(1))

    def insert(i: int):
        def fn(tx):
            if i == 13:
                tx.insert(make_job("x-13"))
                raise ValueError("thirteen")  # its own insert is undone, nobody else's
            return tx.insert(make_job(f"x-{i}"))[1]
        return fn

    results = await asyncio.gather(*(journal.commit(insert(i)) for i in range(300)), return_exceptions=True)
    assert isinstance(results[13], ValueError)
    assert all(r is True for i, r in enumerate(results) if i != 13)
    assert journal.count() == 299 and journal.get("x-13") is None
    assert journal.batched == 300 and journal.batches < 100  # many callers per transaction
    assert len(commits) == journal.batches
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite")  # durable: all there after reopening
    assert reopened.count() == 299
    reopened.close()


async def test_change_sequence_orders_every_write_per_antenna(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    journal.insert(make_job("a-1"))
    journal.insert(make_job("b-1", antenna="antenna-b"))
    journal.insert(make_job("a-2"))
    journal.update(make_job("a-1", JobState.QUEUED))
    changes = journal.changes("antenna-a", 0)
    seqs = [seq for seq, _ in changes]
    assert seqs == sorted(seqs) and len(seqs) == 2  # one row per job of antenna-a, b-1 is not theirs
    assert b'"a-2"' in changes[0][1] and b'"a-1"' in changes[1][1]  # a-1 moved to the end when it changed
    assert journal.changes("antenna-a", seqs[-1]) == []
    epoch = journal.epoch
    journal.close()
    again = Journal(tmp_path / "j.sqlite")
    assert again.epoch == epoch  # the epoch changes only with a new journal
    again.insert(make_job("a-3"))
    assert again.changes("antenna-a", seqs[-1])[0][0] > seqs[-1]  # the sequence goes on after a restart
    again.close()


def test_purge_deletes_only_old_finished_jobs(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    old = time.time() - 10 * 86400
    journal.insert(make_job("old-done", JobState.COMPLETED, at=old))
    journal.insert(make_job("old-running", JobState.RUNNING, at=old))
    journal.insert(make_job("new-done", JobState.FAILED))
    assert journal.purge(time.time() - 86400) == 1
    assert journal.get("old-done") is None
    assert journal.get("old-running") is not None and journal.get("new-done") is not None
    journal.close()


def test_journal_of_an_older_version_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE jobs (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, owner TEXT NOT NULL,
        state INTEGER NOT NULL, backend_ref TEXT NOT NULL DEFAULT '', created REAL NOT NULL, record BLOB NOT NULL);""")
    from federation.journal import job_to_json
    job = make_job("a-1")
    db.execute("INSERT INTO jobs (id, owner, state, created, record) VALUES (?, ?, ?, ?, ?)",
               (job.id, job.owner, int(job.state), job.created_at, job_to_json(job)))
    db.commit()
    db.close()
    journal = Journal(path)
    assert journal.get("a-1") == job
    journal.update(make_job("a-1", JobState.QUEUED))
    assert journal.get("a-1").state is JobState.QUEUED
    journal.close()


# -- arrays --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("0-4", [0, 1, 2, 3, 4]), ("1,3,5-7", [1, 3, 5, 6, 7]), ("0-8:4", [0, 4, 8]), ("7", [7])])
def test_array_syntax(text, expected):
    assert parse_array(text) == expected


@pytest.mark.parametrize("text,why", [
    ("", "not an index"), ("3-1", "empty range"), ("0-9%2", "throttle"), ("1,1", "twice"), ("a-b", "not an index"),
    ("0-10000", "more than 10000"), ("0-9:0", "empty range")])
def test_array_syntax_errors(text, why):
    with pytest.raises(ValueError, match=why):
        parse_array(text)


async def test_bulk_submit_with_an_array_and_a_refused_entry(fed):
    client = fed.client("alice")
    script = JobSpec(argv=("sh", "-c", "echo task=$AIFED_ARRAY_TASK_ID slurm=$SLURM_ARRAY_TASK_ID"),
                     site="leonardo")
    results = await client.submit_many([
        (JobSpec(argv=("true",)), "", ""),
        (JobSpec(argv=("true",), env={"SLURM_JOB_ID": "1"}), "", ""),  # reserved name: refused, alone
        (script, "", "0-8:4"),
    ])
    assert len(results) == 5
    assert isinstance(results[1], AifedError) and "reserved" in results[1].message
    array = results[2:]
    assert [r.array_task for r in array] == [0, 4, 8] and all(r.state is JobState.PENDING for r in array)
    assert len({r.array_job for r in array}) == 1 and len({r.id for r in array}) == 3
    # Ids sort in submission order (the order of the entries, then of the tasks), as Slurm's job ids do.
    accepted = [results[0].id, *(r.id for r in array)]
    assert accepted == sorted(accepted) and all(i.startswith("antenna-a-") for i in accepted)
    for job in [results[0], *array]:
        done = await client.wait(job.id)
        assert done.state is JobState.COMPLETED, done.reason
    out = b"".join([c.data async for c in client.logs(array[1].id)])
    assert out.strip() == b"task=4 slurm=4"
    status = await client.get(array[2].id)
    assert status.spec.array_job == array[0].array_job and status.spec.array_task == 8


async def test_array_retry_with_the_same_request_id_returns_the_same_jobs(fed):
    client = fed.client("alice")
    spec = JobSpec(argv=("true",))
    first = await client.submit_many([(spec, "nightly-42", "0-2")])
    again = await client.submit_many([(spec, "nightly-42", "0-2")])
    assert [j.id for j in first] == [j.id for j in again]
    assert fed.antennas["antenna-a"].core.journal.count() == 3


async def test_bulk_submit_limits(fed, monkeypatch):
    monkeypatch.setattr("antenna.core.MAX_SUBMIT", 5)
    client = fed.client("alice")
    results = await client.submit_many([(JobSpec(argv=("true",)), "", "0-3"), (JobSpec(argv=("true",)), "", "0-1")])
    assert [isinstance(r, Receipt) for r in results] == [True] * 4 + [False]
    assert "at most 5 jobs per call" in results[-1].message
    with pytest.raises(AifedError, match="more than 5 tasks"):
        raise (await client.submit_many([(JobSpec(argv=("true",)), "", "0-5")]))[0]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.stub.SubmitJob(antenna_pb2.SubmitJobRequest(  # an array needs the bulk call
            spec=convert.spec_to_pb(JobSpec(argv=("true",))), array="0-3"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match="set by the antenna"):
        raise (await client.submit_many([(JobSpec(argv=("true",), array_job="antenna-a-x"), "", "")]))[0]
    assert fed.antennas["antenna-a"].core.journal.count() == 4


# -- the hub's batch RPC and change feed ---------------------------------------------------------

def _forward_request(job_id: str, key: str = "", owner: str = "spiffe://eurohpc.test/user/antenna-a/alice"):
    job = make_job(job_id)
    job = Job(id=job.id, spec=JobSpec(argv=("sleep", "30"), partition="dcgp", walltime_s=60), state=job.state,
              owner=owner, antenna="antenna-a", created_at=job.created_at, updated_at=job.updated_at)
    return hub_pb2.ForwardJobRequest(idempotency_key=key or job_id, job=convert.job_to_pb(job))


async def test_forward_jobs_gives_one_result_per_job_and_feed_reports_them(fed, test_pki):
    port = fed.hubs["lumi"].port
    async with secure_channel(f"127.0.0.1:{port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as channel:
        stub = hub_pb2_grpc.HubStub(channel)
        batch = hub_pb2.ForwardJobsRequest(jobs=[
            _forward_request("antenna-a-ok1"),
            _forward_request("antenna-b-theirs"),                     # not this antenna's id
            _forward_request("antenna-a-ok2", owner="spiffe://eurohpc.test/user/antenna-b/carol"),  # not its user
            _forward_request("antenna-a-ok3"),
        ])
        first = await stub.ForwardJobs(batch, timeout=10)
        codes = [r.error.code if r.HasField("error") else 0 for r in first.results]
        assert [r.job_id for r in first.results] == ["antenna-a-ok1", "antenna-b-theirs", "antenna-a-ok2",
                                                     "antenna-a-ok3"]
        assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.PERMISSION_DENIED.value[0], 0]
        assert first.results[0].accepted.state == JobState.QUEUED and not first.results[0].duplicate
        again = await stub.ForwardJobs(batch, timeout=10)  # a retry starts nothing new
        assert [r.duplicate for r in again.results] == [True, False, False, True]
        assert fed.hubs["lumi"].core.journal.count() == 2

        feed = stub.WatchChanges(hub_pb2.WatchChangesRequest())
        seen, message = {}, None
        async for message in feed:
            seen.update({j.id: j.state for j in message.jobs})
            if message.caught_up:
                break
        assert {"antenna-a-ok1", "antenna-a-ok3"} <= set(seen)
        epoch, position = message.epoch, message.sequence
        feed.cancel()
        await stub.CancelJob(jobs_pb2.JobRef(job_id="antenna-a-ok3"), timeout=10)
        resumed = stub.WatchChanges(hub_pb2.WatchChangesRequest(epoch=epoch, after=position))
        async for message in resumed:
            if message.jobs:
                break
        resumed.cancel()
        assert message.jobs[-1].id == "antenna-a-ok3" and message.jobs[-1].state == JobState.CANCELLED
        assert all(j.id != "antenna-a-ok1" for j in message.jobs)  # nothing older than the position again


async def test_a_key_or_an_id_twice_in_one_batch_is_a_replay_or_a_conflict(fed, test_pki):
    """Within one batch as across batches: a key seen again returns the job it created, an id under a new key is
    refused, and each is stored once."""
    port = fed.hubs["lumi"].port
    async with secure_channel(f"127.0.0.1:{port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as channel:
        stub = hub_pb2_grpc.HubStub(channel)
        batch = hub_pb2.ForwardJobsRequest(jobs=[
            _forward_request("antenna-a-one", key="k1"),
            _forward_request("antenna-a-one", key="k1"),   # the same job again: a replay
            _forward_request("antenna-a-one", key="k2"),   # its id under another key
            _forward_request("antenna-a-two", key="k3"),
        ])
        results = (await stub.ForwardJobs(batch, timeout=10)).results
        assert [r.error.code if r.HasField("error") else 0 for r in results] == [
            0, 0, grpc.StatusCode.ALREADY_EXISTS.value[0], 0]
        assert [r.duplicate for r in results] == [False, True, False, False]
        assert results[1].accepted.id == "antenna-a-one"
        assert "another idempotency key" in results[2].error.message
        journal = fed.hubs["lumi"].core.journal
        assert journal.count() == 2 and journal.by_key("antenna-a/k1").id == "antenna-a-one"
        assert journal.by_key("antenna-a/k2") is None


async def test_antenna_catches_up_on_changes_made_while_it_was_down(fed):
    client = fed.client("alice")
    job = await client.submit(JobSpec(argv=("sh", "-c", "sleep 1; echo done"), site="lumi"))
    await eventually(lambda: fed.antennas["antenna-a"].core.journal.get(job.id).state is JobState.RUNNING)
    await fed.antennas["antenna-a"].stop()
    await asyncio.sleep(2)  # the job ends while the antenna is down
    await fed.start_antenna("antenna-a")
    done = await fed.client("alice").wait(job.id)
    assert done.state is JobState.COMPLETED and done.exit_code == 0


async def test_jobs_a_replaced_hub_journal_no_longer_knows_are_lost(fed):
    client = fed.client("alice")
    job = await client.submit(JobSpec(argv=("sleep", "60"), site="lumi"))
    await eventually(lambda: fed.antennas["antenna-a"].core.journal.get(job.id).state is JobState.RUNNING)
    hub = fed.hubs["lumi"]
    pid = orjson.loads(hub.core.journal.backend_ref(job.id))["pid"]
    try:
        await hub.stop()
        shutil.rmtree(hub.config.state_dir)  # the site lost its disk
        await fed.start_hub("lumi")
        done = await client.wait(job.id)
        assert done.state is JobState.LOST and "no longer knows" in done.reason
    finally:
        os.killpg(pid, signal.SIGKILL)


async def test_hub_purges_finished_jobs_older_than_its_retention(test_pki, tmp_path):
    from tests.conftest import Federation
    state = tmp_path / "leonardo"
    journal = Journal(state / "hub.sqlite")
    journal.insert(make_job("antenna-a-old", JobState.COMPLETED, at=time.time() - 3 * 86400))
    journal.insert(make_job("antenna-a-oldrunning", JobState.QUEUED, at=time.time() - 3 * 86400))
    journal.insert(make_job("antenna-a-recent", JobState.COMPLETED, at=time.time() - 3600))
    journal.close()
    fed = Federation(test_pki, tmp_path)
    try:
        hub = await fed.start_hub("leonardo", retention_s=86400, backend="hold")
        await eventually(lambda: hub.core.journal.get("antenna-a-old") is None)
        assert hub.core.journal.get("antenna-a-oldrunning") is not None  # not finished: kept however old
        assert hub.core.journal.get("antenna-a-recent") is not None
    finally:
        await fed.close()


def test_change_sequence_never_goes_back_after_a_purge(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    journal.insert(make_job("a-1", JobState.COMPLETED, at=time.time() - 10 * 86400))
    journal.insert(make_job("a-2", JobState.COMPLETED, at=time.time() - 10 * 86400))
    last = journal.changes("antenna-a", 0)[-1][0]
    assert journal.purge(time.time()) == 2 and journal.count() == 0
    journal.close()
    again = Journal(tmp_path / "j.sqlite")  # a follower holds position `last`: new changes must come after it
    again.insert(make_job("a-3"))
    assert [seq for seq, _ in again.changes("antenna-a", last)] == [last + 1]
    again.close()


def test_forward_batches_are_cut_by_size():
    from antenna.core import _batch
    big = "x" * 3_000_000
    outbox = {f"a-{i}": Job(id=f"a-{i}", spec=JobSpec(script=big if i < 3 else "#!/bin/sh\ntrue\n"),
                            state=JobState.PENDING) for i in range(6)}
    first = _batch(outbox, 1000, 4 << 20)
    assert [j.id for j in first] == ["a-0"]  # two 3 MB scripts would pass 4 MiB
    assert [j.id for j in _batch(outbox, 1000, 4 << 20)] == ["a-1"]
    assert [j.id for j in _batch(outbox, 2, 4 << 20)] == ["a-2", "a-3"]  # a small one still fits
    assert [j.id for j in _batch(outbox, 1, 4 << 20)] == ["a-4"]  # cut by count
    assert [j.id for j in _batch(outbox, 2, 4 << 20)] == ["a-5"] and not outbox
