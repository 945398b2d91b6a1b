"""The `hold` backend (benchmarks and drills): it holds jobs QUEUED, counts them per partition, ends them on cancel."""

from __future__ import annotations

from federation.config import PartitionConfig
from federation.model import Job, JobSpec, JobState
from hub.hold import HoldBackend

PARTS = (PartitionConfig("gpu", "A100", 8, 3600), PartitionConfig("cpu", "", 0, 3600))


def job(job_id: str, partition: str) -> Job:
    return Job(id=job_id, spec=JobSpec(argv=("true",)), state=JobState.QUEUED, partition=partition)


def pending(backend: HoldBackend) -> dict[str, int]:
    return {u.name: u.pending_jobs for u in backend.usage()}


async def test_counts_held_jobs_per_partition(tmp_path):
    changes = []
    backend = HoldBackend(PARTS, changes.append, tmp_path)
    assert pending(backend) == {"gpu": 0, "cpu": 0}
    for i in range(3):
        await backend.submit(job(f"g{i}", "gpu"))
    await backend.submit(job("c0", "cpu"))
    await backend.submit(job("g0", "gpu"))  # the same job again (a retried hand-over) is held once
    assert pending(backend) == {"gpu": 3, "cpu": 1}
    assert all(u.gpus_free == u.gpus_total and u.running_jobs == 0 for u in backend.usage())

    assert await backend.cancel("g1") is True
    assert await backend.cancel("g1") is False  # already ended: nothing to cancel, nothing counted twice
    assert await backend.cancel("nope") is False
    assert [(c.job_id, c.state) for c in changes] == [("g1", JobState.CANCELLED)]
    assert pending(backend) == {"gpu": 2, "cpu": 1}

    assert await backend.recover(job("r0", "cpu"), "") is None  # taken back after a restart: held again
    assert pending(backend) == {"gpu": 2, "cpu": 2}
