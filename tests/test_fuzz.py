"""Property-based fuzzing (hypothesis) of everything that reads outside input.

* every request field of every method of the `aifed.v1.Antenna` and `aifed.v1.Hub` services, on running daemons
  over real mutual TLS: requests are built from the protobuf descriptors, so a method added to a .proto file is
  fuzzed without editing this file;
* the TOML config loaders, the `#SBATCH` parser and the Slurm time-format parser.

Profiles: `ci` (the default: small, derandomized, no example database) and `long` (thousands of examples, with
the example database so a failure found once is replayed first). Choose with the environment variable
HYPOTHESIS_PROFILE; `make fuzz` runs the long one. The profiles apply to this file's tests only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import datetime as dt
import logging
import os
import re
import shlex
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, note, settings, strategies as st

from federation import sbatch
from federation.config import AntennaConfig, ClientConfig, HubConfig, load_antenna, load_client, load_hub
from federation.errors import ConfigError
from federation.identity import Role
from federation.model import JobSpec, JobState
from federation.pb import antenna_pb2, hub_pb2, hub_pb2_grpc
from federation.rpc import secure_channel
from federation.timefmt import parse_duration

from tests.conftest import FEDERATION

# -- profiles --------------------------------------------------------------------------------------

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
               HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          print_blob=False, suppress_health_check=_SUPPRESSED)
settings.register_profile("long", max_examples=4000, deadline=None, print_blob=True,
                          suppress_health_check=_SUPPRESSED)
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
LONG = PROFILE.max_examples >= 1000


def fuzz_settings(share: float) -> settings:
    """The profile, with `share` of its examples (an RPC example costs far more than a parser example)."""
    return settings(PROFILE, max_examples=max(5, int(PROFILE.max_examples * share)))


# A long run must not be cut by the suite's 120 s per-test timeout.
TIMEOUT = pytest.mark.timeout(0 if LONG else 300)

C = grpc.StatusCode
# What the GuardInterceptor (typed AifedErrors) and gRPC itself may answer to a bad request.
PROPER_CODES = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.PERMISSION_DENIED, C.ALREADY_EXISTS,
                C.RESOURCE_EXHAUSTED, C.UNAVAILABLE, C.OUT_OF_RANGE, C.UNIMPLEMENTED, C.ABORTED}
# A server stream left open is cut by our deadline or our cancel: fine for streams, a hang for unary calls.
STREAM_ENDINGS = {C.DEADLINE_EXCEEDED, C.CANCELLED}
UNARY_TIMEOUT_S = 5.0
STREAM_DEADLINE_S = 1.0 if LONG else 0.25
STREAM_MAX_MESSAGES = 3

# -- strings: hostile, odd, and the federation's own vocabulary ------------------------------------------

HOSTILE = [
    "", " ", "\x00", "a\x00b", "\x00" * 8, "../../etc/passwd", "/etc/passwd", "..", ".", "/", "./", "../",
    "..\\..\\windows\\win.ini", "%s%s%s%n", "{0}{1}", "{}", "'; DROP TABLE jobs; --", '" OR 1=1 --', "\r\n", "\n",
    "\t", "\x1b[2J", "\x7f", "\x85", "\u2028", "\u2029", "~", "~nosuchuser-aifed/x", "-", "--", "-h", "--help",
    "\u202egnp.exe", "\ufeff", "\ufffe", "\uffff", "\U0010ffff", "\U0001f680" * 3, "\uff21\uff22", "\u0661\u0662",
    "\u00b2", "\u0130", "\u00df", "e\u0301" * 5, "\ud7ff", "\ue000", "null", "None", "true", "0", "-1",
    "18446744073709551616", "1e309", "NaN", "spiffe://", "spiffe://eurohpc.test/user/antenna-a/alice/../bob",
    "spiffe://eurohpc.test/user/antenna-a/alice\n", "127.0.0.1:\u00b2", "x" * 201, "x" * 300, "\u00e9" * 5000,
    "y" * 70_000,
]
# Just over the largest script, drawn rarely (a megabyte per call): only in requests, never in config files.
RPC_HOSTILE = HOSTILE + ["z" * ((1 << 20) + 1)]

_any_text = st.text(st.characters(codec="utf-8"), max_size=40)
_control_text = st.text(st.characters(max_codepoint=0x1F) | st.sampled_from("\x7f\x85\u2028\u2029\x00"),
                        max_size=12)
_ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def pick(values: list):
    """sampled_from, with a short repr: some values are megabytes long."""
    return st.sampled_from(range(len(values))).map(lambda i: values[i])


TEXT = st.one_of(_any_text, _ascii_text, _control_text, pick(RPC_HOSTILE),
                 st.builds(lambda a, b: a + b, pick(HOSTILE), _any_text))


def _known_strings(known: dict[str, list[str]]) -> dict[str, list[str]]:
    """Field name -> values that get past validation, so that fuzzing reaches the code behind it."""
    ids = known.get("job_ids", [])
    return {
        "job_id": ids + ["antenna-a-0123456789ab", "antenna-b-0123456789ab", "antenna-a-", "antenna-a-x/../y"],
        "id": ids + ["antenna-a-0123456789ab", "antenna-a-fuzz1", "antenna-a-fuzz2", "antenna-b-0123456789ab",
                     "antenna-a-UPPER", "antenna-a-" + "a" * 65],
        "array_job": ids + ["antenna-a-0123456789ab", "antenna-a-array1"],
        "owner": [f"spiffe://{FEDERATION}/user/antenna-a/alice", f"spiffe://{FEDERATION}/user/antenna-a/bob",
                  f"spiffe://{FEDERATION}/user/antenna-b/carol", f"spiffe://{FEDERATION}/hub/leonardo",
                  f"spiffe://{FEDERATION}/antenna/antenna-a", "spiffe://other.test/user/antenna-a/alice"],
        "antenna": ["antenna-a", "antenna-b"],
        "site": ["leonardo", "lumi", "jupiter", "antenna-a", "LEONARDO"],
        "partition": ["booster", "dcgp", "nope", "BOOSTER"],
        "idempotency_key": ["k", "k1", "k2", "retry"] + ids,
        "request_id": ["r", "r1", "r2", "retry"],
        "name": ["job", "train-1", "a.b+c_d", "x" * 129],
        "project": ["ai-health", "proj"],
        "argv": ["true", "false", "/bin/true", "echo", "printf", "hello", "%s"],
        "script": ["#!/bin/sh\necho hi\n", "#!/bin/sh\nexit 3\n", "echo hi\n", "   \n", "#!\n"],
        "script_args": ["a", "--", "-n"],
        "env.key": ["FOO", "PATH", "HOME", "LD_PRELOAD", "AIFED_JOB_ID", "SLURM_JOB_ID", "sbatch_x", "1BAD", "A-B",
                    "_", "A" * 300],
        "env.value": ["1", "", "/nonexistent", "a=b"],
        "array": ["0", "0-3", "1,3,5-7", "0-98:2", "3-1", "0-10001", "0-4000000", "0-99999999999", "0-3%2", "1-",
                  ",", "0:1", "-5", "0-10:0", "0-10:-1", "a-b"],  # at most 50 tasks, or refused: jobs really run
        "epoch": ["", "e1"] + ids,
        "reason": ["cancelled", "killed at its walltime"],
        "gpu_model": ["A100", "H100"],
    }


def _int_hints() -> dict[str, st.SearchStrategy[int]]:
    return {
        "gpus": st.integers(0, 9), "cpus": st.integers(0, 70), "walltime_s": st.integers(0, 4000),
        "memory_mb": st.integers(0, 1 << 16), "limit": st.integers(0, 1200), "array_task": st.integers(0, 5),
        "exit_code": st.integers(-3, 300), "after": st.integers(0, 50), "sequence": st.integers(0, 50),
        "offset": st.integers(0, 100), "seconds": st.integers(-10, 2_000_000_000), "nanos": st.integers(-2, 10 ** 9),
    }


# -- requests built from the protobuf descriptors ----------------------------------------------------------

_T = FieldDescriptor
_INT_RANGES = {
    _T.TYPE_INT32: (-(1 << 31), (1 << 31) - 1), _T.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    _T.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1), _T.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    _T.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1), _T.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    _T.TYPE_UINT32: (0, (1 << 32) - 1), _T.TYPE_FIXED32: (0, (1 << 32) - 1),
    _T.TYPE_UINT64: (0, (1 << 64) - 1), _T.TYPE_FIXED64: (0, (1 << 64) - 1),
}
MAX_DEPTH = 4        # nested messages below the request
PRESENT = st.integers(0, 3).map(bool)  # a field is set 3 times in 4 (shrinks to unset)
MAX_REPEATED = 4     # elements of a repeated field, usually
BIG_REPEATED = 70    # sometimes: past limits such as 64 job shapes


def _repeated(f: FieldDescriptor) -> bool:
    flag = getattr(f, "is_repeated", None)
    return flag if isinstance(flag, bool) else f.label == _T.LABEL_REPEATED


def _map_entry(f: FieldDescriptor) -> bool:
    return f.type == _T.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _harmless_spec(msg: Message, draw) -> None:
    """Half of the job specs run `true` for a few seconds at most (fuzzing must not occupy the machine), with
    no name or environment to refuse: the other fields (GPUs, CPUs, partition, site, mode...) stay random, so
    that placement and forwarding are fuzzed too."""
    msg.ClearField("argv")
    msg.argv.append("true")
    for name in ("script", "name", "env"):
        if name in msg.DESCRIPTOR.fields_by_name:
            msg.ClearField(name)
    msg.walltime_s = min(msg.walltime_s, 30) or 5


def _plausible_job(msg: Message, draw) -> None:
    """Half of the jobs a hub is given carry an id and an owner antenna-a may forward: the hub looks further."""
    msg.id = "antenna-a-" + draw(st.text("0123456789abcdef", min_size=1, max_size=12))
    msg.owner = f"spiffe://{FEDERATION}/user/antenna-a/alice"
    msg.state = draw(st.sampled_from([1, 1, 2, 7]))  # PENDING as an antenna sends it, or not
    msg.ClearField("history")


# Message types (by full name) that half of the examples make harmless or plausible, after the random draws.
HARMLESS = {"aifed.v1.JobSpec": _harmless_spec, "aifed.v1.Job": _plausible_job}


class RequestStrategies:
    """Hypothesis strategies for any message type, walking `DESCRIPTOR.fields` (bounded depth and size)."""

    def __init__(self, known: dict[str, list[str]] | None = None):
        self.strings = _known_strings(known or {})
        self.ints = _int_hints()
        self._cache: dict[tuple[str, int], st.SearchStrategy] = {}

    def message(self, desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        key = (desc.full_name, depth)
        if key not in self._cache:
            self._cache[key] = st.deferred(lambda: self._build(desc, depth))
        return self._cache[key]

    def _build(self, desc: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(desc)
        fields = [f for f in desc.fields if f.type != _T.TYPE_MESSAGE or depth < MAX_DEPTH]
        values = {f.name: self.field(f, depth) for f in fields}
        harmless = HARMLESS.get(desc.full_name)

        @st.composite
        def build(draw) -> Message:
            msg = cls()
            for f in fields:
                if draw(PRESENT):
                    _assign(msg, f, draw(values[f.name]))
            if harmless and draw(st.booleans()):
                harmless(msg, draw)
            return msg

        return build()

    def field(self, f: FieldDescriptor, depth: int) -> st.SearchStrategy:
        if _map_entry(f):
            entry = f.message_type
            key = self.single(entry.fields_by_name["key"], depth + 1, f"{f.name}.key")
            value = self.single(entry.fields_by_name["value"], depth + 1, f"{f.name}.value")
            return st.dictionaries(key, value, max_size=MAX_REPEATED)
        one = self.single(f, depth, f.name)
        if not _repeated(f):
            return one
        lists = st.lists(one, max_size=MAX_REPEATED)
        flat = f.type != _T.TYPE_MESSAGE or all(g.type != _T.TYPE_MESSAGE for g in f.message_type.fields)
        if depth > 0 or not flat:
            return lists
        # Sometimes past limits such as 64 job shapes (only for cheap elements: scalars and flat messages).
        return st.one_of(lists, st.lists(one, min_size=BIG_REPEATED - 10, max_size=BIG_REPEATED))

    def single(self, f: FieldDescriptor, depth: int, hint: str) -> st.SearchStrategy:
        t = f.type
        if t == _T.TYPE_STRING:
            known = self.strings.get(hint)
            return st.one_of(st.sampled_from(known), TEXT) if known else TEXT
        if t == _T.TYPE_BYTES:
            return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\xff" * 100, b"\x80abc"]))
        if t == _T.TYPE_BOOL:
            return st.booleans()
        if t in _INT_RANGES:
            lo, hi = _INT_RANGES[t]
            edges = sorted({v for v in (lo, hi, 0, 1, -1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, hi // 2)
                            if lo <= v <= hi})
            parts = [st.integers(lo, hi), st.sampled_from(edges), st.integers(max(lo, -3), min(hi, 100))]
            if hint in self.ints:
                parts.append(self.ints[hint].filter(lambda v: lo <= v <= hi))
            return st.one_of(*parts)
        if t in (_T.TYPE_FLOAT, _T.TYPE_DOUBLE):
            return st.floats(width=32 if t == _T.TYPE_FLOAT else 64)
        if t == _T.TYPE_ENUM:
            defined = [v.number for v in f.enum_type.values]
            return st.one_of(st.sampled_from(defined), st.sampled_from(defined),
                             st.integers(-(1 << 31), (1 << 31) - 1), st.integers(-2, max(defined) + 3))
        if t == _T.TYPE_MESSAGE:
            return self.message(f.message_type, depth + 1)
        raise AssertionError(f"field type {t} of {f.full_name} is not handled: extend RequestStrategies")


def _assign(msg: Message, f: FieldDescriptor, value) -> None:
    if _map_entry(f):
        target = getattr(msg, f.name)
        if f.message_type.fields_by_name["value"].type == _T.TYPE_MESSAGE:
            for k, v in value.items():
                target[k].CopyFrom(v)
        else:
            target.update(value)
    elif _repeated(f):
        getattr(msg, f.name).extend(value)
    elif f.type == _T.TYPE_MESSAGE:
        getattr(msg, f.name).CopyFrom(value)
    else:
        setattr(msg, f.name, value)


# -- calling any method generically ---------------------------------------------------------------------

SERVICES: dict[str, ServiceDescriptor] = {
    "Antenna": antenna_pb2.DESCRIPTOR.services_by_name["Antenna"],
    "Hub": hub_pb2.DESCRIPTOR.services_by_name["Hub"],
}
METHODS = [(name, m.name) for name, service in SERVICES.items() for m in service.methods]


class Requests(tuple):
    """The request(s) of one call, shown on one line each in hypothesis's reports."""

    def __repr__(self) -> str:
        return "Requests(" + ", ".join(
            f"{type(m).__name__}({text_format.MessageToString(m, as_one_line=True)[:3000]})" for m in self) + ")"


@st.composite
def as_requests(draw, messages: st.SearchStrategy) -> Requests:
    return Requests(draw(messages))  # built here, not with .map: hypothesis then shows the short repr


async def call(channel: grpc.aio.Channel, method: MethodDescriptor, requests: Requests):
    """Call any method; return (status code, details, responses read). Streams are read a little, then cut."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    out_cls = message_factory.GetMessageClass(method.output_type)
    kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
    multi = getattr(channel, kind)(path, request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=out_cls.FromString)
    arg = iter(requests) if method.client_streaming else requests[0]
    if not method.server_streaming:
        try:
            response = await multi(arg, timeout=UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details(), []
        return C.OK, "", [response]
    stream = multi(arg, timeout=STREAM_DEADLINE_S)
    read: list[Message] = []
    try:
        while len(read) < STREAM_MAX_MESSAGES:
            item = await stream.read()
            if item is grpc.aio.EOF:
                return await stream.code(), await stream.details(), read
            read.append(item)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details(), read
    stream.cancel()
    return C.CANCELLED, "cancelled by the test after enough messages", read


class DaemonTracebacks(logging.Handler):
    """The tracebacks the daemons log for unexpected failures, by the ref their INTERNAL status names."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.by_ref: dict[str, str] = {}
        self.setFormatter(logging.Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        ref = re.search(r"\(ref (\w+)\)", record.getMessage())
        if ref and record.exc_info:
            self.by_ref[ref.group(1)] = self.formatter.formatException(record.exc_info)

    def about(self, details: str | None) -> str:
        ref = re.search(r"\(ref (\w+)\)", details or "")
        found = self.by_ref.get(ref.group(1)) if ref else None
        return f"\nThe daemon logged:\n{found}" if found else ""


def check_outcome(method: MethodDescriptor, code: grpc.StatusCode, details: str | None,
                  tracebacks: DaemonTracebacks) -> None:
    """The property: success, or a deliberate status with a message; never UNKNOWN/INTERNAL or a hang."""
    event(f"{method.name}: {code.name}")
    if code == C.OK:
        return
    allowed = PROPER_CODES | (STREAM_ENDINGS if method.server_streaming else set())
    assert code in allowed, f"{method.full_name} answered {code.name}: {details}{tracebacks.about(details)}"
    assert details and details.strip(), f"{method.full_name} answered {code.name} without a message"


async def in_thread(stop: threading.Event, fn: Callable, *args) -> None:
    """Run fn in a daemon thread while the event loop keeps serving. If the awaiting test ends first (Ctrl-C,
    a timeout), `stop` tells the thread to end too, and a daemon thread never holds up the interpreter's exit."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if not done.done():
            done.set_exception(exc) if exc else done.set_result(None)

    def run() -> None:
        outcome = None
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting test
            outcome = exc
        except BaseException as exc:  # noqa: BLE001 - a KeyboardInterrupt cannot travel through a future
            outcome = RuntimeError(f"interrupted: {exc!r}")
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    thread = threading.Thread(target=run, name="hypothesis", daemon=True)
    thread.start()
    try:
        await done
    finally:
        stop.set()
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:  # its last call still needs the loop
            await asyncio.sleep(0.05)


def on_loop(loop: asyncio.AbstractEventLoop, coro, stop: threading.Event, timeout: float = 60):
    """From hypothesis's thread: run coro on the daemons' loop and return its result; give up when the test
    is stopping (the loop may never finish it then)."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return future.result(timeout=0.2)
        except concurrent.futures.TimeoutError:
            if stop.is_set() or time.monotonic() > deadline:
                future.cancel()
                raise KeyboardInterrupt("the test is stopping") if stop.is_set() else \
                    AssertionError(f"no answer in {timeout} s: the call hangs") from None


def run_hypothesis(name: str, strategy: st.SearchStrategy, example: Callable, config: settings) -> None:
    """Run `example` as a @given test (in a worker thread for the RPC tests: the event loop stays free to serve
    the calls). `name` gives each parametrized case its own seed and example-database key."""
    example.__name__ = example.__qualname__ = name
    config(given(strategy)(example))()


async def health_serving(port: int, tls, service: str) -> None:
    async with secure_channel(f"127.0.0.1:{port}", tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", service):
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, (port, name)


async def daemons_still_work(fed, test_pki) -> None:
    """After fuzzing: a normal job runs to the end, each hub adverts, every daemon is SERVING, adverts are fresh."""
    antenna_tls = test_pki.tls(Role.ANTENNA, "antenna-a")
    for site, hub in fed.hubs.items():
        async with secure_channel(f"127.0.0.1:{hub.port}", antenna_tls) as ch:
            advert = await hub_pb2_grpc.HubStub(ch).GetAdvert(hub_pb2.AdvertRequest(), timeout=5)
        assert advert.site == site and advert.partitions
        await health_serving(hub.port, antenna_tls, "aifed.v1.Hub")
    await health_serving(fed.antennas["antenna-a"].port, test_pki.user("antenna-a", "alice"), "aifed.v1.Antenna")
    await fed.wait_sites(timeout=15)
    client = fed.client("alice")
    job = await client.submit(JobSpec(argv=("true",), walltime_s=60))
    done = await asyncio.wait_for(client.wait(job.id), 60)
    assert done.state is JobState.COMPLETED, done


async def stop_every_job(fed) -> None:
    """Cancel what fuzzing left queued or running: a stopped hub leaves its jobs' processes running."""
    for hub in fed.hubs.values():
        core = hub.core
        if core is None:
            continue
        for job, _ in core.journal.unfinished():
            try:
                await core.backend.cancel(job.id)
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
            getattr(h.core.backend, "_running", None) for h in fed.hubs.values() if h.core is not None):
        await asyncio.sleep(0.1)


async def known_jobs(fed) -> dict[str, list[str]]:
    """A few real jobs for the fuzzer to aim at: ended with output, running, and another user's."""
    alice, bob = fed.client("alice"), fed.client("bob")
    done = await alice.submit(JobSpec(argv=("echo", "hello"), walltime_s=60))
    running = await alice.submit(JobSpec(argv=("sleep", "60"), walltime_s=90, gpus=1))
    other = await bob.submit(JobSpec(argv=("true",), walltime_s=60))
    return {"job_ids": [done.id, running.id, other.id]}


# -- config loaders ---------------------------------------------------------------------------------------

def toml_string(s: str) -> str:
    out = []
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_document(doc: dict) -> str:
    """TOML text for a dict: top-level tables as [sections], lists of tables as [[sections]], the rest inline."""
    head, tail = [], []
    for k, v in doc.items():
        if isinstance(v, dict):
            tail.append(f"\n[{toml_string(k)}]")
            tail += [f"{toml_string(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for table in v:
                tail.append(f"\n[[{toml_string(k)}]]")
                tail += [f"{toml_string(kk)} = {toml_value(vv)}" for kk, vv in table.items()]
        else:
            head.append(f"{toml_string(k)} = {toml_value(v)}")
    return "\n".join(head + tail) + "\n"


CONFIG_KEYS = ["hub", "antenna", "client", "tls", "backend", "partitions", "hubs", "site", "federation", "listen",
               "state_dir", "services", "sectors", "access_modes", "advert_ttl", "retention", "type", "kill_grace",
               "cpu_slots", "slurm_conf", "poll_interval", "capacity_interval", "command_timeout", "array_size", "accounts",
               "name", "gpus", "gpu_model", "max_walltime", "endpoint", "ca", "cert", "key"]
CONFIG_STRINGS = ["leonardo", "eurohpc.test", "127.0.0.1:50051", "127.0.0.1:0", "0.0.0.0:65535", "host:65536",
                  "[::1]:50051", ":50051", "127.0.0.1:", "local", "slurm", "hold", "30s", "1-00:00:00", "10",
                  "0", "-5", "2h", "1d", "playground", "fast-lane", "large_scale", "booster", "A100",
                  "/nonexistent/file.pem", "/etc/passwd", "/dev/null", "/", ".", "a" * 300]
# Values that trouble paths, host:port pairs and durations.
CONFIG_HOSTILE = ["~nosuchuser-aifed/x", "~nosuchuser-aifed", "~", "a" * 300, "d/" * 2100, "127.0.0.1:\u00b2",
                  "host:\u0661\u0662", "host:\uff11", "/dev/null", "/", "/proc/self/status", "", " ", "\x00",
                  "a\x00b", "../../etc/passwd", "127.0.0.1:99999", ":1", "host:", "[::1]:50051", "1\u00b2s",
                  "9" * 5000 + "s", "-1", "0s", "\u0663s"]
keys = st.one_of(st.sampled_from(CONFIG_KEYS), _any_text)
scalars = st.one_of(
    st.sampled_from(CONFIG_STRINGS), pick(HOSTILE), _any_text,
    st.integers(-(1 << 63), (1 << 63) - 1), st.integers(-5, 100), st.booleans(), st.floats(),
    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)), st.dates(), st.times())
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner,
                                                                                             max_size=4),
                           max_leaves=12)
toml_documents = st.dictionaries(keys, toml_values | st.lists(st.dictionaries(keys, toml_values, max_size=5),
                                                              min_size=1, max_size=3), max_size=6)


@pytest.fixture(scope="module")
def valid_configs(test_pki, tmp_path_factory) -> dict[str, dict]:
    """A valid document for each loader, with real TLS files (absolute paths)."""
    folder = tmp_path_factory.mktemp("fuzz-config")

    def tls(role, site, name=""):
        t = test_pki.tls(role, site, name)
        return {"ca": str(t.ca), "cert": str(t.cert), "key": str(t.key)}

    return {
        "hub": {"hub": {"site": "leonardo", "federation": FEDERATION, "listen": "127.0.0.1:50051",
                        "state_dir": "state/leonardo", "services": ["inference"], "sectors": ["health"],
                        "access_modes": ["playground", "fast-lane"], "advert_ttl": "45s"},
                "backend": {"type": "local", "kill_grace": "5s", "cpu_slots": 16},
                "partitions": [{"name": "booster", "gpu_model": "A100", "gpus": 4, "max_walltime": "1-00:00:00"},
                               {"name": "dcgp", "max_walltime": "30"}],
                "tls": tls(Role.HUB, "leonardo")},
        "antenna": {"antenna": {"site": "antenna-a", "federation": FEDERATION, "listen": "0.0.0.0:50060",
                                "state_dir": "state/antenna-a"},
                    "hubs": [{"site": "leonardo", "endpoint": "leonardo.example:50051"},
                             {"site": "lumi", "endpoint": "127.0.0.1:50052"}],
                    "tls": tls(Role.ANTENNA, "antenna-a")},
        "client": {"client": {"antenna": "antenna.example:50060"}, "tls": tls(Role.USER, "antenna-a", "alice")},
        "folder": {"path": str(folder)},
    }


LOADERS = {"hub": (load_hub, HubConfig), "antenna": (load_antenna, AntennaConfig),
           "client": (load_client, ClientConfig)}


def _locations(doc, path=()) -> list[tuple]:
    """Every (container path, key) in a nested document, for mutations."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append((*path, k))
        out += _locations(v, (*path, k))
    return out


@st.composite
def mutated(draw, base: dict) -> tuple[dict, int]:
    doc = copy.deepcopy(base)
    n = draw(st.integers(0, 4))
    for _ in range(n):
        spots = _locations(doc)
        op = draw(st.sampled_from(["delete", "replace", "add", "hostile", "rename"]))
        if not spots:
            op = "add"
        if op == "add":
            parents = [()] + [s for s in spots if isinstance(_get(doc, s), (dict, list))]
            parent = _get(doc, draw(st.sampled_from(parents)))
            value = draw(toml_values)
            if isinstance(parent, dict):
                parent[draw(keys)] = value
            else:
                parent.append(value)
            continue
        spot = draw(st.sampled_from(spots))
        parent, key = _get(doc, spot[:-1]), spot[-1]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(toml_values)
        elif op == "hostile":  # a string setting gets a hostile value
            strings = [s for s in spots if isinstance(_get(doc, s), str)] or [spot]
            spot = draw(st.sampled_from(strings))
            _get(doc, spot[:-1])[spot[-1]] = draw(pick(CONFIG_HOSTILE) | pick(HOSTILE) | _control_text)
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(keys)] = parent.pop(key)
    return doc, n


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


class Document:
    """A config file's bytes, shown shortened in hypothesis's reports (the file is written before loading)."""

    def __init__(self, data: bytes):
        self.data = data

    def __repr__(self) -> str:
        text = repr(self.data)
        return f"Document({text[:600]}{' ...' if len(text) > 600 else ''} ({len(self.data)} bytes))"


@st.composite
def as_documents(draw, data: st.SearchStrategy[bytes]) -> Document:
    return Document(draw(data))  # built here, not with .map: hypothesis then shows the short repr


@st.composite
def raw_text(draw, base: str) -> bytes:
    """Valid TOML text damaged at the byte level, or bytes from nowhere."""
    data = bytearray(base.encode())
    choice = draw(st.sampled_from(["edit", "random", "nested"]))
    if choice == "random":
        return draw(st.binary(max_size=200))
    if choice == "nested":
        depth = draw(st.sampled_from([3, 100, 1500]))  # not a range: shrinking must not stop at the stack's edge
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a=", "}")]))
        return base.encode() + b"\nzz = " + (opener * depth + closer * depth).encode()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        what = draw(st.sampled_from(["insert", "delete", "dup"]))
        if what == "insert":
            data[at:at] = draw(st.binary(max_size=8) | st.sampled_from([b"[", b"]", b"=", b'"', b"\n", b"[[",
                                                                        b"\xff", b"\x00", b"#", b"'''"]))
        elif what == "delete":
            del data[at:at + draw(st.integers(1, 20))]
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 40))]
    return bytes(data)


def _write(valid_configs, name: str, data: bytes) -> Path:
    path = Path(valid_configs["folder"]["path"]) / f"{name}.toml"
    path.write_bytes(data)
    return path


_WRONG: dict[type, type] = {}


def wrong_error(exc: BaseException) -> AssertionError:
    """An AssertionError of a class named after `exc`'s type, raised from one place: hypothesis then reports
    each wrong exception type as a distinct bug, and replays it consistently (a RecursionError is not raised at
    the same line twice). The original traceback is in the message."""
    kind = type(exc)
    if kind not in _WRONG:
        _WRONG[kind] = type(f"{kind.__name__}InsteadOfConfigError", (AssertionError,), {})
    frames = traceback.format_exception(exc)
    shown = "".join(frames[:1] + frames[-12:]) if len(frames) > 14 else "".join(frames)
    if len(shown) > 4000:
        shown = shown[:2500] + " [...] " + shown[-1000:]
    return _WRONG[kind](f"raised {kind.__name__}, not ConfigError:\n{shown}")


def _load_or_config_error(kind: str, path: Path):
    loader, config_type = LOADERS[kind]
    wrong = None
    try:
        config = loader(path)
    except ConfigError as err:
        assert str(path) in str(err), f"the error does not name the file: {err}"
        assert err.problem, err
        event(f"{kind}: ConfigError at {err.key.split('[')[0] or '(file)'}")
        return None
    except Exception as exc:  # noqa: BLE001 - the property: nothing but ConfigError
        wrong = wrong_error(exc)
    if wrong is not None:
        raise wrong  # outside the handler: no __context__, so each wrong type is one stable bug to hypothesis
    assert isinstance(config, config_type), config
    assert getattr(config, "path", path) == path
    event(f"{kind}: loaded")
    return config


@TIMEOUT
@pytest.mark.parametrize("kind", list(LOADERS))
def test_config_mutations_load_or_raise_config_error(valid_configs, kind):
    """A valid config changed in up to four places: it loads, or ConfigError names the file (never another error)."""

    def check(case):
        doc, mutations = case
        path = _write(valid_configs, kind, toml_document(doc).encode())
        config = _load_or_config_error(kind, path)
        if mutations == 0:
            assert config is not None, "the unmutated config must load"

    run_hypothesis(f"config_mutations_{kind}", mutated(valid_configs[kind]), check, fuzz_settings(1.5))


@TIMEOUT
@pytest.mark.parametrize("kind", list(LOADERS))
def test_config_random_documents_load_or_raise_config_error(valid_configs, kind):
    """Random TOML documents and damaged TOML text: ConfigError naming the file, or a config."""

    def check(document):
        _load_or_config_error(kind, _write(valid_configs, f"random-{kind}", document.data))

    documents = as_documents(st.one_of(toml_documents.map(lambda d: toml_document(d).encode()),
                                       raw_text(toml_document(valid_configs[kind]))))
    run_hypothesis(f"config_random_{kind}", documents, check, fuzz_settings(1.5))


# -- the #SBATCH parser -------------------------------------------------------------------------------------

SBATCH_OPTIONS = sorted(sbatch._FIELDS) + ["--exclusive", "--qos", "--array", "--mem-per-cpu", "--wrap", "-x",
                                           "--gpus-per-task", "--", "-", "--time-min"]
SBATCH_VALUES = ["1", "4", "1-1", "2", "gpu", "gpu:2", "gpu:a100:2", "a100:1", "gpu:a100:2,gpu:v100:1",
                 "gpu:a100:2,tmpfs:1", "shard:1", "4G", "512M", "1T", "2KB", "10", "1-02:00:00", "30", "0", "-1",
                 "abc", "", "99999999999999999999", "9" * 5000, "\u0663", "\u00b2", "4\u00b2", '"', "'", "\\", "#",
                 "=", "a b", "1:2:3:4", "1-", "-", "gpu:", ":1"]
sbatch_values = st.one_of(pick(SBATCH_VALUES), _ascii_text, _any_text)


# Values each request field accepts, and what they mean.
SBATCH_GOOD = {
    "partition": [("gpu", "gpu"), ("booster", "booster")],
    "walltime_s": [("30", 1800), ("10:00", 600), ("1-02:00:00", 93600), ("2h", 7200), ("0:30", 30)],
    "cpus": [("1", 1), ("4", 4), ("16", 16)],
    "memory_mb": [("4G", 4096), ("512M", 512), ("1024", 1024), ("2T", 2 * 1024 ** 2), ("1500K", 2)],
    "name": [("train", "train"), ("a b", "a b"), ("x=y", "x=y")],
    "project": [("ai-health", "ai-health")],
    "gpus": [("2", 2), ("gpu:2", 2), ("gpu:a100:1", 1), ("a100:4", 4)],
    "array": [("0-3", "0-3"), ("1,3,5-7", "1,3,5-7"), ("0-98:2", "0-98:2")],
}
SBATCH_VALID = {**{k: [t for t, _ in v] for k, v in SBATCH_GOOD.items()},
                "nodes": ["1"], "ntasks": ["1", "1-1"], "output": ["slurm-%j.out"]}


@st.composite
def sbatch_lines(draw) -> str:
    form = draw(st.sampled_from([0, 1, 1, 2, 3, 4, 5, 6, 7]))
    opt = draw(st.sampled_from(SBATCH_OPTIONS))
    valid = SBATCH_VALID.get(sbatch._FIELDS.get(opt, ""))
    value = draw(st.one_of(*[st.sampled_from(valid)] * 3, sbatch_values) if valid else sbatch_values)
    prefix = draw(st.sampled_from(["#SBATCH ", "#SBATCH\t", "#SBATCH", " #SBATCH ", "#sbatch ", "#SBATCH  "]))
    if form == 0:
        return f"{prefix}{opt}={value}"
    if form == 1:
        return f"{prefix}{opt} {value}"
    if form == 2:
        return f"{prefix}{opt}{value}"
    if form == 3:
        return f"{prefix}{opt} {shlex.quote(value)}"
    if form == 4:
        return f"{prefix}{opt}"
    if form == 5:
        return f"{prefix}{opt}={value} {draw(st.sampled_from(SBATCH_OPTIONS))} {draw(sbatch_values)}  # {value}"
    return draw(st.sampled_from(["", "# comment", "#!/bin/bash", "srun python train.py", "   ", "\t#", "#SBATCH",
                                 "echo $SLURM_JOB_ID"]) | _any_text)


_directive_scripts = st.lists(sbatch_lines(), max_size=8).flatmap(
    lambda lines: st.sampled_from(["\n", "\n", "\r\n", "\r", "\x85"]).map(lambda sep: sep.join(lines)))
scripts = st.one_of(_directive_scripts, _directive_scripts, _directive_scripts, _any_text, st.text(max_size=300))

# The type of each request field; a field added to the parser later must be a str or an int.
VALUE_TYPES = {"partition": str, "name": str, "project": str, "walltime_s": int, "cpus": int, "memory_mb": int,
               "gpus": int, "array": str}


def parse_outcome(script: str):
    try:
        return "ok", sbatch.parse(script)
    except sbatch.DirectiveError as err:
        assert type(err) is sbatch.DirectiveError
        assert str(err).startswith("line "), err
        return "error", str(err)


@TIMEOUT
@fuzz_settings(4)
@given(scripts, st.lists(sbatch_lines(), max_size=3))
def test_sbatch_parser_returns_directives_or_directive_error(script, after):
    """Any script: Directives with typed values, or DirectiveError naming the line; nothing after the first
    command counts."""
    outcome, result = parse_outcome(script)
    event(f"sbatch: {outcome}")
    if outcome == "ok":
        lines = script.splitlines()
        assert set(result.values) <= set(sbatch._FIELDS.values()), result.values
        for name, value in result.values.items():
            assert type(value) in ((VALUE_TYPES[name],) if name in VALUE_TYPES else (str, int)), (name, value)
            if name in ("walltime_s", "memory_mb", "gpus"):
                assert value >= 0, (name, value)
            assert lines[result.lines[name] - 1].startswith("#SBATCH"), (name, result.lines[name])
        assert all(isinstance(n, str) and n.startswith("line ") for n in result.notes)
    # Directives stop at the first command: lines after one never change the outcome.
    longer = script + "\nsrun ./train\n" + "\n".join(after)
    assert parse_outcome(longer) == (outcome, result)


@st.composite
def good_scripts(draw) -> tuple[str, dict]:
    """A script whose directives are all valid (every spelling of each option), and the values they mean."""
    fields = draw(st.lists(st.sampled_from(sorted(set(sbatch._FIELDS.values()) & set(SBATCH_GOOD))),
                           unique=True, max_size=len(SBATCH_GOOD)))
    lines, expected = [], {}
    if draw(st.booleans()):
        lines.append("#!/bin/bash")
    for field in fields:
        text, value = draw(st.sampled_from(SBATCH_GOOD[field]))
        option = draw(st.sampled_from(sorted(o for o, f in sbatch._FIELDS.items() if f == field)))
        if field == "gpus" and option == "--gres" and not text.startswith("gpu"):
            text = "gpu:" + text
        quoted = shlex.quote(text)
        form = draw(st.sampled_from(["=", " "] if option.startswith("--") else [" ", ""]))
        if form == "" and quoted != text:
            form = " "
        lines.append(f"#SBATCH {option}{form}{quoted}")
        expected[field] = value
        lines += draw(st.lists(st.sampled_from(["", "# a comment", "#SBATCH --exclusive", "  ", "#SBATCH -o x.out"]),
                               max_size=2))
    lines += ["srun ./train", "#SBATCH --partition=after-the-command"]
    return "\n".join(lines), expected


@TIMEOUT
@fuzz_settings(2)
@given(good_scripts())
def test_sbatch_parser_reads_valid_directives(case):
    """Valid directives, in any spelling and order: exactly the values they mean."""
    script, expected = case
    assert sbatch.parse(script).values == expected


# -- the Slurm time format ----------------------------------------------------------------------------------

@st.composite
def slurm_times(draw) -> tuple[str, int]:
    """A well-formed duration and its value in seconds."""
    d, h, m, s = (draw(st.integers(0, 400)), draw(st.integers(0, 99)), draw(st.integers(0, 999)),
                  draw(st.integers(0, 99)))
    form = draw(st.sampled_from(["M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S", "suffix"]))
    pad = draw(st.sampled_from(["", "0", "00"]))
    text, value = {
        "M": (f"{pad}{m}", m * 60), "M:S": (f"{m}:{pad}{s}", m * 60 + s),
        "H:M:S": (f"{h}:{m}:{s}", h * 3600 + m * 60 + s), "D-H": (f"{d}-{pad}{h}", d * 86400 + h * 3600),
        "D-H:M": (f"{d}-{h}:{m}", d * 86400 + h * 3600 + m * 60),
        "D-H:M:S": (f"{d}-{h}:{m}:{s}", d * 86400 + h * 3600 + m * 60 + s),
    }.get(form, (None, None))
    if form == "suffix":
        unit = draw(st.sampled_from("smhd"))
        text, value = f"{m}{unit}", m * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    spaces = draw(st.sampled_from(["", " ", "\t", " \n"]))
    return spaces + text + spaces, value


time_texts = st.one_of(
    _any_text, _ascii_text,
    st.text(st.sampled_from("0123456789:-smhd +.e\u0663\u00b2\uff11 \t"), max_size=20),
    st.integers(4000, 6000).flatmap(lambda n: st.sampled_from(["", "s", "m", "d", ":0", "-0"]).map(
        lambda tail: "9" * n + tail)),
    pick(HOSTILE))


@TIMEOUT
@fuzz_settings(4)
@given(st.one_of(time_texts, st.integers(-(1 << 70), 1 << 70), st.booleans()))
def test_time_format_is_a_nonnegative_int_or_value_error(text):
    """Anything: a non-negative int of seconds, or ValueError saying which formats are accepted."""
    try:
        value = parse_duration(text)
    except ValueError as err:
        event("time: ValueError")
        assert "is not a duration" in str(err) and "D-HH:MM:SS" in str(err), f"unhelpful message: {err}"
        return
    event("time: parsed")
    assert type(value) is int and value >= 0, value


@TIMEOUT
@fuzz_settings(2)
@given(slurm_times())
def test_time_format_values(case):
    """Well-formed durations in every Slurm format give the right number of seconds."""
    text, seconds = case
    assert parse_duration(text) == seconds


# -- every RPC, last: the slowest tests ------------------------------------------------------------

@TIMEOUT
@pytest.mark.parametrize("service,method", METHODS, ids=[f"{s}.{m}" for s, m in METHODS])
async def test_rpc_requests_get_proper_statuses(fed, test_pki, service, method):
    """Any request to any method: a result, or a deliberate status with a message; the daemons keep working."""
    desc = SERVICES[service].methods_by_name[method]
    if service == "Antenna":
        port, tls = fed.antennas["antenna-a"].port, test_pki.user("antenna-a", "alice")
    else:
        port, tls = fed.hubs["leonardo"].port, test_pki.tls(Role.ANTENNA, "antenna-a")
    strategies = RequestStrategies(await known_jobs(fed))
    one = strategies.message(desc.input_type)
    requests = as_requests(st.lists(one, max_size=3) if desc.client_streaming else st.tuples(one))
    fields_set: set[str] = set()
    loop = asyncio.get_running_loop()
    channel = secure_channel(f"127.0.0.1:{port}", tls)
    tracebacks = DaemonTracebacks()
    stop = threading.Event()
    logging.getLogger("federation.rpc").addHandler(tracebacks)
    try:
        def example(reqs: Requests) -> None:  # in hypothesis's thread; the call runs on the daemons' loop
            if stop.is_set():
                raise KeyboardInterrupt("the test was interrupted")  # ends hypothesis's run at once
            fields_set.update(f.name for r in reqs for f, _ in r.ListFields())
            code, details, _ = on_loop(loop, call(channel, desc, reqs), stop)
            note(f"{desc.full_name} answered {code.name}: {details!r:.300}")
            check_outcome(desc, code, details, tracebacks)

        await in_thread(stop, run_hypothesis, f"fuzz_{service}_{method}", requests, example, fuzz_settings(0.2))
        # The generic strategy really reached every field of the request (none silently left out).
        assert fields_set == {f.name for f in desc.input_type.fields}
        await daemons_still_work(fed, test_pki)
    finally:
        logging.getLogger("federation.rpc").removeHandler(tracebacks)
        await channel.close()
        await stop_every_job(fed)
