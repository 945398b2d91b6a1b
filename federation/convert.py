"""Conversion between protobuf messages and the domain model, used only at the RPC edge."""

from __future__ import annotations

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from federation.errors import AifedError, InvalidArgument
from federation.model import AccessMode, InputFile, Job, JobSpec, JobState, Transition
from federation.pb import jobs_pb2


_STATES = {int(s): s for s in JobState}  # a dict lookup costs a tenth of calling the enum
_MODES = {int(m): m for m in AccessMode}


def ts(seconds: float) -> Timestamp:
    if not seconds:
        return Timestamp()
    nanos = int(seconds * 1e9)
    return Timestamp(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def from_ts(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def spec_to_pb(spec: JobSpec) -> jobs_pb2.JobSpec:
    # Only the fields that are set: most of a spec is empty, and each field given costs the constructor as much
    # as a set one (a JobSpec's fields and the message's have the same names; a test checks every field).
    fields = {name: value for name, value in spec.__dict__.items() if value}
    if spec.inputs:
        fields["inputs"] = [jobs_pb2.InputFile(name=f.name, sha256=f.sha256, size=f.size, residency=f.residency)
                            for f in spec.inputs]
    return jobs_pb2.JobSpec(**fields)


def spec_from_pb(msg: jobs_pb2.JobSpec) -> JobSpec:
    """The domain spec; unset cpus and walltime take their defaults. Does not validate."""
    try:
        mode = _MODES[msg.access_mode]
    except KeyError:
        raise InvalidArgument(f"unknown access mode {msg.access_mode}") from None
    return JobSpec(
        name=msg.name, argv=tuple(msg.argv), script=msg.script, script_args=tuple(msg.script_args),
        env=dict(msg.env) if msg.env else {}, gpus=msg.gpus, cpus=msg.cpus or 1, memory_mb=msg.memory_mb,
        walltime_s=msg.walltime_s or JobSpec.walltime_s, partition=msg.partition, access_mode=mode,
        project=msg.project, site=msg.site, array_job=msg.array_job, array_task=msg.array_task,
        sector=msg.sector, sector_required=msg.sector_required, prefer=tuple(msg.prefer), exclude=tuple(msg.exclude),
        overflow_after_s=msg.overflow_after_s if msg.prefer else JobSpec.overflow_after_s,
        inputs=tuple(InputFile(f.name, f.sha256, f.size, tuple(f.residency)) for f in msg.inputs) if msg.inputs else (),
        outputs=tuple(msg.outputs))


def job_to_pb(job: Job, spec: bool = True) -> jobs_pb2.Job:
    """The job as a message; without its spec (`spec=False`) for messages that report only its progress."""
    msg = jobs_pb2.Job(
        id=job.id, spec=spec_to_pb(job.spec) if spec else None, state=job.state, owner=job.owner,
        antenna=job.antenna, site=job.site, partition=job.partition, has_exit_code=job.exit_code is not None,
        exit_code=job.exit_code or 0, reason=job.reason, country=job.country, alternatives=job.alternatives,
        moved_from=job.moved_from, moved_to=job.moved_to)
    for t in job.history:
        _stamp(msg.history.add(state=t.state, reason=t.reason).at, t.at)
    _stamp(msg.created_at, job.created_at)
    _stamp(msg.updated_at, job.updated_at)
    return msg


def progress_pb(record: bytes, add=None) -> jobs_pb2.Job:
    """`job_to_pb(job_from_json(record), spec=False)`, read straight from a journal record: a change feed sends
    thousands of these a second, and building the `Job` and its `JobSpec` first cost more than the rest.
    `add`: the `add` of a repeated field of jobs, to build the message in place there rather than copy it in."""
    d = orjson.loads(record)
    exit_code = d["exit_code"]
    msg = (add or jobs_pb2.Job)(
        id=d["id"], state=d["state"], owner=d["owner"], antenna=d["antenna"], site=d["site"],
        partition=d["partition"], has_exit_code=exit_code is not None, exit_code=exit_code or 0, reason=d["reason"],
        country=d.get("country", ""), alternatives=d.get("alternatives", ()), moved_from=d.get("moved_from", ""),
        moved_to=d.get("moved_to", ""))
    # Timestamps are set in place: a `Timestamp` built first is then copied into the message.
    for state, at, reason in d["history"]:
        _stamp(msg.history.add(state=state, reason=reason).at, at)
    _stamp(msg.created_at, d["created_at"])
    _stamp(msg.updated_at, d["updated_at"])
    return msg


def _stamp(stamp: Timestamp, seconds: float) -> None:
    """Set a message's timestamp to `seconds` as `ts` would make it (present even when zero)."""
    if seconds:
        nanos = int(seconds * 1e9)
        stamp.seconds, stamp.nanos = nanos // 1_000_000_000, nanos % 1_000_000_000
    else:
        stamp.SetInParent()


_NO_SPEC: JobSpec | None = None  # what a message without a spec (a change feed's) decodes to, decoded once


def job_from_pb(msg: jobs_pb2.Job) -> Job:
    global _NO_SPEC
    try:
        state = _STATES[msg.state]
        history = tuple(Transition(_STATES[t.state], t.at.seconds + t.at.nanos / 1e9, t.reason) for t in msg.history)
    except KeyError:
        raise InvalidArgument(f"job {msg.id!r} carries an unknown state") from None
    if msg.HasField("spec"):
        spec = spec_from_pb(msg.spec)
    else:
        spec = _NO_SPEC = _NO_SPEC or spec_from_pb(msg.spec)
    return Job(
        id=msg.id, spec=spec, state=state, owner=msg.owner, antenna=msg.antenna,
        site=msg.site, partition=msg.partition, exit_code=msg.exit_code if msg.has_exit_code else None,
        reason=msg.reason, history=history, created_at=from_ts(msg.created_at),
        updated_at=from_ts(msg.updated_at), country=msg.country, alternatives=tuple(msg.alternatives),
        moved_from=msg.moved_from, moved_to=msg.moved_to)


def error_pb(error: AifedError) -> jobs_pb2.JobError:
    """Why one job of a batch was refused."""
    return jobs_pb2.JobError(code=error.code.value[0], message=error.message)


def receipt_pb(job: Job) -> jobs_pb2.JobReceipt:
    msg = jobs_pb2.JobReceipt(id=job.id, state=job.state, array_job=job.spec.array_job,
                              array_task=job.spec.array_task)
    _stamp(msg.created_at, job.created_at)
    return msg
