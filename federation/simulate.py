"""The placement simulator behind `aifed bench placement`: real job traces over simulated sites.

A discrete-event simulation that runs the daemons' own code, not copies of it:
- every site schedules with `federation.queue.PartitionQueue` (EASY backfilling, as the local backend does) and
  publishes adverts built from `PartitionQueue.snapshot`, every `advert_period_s` (each site at its own seeded
  phase), which antennas see `delay_s` later;
- every antenna places with `federation.placement.Placer`, under each policy in turn, on candidates made from the
  adverts it can see: estimated waits from the advert's queue model, corrected for what it sent since;
- with `balance` (`--balance`), every site balances load with `federation.balance.plan` and the hub's default
  `[balance]` settings, under every policy but `home-only` (no federation): every `interval_s` while jobs wait in
  its queue (skipping a round when nothing changed at any site since its last one), the jobs waiting in its own
  queue longer than the threshold are handed to the peer whose advert (as the site sees it, `delay_s` late) promises
  a clearly earlier start; they join the peer's queue at once, never move twice, and are counted in `moved`.

Traces (`read_trace`): the Standard Workload Format of the Parallel Workloads Archive (runtime, processors,
requested time) and the Philly GPU trace as CSV (GPUs, duration; no requested time, so the runtime is the
walltime). Jobs are dealt to antennas by a seeded random draw, antenna i's home site is site i (for
`home-only`), and arrival times are scaled so that the offered load (GPU-seconds asked over capacity x span) is
the one asked for. The pooled bound runs the same jobs on one site holding every site's capacity.
"""

from __future__ import annotations

import heapq
import math
import os
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from federation.balance import MAX_LOOKED_AT, Breaker, Waiting, plan
from federation.config import BalanceConfig
from federation.placement import POLICIES, Candidate, Placer
from federation.queue import PartitionQueue, QueueView

BOUND_S = 10.0  # bounded slowdown: runtimes under 10 s count as 10 s


@dataclass(frozen=True, slots=True)
class TraceJob:
    id: str
    submit: float
    run_s: float
    walltime_s: float
    gpus: int


@dataclass
class Trace:
    path: Path
    kind: str                     # "swf" or "philly"
    jobs: list[TraceJob]
    malformed: int = 0            # lines that are not jobs of the format
    skipped: int = 0              # well-formed jobs with no runtime or no GPUs/processors (cancelled before running)
    examples: list[str] = field(default_factory=list)  # a few malformed lines, for the report


def read_trace(path: str | Path) -> Trace:
    """Read an SWF or Philly CSV trace; malformed lines are counted, never fatal."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith((";", "#"))), "")
    kind = "philly" if "," in first else "swf"
    trace = Trace(path, kind, [])
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith((";", "#")):
            continue
        try:
            job = _philly(text) if kind == "philly" else _swf(text)
        except (ValueError, IndexError):
            trace.malformed += 1
            if len(trace.examples) < 3:
                trace.examples.append(f"line {number}: {text[:80]}")
            continue
        if job is None:
            trace.skipped += 1
        else:
            trace.jobs.append(job)
    trace.jobs.sort(key=lambda j: j.submit)
    return trace


def _finite(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def _swf(text: str) -> TraceJob | None:
    f = text.split()
    if len(f) < 18:
        raise ValueError("fewer than 18 fields")
    submit, run, procs, requested_procs, requested_time = (_finite(f[1]), _finite(f[3]), int(f[4]), int(f[7]),
                                                           _finite(f[8]))
    size = procs if procs > 0 else requested_procs
    if submit < 0 or run <= 0 or size <= 0:
        return None
    walltime = max(requested_time, run) if requested_time > 0 else run
    return TraceJob(f[0], submit, run, walltime, size)


def _philly(text: str) -> TraceJob | None:
    f = [x.strip() for x in text.split(",")]
    if len(f) != 6:
        raise ValueError("not 6 fields")
    submit, size, run = _finite(f[1]), int(f[4]), _finite(f[5])
    if submit < 0 or run <= 0 or size <= 0:
        return None
    return TraceJob(f[0], submit, run, run, size)


# -- the workload ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    jobs: list[TraceJob]          # arrival-scaled, runnable somewhere
    antenna: list[int]            # antenna of each job
    too_large: int                # jobs larger than every site, left out
    native_load: float            # offered load before scaling
    scale: float                  # factor applied to arrival times


def workload(trace: Trace, sites: list[int], load: float, antennas: int, seed: int) -> Workload:
    biggest = max(sites)
    if not trace.jobs:
        raise ValueError(f"{trace.path}: no usable job in the trace ({trace.malformed} malformed line(s), "
                         f"{trace.skipped} job(s) without runtime or size)")
    jobs = [j for j in trace.jobs if j.gpus <= biggest]
    if not jobs:
        raise ValueError(f"{trace.path}: no job fits a site of {biggest}")
    t0 = jobs[0].submit
    span = max(jobs[-1].submit - t0, 1.0)
    work = sum(j.gpus * j.run_s for j in jobs)
    native = work / (sum(sites) * span)
    scale = native / load
    scaled = [TraceJob(j.id, (j.submit - t0) * scale, j.run_s, j.walltime_s, j.gpus) for j in jobs]
    rng = random.Random(seed)
    return Workload(scaled, [rng.randrange(antennas) for _ in scaled], len(trace.jobs) - len(jobs), native, scale)


# -- the simulation ----------------------------------------------------------------------------------

class _Site:
    """A simulated hub: its queue, and the adverts it has published (what antennas may see, with delay)."""

    def __init__(self, name: str, gpus: int, period_s: float, phase_s: float, delay_s: float):
        self.name, self.capacity = name, gpus
        self.queue = PartitionQueue(gpus)
        self.period, self.phase, self.delay = period_s, phase_s, delay_s
        self.changed_at = -math.inf
        self.changes = 0  # state changes so far
        self.views: list[tuple[float, QueueView]] = []  # (advert time, what it showed), oldest first
        self.first_view = 0
        self._now: QueueView | None = None  # the current state's view, until it changes
        self._empty = QueueView(-math.inf, gpus, gpus, [], [], 0.0, 0)

    def tick_before(self, t: float) -> float:
        """The last advert time at or before t."""
        return self.phase + math.floor((t - self.phase) / self.period) * self.period

    def _current(self, at: float) -> QueueView:
        if self._now is None:
            self._now = self.queue.snapshot(at)
        return self._now

    def before_change(self, t: float, next_arrival: float) -> None:
        """The state is about to change at t. If adverts went out since the last change (they all showed this
        state) and the next antenna to place a job may still see one, keep the state under the first of them:
        an antenna looking at any advert from then until the change finds it."""
        last = self.tick_before(t)
        if math.isinf(self.changed_at):
            first = -math.inf
        else:
            first = self.phase + math.ceil((self.changed_at - self.phase) / self.period) * self.period
        if first <= last < t and next_arrival - self.delay < last + self.period:
            self.views.append((first, self._current(last)))
        self.changed_at = t
        self._now = None
        self.changes += 1

    def visible(self, t: float) -> tuple[float, QueueView]:
        """The latest advert an antenna sees at t: when it went out, and the queue it showed."""
        tick = self.tick_before(t - self.delay)
        if self.changed_at <= tick:
            return tick, self._current(tick)  # nothing changed since that advert went out
        views, i = self.views, self.first_view
        while i + 1 < len(views) and views[i + 1][0] <= tick:
            i += 1
        if i > 16:  # forget what nobody will look at again (time only moves forward)
            del views[:i]
            i = 0
        self.first_view = i
        if i < len(views) and views[i][0] <= tick:
            return tick, views[i][1]
        return tick, self._empty  # before anything happened


@dataclass
class Result:
    waits: list[float]
    slowdowns: list[float]
    busy_gpu_s: float
    makespan_s: float
    capacity: int
    moved: int = 0
    rejected: int = 0

    def summary(self) -> dict:
        waits = sorted(self.waits)
        return {"mean_wait_s": statistics.fmean(waits) if waits else 0.0,
                "p95_wait_s": waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)] if waits else 0.0,
                "mean_bounded_slowdown": statistics.fmean(self.slowdowns) if self.slowdowns else 0.0,
                "utilisation": self.busy_gpu_s / (self.capacity * self.makespan_s) if self.makespan_s else 0.0,
                "moved": self.moved, "jobs": len(waits), "rejected": self.rejected}


def simulate(w: Workload, sites: list[int], policy: str | None, advert_period_s: float = 10.0,
             delay_s: float = 0.5, seed: int = 1, balance: BalanceConfig | None = None, lane: bool = True) -> Result:
    """Run the workload; `policy` None is the pooled bound (one site of all the capacity, no placement).
    `balance`: the hubs' load-balancing settings (None: no balancing); never under home-only. `lane`: the
    smallest site is the short-job lane (federation/placement.py), as at an antenna's default."""
    settings = balance or BalanceConfig(enabled=False)
    balancing = policy not in (None, "home-only") and settings.enabled and len(sites) > 1
    rng = random.Random(seed)
    if policy is None:
        hubs = [_Site("pooled", sum(sites), advert_period_s, 0.0, delay_s)]
    else:
        hubs = [_Site(f"site{i}", gpus, advert_period_s, rng.uniform(0, advert_period_s), delay_s)
                for i, gpus in enumerate(sites)]
    antennas = max(w.antenna) + 1 if w.antenna else 1
    placers = [Placer(policy, home=f"site{i % len(hubs)}", seed=seed * 1000 + i) if policy else None
               for i in range(antennas)]
    lane_site = min(hubs, key=lambda hub: (hub.capacity, hub.name)).name if lane and len(hubs) > 1 else ""
    jobs = w.jobs
    events: list[tuple[float, int, int, int]] = []  # (time, order, hub, job): a job ends
    starts = [0.0] * len(jobs)
    waits, slowdowns = [], []
    busy = 0.0
    end_of_all = 0.0
    rejected = 0
    order = 0
    moved: set[int] = set()  # jobs handed to another site (once at most)
    next_round = [0.0] * len(hubs)
    seen = [-1] * len(hubs)  # the changes (at every site) a site's last round saw: with none since, it skips one
    replays: list[tuple[int, list]] = [(-1, [])] * len(hubs)
    balancers = [Placer("earliest-start") for _ in hubs]
    breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown_s)  # peers never fail here

    def start_ready(h: int, t: float) -> None:
        nonlocal order
        for entry in hubs[h].queue.schedule(t):
            i = int(entry.key)
            job = jobs[i]
            starts[i] = t
            order += 1
            heapq.heappush(events, (t + min(job.run_s, job.walltime_s), order, h, i))

    def next_arrival(i: int) -> float:
        return jobs[i].submit if i < len(jobs) else math.inf

    def balance_round(h: int, t: float) -> None:
        hub = hubs[h]
        next_round[h] = t + settings.interval_s
        seen[h] = sum(o.changes for o in hubs)
        if replays[h][0] != hub.changes:  # the replay of its queue, longest waits first, while it is unchanged
            ordered = sorted(((start, key) for key, start in hub.queue.snapshot(t).starts().items()), reverse=True)
            replays[h] = (hub.changes, ordered)
        looked_at = []  # the jobs `plan` looks at: the longest waits over the threshold, never moved yet
        for start, key in replays[h][1]:
            if start - t <= settings.threshold_s or len(looked_at) == MAX_LOOKED_AT:
                break
            j = int(key)
            if j not in moved:
                looked_at.append((start - t, key, j))
        if not looked_at:
            return
        placer, index = balancers[h], {o.name: k for k, o in enumerate(hubs)}
        views = {}
        for o in hubs:
            if o is not hub:
                seen_at, views[o.name] = o.visible(t)
                placer.landed(o.name, before=seen_at)

        def estimate(peer: str, job: Waiting) -> Candidate:
            view = views[peer]
            return Candidate(peer, view.wait(job.gpus, job.walltime_s, t), view.free, view.capacity,
                             view.pending_jobs)

        bounds: dict[tuple[str, int], float] = {}

        def soonest(peer: str, gpus: int) -> float:
            """A job of one second starts no later than any longer one of as many GPUs (it backfills wherever
            they would)."""
            if (peer, gpus) not in bounds:
                bounds[peer, gpus] = views[peer].wait(gpus, 1.0, t)
            return bounds[peer, gpus]

        # Most rounds move nothing. A job that no peer could start clearly sooner is left out here, before
        # anything is built for it: first by the wait of a job of one second with as many GPUs (`soonest`, one
        # estimate per size), then by its own estimate at each peer, which the placer's correction can only
        # lengthen (what this site sent a peer: the adverts it just read already count what went before them).
        # `plan` would turn down such a job the same way, so the moves are exactly those of passing every job.
        best_soonest: dict[int, float] = {}
        waiting = []
        for wait, key, j in looked_at:
            job = jobs[j]
            gpus = job.gpus
            if gpus not in best_soonest:
                best_soonest[gpus] = min((soonest(o.name, gpus) for o in hubs
                                          if o is not hub and o.capacity >= gpus), default=math.inf)
            if not settings.worth_moving(wait, best_soonest[gpus]):
                continue
            alternatives = tuple(o.name for o in hubs if o is not hub and o.capacity >= gpus)
            if any(settings.worth_moving(wait, views[peer].wait(gpus, job.walltime_s, t)) for peer in alternatives):
                waiting.append(Waiting(key, gpus, job.walltime_s, wait, alternatives))
        if not waiting:
            return
        moves = plan(waiting, estimate, settings, placer, breaker, now=t, clock=t, soonest=soonest)
        if not moves:
            return
        hub.before_change(t, next_arrival(i))
        for move in moves:
            j, to = int(move.job.key), index[move.peer]
            hub.queue.remove(move.job.key)
            hubs[to].before_change(t, next_arrival(i))
            hubs[to].queue.add(move.job.key, jobs[j].gpus, jobs[j].walltime_s, t)
            moved.add(j)
        for to in {index[m.peer] for m in moves}:
            start_ready(to, t)
        start_ready(h, t)

    i = 0
    clock = 0.0
    while i < len(jobs) or events:
        if balancing:
            # A site with jobs waiting looks at its queue every interval, between events too.
            now = min(events[0][0] if events else math.inf, next_arrival(i))
            changes = sum(o.changes for o in hubs)
            due = [(max(next_round[h], clock), h) for h in range(len(hubs))
                   if len(hubs[h].queue) >= 2 and seen[h] != changes]
            if due and min(due)[0] < now:
                at = min(due)[0]
                for when, h in due:
                    if when <= at:
                        balance_round(h, at)
                clock = at
                continue
        if events and events[0][0] <= next_arrival(i):
            t, _, h, j = heapq.heappop(events)
            clock = t
            hub = hubs[h]
            if policy is not None:  # no antenna looks at the pooled cluster's adverts
                hub.before_change(t, next_arrival(i))
            hub.queue.finish(str(j))
            job = jobs[j]
            ran = min(job.run_s, job.walltime_s)
            busy += job.gpus * ran
            wait = starts[j] - job.submit
            waits.append(wait)
            slowdowns.append(max(1.0, (wait + ran) / max(ran, BOUND_S)))
            end_of_all = max(end_of_all, t)
            start_ready(h, t)
            continue
        job, t = jobs[i], jobs[i].submit
        clock = t
        if policy is None:
            h = 0
        else:
            h = _place(placers[w.antenna[i]], hubs, job, t, lane_site)
            if h < 0:
                rejected += 1
                i += 1
                continue
        hub = hubs[h]
        if policy is not None:
            hub.before_change(t, next_arrival(i + 1))
        hub.queue.add(str(i), job.gpus, job.walltime_s, t)
        start_ready(h, t)
        i += 1
    span = end_of_all - (jobs[0].submit if jobs else 0.0)
    return Result(waits, slowdowns, busy, span, sum(sites), moved=len(moved), rejected=rejected)


def _place(placer: Placer, hubs: list[_Site], job: TraceJob, t: float, lane: str = "") -> int:
    """The antenna's choice for a job arriving at t, from the adverts it sees: the hub's index, or -1."""
    candidates, index = [], {}
    for h, hub in enumerate(hubs):
        if hub.capacity < job.gpus or placer.excludes(hub.name):
            continue
        seen_at, view = hub.visible(t)
        placer.landed(hub.name, before=seen_at)  # what it sent up to the advert, the advert shows
        wait = view.wait(job.gpus, job.walltime_s, t) if placer.needs_estimates else 0.0
        candidates.append(Candidate(hub.name, wait, view.free, hub.capacity, view.pending_jobs))
        index[hub.name] = h
    ranked = placer.order(candidates, job.gpus, job.walltime_s, now=t, lane=lane)
    if not ranked:
        return -1
    chosen = ranked[0].site
    placer.sent(chosen, job.id, job.gpus, job.walltime_s, now=t)
    return index[chosen]


def run(trace_path: str | Path, sites: list[int], load: float = 0.85, advert_period_s: float = 10.0,
        delay_s: float = 0.5, seed: int = 1, policies: tuple[str, ...] = POLICIES, antennas: int = 0,
        keep_waits: bool = False, balance: bool = False, workers: int = 0, lane: bool = True
        ) -> tuple[dict, dict[str, list[float]]]:
    """Every policy and the pooled bound over one trace: the figures `aifed bench placement` prints, and (with
    `keep_waits`) every job's wait per policy. `workers`: policies run at once, each in a process of its own
    (0: one per CPU; 1: one after the other, in this process). `lane`: the short-job lane (earliest-start)."""
    import time

    trace = read_trace(trace_path)
    w = workload(trace, sites, load, antennas or len(sites), seed)
    out: dict = {"trace": str(trace_path), "format": trace.kind, "jobs": len(w.jobs), "malformed": trace.malformed,
                 "skipped": trace.skipped, "too_large": w.too_large, "native_load": w.native_load, "load": load,
                 "sites": sites, "advert_period_s": advert_period_s, "delay_s": delay_s, "seed": seed,
                 "balance": balance, "lane": lane,
                 "policies": {}, "default_policy": POLICIES[0], "examples": trace.examples}
    began = time.perf_counter()
    runs = [(w, sites, policy, advert_period_s, delay_s, seed, balance, keep_waits, lane)
            for policy in (*policies, None)]
    workers = min(len(runs), workers or os.cpu_count() or 1)
    if workers > 1:
        # Each policy is an independent, deterministic run: in parallel, each in a process of its own (spawned,
        # not forked: the caller may hold threads), the figures are the same as one after the other.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_one, runs))
    else:
        results = [_run_one(r) for r in runs]
    waits: dict[str, list[float]] = {}
    for policy, summary, policy_waits in results:
        if policy is None:
            out["pooled"] = summary
        else:
            out["policies"][policy] = summary
        if keep_waits:
            waits[policy or "pooled bound"] = policy_waits
    out["jobs_per_s"] = len(runs) * len(w.jobs) / max(time.perf_counter() - began, 1e-9)
    out["workers"] = workers
    return out, waits


def _run_one(run: tuple) -> tuple[str | None, dict, list[float] | None]:
    """One policy (None: the pooled bound) over the workload: its summary, and its waits if asked."""
    w, sites, policy, advert_period_s, delay_s, seed, balance, keep_waits, lane = run
    result = simulate(w, sites, policy, advert_period_s, delay_s, seed, BalanceConfig(enabled=balance), lane)
    return policy, result.summary(), result.waits if keep_waits else None


# -- `aifed bench placement` ---------------------------------------------------------------------------

def run_bench(args) -> int:
    """Print the table (and with --json, one JSON object on the last line); draw the CDF with --plot."""
    import json
    import sys

    from federation.cli import UsageError

    try:
        sites = [int(x) for x in args.sites.split(",")]
    except ValueError:
        raise UsageError(f"--sites {args.sites!r}: give capacities as integers, e.g. 1024,768,512,256") from None
    if not sites or min(sites) <= 0:
        raise UsageError("--sites: every site needs a capacity above 0")
    if not 0 < args.load <= 2:
        raise UsageError(f"--load {args.load}: give an offered load above 0 and at most 2, e.g. 0.85")
    if args.advert_period <= 0 or args.delay < 0:
        raise UsageError("--advert-period must be above 0 and --delay at least 0 (seconds)")
    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else POLICIES
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise UsageError(f"unknown policy {unknown[0]!r}; policies: {', '.join(POLICIES)}")
    if not Path(args.trace).is_file():
        raise UsageError(f"--trace {args.trace}: no such file")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: give 0 (one per CPU) or more")
    out, waits = run(args.trace, sites, args.load, args.advert_period, args.delay, args.seed, policies,
                     keep_waits=bool(args.plot), balance=args.balance, workers=args.workers, lane=not args.no_lane)
    print(f"{out['trace']} ({out['format']}): {out['jobs']} jobs, {out['malformed']} malformed line(s) skipped"
          + (f" (e.g. {out['examples'][0]})" if out["examples"] else "")
          + f", {out['skipped']} without runtime or size, {out['too_large']} larger than every site")
    print(f"sites {','.join(map(str, sites))}; offered load {args.load} (the trace's own: {out['native_load']:.3f}); "
          f"adverts every {args.advert_period:g} s, seen {args.delay:g} s later; seed {args.seed}; "
          + ("hubs balance load (default [balance] settings)" if out["balance"] else "no load balancing between hubs")
          + ("; earliest-start keeps the smallest site for short jobs" if out["lane"] else "; no short-job lane"))
    print()
    rows = [*out["policies"].items(), ("pooled bound", out["pooled"])]
    print(f"{'POLICY':16} {'MEAN_WAIT_S':>12} {'P95_WAIT_S':>12} {'MEAN_BSLD':>10} {'UTIL':>6} {'MOVED':>6} "
          f"{'REJECTED':>8}")
    for name, r in rows:
        print(f"{name:16} {r['mean_wait_s']:12.0f} {r['p95_wait_s']:12.0f} {r['mean_bounded_slowdown']:10.2f} "
              f"{r['utilisation']:6.3f} {r['moved']:6d} {r['rejected']:8d}")
    default = out["policies"].get(out["default_policy"])
    if default is not None:
        ratios = {"pooled": default["mean_wait_s"] / max(out["pooled"]["mean_wait_s"], 1e-9)}
        if "home-only" in out["policies"]:
            ratios["home_only"] = default["mean_wait_s"] / max(out["policies"]["home-only"]["mean_wait_s"], 1e-9)
        if "least-queue" in out["policies"]:
            ratios["bsld_vs_least_queue"] = (default["mean_bounded_slowdown"]
                                             / max(out["policies"]["least-queue"]["mean_bounded_slowdown"], 1e-9))
        out["ratios"] = ratios
        print()
        print(f"{out['default_policy']} (default): mean wait {ratios['pooled']:.2f} x the pooled bound"
              + (f", {ratios['home_only']:.2f} x home-only" if "home_only" in ratios else "")
              + (f"; mean bounded slowdown {ratios['bsld_vs_least_queue']:.2f} x least-queue"
                 if "bsld_vs_least_queue" in ratios else ""))
    print(f"simulated {out['jobs_per_s']:.0f} jobs/s ({out['workers']} policies at once)")
    if args.plot:
        plot_cdf(waits, args.plot, f"{Path(args.trace).name}: sites {args.sites}, load {args.load}, "
                                   f"adverts every {args.advert_period:g} s")
        print(f"wait-time CDF drawn in {args.plot}")
    if args.json:
        out.pop("examples", None)
        print(json.dumps(out), file=sys.stdout)
    return 0


def plot_cdf(waits: dict[str, list[float]], path: str, title: str) -> None:
    """Wait-time distributions of every policy (and the pooled bound) on one chart, log time axis."""
    from federation.cli import UsageError

    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'aifed[plot]' (make install does)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, values in waits.items():
        xs = sorted(max(v, 1.0) for v in values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=name, linestyle="--" if name == "pooled bound" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("wait (s, log scale; waits under 1 s drawn at 1 s)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
