"""hub.local.LocalBackend driven directly: processes, GPU slots, walltime, cancel, logs and recovery."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from federation.config import PartitionConfig
from federation.model import Job, JobSpec, JobState
from hub.backend import Change
from hub.local import LocalBackend

GPU = PartitionConfig("gpu", "A100", 2, 3600)
CPU = PartitionConfig("cpu", "", 0, 3600)


class Recorder:
    """The on_change callback: keeps every Change in order."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def __call__(self, change: Change) -> None:
        self.changes.append(change)

    def of(self, job_id: str) -> list[Change]:
        return [c for c in self.changes if c.job_id == job_id]

    def states(self, job_id: str) -> list[JobState]:
        return [c.state for c in self.of(job_id)]

    def index(self, job_id: str, state: JobState) -> int:
        return next(i for i, c in enumerate(self.changes) if c.job_id == job_id and c.state == state)

    async def wait(self, job_id: str, state: JobState, timeout: float = 8.0) -> Change:
        """Poll until `job_id` has reported `state`; return that change."""
        deadline = time.monotonic() + timeout
        while True:
            for c in self.of(job_id):
                if c.state == state:
                    return c
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job_id} never reached {state.name}; changes: {self.of(job_id)}")
            await asyncio.sleep(0.02)


def make_job(job_id: str, partition: str = "gpu", **spec) -> Job:
    spec.setdefault("walltime_s", 60)
    return Job(id=job_id, spec=JobSpec(**spec), state=JobState.QUEUED, partition=partition, site="s",
               created_at=time.time())


def live_job_processes(job_id: str) -> list[int]:
    """Pids of processes (not zombies) whose environment says they belong to job_id."""
    out = []
    marker = f"AIFED_JOB_ID={job_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                out.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return out


def kill_job_processes(job_id: str) -> None:
    for pid in live_job_processes(job_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Backends:
    """Creates backends over tmp_path and, at teardown, closes them and kills what their jobs left running."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.made: list[LocalBackend] = []
        self.job_ids: set[str] = set()

    def new(self, partitions=(GPU, CPU), **kw) -> tuple[LocalBackend, Recorder]:
        rec = Recorder()
        kw.setdefault("kill_grace_s", 0.5)
        backend = LocalBackend(tuple(partitions), rec, workdir=self.workdir, **kw)
        self.made.append(backend)
        return backend, rec

    async def submit(self, backend: LocalBackend, job: Job) -> Job:
        self.job_ids.add(job.id)
        assert await backend.submit(job) is None
        return job

    async def cleanup(self) -> None:
        for b in self.made:
            await b.close()
        for job_id in self.job_ids:
            kill_job_processes(job_id)


@pytest.fixture
async def backends(tmp_path):
    b = Backends(tmp_path / "jobs")
    try:
        yield b
    finally:
        await b.cleanup()


# -- running -----------------------------------------------------------------------------------------

async def test_command_runs_to_completion_with_logs(backends):
    """A command reports RUNNING (with a pid ref) then COMPLETED 0; stdout and stderr are captured apart."""
    backend, rec = backends.new()
    await backends.submit(backend, make_job("ok", argv=("sh", "-c", "echo out; echo err >&2")))
    done = await rec.wait("ok", JobState.COMPLETED)
    assert rec.states("ok") == [JobState.RUNNING, JobState.COMPLETED]
    assert done.exit_code == 0
    running = rec.of("ok")[0]
    assert running.ref and orjson.loads(running.ref)["pid"] > 0
    assert backend.read_log("ok", "stdout", 0, 1000) == b"out\n"
    assert backend.read_log("ok", "stderr", 0, 1000) == b"err\n"
    assert backend.read_log("ok", "stdout", 1, 2) == b"ut"
    assert backend.read_log("ok", "stdout", 100, 10) == b""
    assert backend.read_log("nobody", "stdout", 0, 10) == b""


async def test_nonzero_exit_fails_with_its_code(backends):
    backend, rec = backends.new()
    await backends.submit(backend, make_job("bad", argv=("sh", "-c", "exit 3")))
    change = await rec.wait("bad", JobState.FAILED)
    assert change.exit_code == 3
    assert "3" in change.reason
    assert rec.states("bad") == [JobState.RUNNING, JobState.FAILED]


async def test_missing_program_fails_with_127(backends):
    backend, rec = backends.new()
    await backends.submit(backend, make_job("nope", argv=("/definitely/not/a/program", "x")))
    change = await rec.wait("nope", JobState.FAILED)
    assert change.exit_code == 127


async def test_arguments_are_not_shell_interpreted(backends):
    """argv is passed as is: quotes, $ and ; reach the program literally."""
    backend, rec = backends.new()
    await backends.submit(backend, make_job("lit", argv=("printf", "%s|", "a b", "$HOME", "x;y", "'q'")))
    await rec.wait("lit", JobState.COMPLETED)
    assert backend.read_log("lit", "stdout", 0, 1000) == b"a b|$HOME|x;y|'q'|"


async def test_script_with_shebang_runs(backends):
    backend, rec = backends.new()
    await backends.submit(backend, make_job("s1", script="#!/bin/sh\necho $1\n", script_args=("x",)))
    assert (await rec.wait("s1", JobState.COMPLETED)).exit_code == 0
    assert backend.read_log("s1", "stdout", 0, 100) == b"x\n"


async def test_script_without_shebang_runs_with_sh(backends):
    backend, rec = backends.new()
    await backends.submit(backend, make_job("s2", script='echo "plain $1 $2"\nexit 5\n', script_args=("y", "z")))
    assert (await rec.wait("s2", JobState.FAILED)).exit_code == 5
    assert backend.read_log("s2", "stdout", 0, 100) == b"plain y z\n"


async def test_environment_and_home(backends, monkeypatch):
    """User env vars reach the job; HOME and the working directory are its folder; host secrets do not leak."""
    monkeypatch.setenv("AIFED_TEST_SECRET", "leaked")
    backend, rec = backends.new()
    cmd = 'echo "$MY_VAR|$HOME|$(pwd)|$AIFED_JOB_ID|$AIFED_PARTITION|$AIFED_GPUS|${AIFED_TEST_SECRET:-none}"'
    await backends.submit(backend, make_job("env", argv=("sh", "-c", cmd), env={"MY_VAR": "hello world"}, gpus=1))
    await rec.wait("env", JobState.COMPLETED)
    folder = str(backends.workdir / "env")
    out = backend.read_log("env", "stdout", 0, 1000).decode().strip()
    assert out == f"hello world|{folder}|{folder}|env|gpu|1|none"


async def test_walltime_exceeded_is_timeout(backends):
    """A job past its walltime is killed and reported TIMEOUT within a few seconds."""
    backend, rec = backends.new()
    started = time.monotonic()
    await backends.submit(backend, make_job("slow", argv=("sleep", "30"), walltime_s=1))
    change = await rec.wait("slow", JobState.TIMEOUT, timeout=6)
    assert time.monotonic() - started < 4
    assert rec.states("slow") == [JobState.RUNNING, JobState.TIMEOUT]
    assert change.exit_code is not None and change.exit_code != 0
    assert backend.usage()[0].gpus_free == 2


async def test_walltime_kills_processes_that_ignore_sigterm(backends):
    """After the grace period every process of the job is gone, even those that ignore SIGTERM."""
    backend, rec = backends.new()
    await backends.submit(backend, make_job("stubborn", argv=("sh", "-c", "trap '' TERM; sleep 30; true"),
                                            walltime_s=1))
    await rec.wait("stubborn", JobState.TIMEOUT, timeout=6)
    await asyncio.sleep(0.3)
    assert live_job_processes("stubborn") == []


async def test_walltime_gives_the_job_its_grace_period(backends):
    """On TIMEOUT the job gets SIGTERM and kill_grace_s to clean up (save a checkpoint) before SIGKILL."""
    backend, rec = backends.new(kill_grace_s=3)
    script = "trap 'sleep 0.5; echo saved > checkpoint; exit 0' TERM\nsleep 30 &\nwait\n"
    await backends.submit(backend, make_job("ckpt", script=script, walltime_s=1))
    await rec.wait("ckpt", JobState.TIMEOUT, timeout=8)
    await asyncio.sleep(1.0)
    assert (backends.workdir / "ckpt" / "checkpoint").exists(), "the job was killed before its grace period ended"


# -- cancel ------------------------------------------------------------------------------------------

async def test_cancel_running_job(backends):
    backend, rec = backends.new()
    await backends.submit(backend, make_job("c1", argv=("sleep", "30")))
    await rec.wait("c1", JobState.RUNNING)
    assert await backend.cancel("c1") is True
    change = await rec.wait("c1", JobState.CANCELLED, timeout=5)
    assert rec.states("c1") == [JobState.RUNNING, JobState.CANCELLED]
    assert "running" in change.reason
    assert backend.usage()[0].running_jobs == 0
    assert await backend.cancel("c1") is False
    assert await backend.cancel("unknown") is False


async def test_cancel_kills_processes_that_ignore_sigterm(backends):
    """Cancelling ends every process of the job: SIGKILL follows SIGTERM after the grace period."""
    backend, rec = backends.new()
    await backends.submit(backend, make_job("c2", argv=("sh", "-c", "trap '' TERM; sleep 30; true")))
    await rec.wait("c2", JobState.RUNNING)
    await asyncio.sleep(0.2)  # let the trap be set
    await backend.cancel("c2")
    await rec.wait("c2", JobState.CANCELLED, timeout=5)
    await asyncio.sleep(0.5 + 0.7)  # kill_grace_s and a margin
    assert live_job_processes("c2") == [], "a cancelled job's process is still running"


async def test_cancel_queued_job_never_runs(backends):
    """A job cancelled while it waits for GPUs is CANCELLED at once and never starts."""
    backend, rec = backends.new()
    await backends.submit(backend, make_job("big", argv=("sleep", "30"), gpus=2))
    await rec.wait("big", JobState.RUNNING)
    await backends.submit(backend, make_job("waiting", argv=("true",), gpus=1))
    assert backend.usage()[0].pending_jobs == 1
    assert await backend.cancel("waiting") is True
    assert rec.states("waiting") == [JobState.CANCELLED]
    assert backend.usage()[0].pending_jobs == 0
    await backend.cancel("big")
    await rec.wait("big", JobState.CANCELLED, timeout=5)
    await asyncio.sleep(0.3)
    assert rec.states("waiting") == [JobState.CANCELLED]
    assert not (backends.workdir / "waiting").exists()


# -- GPU slots and scheduling ------------------------------------------------------------------------

async def test_gpu_jobs_wait_for_free_slots(backends):
    """Two 2-GPU jobs on a 2-GPU partition run one after the other, each seeing CUDA_VISIBLE_DEVICES=0,1."""
    backend, rec = backends.new()
    cmd = ("sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"; sleep 0.5')
    await backends.submit(backend, make_job("g1", argv=cmd, gpus=2))
    await backends.submit(backend, make_job("g2", argv=cmd, gpus=2))
    await rec.wait("g1", JobState.RUNNING)
    assert rec.states("g2") == []
    await rec.wait("g2", JobState.COMPLETED)
    assert rec.index("g1", JobState.COMPLETED) < rec.index("g2", JobState.RUNNING)
    assert backend.read_log("g1", "stdout", 0, 100) == b"0,1\n"
    assert backend.read_log("g2", "stdout", 0, 100) == b"0,1\n"


async def test_one_gpu_jobs_get_distinct_slots(backends):
    backend, rec = backends.new()
    cmd = ("sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"; sleep 0.5')
    await backends.submit(backend, make_job("a", argv=cmd, gpus=1))
    await backends.submit(backend, make_job("b", argv=cmd, gpus=1))
    await rec.wait("a", JobState.COMPLETED)
    await rec.wait("b", JobState.COMPLETED)
    # both ran at the same time
    assert rec.index("b", JobState.RUNNING) < rec.index("a", JobState.COMPLETED)
    outs = {backend.read_log(j, "stdout", 0, 10) for j in ("a", "b")}
    assert outs == {b"0\n", b"1\n"}


async def test_cpu_only_job_sees_no_gpus(backends):
    backend, rec = backends.new()
    await backends.submit(backend, make_job("c", "cpu", argv=("sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"')))
    await rec.wait("c", JobState.COMPLETED)
    assert backend.read_log("c", "stdout", 0, 10) == b"[]\n"


async def test_backfill_starts_a_short_job_early_but_never_delays_the_first_waiting_one(backends):
    """EASY backfilling: a large job waits for `first` (walltime 60 s) with a reservation; a 10-s job fits in the
    free GPU and ends before that reservation, so it starts now; a 60-s job would end after it, so it waits."""
    backend, rec = backends.new()
    await backends.submit(backend, make_job("first", argv=("sleep", "30"), gpus=1))
    await backends.submit(backend, make_job("large", argv=("true",), gpus=2))
    await backends.submit(backend, make_job("small", argv=("true",), gpus=1))
    await backends.submit(backend, make_job("short", argv=("true",), gpus=1, walltime_s=10))
    await rec.wait("first", JobState.RUNNING)
    await rec.wait("short", JobState.COMPLETED)
    await asyncio.sleep(0.4)
    assert rec.states("large") == [] and rec.states("small") == []
    await backend.cancel("first")
    await rec.wait("small", JobState.COMPLETED)
    assert rec.index("large", JobState.RUNNING) < rec.index("small", JobState.RUNNING)


async def test_cpu_slots_limit_concurrency(backends):
    """Jobs wait while the site's CPU slots are used up."""
    backend, rec = backends.new(cpu_slots=2)
    await backends.submit(backend, make_job("wide", "cpu", argv=("sleep", "0.5"), cpus=2))
    await backends.submit(backend, make_job("narrow", "cpu", argv=("true",), cpus=1))
    await rec.wait("narrow", JobState.COMPLETED)
    assert rec.index("wide", JobState.COMPLETED) < rec.index("narrow", JobState.RUNNING)


async def test_usage_reports_free_running_and_pending(backends):
    backend, rec = backends.new()
    idle = {u.name: u for u in backend.usage()}
    assert (idle["gpu"].gpus_total, idle["gpu"].gpus_free, idle["gpu"].running_jobs, idle["gpu"].pending_jobs,
            idle["gpu"].pending_gpu_seconds) == (2, 2, 0, 0, 0.0)
    assert idle["cpu"].gpus_total == 0
    await backends.submit(backend, make_job("run", argv=("sleep", "30"), gpus=1))
    await backends.submit(backend, make_job("p1", argv=("true",), gpus=2, walltime_s=100))
    await backends.submit(backend, make_job("p2", argv=("true",), gpus=1, walltime_s=600))  # too long to backfill
    await rec.wait("run", JobState.RUNNING)
    u = {x.name: x for x in backend.usage()}["gpu"]
    assert u.gpus_free == 1
    assert u.running_jobs == 1
    assert u.pending_jobs == 2
    assert u.pending_gpu_seconds == 2 * 100 + 1 * 600
    assert {x.name: x for x in backend.usage()}["cpu"].running_jobs == 0


async def test_estimate_wait(backends):
    """0 when idle; about the running job's remaining walltime when full; inf when it can never fit."""
    backend, rec = backends.new()
    assert await backend.estimate_wait("gpu", 2, 600) == 0
    assert await backend.estimate_wait("cpu", 0, 600) == 0
    assert math.isinf(await backend.estimate_wait("gpu", 3, 60))
    assert math.isinf(await backend.estimate_wait("cpu", 1, 60))
    await backends.submit(backend, make_job("full", argv=("sleep", "30"), gpus=2, walltime_s=100))
    await rec.wait("full", JobState.RUNNING)
    assert 95 <= (await backend.estimate_wait("gpu", 1, 60)) <= 100
    assert await backend.estimate_wait("cpu", 0, 60) == 0
    # A queued 2-GPU job of 50 s goes first: a newcomer waits for both.
    await backends.submit(backend, make_job("next", argv=("true",), gpus=2, walltime_s=50))
    assert 145 <= (await backend.estimate_wait("gpu", 1, 60)) <= 150


# -- recovery ----------------------------------------------------------------------------------------

async def test_recover_requeues_a_job_that_never_launched(backends):
    backend, rec = backends.new()
    job = make_job("fresh", argv=("sh", "-c", "echo again"))
    backends.job_ids.add(job.id)
    assert await backend.recover(job, "") is None
    await asyncio.sleep(0.3)
    assert rec.states("fresh") == []  # nothing starts before start(): running jobs reclaim their GPUs first
    await backend.start()
    await rec.wait("fresh", JobState.COMPLETED)
    assert rec.states("fresh") == [JobState.RUNNING, JobState.COMPLETED]
    assert backend.read_log("fresh", "stdout", 0, 100) == b"again\n"


@pytest.mark.parametrize("code, state", [("0", JobState.COMPLETED), ("3\n", JobState.FAILED)])
async def test_recover_a_job_that_ended_while_down(backends, code, state):
    """A launched job with an exit file is reported with that exit code."""
    backend, rec = backends.new()
    folder = backends.workdir / "ended"
    folder.mkdir(parents=True)
    (folder / "launched").write_bytes(b"")
    (folder / "exit").write_text(code)
    change = await backend.recover(make_job("ended", argv=("true",)), '{"pid": 1, "slots": [], "started": 0}')
    assert change == Change("ended", state, int(code), change.reason)
    assert backend.usage()[0].gpus_free == 2


async def test_recover_a_dead_job_without_exit_file_is_lost(backends):
    """Launched, no exit file and its pid is gone: LOST, honestly."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    backend, rec = backends.new()
    folder = backends.workdir / "gone"
    folder.mkdir(parents=True)
    (folder / "launched").write_bytes(b"")
    ref = orjson.dumps({"pid": proc.pid, "slots": [0], "started": time.time()}).decode()
    change = await backend.recover(make_job("gone", argv=("true",), gpus=1), ref)
    assert change is not None and change.job_id == "gone" and change.state is JobState.LOST
    assert backend.usage()[0].gpus_free == 2
    # no ref at all (it crashed between launching and reporting RUNNING): LOST as well
    assert (await backend.recover(make_job("gone", argv=("true",)), "")).state is JobState.LOST


async def test_recover_does_not_adopt_an_unrelated_live_process(backends):
    """A pid reused by another process is not taken for the job."""
    backend, rec = backends.new()
    folder = backends.workdir / "reused"
    folder.mkdir(parents=True)
    (folder / "launched").write_bytes(b"")
    ref = orjson.dumps({"pid": os.getpid(), "slots": [], "started": time.time()}).decode()
    change = await backend.recover(make_job("reused", argv=("true",)), ref)
    assert change is not None and change.state is JobState.LOST


async def test_running_job_survives_close_and_is_taken_back(backends):
    """close() leaves the job running; a new backend over the same workdir follows it to its real end."""
    first, rec1 = backends.new()
    job = await backends.submit(first, make_job("long", argv=("sh", "-c", "sleep 1.5; echo done; exit 4"), gpus=1))
    running = await rec1.wait("long", JobState.RUNNING)
    await first.close()
    pid = orjson.loads(running.ref)["pid"]
    assert live_job_processes("long"), "close() must not stop running jobs"

    second, rec2 = backends.new()
    assert await second.recover(job, running.ref) is None
    u = {x.name: x for x in second.usage()}["gpu"]
    assert (u.running_jobs, u.gpus_free) == (1, 1)
    change = await rec2.wait("long", JobState.FAILED, timeout=6)
    assert change.exit_code == 4
    assert second.read_log("long", "stdout", 0, 100) == b"done\n"
    assert rec1.states("long") == [JobState.RUNNING]  # the closed backend reported nothing more
    assert {x.name: x for x in second.usage()}["gpu"].gpus_free == 2
    assert pid > 0


async def test_taken_back_job_can_be_cancelled_and_keeps_its_walltime(backends):
    """After a takeover, cancel and the walltime still work."""
    first, rec1 = backends.new()
    a = await backends.submit(first, make_job("ta", argv=("sleep", "30"), walltime_s=2))
    b = await backends.submit(first, make_job("tb", argv=("sleep", "30"), walltime_s=60))
    ra, rb = await rec1.wait("ta", JobState.RUNNING), await rec1.wait("tb", JobState.RUNNING)
    await first.close()

    second, rec2 = backends.new()
    assert await second.recover(a, ra.ref) is None
    assert await second.recover(b, rb.ref) is None
    assert await second.cancel("tb") is True
    await rec2.wait("tb", JobState.CANCELLED, timeout=5)
    await rec2.wait("ta", JobState.TIMEOUT, timeout=6)
    await asyncio.sleep(0.3)
    assert live_job_processes("ta") == [] and live_job_processes("tb") == []


# -- inputs --------------------------------------------------------------------------------------------

def slow_staging(seconds: float):
    """A stand-in for the hub's input copy (the backend's `stage_inputs` seam) that takes `seconds` in its thread,
    then writes the input, as a large copy would."""
    import threading
    started = threading.Event()

    def stage(job: Job, folder: Path) -> None:
        started.set()
        time.sleep(seconds)
        (folder / "input.bin").write_bytes(b"x")
    stage.started = started
    return stage


async def test_copying_a_jobs_inputs_does_not_stall_the_event_loop(backends):
    from federation.model import InputFile
    backend, rec = backends.new()
    backend.stage_inputs = slow_staging(1.0)
    job = make_job("big-input", argv=("sh", "-c", "cat input.bin"),
                   inputs=(InputFile("input.bin", "a" * 64, 1),))
    await backends.submit(backend, job)
    ticks, started = 0, time.monotonic()
    while time.monotonic() - started < 0.8:  # the loop turns while the copy runs
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks > 40 and rec.states(job.id) == []  # not started before its inputs are there
    await rec.wait(job.id, JobState.COMPLETED)
    assert backend.read_log(job.id, "stdout", 0, 10) == b"x"


async def test_a_job_cancelled_while_its_inputs_are_copied_never_starts_even_across_a_restart(backends):
    from federation.model import InputFile
    inputs = (InputFile("input.bin", "a" * 64, 1),)
    backend, rec = backends.new()
    backend.stage_inputs = staging = slow_staging(0.5)
    job = make_job("cancel-copy", argv=("sh", "-c", "echo ran > ran"), inputs=inputs)
    await backends.submit(backend, job)
    assert await asyncio.to_thread(staging.started.wait, 5)
    assert await backend.cancel(job.id)
    await rec.wait(job.id, JobState.CANCELLED)
    await asyncio.sleep(0.3)
    assert rec.states(job.id) == [JobState.CANCELLED] and not (backend.folder(job.id) / "ran").exists()

    # A hub that stopped after the cancel was answered, before the job was reported: it is not started again.
    later, rec2 = backends.new()
    assert await later.recover(job, "") == Change(job.id, JobState.CANCELLED, reason="cancelled before it started")


async def test_a_job_cancelled_while_its_inputs_are_copied_ends_cancelled_even_if_the_copy_fails(backends):
    from federation.errors import ResourceExhausted
    from federation.model import InputFile
    backend, rec = backends.new()
    staging = slow_staging(0.3)

    def failing(job: Job, folder: Path) -> None:
        staging(job, folder)
        raise ResourceExhausted("disk full")
    failing.started = staging.started
    backend.stage_inputs = failing
    job = make_job("cancel-fail", argv=("true",), gpus=2, inputs=(InputFile("input.bin", "a" * 64, 1),))
    await backends.submit(backend, job)
    assert await asyncio.to_thread(staging.started.wait, 5)
    assert await backend.cancel(job.id)
    await rec.wait(job.id, JobState.CANCELLED)
    assert rec.states(job.id) == [JobState.CANCELLED]
    assert backend.usage()[0].gpus_free == GPU.gpus  # its GPUs are free again, once
