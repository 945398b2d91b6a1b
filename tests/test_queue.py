"""Unit tests of the queue model of one partition (`federation/queue.py`).

* `PartitionQueue`: the counts (free GPUs, pending and running jobs, pending GPU-seconds) through add, remove,
  claim and finish; first come, first served; EASY backfilling, simulated event by event with explicit times;
  `can_start` refusals; jobs without GPUs; jobs larger than the partition; overdue jobs.
* Estimates (`QueueView.wait`): no wait for a job EASY would start now, else the earlier of its start in a hole
  before the first waiting job's reservation and its start behind the waiting jobs replayed in order with their
  walltimes; snapshots estimated from a later time; the averaged backlog beyond `MODELLED` waiting jobs.
* Properties (hypothesis): random operations checked decision by decision against an independent statement of
  EASY; an event-driven simulation in which no first waiting job starts after its reservation; an estimate of no
  wait whenever `schedule` would start the job (and, overdue jobs aside, only then); estimated starts against a
  brute-force timeline in whole seconds.

Every expected value is worked out by hand in the comments next to it. Times are whole numbers of seconds so
comparisons are exact.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, assume, given, note, settings, strategies as st

import federation.queue as queue_module
from federation.queue import Entry, PartitionQueue

PROPERTIES = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- helpers ---------------------------------------------------------------------------------------


def run(q: PartitionQueue, key: str, gpus: int, walltime_s: float, started: float) -> Entry:
    """Put a job on `q` running since `started` (queued, then claimed)."""
    entry = q.add(key, gpus, walltime_s, submitted=started)
    q.claim(entry, started)
    return entry


def keys(entries: Iterable[Entry]) -> list[str]:
    return [e.key for e in entries]


def refusing(*refused: str, asked: list[str] | None = None) -> Callable[[Entry], bool]:
    """A `can_start` that refuses the named jobs (and records who was asked in `asked`)."""
    def can_start(entry: Entry) -> bool:
        if asked is not None:
            asked.append(entry.key)
        return entry.key not in refused
    return can_start


# -- first come, first served and the counts ----------------------------------------------------------


def test_jobs_start_in_arrival_order_while_they_fit():
    q = PartitionQueue(8)
    for key, gpus in (("a", 3), ("b", 4), ("c", 1), ("d", 2)):
        q.add(key, gpus, 100, submitted=0)
    started = q.schedule(5)
    # 3 + 4 + 1 = 8 GPUs: a, b and c fill the partition; d (2) waits.
    assert keys(started) == ["a", "b", "c"]
    assert all(e.started == 5 for e in started)
    assert list(q.running) == ["a", "b", "c"]
    assert list(q.pending) == ["d"] and len(q) == 1
    assert q.free == 0
    assert q.schedule(6) == []  # nothing fits: nothing changes
    assert q.free == 0 and list(q.pending) == ["d"]


def test_counts_follow_add_remove_claim_and_finish():
    q = PartitionQueue(4)
    a = q.add("a", 2, 100, submitted=0)
    assert (q.free, len(q), len(q.running), q.pending_gpu_s) == (4, 1, 0, 200)  # 2 GPUs x 100 s
    q.add("b", 4, 50, submitted=1)
    assert q.pending_gpu_s == 200 + 4 * 50
    c = q.add("c", 0, 1000, submitted=2)  # no GPUs: no GPU-seconds
    assert q.pending_gpu_s == 400 and len(q) == 3

    assert q.remove("c") is c  # cancelled while pending
    assert q.remove("c") is None and q.remove("nobody") is None
    assert q.pending_gpu_s == 400 and list(q.pending) == ["a", "b"]

    assert q.schedule(10) == [a]  # a (2) fits; b (4) then needs the whole partition
    assert (a.started, a.end) == (10, 110)
    assert (q.free, len(q), len(q.running), q.pending_gpu_s) == (2, 1, 1, 200)
    assert q.remove("a") is None  # running, not pending: remove does not touch it
    assert q.running == {"a": a} and q.free == 2

    assert q.finish("b") is None  # pending, not running: finish does not touch it
    assert list(q.pending) == ["b"]
    assert q.finish("a") is a
    assert (q.free, len(q.running)) == (4, 0)
    assert q.finish("a") is None and q.free == 4  # a second finish frees nothing more

    assert keys(q.schedule(20)) == ["b"]
    assert (q.free, len(q), len(q.running)) == (0, 0, 1)
    assert q.pending_gpu_s == 0


def test_claim_of_a_job_taken_back_counts_its_gpus_without_touching_pending():
    q = PartitionQueue(4)
    q.add("p", 1, 10, submitted=0)
    back = Entry("r", 3, 100, submitted=-50)  # running before a restart, never in this queue's pending
    q.claim(back, started=-20)
    assert q.free == 1 and q.running == {"r": back} and list(q.pending) == ["p"]
    assert q.pending_gpu_s == 10
    assert q.finish("r") is back and q.free == 4


def test_pending_gpu_seconds_drift_is_reset_when_the_queue_empties():
    shapes = (("x", 0.1), ("y", 0.2), ("z", 0.3))
    # The same arithmetic done naively leaves a residue, so the reset is what makes it exactly 0.
    assert (0.1 + 0.2 + 0.3) - 0.1 - 0.2 - 0.3 != 0.0

    q = PartitionQueue(4)
    for key, walltime in shapes:
        q.add(key, 1, walltime, submitted=0)
    for key, _ in shapes:
        q.remove(key)
    assert q.pending_gpu_s == 0.0

    q = PartitionQueue(4)  # emptied by starting the jobs instead (claim takes them out of pending)
    for key, walltime in shapes:
        q.add(key, 1, walltime, submitted=0)
    assert len(q.schedule(0)) == 3
    assert q.pending_gpu_s == 0.0


# -- EASY backfilling -------------------------------------------------------------------------------


def test_easy_short_job_backfills_before_the_reservation_and_long_one_waits():
    q = PartitionQueue(4)
    run(q, "A", 2, 100, started=0)  # ends at 100 at the latest
    run(q, "B", 2, 300, started=0)  # ends at 300 at the latest
    for key, gpus, walltime in (("H", 4, 50), ("S", 2, 200), ("L", 2, 300)):
        q.add(key, gpus, walltime, submitted=0)
    assert q.schedule(0) == []  # no GPU free

    q.finish("A")  # early, at 60
    # H needs 4 with 2 free: its reservation is B's end, 300, with 0 GPUs spare.
    # S: 60 + 200 = 260 <= 300, starts now. L: 60 + 300 = 360 > 300 and 2 > 0 spare, waits.
    assert keys(q.schedule(60)) == ["S"]
    assert q.running["S"].started == 60
    assert list(q.pending) == ["H", "L"]

    q.finish("S")  # at 260: L would end at 560 > 300, still no spare
    assert q.schedule(260) == []
    q.finish("B")  # at 300
    assert keys(q.schedule(300)) == ["H"]  # H starts at its reservation, not delayed
    assert q.running["H"].started == 300 and list(q.pending) == ["L"]
    q.finish("H")  # at 350
    assert keys(q.schedule(350)) == ["L"]


def test_easy_long_job_backfills_on_gpus_the_reservation_leaves_spare():
    q = PartitionQueue(6)
    run(q, "A", 4, 100, started=0)  # free: 2
    for key, gpus, walltime in (("H", 5, 50), ("C", 1, 1000), ("D", 1, 1000), ("E", 1, 90)):
        q.add(key, gpus, walltime, submitted=0)
    # H (5) reserves at 100, when 2 + 4 = 6 are free: 1 spare.
    # C: ends at 1010 > 100 but takes the 1 spare GPU. D: same shape, but no spare left.
    # E: 10 + 90 = 100 <= 100, ends exactly at the reservation.
    assert keys(q.schedule(10)) == ["C", "E"]
    assert q.free == 0 and list(q.pending) == ["H", "D"]

    q.finish("A")
    q.finish("E")
    assert keys(q.schedule(100)) == ["H"]  # 6 - C's 1 = 5: H starts at its reservation
    assert q.running["H"].started == 100
    assert list(q.pending) == ["D"] and q.free == 0


def test_job_that_does_not_fit_now_never_backfills():
    q = PartitionQueue(4)
    run(q, "A", 3, 100, started=0)  # free: 1
    q.add("H", 4, 10, submitted=0)
    q.add("X", 2, 5, submitted=0)  # would end long before the reservation (100), but needs 2 of the 1 free
    q.add("Y", 1, 5, submitted=0)  # fits and ends at 5 <= 100
    assert keys(q.schedule(0)) == ["Y"]
    assert list(q.pending) == ["H", "X"]


def test_only_the_first_waiting_job_holds_a_reservation():
    q = PartitionQueue(4)
    run(q, "A", 2, 100, started=0)  # free: 2
    q.add("H", 3, 10, submitted=0)  # reservation at 100 (2 + 2 = 4), 1 spare
    q.add("I", 4, 10, submitted=0)  # second waiting job: no reservation of its own
    q.add("J", 1, 500, submitted=0)  # takes H's 1 spare GPU, although it delays I
    q.add("K", 1, 500, submitted=0)  # no spare left
    assert keys(q.schedule(0)) == ["J"]
    assert list(q.pending) == ["H", "I", "K"]


def test_arrival_behind_a_waiting_job_starts_only_if_it_may_backfill():
    q = PartitionQueue(4)
    run(q, "R", 3, 100, started=0)  # free: 1
    q.add("H", 4, 10, submitted=0)  # reservation at 100, 0 spare
    assert q.schedule(0) == []
    q.add("X", 1, 50, submitted=1)  # ends at 51 <= 100
    assert keys(q.schedule(1)) == ["X"]
    q.add("Y", 1, 50, submitted=2)  # no GPU left
    assert q.schedule(2) == []
    assert list(q.pending) == ["H", "Y"]


def test_arrival_after_a_finish_reconsiders_every_waiting_job():
    q = PartitionQueue(4)
    run(q, "R1", 2, 100, started=0)
    run(q, "R2", 2, 200, started=0)
    q.add("H", 4, 10, submitted=0)  # reservation at 200, 0 spare
    q.add("B", 2, 150, submitted=0)  # no GPU free
    assert q.schedule(0) == []
    q.finish("R1")  # at 50, and a job arrives before the queue is scheduled again
    q.add("X", 1, 1000, submitted=50)  # ends after the reservation, no spare: waits
    assert keys(q.schedule(50)) == ["B"]  # B, behind H and ahead of X, now fits and ends at 200
    assert list(q.pending) == ["H", "X"]


def test_arrival_after_a_cancellation_reconsiders_every_waiting_job():
    q = PartitionQueue(4)
    run(q, "R", 3, 100, started=0)  # free: 1
    q.add("H", 4, 10, submitted=0)  # reservation at 100, 0 spare
    q.add("I", 2, 10, submitted=0)
    q.add("B", 1, 500, submitted=0)  # ends after the reservation, no spare: waits
    assert q.schedule(0) == []
    q.remove("H")  # I is first now: reservation at 100 too, but 1 + 3 - 2 = 2 GPUs spare
    q.add("X", 1, 500, submitted=1)
    assert keys(q.schedule(1)) == ["B"]  # on a spare GPU, ahead of X; then no GPU is left for X
    assert list(q.pending) == ["I", "X"]


# -- can_start ------------------------------------------------------------------------------------


def test_can_start_refusing_the_first_job_blocks_the_whole_queue():
    q = PartitionQueue(4)
    for key in ("a", "b", "c"):
        q.add(key, 1, 10, submitted=0)
    asked: list[str] = []
    assert q.schedule(0, refusing("a", asked=asked)) == []
    assert asked == ["a"]  # nobody behind it is even asked
    assert list(q.pending) == ["a", "b", "c"] and q.free == 4
    assert keys(q.schedule(1)) == ["a", "b", "c"]  # once allowed, all three fit


def test_can_start_refusing_a_job_in_order_blocks_the_jobs_behind_it():
    q = PartitionQueue(4)
    for key in ("a", "b", "c"):
        q.add(key, 1, 10, submitted=0)
    assert keys(q.schedule(0, refusing("b"))) == ["a"]
    assert list(q.pending) == ["b", "c"]


def test_can_start_refusing_a_backfill_candidate_skips_only_that_one():
    q = PartitionQueue(4)
    run(q, "R", 2, 100, started=0)  # free: 2
    q.add("H", 4, 10, submitted=0)  # reservation at 100, 0 spare
    q.add("c1", 1, 50, submitted=0)
    q.add("c2", 1, 50, submitted=0)
    q.add("c3", 1, 500, submitted=0)  # ends after the reservation: not a candidate, not asked
    asked: list[str] = []
    assert keys(q.schedule(0, refusing("c1", asked=asked))) == ["c2"]
    assert asked == ["c1", "c2"]
    assert list(q.pending) == ["H", "c1", "c3"] and q.free == 1


# -- jobs without GPUs and jobs larger than the partition --------------------------------------------


def test_job_without_gpus_starts_when_every_gpu_is_busy():
    q = PartitionQueue(2)
    run(q, "R", 2, 100, started=0)
    q.add("z", 0, 1000, submitted=0)
    assert keys(q.schedule(0)) == ["z"]  # first in line, needs nothing
    assert q.free == 0

    q.add("H", 2, 10, submitted=1)
    q.add("y", 0, 1000, submitted=1)  # behind a waiting job, ends long after its reservation (100)
    assert keys(q.schedule(1)) == ["y"]
    assert list(q.pending) == ["H"]
    assert q.finish("z") is not None and q.free == 0  # finishing it frees no GPU


def test_job_larger_than_the_partition_is_skipped_and_never_started():
    q = PartitionQueue(4)
    q.add("big", 5, 10, submitted=0)
    q.add("small", 2, 10, submitted=0)
    assert keys(q.schedule(0)) == ["small"]
    q.finish("small")
    assert q.schedule(10) == [] and list(q.pending) == ["big"] and q.free == 4


def test_job_larger_than_the_partition_does_not_take_the_reservation():
    q = PartitionQueue(4)
    run(q, "R", 3, 100, started=0)  # free: 1
    q.add("big", 5, 10, submitted=0)  # skipped: H below is the first waiting job
    q.add("H", 4, 10, submitted=0)  # reservation at 100, 0 spare
    q.add("x", 1, 1000, submitted=0)  # would end after 100 with no spare: waits
    q.add("y", 1, 50, submitted=0)  # ends at 50 <= 100: backfills
    assert keys(q.schedule(0)) == ["y"]
    assert list(q.pending) == ["big", "H", "x"]


# -- overdue jobs ---------------------------------------------------------------------------------


def _overdue_queue(now_pending: float) -> PartitionQueue:
    q = PartitionQueue(5)
    run(q, "A", 2, 100, started=0)  # ends at 100 at the latest
    run(q, "B", 2, 1000, started=0)  # free: 1
    q.add("H", 3, 10, submitted=now_pending)  # needs 1 + A's 2
    q.add("C", 1, 10, submitted=now_pending)
    return q


def test_overdue_job_counts_as_ending_now_in_the_reservation():
    # At 50, A ends at 100: H's reservation is 100 and C (50 + 10 = 60) backfills.
    q = _overdue_queue(50)
    assert keys(q.schedule(50)) == ["C"]
    # At 150, A is overdue and still running: H's reservation is now (150), so C (ends at 160, no spare) waits.
    # (Were A counted as never ending, the reservation would be B's end, 1000, and C would start.)
    q = _overdue_queue(150)
    assert q.schedule(150) == []
    assert list(q.pending) == ["H", "C"]
    # Now, not 100 (in the past): a job without walltime ends by the reservation, 150 + 0 <= 150.
    q.add("D", 1, 0, submitted=150)
    assert keys(q.schedule(150)) == ["D"]


def test_overdue_job_counts_as_ending_now_in_estimates():
    q = PartitionQueue(4)
    run(q, "A", 4, 100, started=0)
    assert q.wait(4, 10, now=40) == 60  # ends at 100
    assert q.wait(4, 10, now=150) == 0  # overdue: ends now, not in the past nor never
    q.add("P", 4, 50, submitted=150)
    # P runs on [150, 200) in the replay, from now; a newcomer waits for it: 200 - 150.
    assert q.wait(1, 10, now=150) == 50


# -- estimates --------------------------------------------------------------------------------------


def test_idle_partition_estimates_no_wait():
    q = PartitionQueue(8)
    assert q.wait(8, 3600, now=0) == 0
    assert q.wait(1, 10, now=1234) == 0
    assert q.wait(0, 10, now=0) == 0


def test_full_partition_waits_for_the_running_jobs_walltimes():
    q = PartitionQueue(4)
    run(q, "A", 2, 100, started=0)
    run(q, "B", 2, 300, started=0)
    assert q.wait(2, 10, now=40) == 60  # A ends at 100
    assert q.wait(3, 10, now=40) == 260  # 3 GPUs only once B ends at 300
    assert q.wait(4, 10, now=40) == 260
    assert q.wait(0, 10, now=40) == 0  # no GPUs needed


def test_pending_job_ahead_holds_a_reservation_that_newcomers_wait_behind():
    q = PartitionQueue(4)
    run(q, "A", 4, 100, started=0)
    q.add("P", 4, 50, submitted=0)  # starts at 100 and holds all 4 GPUs until 150
    assert q.wait(4, 10, now=0) == 150
    assert q.wait(1, 10, now=0) == 150

    q = PartitionQueue(4)
    run(q, "A", 4, 100, started=0)
    q.add("P", 2, 50, submitted=0)  # starts at 100 and holds 2 of the 4 until 150
    assert q.wait(2, 10, now=0) == 100  # the other 2
    assert q.wait(3, 10, now=0) == 150


def test_newcomer_that_may_backfill_now_waits_nothing():
    q = PartitionQueue(4)
    run(q, "B", 2, 300, started=0)  # free: 2
    q.add("P", 4, 50, submitted=0)  # first waiting job: reservation at 300, 0 GPUs spare
    assert q.wait(2, 100, now=0) == 0  # fits now and ends before the reservation
    assert q.wait(2, 300, now=0) == 0  # ends exactly at it
    # Would end after it with no spare GPU: behind P, which runs on [300, 350).
    assert q.wait(2, 400, now=0) == 350
    assert q.wait(1, 400, now=0) == 350


def test_newcomer_may_backfill_now_on_gpus_the_reservation_leaves_spare():
    q = PartitionQueue(6)
    run(q, "A", 4, 100, started=0)  # free: 2
    q.add("H", 5, 50, submitted=10)  # reservation at 100, when 6 are free: 1 spare
    assert q.wait(1, 1000, now=10) == 0  # on the spare GPU
    assert q.wait(2, 90, now=10) == 0  # 10 + 90 = 100: ends by the reservation
    # 2 GPUs past 100: behind H, which runs on [100, 150) leaving 1 free: 150 - 10.
    assert q.wait(2, 1000, now=10) == 140


def test_newcomer_is_estimated_to_backfill_in_a_hole_before_the_reservation():
    q = PartitionQueue(4)
    run(q, "A", 2, 100, started=0)
    run(q, "B", 2, 300, started=0)
    q.add("P", 4, 50, submitted=0)  # reservation at 300 (A's and B's ends); runs on [300, 350)
    # A's end leaves 2 GPUs free on [100, 300): EASY starts a job there if it ends by 300.
    assert q.wait(2, 200, now=0) == 100
    assert q.wait(1, 50, now=0) == 100
    assert q.wait(2, 201, now=0) == 350  # one second too long for the hole: behind P
    assert q.wait(3, 10, now=0) == 350  # too wide for the hole
    assert q.snapshot(0).wait(2, 200, now=40) == 60  # from a later time


def test_waiting_jobs_ahead_no_longer_than_the_newcomer_take_the_hole_first():
    q = PartitionQueue(4)
    run(q, "A", 2, 100, started=0)
    run(q, "B", 2, 300, started=0)
    q.add("P", 4, 50, submitted=0)  # runs on [300, 350)
    q.add("Q", 2, 150, submitted=0)  # no longer than a 200 s newcomer: it takes the 2 GPUs of [100, 300) first
    # Behind the queue instead: P on [300, 350), Q on [350, 500) beside 2 free GPUs.
    assert q.wait(2, 200, now=0) == 350
    assert q.wait(3, 10, now=0) == 500


def test_estimate_replays_the_waiting_jobs_in_order_with_their_walltimes():
    q = PartitionQueue(4)
    for key, gpus, walltime in (("P1", 4, 100), ("P2", 2, 200), ("P3", 4, 50)):
        q.add(key, gpus, walltime, submitted=0)  # not scheduled yet: P1 could start now
    # P1 on [0, 100); P2 on [100, 300); P3 needs all 4: [300, 350). A newcomer comes after P3's start.
    assert q.wait(1, 10, now=0) == 350
    assert q.wait(4, 10, now=0) == 350
    q.add("P4", 1, 20, submitted=0)  # after P3, which holds all 4 until 350: [350, 370)
    assert q.wait(3, 10, now=0) == 350  # 4 - 1 = 3 free beside P4 from 350
    assert q.wait(4, 10, now=0) == 370


def test_shape_larger_than_the_partition_never_starts():
    q = PartitionQueue(4)
    assert q.wait(5, 10, now=0) == math.inf
    assert q.snapshot(0).wait(5, 10) == math.inf
    run(q, "A", 4, 100, started=0)
    q.add("P", 4, 100, submitted=0)
    assert q.wait(5, 10, now=0) == math.inf


def test_pending_job_larger_than_the_partition_holds_nothing_in_estimates():
    q = PartitionQueue(4)
    q.add("big", 5, 1000, submitted=0)
    assert q.wait(4, 10, now=0) == 0
    run(q, "A", 4, 100, started=0)
    assert q.wait(4, 10, now=0) == 100  # only A's end, nothing for big


def test_pending_job_larger_than_the_partition_does_not_take_the_reservation_in_estimates():
    q = PartitionQueue(4)
    run(q, "R", 2, 100, started=0)  # free: 2
    q.add("big", 5, 10, submitted=0)
    q.add("P", 4, 50, submitted=0)  # the first waiting job that can run: reservation at 100, 0 spare
    assert q.wait(2, 100, now=0) == 0  # ends by it
    assert q.wait(2, 500, now=0) == 150  # would not: behind P, on [100, 150)


def test_snapshot_estimates_from_a_later_time_subtract_the_elapsed_time():
    q = PartitionQueue(4)
    run(q, "A", 4, 100, started=0)
    view = q.snapshot(0)
    assert view.wait(4, 10) == 100  # from the view's own time
    assert view.wait(4, 10, now=30) == 70
    assert view.wait(4, 10, now=100) == 0
    assert view.wait(4, 10, now=250) == 0  # never negative
    assert view.wait(2, 10, now=30) == 70  # another shape, after the first was answered


def test_snapshot_is_not_changed_by_later_queue_changes():
    q = PartitionQueue(4)
    run(q, "A", 4, 100, started=0)
    q.add("W", 2, 30, submitted=0)
    view = q.snapshot(0)
    assert (view.at, view.capacity, view.free) == (0, 4, 0)
    assert (view.pending_jobs, view.pending_gpu_s, view.running_jobs) == (1, 60, 1)

    q.finish("A")
    q.add("P", 4, 500, submitted=1)
    assert keys(q.schedule(1)) == ["W"]  # W starts; P waits for it (until 31)

    assert (view.free, view.pending_jobs, view.pending_gpu_s, view.running_jobs) == (0, 1, 60, 1)
    # Asked only now, the view still answers from time 0: W on [100, 130) beside 2 free GPUs.
    assert view.wait(3, 10) == 130
    assert view.wait(2, 10) == 100
    # The queue itself now: W runs until 31, then P holds all 4 on [31, 531).
    assert q.snapshot(1).wait(3, 10) == 530


# -- the backlog beyond MODELLED --------------------------------------------------------------------


def _backlog_queue() -> PartitionQueue:
    q = PartitionQueue(4)
    run(q, "A", 4, 100, started=0)
    q.add("P1", 2, 100, submitted=0)
    q.add("P2", 2, 200, submitted=0)
    q.add("P3", 4, 50, submitted=0)
    return q


def test_all_pending_jobs_are_replayed_within_modelled():
    # P1 on [100, 200) and P2 on [100, 300) side by side; P3 needs all 4: [300, 350).
    q = _backlog_queue()
    assert q.wait(1, 10, now=0) == 350
    assert q.wait(4, 10, now=0) == 350


def test_pending_jobs_beyond_modelled_add_their_gpu_seconds_averaged_over_capacity(monkeypatch):
    monkeypatch.setattr(queue_module, "MODELLED", 1)
    q = _backlog_queue()
    # Only P1 is replayed ([100, 200), 2 GPUs left free); P2 and P3 are a backlog of (2 x 200 + 4 x 50) / 4 = 150 s.
    assert q.wait(1, 10, now=0) == 100 + 150
    assert q.wait(3, 10, now=0) == 200 + 150

    monkeypatch.setattr(queue_module, "MODELLED", 0)
    # All three averaged: (2 x 100 + 2 x 200 + 4 x 50) / 4 = 200 s, after A's end.
    assert q.wait(1, 10, now=0) == 100 + 200


def test_pending_job_larger_than_the_partition_adds_no_backlog(monkeypatch):
    monkeypatch.setattr(queue_module, "MODELLED", 0)
    q = PartitionQueue(4)
    run(q, "A", 4, 100, started=0)
    q.add("small", 2, 100, submitted=0)
    q.add("big", 5, 1000, submitted=0)
    assert q.wait(1, 10, now=0) == 100 + 2 * 100 / 4


# -- properties -------------------------------------------------------------------------------------


class Model:
    """What the queue should hold, kept independently of it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.pending: dict[str, tuple[int, int]] = {}  # key: (GPUs, walltime), arrival order
        self.running: dict[str, tuple[int, int]] = {}  # key: (GPUs, latest end)

    @property
    def free(self) -> int:
        return self.capacity - sum(gpus for gpus, _ in self.running.values())


def reference_reservation(running: Iterable[tuple[int, int]], free: int, gpus: int,
                          now: float) -> tuple[float, int]:
    """EASY's reservation for a first waiting job of `gpus` GPUs, stated plainly: the first time (each running
    job ending at its walltime, or now if overdue) by which enough GPUs are free, and every GPU free then that the
    job leaves over."""
    if gpus <= free:
        return now, free - gpus
    running = list(running)
    for at in sorted({max(end, now) for _, end in running}):
        free_then = free + sum(g for g, end in running if max(end, now) <= at)
        if free_then >= gpus:
            return at, free_then - gpus
    return math.inf, 0


def check_easy_call(model: Model, now: float, allowed: Callable[[str], bool], started: list[Entry]) -> None:
    """Check one `schedule(now)` call's decisions job by job, and apply them to `model`.

    In order, a job that fits and is allowed must start; a refused one blocks the rest. After the first job that
    does not fit, a job may start only if it fits now and ends by that job's reservation or uses GPUs the
    reservation leaves spare; and one that fits, is allowed and ends by the reservation must start. (A job that
    uses spare GPUs is not required to start: the model may count the spare GPUs more cautiously.)"""
    assert all(e.started == now for e in started)
    chosen = keys(started)
    assert chosen == [k for k in model.pending if k in set(chosen)], "started out of arrival order"
    free, shadow, spare, blocked = model.free, None, 0, False
    for key, (gpus, walltime) in list(model.pending.items()):
        starts = key in chosen
        if blocked or gpus > model.capacity:
            assert not starts, f"{key} started though blocked or larger than the partition"
            continue
        if shadow is None:  # still in order
            if gpus > free:
                assert not starts, f"{key} started without fitting"
                shadow, spare = reference_reservation(model.running.values(), free, gpus, now)
            elif not allowed(key):
                assert not starts
                blocked = True
            else:
                assert starts, f"{key} fits in order but did not start"
        else:
            fits, early = gpus <= free, now + walltime <= shadow
            if fits and early and allowed(key):
                assert starts, f"{key} fits and ends by the reservation ({shadow}) but did not start"
            if starts:
                assert fits and allowed(key), f"{key} backfilled without fitting or being allowed"
                assert early or gpus <= spare, f"{key} backfilled past the reservation ({shadow}) without spare"
                if not early:
                    spare -= gpus
        if starts:
            del model.pending[key]
            model.running[key] = (gpus, now + walltime)
            free -= gpus


def check_counts(q: PartitionQueue, model: Model) -> None:
    assert q.free == model.free >= 0
    assert q.free == q.capacity - sum(e.gpus for e in q.running.values())
    assert list(q.pending) == list(model.pending) and len(q) == len(model.pending)
    assert {k: (e.gpus, e.end) for k, e in q.running.items()} == model.running
    assert q.pending_gpu_s == pytest.approx(sum(g * w for g, w in model.pending.values()))
    if not model.pending:
        assert q.pending_gpu_s == 0.0


def operations(capacity: int) -> st.SearchStrategy:
    """Random changes, each followed by a `schedule` call or not (the last item)."""
    add = st.tuples(st.just("add"), st.integers(0, capacity + 1), st.integers(0, 50),
                    st.sampled_from([False, False, False, True]),  # refused by can_start (if any)
                    st.sampled_from([True, False, False]))
    return st.lists(st.one_of(
        add, add,  # twice as likely as each other change, so that jobs wait
        st.tuples(st.just("tick"), st.integers(0, 40), st.sampled_from([True, False, False])),
        st.tuples(st.just("finish"), st.integers(0, 1000), st.sampled_from([True, False, False])),
        st.tuples(st.just("remove"), st.integers(0, 1000), st.sampled_from([True, False, False])),
    ), min_size=30, max_size=120)


@PROPERTIES
@given(data=st.data(), capacity=st.integers(1, 6), with_can_start=st.booleans())
def test_random_operations_keep_the_counts_and_follow_easy(data, capacity, with_can_start):
    """Adds (some refused by `can_start`), cancellations, finishes (early or overdue) and time passing, with
    `schedule` calls in between: the counts always match a model kept aside, and every decision follows EASY."""
    q, model, now, n = PartitionQueue(capacity), Model(capacity), 0, 0
    refused: set[str] = set()
    can_start = (lambda entry: entry.key not in refused) if with_can_start else None

    def allowed(key: str) -> bool:
        return can_start is None or key not in refused

    for op in data.draw(operations(capacity)):
        note(f"{op} at {now}")
        if op[0] == "add":
            key, n = f"j{n}", n + 1
            q.add(key, op[1], op[2], submitted=now)
            model.pending[key] = (op[1], op[2])
            if op[3]:
                refused.add(key)
        elif op[0] == "tick":
            now += op[1]  # may leave running jobs overdue
        elif op[0] == "finish" and model.running:
            key = sorted(model.running)[op[1] % len(model.running)]
            assert q.finish(key).key == key
            del model.running[key]
        elif op[0] == "remove" and model.pending:
            key = sorted(model.pending)[op[1] % len(model.pending)]
            assert q.remove(key).key == key
            del model.pending[key]
        check_counts(q, model)
        if op[-1]:
            check_easy_call(model, now, allowed, q.schedule(now, can_start))
            check_counts(q, model)


jobs = st.lists(st.tuples(st.integers(0, 10),  # seconds after the previous arrival
                          st.integers(0, 9),  # GPUs (some over the partition's)
                          st.integers(1, 60),  # walltime
                          st.integers(0, 60)),  # how much earlier than its walltime it ends
                min_size=10, max_size=60)


@PROPERTIES
@given(capacity=st.integers(1, 8), arrivals=jobs)
def test_simulation_first_waiting_job_never_starts_after_its_reservation(capacity, arrivals):
    """Jobs arrive, run at most their walltime, and the queue is scheduled after every event, as the daemons do.
    Whenever a job is the first waiting one, its EASY reservation is noted; it must start by the earliest one
    noted, and every job that fits the partition must eventually start."""
    q = PartitionQueue(capacity)
    events: list[tuple[int, int, int, str]] = []  # (time, 0 finish / 1 arrival, sequence, key)
    shape: dict[str, tuple[int, int, int]] = {}  # key: (GPUs, walltime, runtime)
    at = 0
    for n, (gap, gpus, walltime, early) in enumerate(arrivals):
        at += gap
        shape[f"j{n}"] = (gpus, walltime, max(0, walltime - early))
        heapq.heappush(events, (at, 1, n, f"j{n}"))
    reservation: dict[str, float] = {}
    started: dict[str, int] = {}
    seq = len(arrivals)
    while events:
        now, kind, _, key = heapq.heappop(events)
        if kind == 0:
            q.finish(key)
        else:
            q.add(key, shape[key][0], shape[key][1], submitted=now)
        for entry in q.schedule(now):
            started[entry.key] = now
            seq += 1
            heapq.heappush(events, (now + shape[entry.key][2], 0, seq, entry.key))
        assert q.free == capacity - sum(e.gpus for e in q.running.values()) >= 0
        head = next((e for e in q.pending.values() if e.gpus <= capacity), None)
        if head is not None:
            assert head.gpus > q.free, "the first waiting job fits but was left waiting"
            running = [(e.gpus, e.end) for e in q.running.values()]
            shadow, _ = reference_reservation(running, q.free, head.gpus, now)
            reservation[head.key] = min(reservation.get(head.key, math.inf), shadow)

    for key, (gpus, _, _) in shape.items():
        if gpus > capacity:
            assert key not in started and key in q.pending
        else:
            assert key in started, f"{key} never started"
    for key, shadow in reservation.items():
        assert started[key] <= shadow, f"{key} started at {started[key]}, after its reservation {shadow}"
    assert q.free == capacity and not q.running


def fcfs_start(capacity: int, at: int, running: list[tuple[int, int]], pending: list[tuple[int, int]],
               gpus: int) -> float:
    """When a job of `gpus` GPUs behind `pending` starts, first come, first served, every job lasting its walltime:
    worked out second by second from `at` (`running`: (GPUs, end); `pending`: (GPUs, walltime))."""
    if gpus > capacity:
        return math.inf
    horizon = max([at] + [end for _, end in running]) + sum(w for _, w in pending) + 1
    free = {t: capacity - sum(g for g, end in running if end > t) for t in range(at, horizon)}
    clock = at
    for g, w in pending:
        if g <= capacity:
            clock = next(t for t in range(clock, horizon) if free[t] >= g)
            for t in range(clock, min(clock + w, horizon)):
                free[t] -= g
    return next(t for t in range(clock, horizon) if free[t] >= gpus)


def hole_start(capacity: int, at: int, running: list[tuple[int, int]], pending: list[tuple[int, int]], gpus: int,
               walltime: int) -> float:
    """When a job of this shape backfills before the first waiting job's reservation, as documented: the first
    second from `at` at which the running jobs leave enough GPUs for it and for the waiting jobs behind the first
    that could also end by the reservation, if it then ends by the reservation (inf if it does not)."""
    waiting = [(g, w) for g, w in pending if g <= capacity]
    if not waiting:
        return math.inf
    free_at = capacity - sum(g for g, _ in running)
    shadow, _ = reference_reservation(running, free_at, waiting[0][0], at)
    need = gpus + sum(g for g, w in waiting[1:] if at + w <= shadow)
    for t in range(at, int(shadow)):
        if free_at + sum(g for g, end in running if end <= t) >= need:
            return t if t + walltime <= shadow else math.inf
    return math.inf


@PROPERTIES
@given(capacity=st.integers(1, 6), at=st.integers(0, 30),
       running=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30), st.integers(1, 60)), max_size=5),
       pending=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 30)), max_size=8))
def test_estimate_of_a_job_that_cannot_start_now_matches_a_brute_force_timeline(capacity, at, running, pending):
    """For every shape that does not fit now, the estimate is the earlier of its start in a hole before the
    reservation and its first come, first served start behind the waiting jobs (which may include jobs that fit:
    the queue is not scheduled here)."""
    assume(not pending or pending[0][0] <= capacity)  # else the first job never runs and the next one reserves
    q, kept = PartitionQueue(capacity), []
    for n, (g, started, walltime) in enumerate(running):  # as many as fit; some may be overdue at `at`
        if g <= q.free:
            run(q, f"r{n}", g, walltime, started=min(started, at))
            kept.append((g, min(started, at) + walltime))
    for n, (g, walltime) in enumerate(pending):
        q.add(f"p{n}", g, walltime, submitted=at)
    view = q.snapshot(at)
    for gpus in range(q.free + 1, capacity + 2):
        for walltime in (1, 5, 20, 60):
            start = min(fcfs_start(capacity, at, kept, pending, gpus),
                        hole_start(capacity, at, kept, pending, gpus, walltime))
            assert view.wait(gpus, walltime) == start - at, f"{gpus} GPUs for {walltime} s"
            assert view.wait(gpus, walltime, now=at + 5) == max(0, start - at - 5)


def starts_now(q: PartitionQueue, gpus: int, walltime: int, now: float) -> bool:
    """Whether a newcomer of this shape starts at once (tried on a copy of `q`)."""
    trial = copy.deepcopy(q)
    trial.add("new", gpus, walltime, submitted=now)
    return "new" in keys(trial.schedule(now))


@settings(PROPERTIES, max_examples=150)
@given(data=st.data(), capacity=st.integers(1, 6))
def test_no_wait_estimate_matches_schedule_starting_the_job_overdue_jobs_aside(data, capacity):
    """After any changes and a `schedule`, a newcomer that adding and scheduling at once would start is estimated
    to wait 0; and one that would not is estimated to wait 0 only if a running job is at or past its walltime
    (it counts as ending now, though it still holds its GPUs)."""
    q, now, n = PartitionQueue(capacity), 0, 0
    for op in data.draw(operations(capacity)):
        if op[0] == "add":
            q.add(f"j{n}", op[1], op[2], submitted=now)
            n += 1
        elif op[0] == "tick":
            now += op[1]
        elif op[0] == "finish" and q.running:
            q.finish(sorted(q.running)[op[1] % len(q.running)])
        elif op[0] == "remove" and q.pending:
            q.remove(sorted(q.pending)[op[1] % len(q.pending)])
        if op[-1]:
            q.schedule(now)
    q.schedule(now)
    view = q.snapshot(now)
    overdue = any(e.end <= now for e in q.running.values())
    for gpus in range(capacity + 2):
        for walltime in (0, 1, 10, 30, 100, 1000):
            no_wait = view.wait(gpus, walltime) == 0
            if starts_now(q, gpus, walltime, now):
                assert no_wait, f"{gpus} GPUs for {walltime} s start now but are estimated to wait"
            else:
                assert not no_wait or overdue, f"{gpus} GPUs for {walltime} s cannot start but are estimated to wait 0"


# -- jobs ending together, and competitors for a hole ------------------------------------------------------------

def test_gpus_of_jobs_ending_at_the_reservation_time_count_as_spare():
    """A and B (1 GPU each) end at 100, C (2) at 1000; H needs 2 and is reserved at 100. Both A and B free their
    GPU then: 3 free, H takes 2, and 1 is spare for D, which may run past 100 on it."""
    q = PartitionQueue(5)
    run(q, "A", 1, 100, 0)
    run(q, "B", 1, 100, 0)
    run(q, "C", 2, 1000, 0)
    q.add("H", 2, 50, 0)
    q.add("D", 1, 500, 0)
    assert [e.key for e in q.schedule(0)] == ["D"]
    assert [k for k in q.pending] == ["H"]


def test_overdue_jobs_all_count_as_ending_now_in_the_reservation():
    """A (2 GPUs, end 100) and B (2, end 120) are overdue at 150; H needs 3: reserved now with 1 spare for D."""
    q = PartitionQueue(6)
    run(q, "A", 2, 100, 0)
    run(q, "B", 2, 120, 0)
    run(q, "C", 1, 1000, 0)
    q.add("H", 3, 50, 0)
    q.add("D", 1, 5000, 0)
    assert [e.key for e in q.schedule(150)] == ["D"]


def test_a_longer_job_ahead_that_fits_the_hole_takes_it_first_in_estimates():
    """A (2 GPUs) ends at 100, B (2) at 300; P (4) waits for 300; Q (2 GPUs, 150 s) fits the hole at 100 and is
    ahead of a newcomer of 2 GPUs for 100 s, so the newcomer does not get that hole: it waits for the queue."""
    q = PartitionQueue(4)
    run(q, "A", 2, 100, 0)
    run(q, "B", 2, 300, 0)
    q.add("P", 4, 50, 0)
    q.add("Q", 2, 150, 0)
    assert q.wait(2, 100, now=0) >= 300


def test_a_first_job_too_large_for_the_partition_is_not_counted_as_a_competitor():
    """`big` can never run here; P is the first waiting job. A newcomer of 2 GPUs for 200 s backfills at 100."""
    q = PartitionQueue(4)
    run(q, "A", 2, 100, 0)
    run(q, "B", 2, 300, 0)
    q.add("big", 5, 10, 0)
    q.add("P", 4, 50, 0)
    assert q.wait(2, 200, now=0) == 100


def test_each_waiting_job_has_its_expected_start_in_arrival_order():
    """What the hub's load balancer reads: 4 GPUs, all busy until 100. A (2 GPUs, 50 s) starts at 100; B (4 GPUs)
    needs A's GPUs back: 150; C (2 GPUs) waits behind B: 180. D (8 GPUs) can never run here and is left out."""
    q = PartitionQueue(4)
    q.claim(Entry("r", 4, 100, 0.0), 0.0)
    for key, gpus, wall in (("A", 2, 50), ("B", 4, 30), ("D", 8, 10), ("C", 2, 10)):
        q.add(key, gpus, wall, 1.0)
    assert q.snapshot(10.0).starts() == {"A": 100.0, "B": 150.0, "C": 180.0}
