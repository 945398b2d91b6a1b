"""GPU-hours per project and period at a hub: `[modes.<mode>] max_gpu_hours` and `period`.

The EuroHPC access modes give each project a share of GPU time per period (Playground and Fast Lane are first
come, first served, within such caps). A hub counts, per (antenna, project, access mode), the jobs it accepted
in the last `period`: a job that ended costs its GPUs x real runtime (first RUNNING to its end; nothing if it
never ran), one that has not ended its GPUs x walltime. A job is accepted only if that, plus its own GPUs x
walltime, stays within `max_gpu_hours`. Jobs without a project are counted per user.

The ledger is in memory: built from the journal when the hub starts, kept up to date from each job change, and
checked and charged in the transaction that stores a job (the journal runs it in a worker thread, hence the
lock), so that two forwards racing for the last GPU-hours cannot both pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from federation.config import ModeLimits
from federation.errors import FailedPrecondition
from federation.model import AccessMode, Job, JobState

Key = tuple[str, str, AccessMode]  # (antenna, project or owner, mode)


def key_of(job: Job) -> Key:
    return job.antenna, job.spec.project or job.owner, job.spec.access_mode


def cost_s(job: Job) -> float:
    """GPU-seconds a job counts for: real runtime once it ended, walltime until then."""
    if not job.final:
        return float(job.spec.gpus * job.spec.walltime_s)
    started = next((t.at for t in job.history if t.state is JobState.RUNNING), None)
    if started is None:
        return 0.0
    return job.spec.gpus * max(0.0, job.updated_at - started)


class Quotas:
    def __init__(self, limits: Iterable[ModeLimits], site: str):
        self.limits = {m.mode: m for m in limits if m.max_gpu_hours}
        self.site = site
        self._lock = threading.Lock()
        self._jobs: dict[Key, dict[str, tuple[float, float]]] = {}  # key -> job id -> (accepted at, GPU-seconds)

    def __bool__(self) -> bool:
        return bool(self.limits)

    @property
    def longest_s(self) -> int:
        """The longest period counted: older jobs never matter."""
        return max((m.period_s for m in self.limits.values()), default=0)

    def rebuild(self, jobs: Iterable[Job], now: float | None = None) -> None:
        now = time.time() if now is None else now
        longest = self.longest_s
        with self._lock:
            self._jobs.clear()
            for job in jobs:
                if job.spec.access_mode in self.limits and job.created_at >= now - longest:
                    self._jobs.setdefault(key_of(job), {})[job.id] = (job.created_at, cost_s(job))

    def observe(self, job: Job) -> None:
        """A job changed: what it counts for may have (it ended, after a real runtime)."""
        if job.spec.access_mode not in self.limits:
            return
        with self._lock:
            entries = self._jobs.get(key_of(job))
            if entries is not None and job.id in entries:
                entries[job.id] = (entries[job.id][0], cost_s(job))

    def used_s(self, key: Key, now: float) -> float:
        period = self.limits[key[2]].period_s
        entries = self._jobs.get(key, {})
        for job_id in [j for j, (at, _) in entries.items() if at < now - period]:
            del entries[job_id]  # out of the window for good
        return sum(cost for _, cost in entries.values())

    def admit(self, job: Job) -> FailedPrecondition | None:
        """Charge a job being stored, or say why it cannot be (nothing charged then)."""
        limits = self.limits.get(job.spec.access_mode)
        if limits is None:
            return None
        key, asks = key_of(job), float(job.spec.gpus * job.spec.walltime_s)
        with self._lock:
            used = self.used_s(key, job.created_at)
            budget = limits.max_gpu_hours * 3600
            if used + asks > budget + 1e-6:
                who = f"project {job.spec.project}" if job.spec.project else f"user {job.owner}"
                return FailedPrecondition(
                    f"{who} of antenna {job.antenna} has {max(0.0, budget - used) / 3600:.4g} of its "
                    f"{limits.max_gpu_hours:g} GPU-hours left in {limits.mode.slug} at site {self.site} over the "
                    f"last {limits.period_s / 86400:g} day(s); this job asks for {asks / 3600:.4g}")
            self._jobs.setdefault(key, {})[job.id] = (job.created_at, asks)
        return None

    def forget(self, job_ids: Iterable[str]) -> None:
        """Undo `admit` for jobs whose transaction failed."""
        with self._lock:
            for entries in self._jobs.values():
                for job_id in job_ids:
                    entries.pop(job_id, None)


# -- consumption per antenna, for `aifed usage --hub` ----------------------------------------------------------

@dataclass(frozen=True)
class AntennaUsage:
    antenna: str
    project: str       # "" for jobs without a project
    mode: AccessMode
    used_s: float      # GPU-seconds of jobs that ended, by real runtime
    reserved_s: float  # GPU-seconds of jobs not ended, by walltime
    jobs: int


def consumption(jobs: Iterable[Job]) -> list[AntennaUsage]:
    """GPU-seconds per (antenna, project, mode) of these jobs, sorted."""
    totals: dict[tuple[str, str, AccessMode], list] = {}
    for job in jobs:
        t = totals.setdefault((job.antenna, job.spec.project, job.spec.access_mode), [0.0, 0.0, 0])
        t[0 if job.final else 1] += cost_s(job)
        t[2] += 1
    return [AntennaUsage(a, p, m, used, reserved, n)
            for (a, p, m), (used, reserved, n) in sorted(totals.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                         int(kv[0][2])))]
