"""federation.model (JobSpec.validate, Job.moved) and federation.convert (protobuf round trips)."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import replace

import grpc
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from federation.convert import job_from_pb, job_to_pb, progress_pb, receipt_pb, spec_from_pb, spec_to_pb, ts
from federation.errors import InvalidArgument
from federation.journal import job_from_json, job_to_json
from federation.model import (MAX_ARGV, MAX_GPUS, MAX_WALLTIME_S, AccessMode, InputFile, Job, JobSpec, JobState,
                              Transition, evolve, record)
from federation.pb import hub_pb2, jobs_pb2

VALID = JobSpec(argv=("python", "train.py"), env={"SEED": "1", "_X9": ""}, name="train-1.v2+a_b", gpus=4, cpus=8,
                memory_mb=1024, walltime_s=3600, access_mode=AccessMode.PLAYGROUND)


def invalid(spec: JobSpec, *fragments: str) -> InvalidArgument:
    """validate() must raise InvalidArgument (INVALID_ARGUMENT) whose message contains every fragment."""
    with pytest.raises(InvalidArgument) as info:
        spec.validate()
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    for fragment in fragments:
        assert fragment in err.message, f"{fragment!r} not in {err.message!r}"
    assert str(err) == err.message
    return err


# -- JobSpec.validate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    VALID,
    JobSpec(argv=("true",)),
    JobSpec(script="#!/bin/sh\necho hi\n", script_args=("a", "")),
    JobSpec(argv=("x",), gpus=0, cpus=1, walltime_s=1, name=""),
    JobSpec(argv=("x",), gpus=MAX_GPUS, walltime_s=MAX_WALLTIME_S, name="n" * 128),
    JobSpec(argv=("x", "")),          # later empty arguments are fine
])
def test_valid_specs_pass(spec):
    assert spec.validate() is None


def test_no_command_and_no_script():
    invalid(JobSpec(), "no command")
    invalid(JobSpec(script="  \n\t"), "no command")


def test_both_command_and_script():
    invalid(JobSpec(argv=("echo",), script="echo hi"), "either a command or a script, not both")


@pytest.mark.parametrize("first", ["", "   "])
def test_empty_first_word(first):
    invalid(JobSpec(argv=(first, "arg")), "the command is empty")


@pytest.mark.parametrize("gpus", [-1, MAX_GPUS + 1, -(10 ** 12)])
def test_gpus_out_of_range(gpus):
    invalid(JobSpec(argv=("x",), gpus=gpus), "gpus", str(gpus))


def test_cpus_zero():
    invalid(JobSpec(argv=("x",), cpus=0), "cpus must be between 1")


@pytest.mark.parametrize("walltime", [0, -60, MAX_WALLTIME_S + 1])
def test_walltime_out_of_range(walltime):
    invalid(JobSpec(argv=("x",), walltime_s=walltime), "walltime")


def test_memory_negative():
    invalid(JobSpec(argv=("x",), memory_mb=-1), "memory_mb")


@pytest.mark.parametrize("name", ["1X", "A-B", "", "A B", "A=B", "É", "A\n"])
def test_invalid_env_var_names(name):
    """Variable names are [A-Za-z_][A-Za-z0-9_]*, nothing else (not even a trailing newline)."""
    invalid(JobSpec(argv=("x",), env={name: "v"}), "environment variable name", repr(name))


def test_env_value_with_nul():
    invalid(JobSpec(argv=("x",), env={"A": "a\x00b"}), "environment variable A", "NUL")


@pytest.mark.parametrize("spec", [
    JobSpec(argv=("echo", "a\x00b")),
    JobSpec(argv=("ec\x00ho",)),
    JobSpec(script="echo", script_args=("\x00",)),
])
def test_nul_byte_in_an_argument(spec):
    invalid(spec, "NUL byte")


def test_nul_byte_in_script():
    invalid(JobSpec(script="echo \x00"), "NUL byte")


def test_too_many_arguments():
    """Arguments (argv plus script_args) are capped at MAX_ARGV."""
    JobSpec(argv=("x",) * MAX_ARGV).validate()
    invalid(JobSpec(argv=("x",) * (MAX_ARGV + 1)), "too many arguments")
    invalid(JobSpec(script="echo", script_args=("a",) * (MAX_ARGV + 1)), "too many arguments")


def test_script_too_large():
    invalid(JobSpec(script="#" * ((1 << 20) + 1)), "larger than")


@pytest.mark.parametrize("name", ["my job", "a/b", "n" * 129, "job;rm", "job\n", "é\t"])
def test_bad_job_name(name):
    """Job names are at most 128 of letters, digits, . _ + - (a trailing newline is not allowed either)."""
    invalid(JobSpec(argv=("x",), name=name), "job name", repr(name))


def test_unknown_access_mode():
    invalid(JobSpec(argv=("x",), access_mode=9), "access mode")


# -- Job.moved ---------------------------------------------------------------------------------------

def test_moved_records_a_transition():
    """A new state adds a Transition with the state, time and reason; the original is unchanged."""
    job = Job(id="j", spec=VALID, state=JobState.QUEUED, created_at=1.0, updated_at=1.0)
    running = job.moved(JobState.RUNNING, "started", at=5.0)
    assert running.state is JobState.RUNNING
    assert running.reason == "started"
    assert running.updated_at == 5.0
    assert running.history == (Transition(JobState.RUNNING, 5.0, "started"),)
    assert job.history == () and job.state is JobState.QUEUED
    done = running.moved(JobState.FAILED, "exited with code 2", at=6.0, exit_code=2)
    assert done.exit_code == 2 and done.final
    assert [t.state for t in done.history] == [JobState.RUNNING, JobState.FAILED]
    assert done.history[-1] == Transition(JobState.FAILED, 6.0, "exited with code 2")


def test_moved_to_the_same_state_adds_no_history():
    """Same state: no transition; only the other changes apply."""
    job = Job(id="j", spec=VALID, state=JobState.RUNNING, history=(Transition(JobState.RUNNING, 1.0),),
              updated_at=1.0)
    assert job.moved(JobState.RUNNING, "again", at=9.0) is job
    changed = job.moved(JobState.RUNNING, "again", at=9.0, partition="p2")
    assert changed.history == job.history
    assert changed.partition == "p2"
    assert changed.updated_at == 9.0
    assert changed.reason == ""


def test_final_states():
    assert {s for s in JobState if s.final} == {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED,
                                                 JobState.TIMEOUT, JobState.LOST, JobState.MOVED}


# -- convert -----------------------------------------------------------------------------------------

def full_job(exit_code: int | None) -> Job:
    return Job(id="job-1", spec=VALID, state=JobState.FAILED if exit_code else JobState.COMPLETED,
               owner="spiffe://f.test/user/a/alice", antenna="a", site="leonardo", partition="booster",
               exit_code=exit_code, reason="r", created_at=1_700_000_000.123456, updated_at=1_700_000_100.654321,
               history=(Transition(JobState.PENDING, 1_700_000_000.123456, "accepted"),
                        Transition(JobState.RUNNING, 1_700_000_050.000001, ""),
                        Transition(JobState.COMPLETED, 1_700_000_100.654321, "done")))


def assert_same_job(got: Job, want: Job) -> None:
    """Equal, with timestamps compared to the microsecond."""
    assert got.created_at == pytest.approx(want.created_at, abs=1e-6)
    assert got.updated_at == pytest.approx(want.updated_at, abs=1e-6)
    assert len(got.history) == len(want.history)
    for g, w in zip(got.history, want.history):
        assert (g.state, g.reason) == (w.state, w.reason)
        assert g.at == pytest.approx(w.at, abs=1e-6)
    strip = dict(created_at=0.0, updated_at=0.0, history=())
    assert replace(got, **strip) == replace(want, **strip)


@pytest.mark.parametrize("exit_code", [None, 0, 1, 255, -9])
def test_job_round_trips_through_protobuf(exit_code):
    """job_from_pb(job_to_pb(job)) == job; exit code None and 0 stay distinct."""
    job = full_job(exit_code)
    msg = job_to_pb(job)
    assert msg.has_exit_code is (exit_code is not None)
    back = job_from_pb(msg)
    assert back.exit_code == exit_code
    assert_same_job(back, job)
    assert job_from_pb(jobs_pb2.Job.FromString(msg.SerializeToString())) == back  # through the wire format too


states = st.sampled_from(list(JobState))
stamps = st.floats(min_value=0, max_value=4e9, allow_nan=False)
words = st.text(max_size=12)


@settings(max_examples=200, deadline=None)
@given(job=st.builds(
    Job, id=words, spec=st.just(VALID), state=states, owner=words, antenna=words, site=words, partition=words,
    exit_code=st.none() | st.integers(-255, 255), reason=st.text(max_size=40), created_at=stamps, updated_at=stamps,
    history=st.lists(st.builds(Transition, states, stamps, words), max_size=4).map(tuple),
    account=words, country=words, alternatives=st.lists(words, max_size=3).map(tuple), moved_from=words,
    moved_to=words))
def test_a_change_feed_message_read_from_the_record_is_the_job_without_its_spec(job):
    """progress_pb(record) sends exactly what job_to_pb(job_from_json(record), spec=False) would."""
    record = job_to_json(job)
    assert progress_pb(record) == job_to_pb(job_from_json(record), spec=False)
    assert not progress_pb(record).HasField("spec")
    changes = hub_pb2.JobChanges()
    progress_pb(record, changes.jobs.add)  # built in place in a feed message: the same job
    assert list(changes.jobs) == [progress_pb(record)]
    # Timestamps are set in place: the same as a Timestamp made by ts(), and present even when zero.
    msg = job_to_pb(job)
    assert msg.created_at == ts(job.created_at) and msg.updated_at == ts(job.updated_at)
    assert msg.HasField("created_at") and msg.HasField("updated_at")
    assert [t.at for t in msg.history] == [ts(t.at) for t in job.history]
    assert all(t.HasField("at") for t in msg.history)
    assert receipt_pb(job).created_at == ts(job.created_at) and receipt_pb(job).HasField("created_at")


hub_states = st.sampled_from([s for s in JobState if s is not JobState.MOVED])


@settings(max_examples=300, deadline=None)
@given(local=st.builds(
    Job, id=st.just("a-1"), spec=st.just(VALID), state=st.sampled_from([s for s in JobState if not s.final]),
    owner=words, antenna=words, site=st.just("hub1"), partition=words,
    exit_code=st.none() | st.integers(-255, 255), reason=st.text(max_size=40), created_at=stamps,
    updated_at=stamps, history=st.lists(st.builds(Transition, states, stamps, words), max_size=4).map(tuple),
    country=words, alternatives=st.lists(words, max_size=3).map(tuple)),
    state=hub_states, partition=words, exit_code=st.none() | st.integers(-255, 255), reason=st.text(max_size=40),
    updated_at=stamps, history=st.lists(st.builds(Transition, hub_states, stamps, words), max_size=4).map(tuple),
    same=st.booleans())
def test_the_antennas_merge_of_a_change_on_the_stored_record_is_its_merge_of_jobs(local, same, **remote):
    """The antenna applies a hub's change to the stored record in place (`_merge_progress`): the record it stores
    is what `_merge` of the two jobs would store, byte for byte, and it reports a change exactly when `_merge`
    makes one."""
    from antenna.core import _merge, _merge_progress, _progress_applies
    from federation.journal import job_from_record
    hub = evolve(local, state=JobState.FORWARDED, history=local.history[1:]) if same else evolve(local, **remote)
    msg = job_to_pb(hub, spec=False)
    if same:  # the hub says what the antenna already has: nothing to store
        local = _merge(local, job_from_pb(msg))
    record = orjson.loads(job_to_json(local))
    assert _progress_applies(record, msg, "hub1")
    expected = _merge(local, job_from_pb(msg))
    assert _merge_progress(record, msg) is (expected != local)
    assert orjson.dumps(record) == job_to_json(expected)
    assert job_from_record(record) == expected


def test_a_change_the_record_merge_does_not_handle_goes_the_general_way():
    """`_progress_applies` leaves to `_merge` a job stored at another hub, a job that has ended, a move, and a
    state this antenna does not know."""
    from antenna.core import _progress_applies
    job = full_job(None)
    record = orjson.loads(job_to_json(evolve(job, site="hub1", state=JobState.QUEUED)))
    msg = job_to_pb(evolve(job, state=JobState.RUNNING), spec=False)
    assert _progress_applies(record, msg, "hub1")
    assert not _progress_applies(record, msg, "hub2")
    assert not _progress_applies({**record, "state": int(JobState.CANCELLED)}, msg, "hub1")
    assert not _progress_applies(record, job_to_pb(evolve(job, state=JobState.MOVED), spec=False), "hub1")
    unknown = job_to_pb(evolve(job, state=JobState.RUNNING), spec=False)
    unknown.history[0].state = 42
    assert not _progress_applies(record, unknown, "hub1")
    unknown.state = 42
    assert not _progress_applies(record, unknown, "hub1")


def test_zero_timestamps_round_trip():
    job = Job(id="j", spec=JobSpec(argv=("x",)), state=JobState.PENDING)
    assert job_from_pb(job_to_pb(job)) == job


def test_spec_round_trips_and_unset_fields_take_defaults():
    """A spec survives; unset cpus and walltime on the wire mean the defaults."""
    assert spec_from_pb(spec_to_pb(VALID)) == VALID
    script = JobSpec(script="#!/bin/sh\n", script_args=("a",), partition="p", project="x", site="s")
    assert spec_from_pb(spec_to_pb(script)) == script
    bare = spec_from_pb(jobs_pb2.JobSpec(argv=["x"]))
    assert bare.cpus == 1 and bare.walltime_s == JobSpec.walltime_s


def test_a_spec_with_every_field_set_round_trips():
    """spec_to_pb sends the fields that are set, by name: each field of a JobSpec, set, comes back."""
    spec = JobSpec(argv=("a", "b"), script="", script_args=("c",), env={"K": "v"}, name="n", gpus=2, cpus=3,
                   memory_mb=4, walltime_s=5, partition="p", access_mode=AccessMode.LARGE_SCALE, project="pr",
                   site="", array_job="a-1", array_task=6, sector="health", sector_required=True, prefer=("x",),
                   overflow_after_s=7, exclude=("y",), inputs=(InputFile("i", "0" * 64, 8, ("IT",)),
                                                                InputFile("j", "1" * 64, 0)), outputs=("o",))
    assert {f.name for f in dataclasses.fields(JobSpec)} == {
        name for name, value in dataclasses.asdict(spec).items() if value} | {"script", "site"}
    assert spec_from_pb(spec_to_pb(spec)) == spec
    assert spec_from_pb(jobs_pb2.JobSpec.FromString(spec_to_pb(spec).SerializeToString())) == spec


def test_unknown_enum_values_from_the_wire_are_invalid_argument():
    with pytest.raises(InvalidArgument, match="access mode"):
        spec_from_pb(jobs_pb2.JobSpec(argv=["x"], access_mode=42))
    msg = job_to_pb(full_job(0))
    msg.state = 42
    with pytest.raises(InvalidArgument, match="unknown state"):
        job_from_pb(msg)


# -- property: validate() never fails in another way -------------------------------------------------

wide_ints = st.one_of(st.integers(min_value=-(2 ** 63), max_value=2 ** 63), st.integers(min_value=-5, max_value=5))
texts = st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(argv=st.lists(texts, max_size=5).map(tuple), script=texts, script_args=st.lists(texts, max_size=3).map(tuple),
       env=st.dictionaries(texts, texts, max_size=4), name=texts, gpus=wide_ints, cpus=wide_ints,
       memory_mb=wide_ints, walltime_s=wide_ints, partition=texts, project=texts, site=texts,
       access_mode=st.one_of(st.sampled_from(list(AccessMode)), st.integers(min_value=-3, max_value=10)))
def test_validate_passes_or_raises_invalid_argument(**fields):
    """Any field values: validate() returns None or raises InvalidArgument, never another exception."""
    spec = JobSpec(**fields)
    try:
        assert spec.validate() is None
    except InvalidArgument as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.message


@pytest.mark.parametrize("name", ["SBATCH_PARTITION", "SLURM_JOB_ID", "AIFED_SITE", "sbatch_time", "SRUN_X"])
def test_reserved_env_names_are_refused(name):
    with pytest.raises(InvalidArgument, match="is reserved"):
        JobSpec(argv=("true",), env={name: "x"}).validate()


def test_evolve_is_replace():
    """The model's fast copy gives what dataclasses.replace gives, and refuses unknown fields the same way."""
    job = full_job(3)
    changes = dict(state=JobState.QUEUED, reason="again", history=(), exit_code=None, alternatives=("lumi",))
    assert evolve(job, **changes) == replace(job, **changes)
    assert evolve(job) == job and evolve(job) is not job
    assert evolve(VALID, array_job="a-1", array_task=3) == replace(VALID, array_job="a-1", array_task=3)
    copy = evolve(job, reason="other")
    assert job.reason == "r" and copy.reason == "other"  # the original is untouched
    with pytest.raises(AttributeError):
        copy.reason = "frozen still"  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field 'colour'"):
        evolve(job, colour="red")


def _plain_twin(cls: type) -> type:
    """The same class as a plain frozen dataclass, with the `__init__` the dataclasses module generates."""
    plain = type(cls.__name__, (), {"__annotations__": dict(cls.__annotations__),
                                    **{f.name: f for f in dataclasses.fields(cls)}})
    return dataclasses.dataclass(frozen=True)(plain)


@pytest.mark.parametrize("cls", [JobSpec, Job, Transition, InputFile])
def test_record_init_is_the_dataclass_init(cls):
    """The job model's fast `__init__` takes the arguments the dataclass's own would, with the same defaults,
    and builds the same instance; the class stays frozen."""
    twin = _plain_twin(cls)
    fast, plain = inspect.signature(cls.__init__).parameters, inspect.signature(twin.__init__).parameters
    assert list(fast) == list(plain)
    for name, param in plain.items():
        if param.default is not inspect.Parameter.empty and not repr(param.default).startswith("<factory>"):
            assert fast[name].default == param.default, name
    samples = {
        JobSpec: [{}, {"argv": ("x",), "gpus": 2, "env": {"A": "1"}, "inputs": (InputFile("a", "0" * 64, 3),)},
                  {"script": "#!/bin/sh\n", "site": "lumi", "prefer": ("a", "b"), "overflow_after_s": 5}],
        Job: [{"id": "j", "spec": VALID, "state": JobState.PENDING},
              {"id": "j", "spec": VALID, "state": JobState.FAILED, "exit_code": 3, "history": (Transition(
                  JobState.PENDING, 1.5),), "moved_to": "lumi", "alternatives": ("x",)}],
        Transition: [{"state": JobState.RUNNING, "at": 2.0}, {"state": JobState.FAILED, "at": 3.0, "reason": "r"}],
        InputFile: [{"name": "a", "sha256": "f" * 64, "size": 1}, {"name": "b", "sha256": "e" * 64, "size": 0,
                                                                  "residency": ("IT",)}],
    }[cls]
    for kwargs in samples:
        got, want = cls(**kwargs), twin(**kwargs)
        assert got.__dict__ == want.__dict__
        assert cls(**kwargs) == got
        if cls in (Transition, InputFile):  # hashable as the dataclass's are (a spec holds a dict: never)
            assert hash(got) == hash(want) == hash(cls(**kwargs))
        positional = [kwargs[name] for name in list(plain)[1:] if name in kwargs][:1]
        if positional and list(plain)[1] in kwargs:  # the first field may be given by position too
            rest = {k: v for k, v in kwargs.items() if k != list(plain)[1]}
            assert cls(*positional, **rest) == got
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(got, dataclasses.fields(cls)[0].name, None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        cls(**samples[0], colour="red")
    if cls is JobSpec:
        assert JobSpec().env == {} and JobSpec().env is not JobSpec().env  # a fresh default each time


def test_record_refuses_what_it_would_skip():
    """A class whose `__init__` does more than store its fields cannot be made a record."""
    with pytest.raises(TypeError, match="__post_init__"):
        @record
        class Checked:
            x: int

            def __post_init__(self):
                pass
    with pytest.raises(TypeError, match="plain init fields"):
        @record
        class Hidden:
            x: int = dataclasses.field(default=0, init=False)
