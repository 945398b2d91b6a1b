"""One contract, every backend: the local executor and Slurm (a private cluster) behave the same to the hub."""

from __future__ import annotations

import asyncio
import time

import pytest

from federation.config import PartitionConfig
from federation.model import Job, JobSpec, JobState
from hub.backend import Change

PARTS = (PartitionConfig("gpu", "A100", 8, 3600),)


class Recorder:
    def __init__(self):
        self.changes: list[Change] = []

    def __call__(self, change: Change) -> None:
        self.changes.append(change)

    def states(self, job_id):
        return [c.state for c in self.changes if c.job_id == job_id]

    async def final(self, job_id, timeout=60.0) -> Change:
        deadline = time.monotonic() + timeout
        while True:
            done = [c for c in self.changes if c.job_id == job_id and c.state.final]
            if done:
                return done[0]
            assert time.monotonic() < deadline, f"{job_id}: {self.states(job_id)}"
            await asyncio.sleep(0.05)

    async def reaches(self, job_id, state, timeout=30.0) -> Change:
        deadline = time.monotonic() + timeout
        while True:
            hits = [c for c in self.changes if c.job_id == job_id and c.state is state]
            if hits:
                return hits[0]
            assert time.monotonic() < deadline, f"{job_id} never {state.name}: {self.states(job_id)}"
            await asyncio.sleep(0.05)


def job(name: str, script: str, gpus: int = 0, walltime_s: int = 300) -> Job:
    job_id = f"antenna-a-{name}{int(time.time() * 1000) % 10**9}"
    return Job(id=job_id, spec=JobSpec(argv=("sh", "-c", script), gpus=gpus, walltime_s=walltime_s),
               state=JobState.QUEUED, partition="gpu", site="s", created_at=time.time())


@pytest.fixture(params=["local", "slurm"])
async def make(request, tmp_path):
    """A factory of started backends of one kind over one work folder (a second one takes over the first)."""
    made = []

    async def factory():
        rec = Recorder()
        if request.param == "local":
            from hub.local import LocalBackend
            backend = LocalBackend(PARTS, rec, tmp_path / "jobs", kill_grace_s=1.0)
        else:
            from hub.commands import CommandRunner
            from hub.slurm import SlurmBackend
            lab = request.getfixturevalue("slurm_lab")
            backend = SlurmBackend(PARTS, rec, tmp_path / "jobs", CommandRunner({"SLURM_CONF": str(lab.conf)}, 20),
                                   poll_s=0.5, capacity_s=1)
        made.append(backend)
        return backend, rec

    factory.kind = request.param
    yield factory
    for backend in made:
        await backend.close()


async def test_completes_with_exit_code_and_logs(make):
    backend, rec = await make()
    await backend.start()
    j = job("ok", "echo out; echo err >&2")
    await backend.submit(j)
    done = await rec.final(j.id)
    assert (done.state, done.exit_code) == (JobState.COMPLETED, 0)
    assert JobState.RUNNING in rec.states(j.id)
    assert backend.read_log(j.id, "stdout", 0, 100) == b"out\n"
    assert backend.read_log(j.id, "stderr", 0, 100) == b"err\n"
    assert backend.read_log(j.id, "stdout", 2, 100) == b"t\n"


async def test_failure_keeps_the_exit_code(make):
    backend, rec = await make()
    await backend.start()
    j = job("fail", "exit 5")
    await backend.submit(j)
    done = await rec.final(j.id)
    assert (done.state, done.exit_code) == (JobState.FAILED, 5)


async def test_gpus_are_granted(make):
    backend, rec = await make()
    await backend.start()
    j = job("gpu", "echo $CUDA_VISIBLE_DEVICES", gpus=3)
    await backend.submit(j)
    assert (await rec.final(j.id)).state is JobState.COMPLETED
    assert backend.read_log(j.id, "stdout", 0, 100) == b"0,1,2\n"


async def test_cancel_running_and_queued(make):
    backend, rec = await make()
    await backend.start()
    big = job("big", "sleep 60", gpus=8)
    waiting = job("waiting", "echo never", gpus=8)
    await backend.submit(big)
    await rec.reaches(big.id, JobState.RUNNING)
    await backend.submit(waiting)
    await asyncio.sleep(1.0)
    assert JobState.RUNNING not in rec.states(waiting.id)
    assert await backend.cancel(waiting.id)
    assert await backend.cancel(big.id)
    assert (await rec.final(waiting.id)).state is JobState.CANCELLED
    assert (await rec.final(big.id)).state is JobState.CANCELLED
    assert JobState.RUNNING not in rec.states(waiting.id)
    assert not await backend.cancel("antenna-a-unknown")


async def test_usage_counts_gpus(make):
    backend, rec = await make()
    await backend.start()
    j = job("use", "sleep 30", gpus=2)
    await backend.submit(j)
    await rec.reaches(j.id, JobState.RUNNING)
    if make.kind == "slurm":
        await backend.refresh_capacity()
    (gpu,) = backend.usage()
    assert (gpu.gpus_total, gpu.gpus_free, gpu.running_jobs) == (8, 6, 1)
    assert await backend.estimate_wait("gpu", 2, 60) == 0
    await backend.cancel(j.id)
    await rec.final(j.id)


async def test_a_new_backend_takes_back_a_running_job(make):
    first, rec1 = await make()
    await first.start()
    j = job("back", "sleep 2; echo done")
    await first.submit(j)
    running = await rec1.reaches(j.id, JobState.RUNNING)
    ref = next(c.ref for c in rec1.changes if c.job_id == j.id and c.ref)
    await first.close()
    second, rec2 = await make()
    assert await second.recover(j, ref) is None
    await second.start()
    done = await rec2.final(j.id)
    assert (done.state, done.exit_code) == (JobState.COMPLETED, 0), rec2.changes
    assert second.read_log(j.id, "stdout", 0, 100) == b"done\n"
    assert running.state is JobState.RUNNING
