"""A backend that accepts jobs and holds them QUEUED without running anything.

For benchmarks and drills of the federation path itself (`aifed bench forward`, the crash harness): the hub
journals, acknowledges and reports jobs exactly as with a real scheduler, but nothing executes. Cancelling a
held job ends it. Selected with `[backend] type = "hold"`.
"""

from __future__ import annotations

from federation.model import Job, JobState
from hub.backend import Backend, Change, PartitionUsage


class HoldBackend(Backend):
    def __init__(self, partitions, on_change, workdir):
        super().__init__(partitions, on_change, workdir)
        self.held: dict[str, str] = {}  # job id -> partition
        self.pending: dict[str, int] = dict.fromkeys(self.partitions, 0)  # partition -> jobs held (usage is O(1))

    def _hold(self, job: Job) -> None:
        if job.id not in self.held:
            self.held[job.id] = job.partition
            self.pending[job.partition] = self.pending.get(job.partition, 0) + 1

    async def submit(self, job: Job) -> None:
        self._hold(job)

    async def cancel(self, job_id: str) -> bool:
        partition = self.held.pop(job_id, None)
        if partition is None:
            return False
        self.pending[partition] -= 1
        self.on_change(Change(job_id, JobState.CANCELLED, reason="cancelled"))
        return True

    async def recover(self, job: Job, ref: str) -> Change | None:
        self._hold(job)
        return None

    def usage(self) -> list[PartitionUsage]:
        return [PartitionUsage(p.name, p.gpus, p.gpus, 0, self.pending.get(p.name, 0), 0.0)
                for p in self.partitions.values()]

    async def estimate_wait(self, partition: str, gpus: int, walltime_s: int) -> float:
        return 0.0
