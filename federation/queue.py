"""The queue model of one partition: first come, first served with EASY backfilling, and start-time estimates.

One model serves three users, so that what the simulator measures is what the daemons do:
- the local backend schedules its jobs with it (`PartitionQueue.schedule`) and answers estimates from it;
- a hub's advert carries its estimates (`estimate`: when a job of a given shape would start);
- the placement simulator (`federation/simulate.py`) runs every simulated site on it, and shows antennas
  `snapshot`s of it as old as the site's advert period.

Scheduling (EASY backfilling, as Slurm's backfill plugin and most HPC sites do): pending jobs start in arrival
order while they fit. The first one that does not fit gets a reservation: the earliest time enough GPUs free up,
counting each running job as ending at its start plus walltime. A later job may start now, out of order, if it
fits now and either ends before that reservation or uses only GPUs the reservation leaves spare. The first job
is never delayed by a later one, so no job starves.

Estimates (`Profile`): the free GPUs over time, from the running jobs' walltimes, with each pending job placed in
order at the earliest time it fits (conservative backfilling: every pending job holds a reservation). A new job's
estimated start is the earliest time it fits in that profile. Walltimes are upper bounds of runtimes, so this
is close to an upper bound of the real start (jobs end early, and EASY starts jobs sooner than conservative
backfilling does). Only the first `MODELLED` pending jobs are placed one by one; the GPU-seconds of the rest are
added as if spread evenly over the partition, which keeps an estimate's cost bounded whatever the queue holds.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MODELLED = 256  # pending jobs placed one by one in an estimate's profile; the rest are averaged


@dataclass(slots=True)
class Entry:
    key: str
    gpus: int
    walltime_s: float
    submitted: float
    started: float = -1.0

    @property
    def end(self) -> float:
        """When it ends at the latest (its walltime), if it started."""
        return self.started + self.walltime_s


class Profile:
    """Free GPUs over time from `start` on: `free[i]` GPUs on [times[i], times[i+1]) (the last for ever)."""

    __slots__ = ("times", "free", "start", "backlog_s")

    def __init__(self, start: float, free_now: int, ends: Iterable[tuple[float, int]], capacity: int,
                 pending: Iterable[tuple[int, float]] = ()):
        """`ends`: (time, GPUs released) of the running jobs, in time order; `pending`: (GPUs, walltime) of the
        waiting jobs in arrival order."""
        self.start = start
        times, free = [start], [free_now]
        for at, gpus in ends:
            if at <= times[-1]:
                free[-1] += gpus  # overdue or simultaneous: free from the start of this segment
            else:
                times.append(at)
                free.append(free[-1] + gpus)
        self.times, self.free = times, free
        self.backlog_s = 0.0  # GPU-seconds of pending jobs beyond MODELLED, averaged over the partition
        for n, (gpus, walltime_s) in enumerate(pending):
            if gpus > capacity:
                continue  # never runs here; it holds nothing
            if n < MODELLED:
                self.reserve(self.earliest(gpus, walltime_s), gpus, walltime_s)
            else:
                self.backlog_s += gpus * walltime_s
        if capacity and self.backlog_s:
            self.backlog_s /= capacity

    def earliest(self, gpus: int, walltime_s: float) -> float:
        """The earliest time a job of `gpus` GPUs for `walltime_s` fits (inf if it never does)."""
        times, free = self.times, self.free
        n, i = len(times), 0
        while i < n:
            if free[i] < gpus:
                i += 1
                continue
            until = times[i] + walltime_s
            j = i + 1
            while j < n and times[j] < until and free[j] >= gpus:
                j += 1
            if j == n or times[j] >= until:
                return times[i]
            i = j + 1  # segment j has too few GPUs: no start before it ends can work
        return math.inf

    def reserve(self, at: float, gpus: int, walltime_s: float) -> None:
        """Take `gpus` GPUs from `at` to `at + walltime_s`."""
        if math.isinf(at) or gpus <= 0:
            return
        i = self._split(at)
        j = self._split(at + walltime_s)
        for k in range(i, j):
            self.free[k] -= gpus

    def _split(self, at: float) -> int:
        """The index of the segment starting at `at`, splitting the one that holds it if needed."""
        i = bisect.bisect_left(self.times, at)
        if i < len(self.times) and self.times[i] == at:
            return i
        self.times.insert(i, at)
        self.free.insert(i, self.free[i - 1])
        return i

    def wait(self, gpus: int, walltime_s: float, now: float) -> float:
        """Seconds from `now` until a job of this shape would start (inf if never)."""
        return max(0.0, self.earliest(gpus, walltime_s) + self.backlog_s - now)


class QueueView:
    """What a site tells about a partition at one moment (an advert): enough to estimate starts then."""

    __slots__ = ("at", "capacity", "free", "pending_jobs", "pending_gpu_s", "running_jobs", "_ends", "_pending",
                 "_profile")

    def __init__(self, at: float, capacity: int, free: int, ends: list[tuple[float, int]],
                 pending: list[tuple[int, float]], pending_gpu_s: float, running_jobs: int):
        self.at, self.capacity, self.free = at, capacity, free
        self.pending_jobs, self.pending_gpu_s, self.running_jobs = len(pending), pending_gpu_s, running_jobs
        self._ends, self._pending = ends, pending
        self._profile: Profile | None = None

    def wait(self, gpus: int, walltime_s: float, now: float | None = None) -> float:
        """Estimated wait of a job of this shape submitted at `now` (default: the view's own time)."""
        now = self.at if now is None else now
        if gpus > self.capacity:
            return math.inf
        if not self._pending and gpus <= self.free:
            return 0.0
        if self._profile is None:
            self._profile = Profile(self.at, self.free, self._ends, self.capacity, self._pending)
        return self._profile.wait(gpus, walltime_s, now)


class PartitionQueue:
    """A partition's GPUs, its running jobs and its pending jobs in arrival order."""

    def __init__(self, gpus: int):
        self.capacity = gpus
        self.free = gpus
        self.pending: dict[str, Entry] = {}  # arrival order
        self.running: dict[str, Entry] = {}
        self.pending_gpu_s = 0.0
        self._ends: list[tuple[float, str]] = []  # (expected end, key) of running jobs with GPUs, sorted
        self._cpu_only = 0  # pending jobs without GPUs: they fit whatever is free

    def __len__(self) -> int:
        return len(self.pending)

    # -- changes -------------------------------------------------------------------------------------

    def add(self, key: str, gpus: int, walltime_s: float, submitted: float) -> Entry:
        entry = Entry(key, gpus, walltime_s, submitted)
        self.pending[key] = entry
        self.pending_gpu_s += gpus * walltime_s
        self._cpu_only += not gpus
        return entry

    def remove(self, key: str) -> Entry | None:
        """Take a pending job out (cancelled before it started)."""
        entry = self.pending.pop(key, None)
        if entry is not None:
            self.pending_gpu_s -= entry.gpus * entry.walltime_s
            self._cpu_only -= not entry.gpus
            if not self.pending:
                self.pending_gpu_s = 0.0  # no float drift left behind
        return entry

    def claim(self, entry: Entry, started: float) -> None:
        """A job runs from `started` (taken from pending, or taken back after a restart)."""
        if self.pending.get(entry.key) is entry:
            self.remove(entry.key)
        entry.started = started
        self.running[entry.key] = entry
        self.free -= entry.gpus
        if entry.gpus:
            bisect.insort(self._ends, (entry.end, entry.key))

    def finish(self, key: str) -> Entry | None:
        """A running job ended: its GPUs are free."""
        entry = self.running.pop(key, None)
        if entry is not None:
            self.free += entry.gpus
            if entry.gpus:
                i = bisect.bisect_left(self._ends, (entry.end, key))
                if i < len(self._ends) and self._ends[i][1] == key:
                    del self._ends[i]
        return entry

    # -- scheduling ----------------------------------------------------------------------------------

    def schedule(self, now: float, can_start: Callable[[Entry], bool] | None = None) -> list[Entry]:
        """Start what EASY backfilling starts now; return those jobs (already counted as running).

        `can_start` may refuse a job for a reason of its own (CPUs); a first job refused that way blocks the
        queue without a reservation, so nothing passes it."""
        started: list[Entry] = []
        if not self.pending or (self.free <= 0 and not self._cpu_only):
            return started
        shadow, spare = -1.0, 0
        for entry in list(self.pending.values()):
            if self.free <= 0 and not self._cpu_only:
                break
            if entry.gpus > self.capacity:
                continue  # can never run here (the partition shrank): its owner fails it
            if shadow < 0:  # still in order
                if entry.gpus <= self.free:
                    if can_start is not None and not can_start(entry):
                        break
                    self.claim(entry, now)
                    started.append(entry)
                    continue
                shadow, spare = self._reservation(entry.gpus, now)
                continue
            if entry.gpus <= self.free and (now + entry.walltime_s <= shadow or entry.gpus <= spare):
                if can_start is not None and not can_start(entry):
                    continue
                if now + entry.walltime_s > shadow:
                    spare -= entry.gpus
                self.claim(entry, now)
                started.append(entry)
        return started

    def _reservation(self, gpus: int, now: float) -> tuple[float, int]:
        """When the first waiting job (of `gpus` GPUs) can start at the latest, and the GPUs then left over."""
        free = self.free
        for end, key in self._ends:
            free += self.running[key].gpus
            if free >= gpus:
                return max(end, now), free - gpus
        return math.inf, 0

    # -- estimates -----------------------------------------------------------------------------------

    def snapshot(self, now: float) -> QueueView:
        """The queue as an advert issued now shows it."""
        ends = [(end, self.running[key].gpus) for end, key in self._ends]
        pending = [(e.gpus, e.walltime_s) for e in self.pending.values()]
        return QueueView(now, self.capacity, self.free, ends, pending, self.pending_gpu_s, len(self.running))

    def wait(self, gpus: int, walltime_s: float, now: float) -> float:
        """Estimated wait of a job of this shape submitted now, behind everything queued."""
        return self.snapshot(now).wait(gpus, walltime_s, now)
