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

Estimates (`QueueView.wait`), consistent with that schedule: a job of a given shape submitted now starts at
once if EASY would start it (it fits, and the queue is empty or it may backfill); otherwise at the time it reaches
the head of the queue and enough GPUs are free, replaying the waiting jobs in order with every job lasting its
walltime. That is an upper bound in practice (jobs end early, and the job may backfill later). Only the first
`MODELLED` waiting jobs are replayed one by one; the GPU-seconds of the rest are added as if spread evenly over
the partition, which keeps an estimate's cost bounded whatever the queue holds. A view computes its replay once
and answers every shape from it.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MODELLED = 256  # waiting jobs replayed one by one for an estimate; the GPU-seconds of the rest are averaged


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


class QueueView:
    """What a site tells about a partition at one moment (an advert): enough to estimate starts then."""

    __slots__ = ("at", "capacity", "free", "pending_jobs", "pending_gpu_s", "running_jobs", "_ends", "_pending",
                 "_shadow", "_replayed", "_starts", "_holes")

    def __init__(self, at: float, capacity: int, free: int, ends: list[tuple[float, str, int]],
                 pending: tuple[Entry, ...], pending_gpu_s: float, running_jobs: int):
        """`ends`: (expected end, key, GPUs) of the running jobs in time order; `pending`: the waiting jobs in
        arrival order (only their GPUs and walltimes are read)."""
        self.at, self.capacity, self.free = at, capacity, free
        self.pending_jobs, self.pending_gpu_s, self.running_jobs = len(pending), pending_gpu_s, running_jobs
        self._ends, self._pending = ends, pending
        self._shadow: tuple[float, int] | None = None
        # After replaying the queue: (its last start, GPUs then free, the ends then in time order, backlog seconds)
        self._replayed: tuple[float, int, list[tuple[float, str, int]], float] | None = None
        self._starts: dict[int, float] = {}
        # For backfilling estimates: (end times, GPUs free after each, waiting walltimes sorted, GPUs prefix sums)
        self._holes: tuple[list[float], list[int], list[float], list[int]] | None = None

    def wait(self, gpus: int, walltime_s: float, now: float | None = None) -> float:
        """Estimated wait of a job of this shape submitted at `now` (default: the view's own time)."""
        now = self.at if now is None else now
        if gpus > self.capacity:
            return math.inf
        if gpus <= self.free and (not self._pending or self._backfills(gpus, walltime_s)):
            return 0.0
        start = self._starts.get(gpus)
        if start is None:
            start = self._starts[gpus] = self._tail_start(gpus)
        if gpus <= self.capacity and self._pending:
            start = min(start, self._backfill_start(gpus, walltime_s))
        return max(0.0, start - now)

    def _backfill_start(self, gpus: int, walltime_s: float) -> float:
        """When such a job would backfill before the first waiting job's reservation (inf if it would not): at
        the first running job's end after which enough GPUs are free for it and for the waiting jobs ahead of
        it that could end before that reservation too (they compete for the same holes, and go first)."""
        shadow, _ = self._reserve_head()
        if self.at + walltime_s > shadow:
            return math.inf
        if self._holes is None:
            times, after, free = [], [], self.free
            for end, _, released in self._ends:
                if end >= shadow:
                    break
                free += released
                times.append(end)
                after.append(free)
            fitting = [e for e in self._pending[:MODELLED] if e.gpus <= self.capacity]
            others = sorted((e.walltime_s, e.gpus) for e in fitting[1:])  # all but the first, which waits
            walls, ahead, total = [], [0], 0
            for w, g in others:
                walls.append(w)
                total += g
                ahead.append(total)
            self._holes = (times, after, walls, ahead)
        times, after, walls, ahead = self._holes
        # Competitors: the waiting jobs ahead that could fit in the same holes (end before the reservation).
        need = gpus + ahead[bisect.bisect_right(walls, shadow - self.at)]
        i = bisect.bisect_left(after, need)
        if i == len(after):
            return math.inf
        start = max(times[i], self.at)
        return start if start + walltime_s <= shadow else math.inf

    def _reserve_head(self) -> tuple[float, int]:
        if self._shadow is None:
            head = next((e.gpus for e in self._pending if e.gpus <= self.capacity), 0)
            self._shadow = _reservation(self.free, self._ends, head, self.at)
        return self._shadow

    def _backfills(self, gpus: int, walltime_s: float) -> bool:
        """Whether EASY would start such a job now, past the waiting ones (which all wait for the first)."""
        shadow, spare = self._reserve_head()
        return self.at + walltime_s <= shadow or gpus <= spare

    def _tail_start(self, gpus: int) -> float:
        """When a job of `gpus` GPUs behind the whole queue would start (first come, first served)."""
        if self._replayed is None:
            self._replayed = self._replay()
        clock, free, ends, backlog_s = self._replayed
        return _reservation(free, ends, gpus, clock)[0] + backlog_s

    def starts(self) -> dict[str, float]:
        """When each waiting job is expected to start (arrival order, every job lasting its walltime), as the
        estimate for a new job is made; past the first `MODELLED` jobs, what is ahead is averaged over the
        partition. Jobs that can never run here are left out. The hub's load balancer reads this."""
        out: dict[str, float] = {}
        self._replayed = self._replay(out)
        return out

    def _replay(self, starts: dict[str, float] | None = None) -> tuple[float, int, list, float]:
        """Replay the waiting jobs in arrival order, each lasting its walltime (the first `MODELLED` one by one,
        the GPU-seconds of the rest averaged over the partition), noting each one's start in `starts`. Return
        the last start, the GPUs then free, the ends then in time order, and the averaged backlog in seconds."""
        ends = list(self._ends)  # sorted: a valid heap
        free, clock, backlog = self.free, self.at, 0.0
        for n, entry in enumerate(self._pending):
            g, w = entry.gpus, entry.walltime_s
            if g > self.capacity:
                continue  # never runs here
            if n >= MODELLED:
                if starts is not None:
                    starts[entry.key] = clock + backlog / max(self.capacity, 1)
                backlog += g * w
                continue
            while free < g and ends:
                end, _, released = heapq.heappop(ends)
                clock, free = max(clock, end), free + released
            free -= g
            if starts is not None:
                starts[entry.key] = clock
            if g:
                heapq.heappush(ends, (clock + w, "", g))
        return clock, free, sorted(ends), backlog / max(self.capacity, 1)


def _reservation(free: int, ends: Iterable[tuple[float, str, int]], gpus: int, now: float) -> tuple[float, int]:
    """When `gpus` GPUs are free at the latest, given `free` now and the running jobs' (end, key, GPUs) in time
    order, and how many GPUs are then left over."""
    if gpus <= free:
        return now, free - gpus
    ends = iter(ends)
    for end, _, released in ends:
        free += released
        if free >= gpus:
            at = max(end, now)
            for later, _, more in ends:  # jobs ending at the same moment (or overdue, so now) free theirs too
                if later > at:
                    break
                free += more
            return at, free - gpus
    return math.inf, 0


class PartitionQueue:
    """A partition's GPUs, its running jobs and its pending jobs in arrival order."""

    def __init__(self, gpus: int):
        self.capacity = gpus
        self.free = gpus
        self.pending: dict[str, Entry] = {}  # arrival order
        self.running: dict[str, Entry] = {}
        self.pending_gpu_s = 0.0
        self._ends: list[tuple[float, str, int]] = []  # (expected end, key, GPUs) of running jobs with GPUs, sorted
        self._cpu_only = 0  # pending jobs without GPUs: they fit whatever is free
        # Whether only the newest job can have become startable since the last schedule() (an arrival behind
        # others): nothing ended and nothing left the queue, so whatever could not start still cannot.
        self._only_newest = False
        self._settled = False  # schedule() ran since the last change

    def __len__(self) -> int:
        return len(self.pending)

    # -- changes -------------------------------------------------------------------------------------

    def add(self, key: str, gpus: int, walltime_s: float, submitted: float) -> Entry:
        entry = Entry(key, gpus, walltime_s, submitted)
        self._only_newest = bool(self.pending) and self._settled
        self._settled = False
        self.pending[key] = entry
        self.pending_gpu_s += gpus * walltime_s
        self._cpu_only += not gpus
        return entry

    def remove(self, key: str) -> Entry | None:
        """Take a pending job out (cancelled before it started)."""
        entry = self.pending.pop(key, None)
        if entry is not None:
            self._settled = self._only_newest = False
            self.pending_gpu_s -= entry.gpus * entry.walltime_s
            self._cpu_only -= not entry.gpus
            if not self.pending:
                self.pending_gpu_s = 0.0  # no float drift left behind
        return entry

    def claim(self, entry: Entry, started: float) -> None:
        """A job runs from `started` (taken from pending, or taken back after a restart)."""
        if self.pending.get(entry.key) is entry:
            self.remove(entry.key)
        self._settled = False
        entry.started = started
        self.running[entry.key] = entry
        self.free -= entry.gpus
        if entry.gpus:
            bisect.insort(self._ends, (entry.end, entry.key, entry.gpus))

    def finish(self, key: str) -> Entry | None:
        """A running job ended: its GPUs are free."""
        entry = self.running.pop(key, None)
        if entry is not None:
            self._settled = self._only_newest = False
            self.free += entry.gpus
            if entry.gpus:
                i = bisect.bisect_left(self._ends, (entry.end, key, entry.gpus))
                if i < len(self._ends) and self._ends[i][1] == key:
                    del self._ends[i]
        return entry

    # -- scheduling ----------------------------------------------------------------------------------

    def schedule(self, now: float, can_start: Callable[[Entry], bool] | None = None) -> list[Entry]:
        """Start what EASY backfilling starts now; return those jobs (already counted as running).

        `can_start` may refuse a job for a reason of its own (CPUs); a first job refused that way blocks the
        queue without a reservation, so nothing passes it."""
        started = self._schedule(now, can_start)
        self._only_newest, self._settled = False, True
        return started

    def _schedule(self, now: float, can_start: Callable[[Entry], bool] | None) -> list[Entry]:
        started: list[Entry] = []
        if not self.pending or (self.free <= 0 and not self._cpu_only):
            return started
        shadow, spare = -1.0, 0
        head = next(iter(self.pending.values()))
        if self._only_newest and self.free < head.gpus <= self.capacity:
            # The first job waits for GPUs already: only the newest may start, by backfilling.
            newest = next(reversed(self.pending.values()))
            if newest.gpus > self.free or newest.gpus > self.capacity:
                return started
            shadow, spare = _reservation(self.free, self._ends, head.gpus, now)
            candidates: Iterable[Entry] = (newest,)
        else:
            candidates = list(self.pending.values())
        for entry in candidates:
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
                shadow, spare = _reservation(self.free, self._ends, entry.gpus, now)
                continue
            if entry.gpus <= self.free and (now + entry.walltime_s <= shadow or entry.gpus <= spare):
                if can_start is not None and not can_start(entry):
                    continue
                if now + entry.walltime_s > shadow:
                    spare -= entry.gpus
                self.claim(entry, now)
                started.append(entry)
        return started

    # -- estimates -----------------------------------------------------------------------------------

    def snapshot(self, now: float) -> QueueView:
        """The queue as an advert issued now shows it."""
        return QueueView(now, self.capacity, self.free, list(self._ends), tuple(self.pending.values()),
                         self.pending_gpu_s, len(self.running))

    def wait(self, gpus: int, walltime_s: float, now: float) -> float:
        """Estimated wait of a job of this shape submitted now, behind everything queued."""
        return self.snapshot(now).wait(gpus, walltime_s, now)
