"""Placement: which hubs could run a job (filters, each with its reason), then which one, by a policy.

Filters (`why_not`, and the antenna's checks of reachability, drain and maintenance) say why a hub cannot take a
job. The hubs left are `Candidate`s, ordered by the antenna's `Placer` under one of the `POLICIES`:

- `earliest-start` (the default): the hub where the job is expected to start first, from the hub's own estimate
  for the job's shape (its queue model: federation/queue.py), plus the GPU-seconds this antenna has sent there
  that the estimate cannot show yet, spread over the hub's GPUs (no herding: a burst of jobs does not all go to
  the hub that looked idle a moment ago). The expected completion time is that start plus the runtime; GPUs are
  counted as equal across hubs, so the runtime does not change the order. Ties (to the second): the hub with the
  most GPUs free, then the most energy-efficient (GFLOPS per watt, from the advert), then by name. Spreading
  leaves every hub room to start and backfill the next jobs; packing the fullest hub first (best fit) measured
  worse in the simulator (docs/benchmarks.md).
- `least-queue`: the fewest jobs waiting (from the advert, plus those sent since), then the most GPUs free, then
  the most energy-efficient.
- `round-robin`: each hub in turn; `random`: any, uniformly (seeded); `home-only`: only `antenna.home`, no
  federation.

**The short-job lane** (under `earliest-start`, unless `antenna.short_job_lane = false`): the smallest hub of
the federation is kept for short jobs. A job is long when its size (GPUs, at least one, times its walltime) is
above the median of the last `LANE_HISTORY` jobs this antenna placed; a long job goes to the smallest hub only
when the policy would choose that hub anyway and the job would start there at once (capacity nobody else
uses). Short jobs then never queue there behind long ones: the idea of size-interval task assignment with
unbalanced load (Schroeder and Harchol-Balter, "Evaluation of task assignment policies for supercomputing
servers: the case for load unbalancing and fairness", 2004), without its fixed intervals. Measured in
docs/benchmarks.md.

Under every policy, hubs that specialise in the job's strategic sector come first. The same `Placer` runs in the
daemon and in the placement simulator (federation/simulate.py).
"""

from __future__ import annotations

import bisect
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from federation.config import quota_why_not
from federation.model import JobSpec
from federation.pb import jobs_pb2
from federation.timefmt import format_duration


@dataclass(frozen=True)
class Verdict:
    site: str
    reason: str = ""          # why the site cannot take the job; empty if it can
    wait_s: float | None = None
    transient: bool = False   # the reason may pass (an unreachable hub); a permanent one will not

    @property
    def fits(self) -> bool:
        return not self.reason


def why_not(spec: JobSpec, advert: jobs_pb2.Advert, country: str = "") -> str:
    """Why a hub with this advert could never run the job, or "" if it can (a drain is only for now: see
    `Verdict.transient` in the antenna)."""
    if spec.sector_required and spec.sector not in advert.sectors:
        return f"does not specialise in sector {spec.sector}"
    for f in spec.inputs:
        if not f.allows(advert.site, advert.location):
            return (f"is in {advert.location or 'no declared country'}, and input {f.name!r} must stay in "
                    f"{', '.join(f.residency)} (data residency)")
    if advert.countries and country not in advert.countries:
        return (f"serves users from {', '.join(advert.countries)} only, and this job is from "
                + (country or "no declared country (antenna.country, or its project's or user's country in the "
                              "allocations file)"))
    parts = list(advert.partitions)
    if spec.partition:
        parts = [p for p in parts if p.name == spec.partition]
        if not parts:
            return f"has no partition {spec.partition!r}"
    if spec.access_mode and advert.access_modes and spec.access_mode not in advert.access_modes:
        return f"does not accept access mode {spec.access_mode.slug}"
    for limits in advert.mode_limits:
        if limits.mode == spec.access_mode:
            if limits.max_gpus and spec.gpus > limits.max_gpus:
                return f"allows at most {limits.max_gpus} GPU(s) per job in {spec.access_mode.slug}"
            if limits.max_walltime_s and spec.walltime_s > limits.max_walltime_s:
                return (f"allows at most {format_duration(limits.max_walltime_s)} of walltime in "
                        f"{spec.access_mode.slug}")
            if reason := quota_why_not(spec.access_mode, limits.max_gpu_hours, limits.period_s, spec.gpus,
                                       spec.walltime_s):
                return reason
    if parts and spec.cpus > max(p.max_cpus for p in parts):
        return f"runs jobs of at most {max(p.max_cpus for p in parts)} CPUs"
    if not any(p.gpus_total >= spec.gpus for p in parts):
        return f"has at most {max(p.gpus_total for p in parts)} GPUs in a partition"
    if not any(p.gpus_total >= spec.gpus and p.max_walltime_s >= spec.walltime_s for p in parts):
        longest = max(p.max_walltime_s for p in parts if p.gpus_total >= spec.gpus)
        return f"allows at most {format_duration(longest)} of walltime for {spec.gpus} GPUs"
    return ""


def maintenance_in_the_way(advert: jobs_pb2.Advert, walltime_s: int, now: float | None = None) -> str:
    """The hub's announced maintenance a job starting now would run into, described; "" if none."""
    now = time.time() if now is None else now
    for window in advert.maintenance:
        start, end = window.start.ToNanoseconds() / 1e9, window.end.ToNanoseconds() / 1e9
        if start < now + walltime_s and now < end:
            return (f"has maintenance from {time.strftime('%Y-%m-%d %H:%M', time.gmtime(start))} to "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))}"
                    + (f" ({window.reason})" if window.reason else "") + " that the job would run into")
    return ""


POLICIES = ("earliest-start", "least-queue", "round-robin", "random", "home-only")
DEFAULT_POLICY = "earliest-start"
UNSEEN_TTL_S = 120.0  # a job sent this long ago is in the hub's figures, acknowledged or not


@dataclass(frozen=True, slots=True)
class Candidate:
    """A hub that passed the filters, as placement sees it."""

    site: str
    wait_s: float              # the hub's estimate of the job's wait there
    free_gpus: int = 0         # free now, in the partition(s) that fit
    total_gpus: int = 0
    pending_jobs: int = 0      # waiting there (advert)
    specialised: bool = False  # in the job's strategic sector
    gflops_per_watt: float = 0.0  # energy efficiency (advert; 0: not given)
    transfer_s: float = 0.0    # time to send the job's inputs there (their size / the link rate to the hub)


@dataclass(frozen=True, slots=True)
class Scored:
    candidate: Candidate
    score: float  # what the policy orders by (earliest-start: the expected wait in seconds, corrected)
    kept: bool = False  # ranked last because this hub is the short-job lane and the job is long

    @property
    def site(self) -> str:
        return self.candidate.site


LANE_HISTORY = 5000  # jobs whose sizes set the median that tells a long job from a short one
LANE_MIN_HISTORY = 50  # until this many jobs were placed, every job counts as short


class Sizes:
    """The sizes of the last `n` jobs placed, sorted, for their median."""

    def __init__(self, n: int = LANE_HISTORY):
        self.n = n
        self._arrived: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._arrived)

    def add(self, size: float) -> None:
        self._arrived.append(size)
        bisect.insort(self._sorted, size)
        if len(self._arrived) > self.n:
            del self._sorted[bisect.bisect_left(self._sorted, self._arrived.popleft())]

    def median(self) -> float:
        return self._sorted[len(self._sorted) // 2]


class Placer:
    """Orders candidate hubs under a policy, and remembers what this antenna sent that hubs may not show yet."""

    def __init__(self, policy: str = DEFAULT_POLICY, home: str = "", seed: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}; policies: {', '.join(POLICIES)}")
        if policy == "home-only" and not home:
            raise ValueError("placement home-only needs the antenna's home site (antenna.home)")
        self.policy, self.home = policy, home
        self._rng = random.Random(seed)
        self._turn = 0
        self._unseen: dict[str, OrderedDict[str, tuple[float, float]]] = {}  # site -> job -> (sent at, GPU-s)
        self._unseen_gpu_s: dict[str, float] = {}
        self.sizes = Sizes()  # of the jobs placed with a short-job lane

    @property
    def needs_estimates(self) -> bool:
        return self.policy == "earliest-start"

    def excludes(self, site: str) -> str:
        """Why the policy itself rules a hub out ("" if it does not)."""
        if self.policy == "home-only" and site != self.home:
            return f"is not this antenna's home site {self.home} (placement policy home-only)"
        return ""

    def order(self, candidates: list[Candidate], gpus: int, walltime_s: float, now: float | None = None,
              turn: bool = True, lane: str = "") -> list[Scored]:
        """The candidates, best first. `turn`: a real choice (round-robin moves on, the job's size is
        remembered); False for a preview. `lane`: the hub kept for short jobs (the federation's smallest), if any;
        only `earliest-start` keeps it."""
        if not candidates:
            return []
        now = time.time() if now is None else now
        if self.policy == "earliest-start":
            scored = [Scored(c, self.expected_wait(c, now)) for c in candidates]
            ranked = sorted(scored, key=lambda s: (round(s.score), -s.candidate.free_gpus,
                                                   -s.candidate.gflops_per_watt, s.site))
            if lane:
                ranked = self._keep_lane(ranked, lane, max(gpus, 1) * walltime_s, turn)
        elif self.policy == "least-queue":
            ranked = sorted((Scored(c, c.pending_jobs + self.unseen_jobs(c.site, now)) for c in candidates),
                            key=lambda s: (s.score, -s.candidate.free_gpus, -s.candidate.gflops_per_watt, s.site))
        elif self.policy == "round-robin":
            ordered = sorted(candidates, key=lambda c: c.site)
            k = self._turn % len(ordered)
            if turn:
                self._turn += 1
            ranked = [Scored(c, i) for i, c in enumerate(ordered[k:] + ordered[:k])]
        elif self.policy == "random":
            shuffled = list(candidates)
            (self._rng if turn else random.Random(0)).shuffle(shuffled)
            ranked = [Scored(c, i) for i, c in enumerate(shuffled)]
        else:  # home-only
            ranked = [Scored(c, 0) for c in candidates if c.site == self.home]
        # Specialised hubs first, each group in the policy's order (sorted() is stable).
        return sorted(ranked, key=lambda s: not s.candidate.specialised)

    def is_long(self, size: float) -> bool:
        """Whether a job of this size (GPUs times walltime) is long: above the median of the jobs placed lately."""
        return len(self.sizes) >= LANE_MIN_HISTORY and size > self.sizes.median()

    def _keep_lane(self, ranked: list[Scored], lane: str, size: float, turn: bool) -> list[Scored]:
        """A long job ranks the lane hub last, unless that hub comes first anyway and would start it at once."""
        if turn:
            self.sizes.add(size)
        kept = next((s for s in ranked if s.site == lane), None)
        if kept is None or len(ranked) < 2 or not self.is_long(size):
            return ranked
        if kept is ranked[0] and round(kept.score) <= 0:
            return ranked  # capacity there that would otherwise stay idle
        return [s for s in ranked if s is not kept] + [Scored(kept.candidate, kept.score, kept=True)]

    def expected_wait(self, candidate: Candidate, now: float | None = None) -> float:
        """The hub's estimate for the job, plus what this antenna sent there that the hub does not show yet, plus
        the time its inputs take to get there (the job cannot start before)."""
        now = time.time() if now is None else now
        return (candidate.transfer_s + candidate.wait_s
                + self.unseen_gpu_s(candidate.site, now) / max(candidate.total_gpus, 1))

    def preferred_first(self, ranked: list[Scored], prefer: tuple[str, ...], overflow_after_s: float,
                        now: float | None = None) -> list[Scored]:
        """The user's preferred hubs before the policy's order: the first of them, in the user's order, that passed
        the filters and would start the job within `overflow_after_s` (counting what this antenna just sent
        there) goes first; if none would, the job overflows: the policy's order stands."""
        by_site = {s.site: s for s in ranked}
        for name in prefer:
            s = by_site.get(name)
            if s is not None and self.expected_wait(s.candidate, now) <= overflow_after_s:
                return [s, *(r for r in ranked if r is not s)]
        return ranked

    # -- what hubs have not seen yet -----------------------------------------------------------------

    def sent(self, site: str, job_id: str, gpus: int, walltime_s: float, now: float | None = None) -> None:
        """A job was placed on `site`: until the hub counts it, estimates there are corrected by it."""
        now = time.time() if now is None else now
        jobs = self._unseen.setdefault(site, OrderedDict())
        cost = float(gpus * walltime_s)
        jobs[job_id] = (now, cost)
        self._unseen_gpu_s[site] = self._unseen_gpu_s.get(site, 0.0) + cost

    def landed(self, site: str, job_ids=(), before: float | None = None) -> None:
        """The hub counts these jobs now (acknowledged), or every job sent up to `before` (its advert's time)."""
        jobs = self._unseen.get(site)
        if not jobs:
            return
        for job_id in job_ids:
            if (entry := jobs.pop(job_id, None)) is not None:
                self._unseen_gpu_s[site] -= entry[1]
        if before is not None:
            while jobs and next(iter(jobs.values()))[0] <= before:
                self._unseen_gpu_s[site] -= jobs.popitem(last=False)[1][1]
        if not jobs:
            self._unseen_gpu_s[site] = 0.0

    def unseen_gpu_s(self, site: str, now: float) -> float:
        self.landed(site, before=now - UNSEEN_TTL_S)
        return self._unseen_gpu_s.get(site, 0.0)

    def unseen_jobs(self, site: str, now: float) -> int:
        self.landed(site, before=now - UNSEEN_TTL_S)
        return len(self._unseen.get(site, ()))
