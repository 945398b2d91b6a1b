"""federation.journal: the durable SQLite (WAL) job journal."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import orjson
import pytest

from federation.journal import Journal, job_from_record
from federation.model import AccessMode, Job, JobSpec, JobState, Transition

SPEC = JobSpec(argv=("python", "train.py", "--lr", "3e-4"), env={"WANDB_MODE": "offline", "SEED": "7"},
               name="train.v2", gpus=4, cpus=32, memory_mb=65536, walltime_s=7200, partition="booster",
               access_mode=AccessMode.FAST_LANE, project="ehpc-123", site="leonardo")


def make_job(job_id: str, owner: str = "spiffe://f.test/user/a/alice", state: JobState = JobState.QUEUED,
             created: float = 1000.0, **kw) -> Job:
    kw.setdefault("updated_at", created)
    return Job(id=job_id, spec=kw.pop("spec", SPEC), state=state, owner=owner, antenna="a", site="leonardo",
               partition="booster", created_at=created, **kw)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "state" / "journal.sqlite")
    yield j
    j.close()


def test_insert_and_get_round_trip_a_full_job(journal):
    """Every field of a job, spec included, comes back equal."""
    job = make_job("j1", exit_code=3, reason="exited with code 3", history=(
        Transition(JobState.PENDING, 1000.25, "accepted"),
        Transition(JobState.RUNNING, 1001.5, ""),
        Transition(JobState.FAILED, 1002.123456, "exited with code 3"),
    ), state=JobState.FAILED, updated_at=1002.123456)
    stored, created = journal.insert(job, "key-1", backend_ref='{"pid": 1}')
    assert created is True and stored == job
    got = journal.get("j1")
    assert got == job
    assert got.spec.access_mode is AccessMode.FAST_LANE
    assert isinstance(got.spec.argv, tuple) and got.spec.env == {"WANDB_MODE": "offline", "SEED": "7"}
    assert journal.backend_ref("j1") == '{"pid": 1}'
    assert journal.by_key("key-1") == job
    assert journal.count() == 1


def test_script_job_and_exit_code_zero_round_trip(journal):
    """A script spec, exit code 0 (not None) and empty strings survive."""
    spec = JobSpec(script="#!/bin/sh\necho \"$1\" é\n", script_args=("x", ""), walltime_s=60)
    job = make_job("j2", spec=spec, exit_code=0, state=JobState.COMPLETED)
    journal.insert(job)
    got = journal.get("j2")
    assert got == job
    assert got.exit_code == 0


def test_get_unknown_is_none(journal):
    assert journal.get("nope") is None
    assert journal.by_key("nope") is None
    assert journal.backend_ref("nope") == ""


def test_same_idempotency_key_returns_the_first_job(journal):
    """A retried insert with the same key stores nothing and returns (the first job, False)."""
    first = make_job("j1")
    journal.insert(first, "k")
    again, created = journal.insert(make_job("j2", owner="someone-else"), "k")
    assert created is False
    assert again == first
    assert journal.get("j2") is None
    assert journal.count() == 1


def test_no_key_and_distinct_keys_both_store(journal):
    """Keys only deduplicate equal keys; jobs without a key never collide."""
    journal.insert(make_job("j1"))
    journal.insert(make_job("j2"))
    journal.insert(make_job("j3"), "k1")
    journal.insert(make_job("j4"), "k2")
    assert journal.count() == 4


def test_update_changes_state_and_ref(journal):
    """update() stores the new record; the state index follows; a ref is replaced only when given."""
    job = make_job("j1")
    journal.insert(job, backend_ref="r0")
    running = job.moved(JobState.RUNNING, "started", at=1001.0)
    journal.update(running, backend_ref="r1")
    assert journal.get("j1") == running
    assert journal.backend_ref("j1") == "r1"
    done = running.moved(JobState.COMPLETED, at=1002.0, exit_code=0)
    journal.update(done)
    assert journal.get("j1").state is JobState.COMPLETED
    assert journal.get("j1").exit_code == 0
    assert journal.backend_ref("j1") == "r1"
    assert journal.list(states=[JobState.RUNNING]) == []
    assert journal.list(states=[JobState.COMPLETED]) == [done]


def test_a_record_changed_in_place_is_stored_as_update_would_store_it(journal, tmp_path):
    """records() reads decoded records by id; put_record() stores one changed in place: the job, the state index,
    the change sequence and the ref end up as `update` with the same job leaves them."""
    job = make_job("j1", history=(Transition(JobState.PENDING, 1000.0, "accepted"),))
    journal.insert(job, backend_ref="r0")
    journal.insert(make_job("j2"))
    running = job.moved(JobState.RUNNING, "started", at=1001.5)
    before = journal.changes("a", 0)

    def change(tx):
        records = tx.records(["j1", "missing"])
        assert list(records) == ["j1"]
        records["j1"].update(state=int(running.state), reason=running.reason, updated_at=running.updated_at,
                             history=[[int(t.state), t.at, t.reason] for t in running.history])
        tx.put_record(records["j1"])

    journal.write(change)
    assert journal.get("j1") == running
    assert journal.backend_ref("j1") == "r0"
    assert journal.list(states=[JobState.RUNNING]) == [running]
    after = journal.changes("a", 0)
    assert len(after) == len(before) == 2 and after[-1][0] > before[-1][0]  # j1 changed last
    other = Journal(tmp_path / "other.sqlite")
    other.insert(job, backend_ref="r0")
    other.insert(make_job("j2"))
    other.update(running)
    assert other.get("j1") == journal.get("j1") and other.changes("a", 0) == after  # the same bytes
    other.close()
    with pytest.raises(KeyError):
        journal.write(lambda tx: tx.put_record({**tx.records(["j1"])["j1"], "id": "ghost"}))


def test_a_record_keeps_every_field_of_the_spec_and_reads_records_written_before(journal):
    """The spec is stored field by field (orjson writes the dataclass), inputs and residency included; a record
    written before (inputs as lists, residency only when set, no inputs or outputs key when empty) still reads."""
    from dataclasses import fields

    import orjson

    from federation.journal import job_from_json, job_to_json
    from federation.model import InputFile

    spec = replace(SPEC, inputs=(InputFile("data/a.bin", "a" * 64, 10, ("IT", "leonardo")),
                                 InputFile("b.txt", "b" * 64, 0)), outputs=("out/model.pt",))
    job = make_job("j1", spec=spec, history=(Transition(JobState.PENDING, 1000.5, "accepted"),))
    record = orjson.loads(job_to_json(job))
    assert list(record["spec"]) == [f.name for f in fields(JobSpec)]
    assert record["spec"]["inputs"][0] == {"name": "data/a.bin", "sha256": "a" * 64, "size": 10,
                                           "residency": ["IT", "leonardo"]}
    journal.insert(job)
    assert journal.get("j1") == job
    old = {**record, "spec": {**record["spec"], "inputs": [["data/a.bin", "a" * 64, 10, ["IT", "leonardo"]],
                                                           ["b.txt", "b" * 64, 0]]}}
    assert job_from_json(orjson.dumps(old)) == job
    bare = {**record, "spec": {k: v for k, v in record["spec"].items() if k not in ("inputs", "outputs")}}
    assert job_from_json(orjson.dumps(bare)) == replace(job, spec=replace(spec, inputs=(), outputs=()))


def test_update_unknown_job_raises_key_error(journal):
    with pytest.raises(KeyError):
        journal.update(make_job("ghost"))
    assert journal.count() == 0


def test_list_filters_and_orders_newest_first(journal):
    """list() filters by owner and states, newest first, and honours the limit."""
    alice, bob = "spiffe://f.test/user/a/alice", "spiffe://f.test/user/a/bob"
    journal.insert(make_job("a1", alice, JobState.COMPLETED, created=10))
    journal.insert(make_job("b1", bob, JobState.RUNNING, created=20))
    journal.insert(make_job("a2", alice, JobState.RUNNING, created=30))
    journal.insert(make_job("a3", alice, JobState.QUEUED, created=40))
    journal.insert(make_job("a0", alice, JobState.FAILED, created=5))

    assert [j.id for j in journal.list()] == ["a3", "a2", "b1", "a1", "a0"]
    assert [j.id for j in journal.list(owner=alice)] == ["a3", "a2", "a1", "a0"]
    assert [j.id for j in journal.list(owner=bob)] == ["b1"]
    assert journal.list(owner="nobody") == []
    assert [j.id for j in journal.list(states=[JobState.RUNNING])] == ["a2", "b1"]
    assert [j.id for j in journal.list(owner=alice, states=(JobState.RUNNING, JobState.FAILED))] == ["a2", "a0"]
    assert [j.id for j in journal.list(limit=2)] == ["a3", "a2"]
    assert [j.id for j in journal.list(owner=alice, limit=1)] == ["a3"]


def test_unfinished_lists_only_live_jobs_oldest_first_with_refs(journal):
    """unfinished() skips final states, returns oldest first, each with its backend reference."""
    for i, state in enumerate(JobState):
        journal.insert(make_job(f"j{i}", state=state, created=100 - i), backend_ref=f"ref-{state.name}")
    live = journal.unfinished()
    # created = 100 - i, so the later states in the enum are the older jobs.
    assert [(job.id, job.state, ref) for job, ref in live] == [
        ("j10", JobState.MOVING, "ref-MOVING"),  # not final: being handed to a peer hub (MOVED is final)
        ("j9", JobState.UNKNOWN, "ref-UNKNOWN"),  # not final: the scheduler's state is merely unknown
        ("j3", JobState.RUNNING, "ref-RUNNING"),
        ("j2", JobState.QUEUED, "ref-QUEUED"),
        ("j1", JobState.FORWARDED, "ref-FORWARDED"),
        ("j0", JobState.PENDING, "ref-PENDING"),
    ]


def test_unfinished_follows_updates(journal):
    """A job that reaches a final state leaves unfinished()."""
    job = make_job("j1")
    journal.insert(job, backend_ref="r")
    assert [j.id for j, _ in journal.unfinished()] == ["j1"]
    journal.update(job.moved(JobState.CANCELLED, "by owner"))
    assert journal.unfinished() == []


def test_data_survives_reopening(tmp_path):
    """Everything committed is there after closing and reopening the file."""
    path = tmp_path / "j.sqlite"
    first = Journal(path)
    job = make_job("j1")
    first.insert(job, "k", backend_ref="r")
    moved = job.moved(JobState.RUNNING, at=1001.0)
    first.update(moved)
    first.close()

    second = Journal(path)
    try:
        assert second.get("j1") == moved
        assert second.by_key("k") == moved
        assert second.backend_ref("j1") == "r"
        assert second.insert(make_job("j9"), "k") == (moved, False)
        assert [j.id for j, _ in second.unfinished()] == ["j1"]
    finally:
        second.close()


def test_journal_mode_is_wal(journal):
    """The database is in WAL mode, as seen by an independent connection too."""
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = sqlite3.connect(journal.path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_a_second_reader_sees_committed_changes(journal):
    """Changes are committed at once: an independent SQLite connection sees them."""
    other = sqlite3.connect(journal.path)
    try:
        job = make_job("j1")
        journal.insert(job, "k")
        assert other.execute("SELECT id, state FROM jobs").fetchall() == [("j1", int(JobState.QUEUED))]
        journal.update(replace(job, state=JobState.RUNNING, reason="x"))
        assert other.execute("SELECT state FROM jobs WHERE id = 'j1'").fetchone() == (int(JobState.RUNNING),)
    finally:
        other.close()


def test_one_journal_per_file(tmp_path):
    """A second Journal on a file that is open is refused (two daemons would run every job twice)."""
    path = tmp_path / "j.sqlite"
    first = Journal(path)
    try:
        with pytest.raises(RuntimeError, match="another aifed process"):
            Journal(path)
        other = Journal(tmp_path / "other.sqlite")  # another file is fine
        other.close()
    finally:
        first.close()
    again = Journal(path)  # free once the first is closed
    again.close()


def test_taken_and_records_inside_a_transaction_see_its_own_changes(journal):
    """What the hub's batch insert relies on: keys and ids found together, including those stored earlier in the
    same transaction; a checked insert whose key is taken after all fails rather than storing twice."""
    journal.write(lambda tx: tx.insert(make_job("j1"), "k1"))

    def batch(tx):
        assert tx.taken(["k1", "k2"], ["j1", "j2"]) == ({"k1"}, {"j1"})
        tx.insert(make_job("j2"), "k2", checked=True)
        assert tx.taken(["k1", "k2", "k3"], ["j2", "j3"]) == ({"k1", "k2"}, {"j2"})
        assert set(tx.records(["j1", "j2", "nope"])) == {"j1", "j2"}
        with pytest.raises(sqlite3.IntegrityError):
            tx.insert(make_job("j3"), "k1", checked=True)
        return tx.records(f"j{i}" for i in range(1, 4))

    got = journal.write(batch)
    assert set(got) == {"j1", "j2"} and job_from_record(got["j2"]) == make_job("j2")
    assert journal.count() == 2 and journal.by_key("k2").id == "j2"


def test_taken_and_records_look_up_more_than_one_query_holds(journal):
    journal.write(lambda tx: [tx.insert(make_job(f"j{i}"), f"k{i}") for i in range(0, 1200, 3)])
    keys, ids = journal.write(lambda tx: tx.taken([f"k{i}" for i in range(1200)], [f"j{i}" for i in range(1200)]))
    assert keys == {f"k{i}" for i in range(0, 1200, 3)} and ids == {f"j{i}" for i in range(0, 1200, 3)}
    assert set(journal.write(lambda tx: tx.records(f"j{i}" for i in range(1200)))) == ids
    assert set(journal.get_many(f"j{i}" for i in range(1200))) == ids


def test_a_journal_nobody_follows_keeps_no_feed_index_and_still_answers_changes(tmp_path):
    """An antenna's journal (`feed=False`) drops the index that serves `changes`, also from a journal written with
    it; `changes` gives the same answer without it, and opening with `feed` builds the index again."""
    path = tmp_path / "j.sqlite"

    def indexes() -> set[str]:
        db = sqlite3.connect(path)
        try:
            return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        finally:
            db.close()

    journal = Journal(path)
    for i, created in enumerate((3.0, 1.0, 2.0)):
        journal.insert(make_job(f"j{i}", created=created))
    journal.insert(replace(make_job("x", created=4.0), antenna="b"))  # another antenna's
    journal.update(make_job("j0", state=JobState.RUNNING, created=3.0))
    followed = journal.changes("a", 0)
    journal.close()
    assert "jobs_feed" in indexes()

    journal = Journal(path, feed=False)
    assert "jobs_feed" not in indexes() and {"jobs_owner", "jobs_state"} <= indexes()
    assert journal.changes("a", 0) == followed and [r[0] for r in journal.changes("a", followed[0][0])] == [
        seq for seq, _ in followed[1:]]
    assert [orjson.loads(record)["id"] for _, record in followed] == ["j1", "j2", "j0"]  # in change order
    journal.close()
    Journal(path).close()
    assert "jobs_feed" in indexes()
