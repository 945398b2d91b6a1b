"""Tests of the placement simulator (`federation/simulate.py`) behind `aifed bench placement`.

* `read_trace`: the Standard Workload Format (18 whitespace fields: 2 submit, 4 runtime, 5 allocated processors
  or else 8 requested, 9 requested time as the walltime but never below the runtime; `;` headers) and the Philly
  CSV (`#` header; id, arrival, topology, shape, size = GPUs, duration; walltime = runtime); malformed lines
  counted with up to three examples naming their line, jobs without runtime or size or with a negative submit
  counted as skipped, jobs sorted by submit time.
* `workload`: arrival scaling to the offered load asked for, jobs larger than every site left out, the seeded
  split into antennas.
* `simulate`: small hand-made workloads whose waits, bounded slowdowns and utilisation are worked out by hand in
  the comments; the pooled bound; home-only against a single site; earliest-start against home-only; `rejected`;
  determinism; what antennas see of a site's adverts.
* `run` and the CLI (`aifed bench placement`): the JSON figures, the table, usage errors, the CDF plot.

Traces are written to tmp_path and hold a few dozen to a few hundred jobs. Times are whole seconds where the
result is compared exactly.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from federation.config import BalanceConfig
from federation.placement import POLICIES
from federation import cli
from federation.simulate import BOUND_S, TraceJob, Workload, _Site, read_trace, run, simulate, workload

SUMMARY_KEYS = {"mean_wait_s", "p95_wait_s", "mean_bounded_slowdown", "utilisation", "moved"}
PHILLY_HEADER = "#job id,arrival time (sec),topology,shape,size,duration (sec)"
SWF_HEADER = ["; Version: 2.2", "; Computer: a test machine", "; MaxProcs: 16"]


# -- helpers -----------------------------------------------------------------------------------------

def swf(number, submit, run_s, procs, requested_procs=-1, requested_time=-1, extra=()) -> str:
    """One SWF job line: the 18 fields, unknowns as -1 (plus `extra` fields, as Alea's variant has)."""
    fields = [number, submit, -1, run_s, procs, -1, -1, requested_procs, requested_time,
              -1, 1, 1, 1, -1, -1, -1, -1, -1, *extra]
    return " ".join(str(f) for f in fields)


def philly(job_id, arrival, size, duration, shape=None) -> str:
    return f"{job_id},{arrival},CLOS,{shape if shape is not None else size},{size},{duration}"


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def random_swf(path: Path, jobs: int, seed: int, sizes=(1, 1, 2, 4, 8), mean_gap_s: float = 30.0) -> Path:
    """A synthetic SWF trace of `jobs` jobs with whole-second times (walltime 1 to 3 x the runtime)."""
    rng = random.Random(seed)
    lines, t = list(SWF_HEADER), 0
    for n in range(1, jobs + 1):
        t += int(rng.expovariate(1 / mean_gap_s))
        run_s = rng.randint(10, 600)
        lines.append(swf(n, t, run_s, rng.choice(sizes), requested_time=run_s * rng.randint(1, 3)))
    return write(path, lines)


def hand_workload(jobs: list[tuple], antenna: int | list[int] = 0) -> Workload:
    """A workload of (submit, runtime, GPUs[, walltime]) jobs, in submit order, all from `antenna` (or one each)."""
    trace_jobs = [TraceJob(str(k), float(j[0]), float(j[1]), float(j[3] if len(j) > 3 else j[1]), j[2])
                  for k, j in enumerate(jobs)]
    antennas = antenna if isinstance(antenna, list) else [antenna] * len(jobs)
    return Workload(trace_jobs, antennas, too_large=0, native_load=0.0, scale=1.0)


def random_workload(jobs: int, seed: int, antennas: int, sizes=(1, 1, 2, 4, 8), mean_gap_s: float = 30.0,
                    antenna: int | None = None) -> Workload:
    """Seeded random jobs (whole seconds); every job from `antenna` if given, else from a random antenna."""
    rng = random.Random(seed)
    rows, t = [], 0
    for _ in range(jobs):
        t += int(rng.expovariate(1 / mean_gap_s))
        run_s = rng.randint(10, 600)
        rows.append((t, run_s, rng.choice(sizes), run_s * rng.randint(1, 3)))
    owners = [antenna] * jobs if antenna is not None else [rng.randrange(antennas) for _ in range(jobs)]
    return hand_workload(rows, owners)


def offered_load(jobs: list[TraceJob], sites: list[int]) -> float:
    """GPU-seconds asked over capacity x the span of submit times."""
    span = max(j.submit for j in jobs) - min(j.submit for j in jobs)
    return sum(j.gpus * j.run_s for j in jobs) / (sum(sites) * span)


def bench(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["bench", "placement", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Capacity 4. A (4 GPUs, 0-100) fills the site. B (2 GPUs, t=10) waits for A: reservation at 100. C (4 GPUs,
# t=20) waits behind B. At 100 A ends, B starts (100-150); C needs all 4: its reservation is B's end, 150, with 0
# spare. D (2 GPUs, t=110, runs 20, walltime 40) fits the 2 free GPUs and ends by 110+40 = 150 <= 150: it
# backfills at 110 (ends 130). C starts at 150, ends 180.
# Waits: A 0, B 90, C 130, D 0. Bounded slowdowns: A 100/100 = 1, B (90+50)/50 = 2.8, C (130+30)/30 = 16/3,
# D 20/20 = 1. Busy GPU-seconds 4x100 + 2x50 + 4x30 + 2x20 = 660 over 4 GPUs x 180 s.
BACKFILL = [(0, 100, 4), (10, 50, 2), (20, 30, 4), (110, 20, 2, 40)]
BACKFILL_WAITS = [0.0, 0.0, 90.0, 130.0]

# Ten 2-GPU jobs of 100 s, one every 10 s. On 2 GPUs they run one after the other: job k starts at 100k, waits
# 90k: mean 90 x 45 / 10 = 405. On 8 GPUs (4 at a time): jobs 0-3 start at once, jobs 4-7 (t=40..70) start as
# jobs 0-3 end (100..130): wait 60 each; jobs 8 and 9 (t=80, 90) start as jobs 4 and 5 end (200, 210): wait 120.
# Mean (4 x 60 + 2 x 120) / 10 = 48.
STREAM = [(10 * k, 100, 2) for k in range(10)]
STREAM_WAITS_ON_2 = [90.0 * k for k in range(10)]
STREAM_WAITS_ON_8 = [0.0] * 4 + [60.0] * 4 + [120.0] * 2


# -- read_trace: SWF -----------------------------------------------------------------------------------

def test_swf_jobs_take_submit_runtime_processors_and_requested_time(tmp_path):
    path = write(tmp_path / "t.swf", [
        *SWF_HEADER,
        swf(1, 100, 50, 4, requested_procs=8, requested_time=3600),  # allocated 4 wins over requested 8
        swf(2, 10, 200, -1, requested_procs=8, requested_time=100),  # no allocation: 8 requested; 100 < 200 run
        swf(3, 50, 30, 2),                                            # no requested time: walltime = runtime
        swf(4, 75, 60, 3, requested_time=60, extra=(7, 7)),           # 20 fields (Alea's variant): fine
        "\t".join(swf(5, 60, 5, 1, requested_time=0).split()),         # tabs; requested time 0: the runtime
    ])
    trace = read_trace(path)
    assert trace.kind == "swf"
    assert (trace.malformed, trace.skipped, trace.examples) == (0, 0, [])
    assert [(j.id, j.submit, j.run_s, j.walltime_s, j.gpus) for j in trace.jobs] == [
        ("2", 10.0, 200.0, 200.0, 8),
        ("3", 50.0, 30.0, 30.0, 2),
        ("5", 60.0, 5.0, 5.0, 1),
        ("4", 75.0, 60.0, 60.0, 3),
        ("1", 100.0, 50.0, 3600.0, 4),
    ]


def test_swf_malformed_lines_are_counted_with_three_examples_naming_their_line(tmp_path):
    short = " ".join(swf(2, 20, 10, 1).split()[:17])
    path = write(tmp_path / "t.swf", [
        *SWF_HEADER,                          # lines 1-3
        swf(1, 10, 10, 1),                    # line 4: fine
        short,                                # line 5: 17 fields
        "",                                   # line 6: blank, ignored
        swf(3, "abc", 10, 1),                 # line 7: submit not a number
        swf(4, 40, "nan", 1),                 # line 8: runtime nan
        swf(5, "inf", 10, 1),                 # line 9: submit inf
        swf(6, 60, 10, "x"),                  # line 10: processors not a number
        swf(7, 70, 10, 1, requested_time="-inf"),  # line 11: requested time -inf
        "garbage",                            # line 12
        swf(8, 80, 10, 1),                    # line 13: fine
    ])
    trace = read_trace(path)
    assert trace.kind == "swf"
    assert [j.id for j in trace.jobs] == ["1", "8"]
    assert trace.malformed == 7 and trace.skipped == 0
    assert trace.examples == [f"line 5: {short}", f"line 7: {swf(3, 'abc', 10, 1)}", f"line 8: {swf(4, 40, 'nan', 1)}"]


def test_swf_jobs_without_runtime_or_processors_or_with_a_negative_submit_are_skipped(tmp_path):
    path = write(tmp_path / "t.swf", [
        *SWF_HEADER,
        swf(1, 10, 0, 4),                          # runtime 0 (cancelled before it ran)
        swf(2, 20, -1, 4),                         # runtime unknown
        swf(3, 30, 100, -1, requested_procs=-1),   # no processors at all
        swf(4, 40, 100, 0, requested_procs=0),
        swf(5, -5, 100, 4),                        # negative submit
        swf(6, 60, 100, 0, requested_procs=2),     # 0 allocated: the 2 requested
    ])
    trace = read_trace(path)
    assert (trace.skipped, trace.malformed) == (5, 0)
    assert [(j.id, j.gpus) for j in trace.jobs] == [("6", 2)]


def test_a_trace_of_only_comments_has_no_jobs_and_no_errors(tmp_path):
    trace = read_trace(write(tmp_path / "t.swf", [*SWF_HEADER, "", "; the end"]))
    assert (trace.kind, trace.jobs, trace.malformed, trace.skipped) == ("swf", [], 0, 0)


# -- read_trace: Philly CSV ------------------------------------------------------------------------------

def test_philly_csv_is_detected_and_gives_gpus_and_duration_with_walltime_equal_to_runtime(tmp_path):
    path = write(tmp_path / "philly.csv", [
        PHILLY_HEADER,
        philly(7, 300.0, 16, 1200.5, shape="8+8"),
        philly(3, 0.0, 1, 60.0),
        " 5 , 120 , CLOS , 2 , 2 , 30 ",  # spaces around fields
    ])
    trace = read_trace(path)
    assert trace.kind == "philly"
    assert (trace.malformed, trace.skipped) == (0, 0)
    assert [(j.id, j.submit, j.run_s, j.walltime_s, j.gpus) for j in trace.jobs] == [
        ("3", 0.0, 60.0, 60.0, 1),
        ("5", 120.0, 30.0, 30.0, 2),
        ("7", 300.0, 1200.5, 1200.5, 16),
    ]


def test_philly_malformed_lines_are_counted_and_bad_jobs_skipped(tmp_path):
    path = write(tmp_path / "philly.csv", [
        PHILLY_HEADER,                    # line 1
        philly(1, 0, 1, 100),             # line 2: fine
        "2,10,CLOS,1,1",                  # line 3: 5 fields
        "3,20,CLOS,1,1,100,extra",        # line 4: 7 fields
        philly(4, 30, 1, "nan"),          # line 5: duration nan
        philly(5, "inf", 1, 100),         # line 6: arrival inf
        philly(6, 50, "x", 100),          # line 7: size not a number
        philly(7, 60, 0, 100),            # size 0: skipped
        philly(8, 70, 2, 0),              # duration 0: skipped
        philly(9, -1, 2, 100),            # negative arrival: skipped
        philly(10, 90, 4, 100),           # fine
    ])
    trace = read_trace(path)
    assert trace.kind == "philly"
    assert [j.id for j in trace.jobs] == ["1", "10"]
    assert (trace.malformed, trace.skipped) == (5, 3)
    assert trace.examples == ["line 3: 2,10,CLOS,1,1", "line 4: 3,20,CLOS,1,1,100,extra",
                              f"line 5: {philly(4, 30, 1, 'nan')}"]


# -- workload ------------------------------------------------------------------------------------------

def test_arrivals_are_scaled_so_the_offered_load_is_the_one_asked_for(tmp_path):
    # Sites 4+4 = 8 GPUs. Jobs that fit (submits 1000..1200, span 200): 2x100 + 4x50 + 1x400 = 800 GPU-seconds;
    # native load 800 / (8 x 200) = 0.5. The 16-processor job fits no site: left out of the load and the span.
    path = write(tmp_path / "t.swf", [
        *SWF_HEADER,
        swf(1, 1000, 100, 2),
        swf(2, 1100, 50, 4),     # as large as the biggest site: kept
        swf(3, 1150, 10, 16),    # too large
        swf(4, 1200, 400, 1),
    ])
    trace = read_trace(path)
    w = workload(trace, [4, 4], load=0.25, antennas=2, seed=1)
    assert w.native_load == pytest.approx(0.5, abs=1e-12)
    assert w.scale == pytest.approx(2.0, abs=1e-12)  # half the load: arrivals twice as far apart
    assert w.too_large == 1
    assert [(j.id, j.submit) for j in w.jobs] == [("1", 0.0), ("2", 200.0), ("4", 400.0)]
    assert [(j.run_s, j.walltime_s, j.gpus) for j in w.jobs] == [(100.0, 100.0, 2), (50.0, 50.0, 4),
                                                                 (400.0, 400.0, 1)]
    assert offered_load(w.jobs, [4, 4]) == pytest.approx(0.25, abs=1e-9)

    w = workload(trace, [4, 4], load=2.0, antennas=2, seed=1)
    assert w.scale == pytest.approx(0.25, abs=1e-12)
    assert [j.submit for j in w.jobs] == [0.0, 25.0, 50.0]


@pytest.mark.parametrize("load", [0.3, 0.85, 1.0, 1.7])
def test_the_scaled_trace_offers_the_load_asked_for(tmp_path, load):
    trace = read_trace(random_swf(tmp_path / "t.swf", 150, seed=3, sizes=(1, 2, 4, 8, 32)))
    sites = [16, 8, 4]
    w = workload(trace, sites, load, antennas=3, seed=1)
    kept = [j for j in trace.jobs if j.gpus <= 16]
    assert w.too_large == len(trace.jobs) - len(kept) > 0
    assert w.native_load == pytest.approx(offered_load(kept, sites), rel=1e-12)
    assert w.scale == pytest.approx(w.native_load / load, rel=1e-12)
    assert offered_load(w.jobs, sites) == pytest.approx(load, abs=1e-9)
    assert w.jobs[0].submit == 0.0
    assert [j.submit for j in w.jobs] == sorted(j.submit for j in w.jobs)


def test_jobs_larger_than_every_site_are_left_out_and_a_trace_with_none_that_fit_is_refused(tmp_path):
    path = write(tmp_path / "t.swf", [*SWF_HEADER, swf(1, 0, 100, 16), swf(2, 10, 100, 8), swf(3, 20, 100, 9)])
    trace = read_trace(path)
    assert workload(trace, [16, 4], 0.5, 2, 1).too_large == 0
    w = workload(trace, [8, 4], 0.5, 2, 1)
    assert w.too_large == 2 and [j.id for j in w.jobs] == ["2"]
    with pytest.raises(ValueError, match="no job fits a site of 4"):
        workload(trace, [4, 2], 0.5, 2, 1)


def test_the_split_into_antennas_is_deterministic_for_a_seed_and_differs_for_another(tmp_path):
    trace = read_trace(random_swf(tmp_path / "t.swf", 200, seed=4))
    first = workload(trace, [8, 8, 4, 4], 0.85, antennas=4, seed=7)
    again = workload(trace, [8, 8, 4, 4], 0.85, antennas=4, seed=7)
    other = workload(trace, [8, 8, 4, 4], 0.85, antennas=4, seed=8)
    assert first.antenna == again.antenna and first.jobs == again.jobs
    assert len(first.antenna) == len(first.jobs) == 200
    assert set(first.antenna) == {0, 1, 2, 3}  # 200 draws from 4: every antenna gets jobs
    assert other.antenna != first.antenna
    assert other.jobs == first.jobs  # the seed splits; it does not change the jobs


# -- simulate: by hand --------------------------------------------------------------------------------

def test_one_site_schedules_with_easy_backfilling_as_worked_out_by_hand():
    result = simulate(hand_workload(BACKFILL), [4], None)
    assert sorted(result.waits) == BACKFILL_WAITS
    assert sorted(result.slowdowns) == pytest.approx([1.0, 1.0, 2.8, 16 / 3])
    assert (result.busy_gpu_s, result.makespan_s, result.capacity) == (660.0, 180.0, 4)
    summary = result.summary()
    assert summary["mean_wait_s"] == pytest.approx(220 / 4)
    assert summary["p95_wait_s"] == 130.0  # nearest rank: the 4th of 4
    assert summary["mean_bounded_slowdown"] == pytest.approx((1 + 2.8 + 16 / 3 + 1) / 4)
    assert summary["utilisation"] == pytest.approx(660 / (4 * 180))
    assert (summary["jobs"], summary["rejected"], summary["moved"]) == (4, 0, 0)


@pytest.mark.parametrize("policy", POLICIES)
def test_on_a_single_site_every_policy_gives_the_pooled_result(policy):
    pooled = simulate(hand_workload(BACKFILL), [4], None)
    placed = simulate(hand_workload(BACKFILL), [4], policy)
    assert sorted(placed.waits) == BACKFILL_WAITS
    assert placed.summary() == pooled.summary()


def test_the_pooled_bound_is_one_site_of_the_summed_capacity():
    # Sites 1 and 3 pooled: the 4-GPU site worked out above (job C of 4 GPUs fits neither site alone).
    split = simulate(hand_workload(BACKFILL), [1, 3], None)
    assert sorted(split.waits) == BACKFILL_WAITS
    assert split.summary() == simulate(hand_workload(BACKFILL), [4], None).summary()
    # Ten 2-GPU jobs on 2 + 8 = 10 GPUs pooled: 5 at a time. Jobs 0-4 start at once; jobs 5-9 (t=50..90) start
    # as jobs 0-4 end (100..140): wait 50 each.
    pooled = simulate(hand_workload(STREAM), [2, 8], None)
    assert sorted(pooled.waits) == [0.0] * 5 + [50.0] * 5
    assert pooled.summary()["mean_wait_s"] == 25.0


def test_bounded_slowdown_counts_runtimes_under_10_seconds_as_10():
    assert BOUND_S == 10.0
    # One GPU. X runs 0-100. Y (2 s, t=1) waits 99: (99 + 2) / max(2, 10) = 10.1 (50.5 unbounded). Z (4 s,
    # t=200) does not wait: max(1, 4 / 10) = 1.
    result = simulate(hand_workload([(0, 100, 1), (1, 2, 1), (200, 4, 1)]), [1], None)
    assert sorted(result.waits) == [0.0, 0.0, 99.0]
    assert sorted(result.slowdowns) == pytest.approx([1.0, 1.0, 10.1])
    assert result.summary()["mean_bounded_slowdown"] == pytest.approx(12.1 / 3)


def test_utilisation_is_busy_gpu_seconds_over_capacity_times_makespan():
    # Sites 2 + 2 pooled. A job of 2 GPUs runs 0-100, one of 4 GPUs 300-400: 200 + 400 = 600 GPU-seconds over
    # 4 GPUs x 400 s (first submit to last end, idle time included) = 0.375.
    result = simulate(hand_workload([(0, 100, 2), (300, 100, 4)]), [2, 2], None)
    assert (result.busy_gpu_s, result.makespan_s) == (600.0, 400.0)
    assert result.summary()["utilisation"] == pytest.approx(0.375)
    # A job that ends before its walltime is busy only while it runs.
    early = simulate(hand_workload([(0, 100, 2, 1000)]), [2, 2], None)
    assert (early.busy_gpu_s, early.makespan_s) == (200.0, 100.0)


# -- simulate: policies -------------------------------------------------------------------------------

def test_home_only_keeps_each_antennas_jobs_on_its_home_site():
    # Antenna i's home is site i: one antenna sending everything sees its home site alone.
    assert sorted(simulate(hand_workload(STREAM, antenna=0), [2, 8], "home-only").waits) == STREAM_WAITS_ON_2
    assert sorted(simulate(hand_workload(STREAM, antenna=1), [2, 8], "home-only").waits) == STREAM_WAITS_ON_8
    assert sorted(simulate(hand_workload(STREAM, antenna=1), [8, 2], "home-only").waits) == STREAM_WAITS_ON_2
    result = simulate(hand_workload(STREAM, antenna=0), [2, 8], "home-only")
    assert result.summary()["mean_wait_s"] == 405.0
    assert result.summary()["moved"] == 0
    # Two antennas with one home each: the halves do not meet. Even jobs (t=0,20,..,80) on 2 GPUs wait
    # 0,80,160,240,320; odd jobs (t=10,..,90) on 8 GPUs (4 at a time): the first four start at once, the fifth
    # (t=90) when the first ends (110): wait 20.
    alternate = simulate(hand_workload(STREAM, antenna=[k % 2 for k in range(10)]), [2, 8], "home-only")
    assert sorted(alternate.waits) == [0.0] * 5 + [20.0, 80.0, 160.0, 240.0, 320.0]


def test_earliest_start_beats_home_only_when_one_antenna_sends_everything_to_the_smallest_site():
    home = simulate(hand_workload(STREAM, antenna=0), [2, 8], "home-only").summary()
    best = simulate(hand_workload(STREAM, antenna=0), [2, 8], "earliest-start").summary()
    assert best["jobs"] == home["jobs"] == 10 and best["rejected"] == 0
    assert best["mean_wait_s"] < home["mean_wait_s"] == 405.0
    assert best["p95_wait_s"] < home["p95_wait_s"] == 810.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_earliest_start_never_does_worse_than_home_only_on_an_imbalanced_workload(seed):
    # Every job from antenna 2, whose home is the 2-GPU site; no job is too large for it.
    w = random_workload(120, seed=seed, antennas=3, sizes=(1, 2), mean_gap_s=60, antenna=2)
    home = simulate(w, [8, 4, 2], "home-only", seed=seed).summary()
    best = simulate(w, [8, 4, 2], "earliest-start", seed=seed).summary()
    assert home["rejected"] == best["rejected"] == 0
    assert home["mean_wait_s"] > 0  # the home site alone is overloaded
    assert best["mean_wait_s"] <= home["mean_wait_s"]
    assert best["mean_bounded_slowdown"] <= home["mean_bounded_slowdown"]


def test_sites_hand_long_waiting_jobs_to_an_idle_peer_once_and_never_under_home_only():
    # Round-robin sends every other job of 2 GPUs for 1000 s to the 2-GPU site: its queue grows by 1000 s a job,
    # while the 16-GPU site (8 at a time) never fills. Past the threshold (600 s of expected wait), the small
    # site hands its waiting jobs to the big one, which starts them at once.
    jobs = [(10 * k, 1000, 2) for k in range(12)]
    still = simulate(hand_workload(jobs), [2, 16], "round-robin", balance=BalanceConfig(enabled=False)).summary()
    moving = simulate(hand_workload(jobs), [2, 16], "round-robin", balance=BalanceConfig(enabled=True)).summary()
    assert still["moved"] == 0 and still["mean_wait_s"] > 1000
    assert moving["jobs"] == still["jobs"] == 12  # every job ran, once
    # Jobs 2, 4, 6 and 8 are moved one round (10 s) after they arrive; job 10 would wait as long at the big site,
    # full by then (8 jobs of 2 GPUs running, 1 waiting), so it stays.
    assert moving["moved"] == 4
    assert moving["mean_wait_s"] < still["mean_wait_s"] / 3
    home = simulate(hand_workload(jobs, antenna=[0] * 12), [2, 16], "home-only",
                    balance=BalanceConfig(enabled=True)).summary()
    assert home["moved"] == 0  # no federation, no balancing


def test_home_only_rejects_the_jobs_its_home_site_is_too_small_for():
    # Home site 0 has 2 GPUs: the three 4-GPU jobs cannot go there, the two 1-GPU jobs can.
    jobs = [(0, 50, 4), (10, 50, 1), (20, 50, 4), (30, 50, 1), (40, 50, 4)]
    home = simulate(hand_workload(jobs, antenna=0), [2, 8], "home-only")
    assert home.rejected == 3 and sorted(home.waits) == [0.0, 0.0]
    assert home.busy_gpu_s == 2 * 50.0  # only what ran
    assert home.summary()["jobs"] == 2 and home.summary()["rejected"] == 3
    # From the antenna whose home has 8 GPUs, or under any other policy, every job runs.
    assert simulate(hand_workload(jobs, antenna=1), [2, 8], "home-only").rejected == 0
    for policy in POLICIES[:-1]:
        result = simulate(hand_workload(jobs, antenna=0), [2, 8], policy)
        assert (result.rejected, len(result.waits)) == (0, 5), policy


@pytest.mark.parametrize("policy", [*POLICIES, None])
def test_results_repeat_exactly_for_the_same_seed(policy):
    w = random_workload(150, seed=11, antennas=3, mean_gap_s=20)
    first = simulate(w, [8, 4, 4], policy, seed=5)
    second = simulate(w, [8, 4, 4], policy, seed=5)
    assert first == second
    assert len(first.waits) + first.rejected == 150


def test_random_placement_depends_on_the_seed():
    w = random_workload(150, seed=11, antennas=3, mean_gap_s=20)
    assert simulate(w, [8, 4, 4], "random", seed=5).waits != simulate(w, [8, 4, 4], "random", seed=6).waits


# -- what antennas see of a site ------------------------------------------------------------------------

def test_antennas_see_the_last_advert_delay_seconds_late():
    site = _Site("s", 4, period_s=10.0, phase_s=0.0, delay_s=0.5)  # adverts at 0, 10, 20...
    site.before_change(1.0, next_arrival=1.2)
    site.queue.add("x", 2, 100.0, 1.0)
    assert [e.key for e in site.queue.schedule(1.0)] == ["x"]
    tick, view = site.visible(1.2)  # sees the advert of 0, before x
    assert (tick, view.free, view.running_jobs) == (0.0, 4, 0)
    tick, view = site.visible(10.4)  # the advert of 10 is not seen before 10.5
    assert (tick, view.free) == (0.0, 4)
    tick, view = site.visible(10.6)
    assert (tick, view.free, view.running_jobs) == (10.0, 2, 1)


def test_an_advert_is_seen_even_when_later_adverts_showed_the_same_state():
    site = _Site("s", 4, period_s=10.0, phase_s=0.0, delay_s=0.5)
    site.before_change(1.0, next_arrival=30.2)
    site.queue.add("x", 2, 100.0, 1.0)
    site.queue.schedule(1.0)
    site.before_change(30.1, next_arrival=30.2)  # a change 0.1 s after the advert of 30
    site.queue.add("y", 2, 100.0, 30.1)
    site.queue.schedule(30.1)
    # At 30.2 the antenna sees the advert of 20 (30 is seen from 30.5), which showed x running: 2 GPUs free.
    tick, view = site.visible(30.2)
    assert tick == 20.0
    assert (view.free, view.running_jobs) == (2, 1)


# -- run --------------------------------------------------------------------------------------------------

def mixed_trace(path: Path) -> Path:
    """60 good jobs (up to 8 processors), 2 malformed lines, 1 job without runtime, 1 of 64 processors."""
    lines = random_swf(path, 60, seed=21).read_text().splitlines()
    lines += ["1 2 3", swf(61, 100, "nan", 1), swf(62, 200, 0, 4), swf(63, 300, 100, 64)]
    return write(path, lines)


def test_run_gives_every_policy_and_the_pooled_bound_as_json(tmp_path):
    path = mixed_trace(tmp_path / "t.swf")
    out, waits = run(path, [8, 4], load=0.7)
    assert set(out["policies"]) == set(POLICIES)
    for figures in [*out["policies"].values(), out["pooled"]]:
        assert SUMMARY_KEYS <= set(figures)
        assert figures["p95_wait_s"] >= 0 and 0 < figures["utilisation"] <= 1
        assert figures["mean_bounded_slowdown"] >= 1
    assert out["default_policy"] == "earliest-start"
    assert (out["malformed"], out["skipped"], out["too_large"], out["jobs"]) == (2, 1, 1, 60)
    assert out["format"] == "swf" and out["sites"] == [8, 4] and out["load"] == 0.7
    assert out["examples"] == ["line 64: 1 2 3", f"line 65: {swf(61, 100, 'nan', 1)}"]
    assert waits == {}
    assert json.loads(json.dumps(out))["policies"] == out["policies"]
    # The same figures as the pieces give.
    w = workload(read_trace(path), [8, 4], 0.7, 2, 1)
    assert out["pooled"] == simulate(w, [8, 4], None, 10.0, 0.5, 1).summary()
    assert out["policies"]["home-only"] == simulate(w, [8, 4], "home-only", 10.0, 0.5, 1).summary()
    assert out["native_load"] == w.native_load


def test_run_keeps_every_jobs_wait_per_policy_when_asked(tmp_path):
    path = random_swf(tmp_path / "t.swf", 40, seed=22, sizes=(1, 2))
    out, waits = run(path, [4, 2], load=0.9, policies=("home-only", "round-robin"), keep_waits=True)
    assert set(out["policies"]) == {"home-only", "round-robin"}
    assert set(waits) == {"home-only", "round-robin", "pooled bound"}
    assert all(len(v) == 40 for v in waits.values())
    assert statistics.fmean(waits["pooled bound"]) == pytest.approx(out["pooled"]["mean_wait_s"])


def test_policies_run_in_parallel_processes_give_the_same_figures_as_one_after_the_other(tmp_path):
    path = random_swf(tmp_path / "t.swf", 80, seed=23, sizes=(1, 2, 4))
    together, waits_together = run(path, [4, 2], load=0.9, keep_waits=True, balance=True, workers=3)
    alone, waits_alone = run(path, [4, 2], load=0.9, keep_waits=True, balance=True, workers=1)
    assert (together["workers"], alone["workers"]) == (3, 1)
    for out in (together, alone):
        out.pop("jobs_per_s"), out.pop("workers")
    assert together == alone and waits_together == waits_alone
    assert list(together["policies"]) == list(POLICIES)  # in the order asked


# -- the CLI -------------------------------------------------------------------------------------------

def test_bench_placement_prints_a_table_and_one_json_object_on_the_last_line(tmp_path, capsys):
    path = mixed_trace(tmp_path / "t.swf")
    code, out, err = bench(capsys, "--trace", str(path), "--sites", "8,4", "--json")
    assert code == 0, err
    lines = out.splitlines()
    figures = json.loads(lines[-1])
    assert set(figures["policies"]) == set(POLICIES)
    for row in [*figures["policies"].values(), figures["pooled"]]:
        assert SUMMARY_KEYS <= set(row)
    assert figures["default_policy"] == "earliest-start"
    assert (figures["malformed"], figures["skipped"], figures["too_large"]) == (2, 1, 1)
    table = "\n".join(lines[:-1])
    assert "2 malformed line(s) skipped (e.g. line 64: 1 2 3)" in table
    for name in (*POLICIES, "pooled bound"):
        assert any(line.startswith(name) for line in lines[:-1]), name
    assert not any(line.startswith("{") for line in lines[:-1])


def test_bench_placement_runs_only_the_policies_asked_for(tmp_path, capsys):
    path = random_swf(tmp_path / "t.swf", 30, seed=23)
    code, out, err = bench(capsys, "--trace", str(path), "--sites", "8,4", "--policies", "random,home-only",
                           "--load", "0.5", "--json")
    assert code == 0, err
    figures = json.loads(out.splitlines()[-1])
    assert set(figures["policies"]) == {"random", "home-only"}
    assert figures["load"] == 0.5


def test_bench_placement_reads_a_philly_csv(tmp_path, capsys):
    rows = [PHILLY_HEADER] + [philly(k, 60 * k, [1, 1, 2, 4, 8][k % 5], 100 + 37 * k) for k in range(40)]
    path = write(tmp_path / "philly.csv", rows)
    code, out, err = bench(capsys, "--trace", str(path), "--sites", "8,4", "--json")
    assert code == 0, err
    figures = json.loads(out.splitlines()[-1])
    assert (figures["format"], figures["jobs"], figures["malformed"]) == ("philly", 40, 0)


@pytest.mark.parametrize("args, message", [
    (["--sites", "8,x"], "--sites '8,x': give capacities as integers"),
    (["--sites", "0"], "--sites: every site needs a capacity above 0"),
    (["--sites", "8,-4"], "--sites: every site needs a capacity above 0"),
    (["--load", "0"], "give an offered load above 0 and at most 2"),
    (["--load", "2.5"], "give an offered load above 0 and at most 2"),
    (["--policies", "nope"], "unknown policy 'nope'; policies: earliest-start, least-queue"),
    (["--advert-period", "0"], "--advert-period must be above 0"),
    (["--delay", "-1"], "--delay at least 0"),
], ids=["sites-not-integers", "site-of-0", "negative-site", "load-0", "load-above-2", "unknown-policy",
        "advert-period-0", "negative-delay"])
def test_bench_placement_refuses_bad_arguments_with_a_usage_error(tmp_path, capsys, args, message):
    path = random_swf(tmp_path / "t.swf", 10, seed=24)
    code, out, err = bench(capsys, "--trace", str(path), "--sites", "8,4", *args)
    assert code == cli.EXIT_USAGE == 2
    assert err.startswith("aifed: ") and message in err
    assert out == ""


def test_bench_placement_refuses_a_missing_trace_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.swf"
    code, out, err = bench(capsys, "--trace", str(missing), "--sites", "8,4")
    assert code == 2
    assert f"--trace {missing}: no such file" in err
    assert out == ""


def test_bench_placement_fails_with_a_message_on_a_trace_with_no_usable_job(tmp_path, capsys):
    path = write(tmp_path / "t.swf", [*SWF_HEADER, "not a job", swf(1, 0, 100, 64)])
    code, out, err = bench(capsys, "--trace", str(path), "--sites", "8,4")
    assert code != 0
    assert err.startswith("aifed: ") and "Traceback" not in err


def test_bench_placement_draws_the_wait_time_cdf_into_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = random_swf(tmp_path / "t.swf", 30, seed=25)
    png = tmp_path / "cdf.png"
    code, out, err = bench(capsys, "--trace", str(path), "--sites", "8,4", "--plot", str(png), "--json")
    assert code == 0, err
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"wait-time CDF drawn in {png}" in out
    assert json.loads(out.splitlines()[-1])["default_policy"] == "earliest-start"


def test_the_short_job_lane_keeps_short_jobs_from_waiting_behind_a_long_one_at_the_smallest_site():
    # Two 1-GPU sites; site0 (first by name) is the lane. 50 short jobs teach the antenna what short is. Then a
    # short job takes site0 for 300 s and a long one site1; a second long job would start first at site0 (after
    # 300 s): with the lane it waits for site1 instead, and the short jobs after it run at site0 once it is free.
    jobs = [(100 * k, 10, 1) for k in range(50)]
    jobs += [(10_000, 300, 1), (10_001, 5_000, 1), (10_002, 5_000, 1)]
    jobs += [(10_010 + 10 * k, 10, 1) for k in range(5)]
    lane = simulate(hand_workload(jobs), [1, 1], "earliest-start")
    plain = simulate(hand_workload(jobs), [1, 1], "earliest-start", lane=False)
    assert lane.summary()["jobs"] == plain.summary()["jobs"] == len(jobs)
    assert sorted(plain.waits)[-5:] == [4_991.0] * 5  # the short jobs, behind the second long job
    assert sorted(lane.waits)[-6:] == [290.0] * 5 + [4_999.0]  # only the second long job waits long
    assert lane.summary()["mean_bounded_slowdown"] < plain.summary()["mean_bounded_slowdown"] / 10
    assert simulate(hand_workload(jobs), [1, 1], "least-queue").waits == \
        simulate(hand_workload(jobs), [1, 1], "least-queue", lane=False).waits  # only earliest-start keeps a lane
