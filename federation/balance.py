"""Hub-to-hub load balancing, the decisions: which waiting jobs a hub hands to which peer. The hub daemon
(hub/balance.py) and the placement simulator (federation/simulate.py) both run this code.

Each round, a hub looks at the jobs waiting in its own queue, with the wait its queue model expects for each
(`federation.queue.QueueView.starts`). A job is offered when that wait exceeds the threshold; it moves to the
peer, among those its antenna allowed (`Job.alternatives`, the hubs that passed the antenna's filters), that
the antenna's own `earliest-start` placement code ranks first, if that peer would start it clearly sooner
(`BalanceConfig.worth_moving`). The jobs that would wait longest are looked at first, at most `MAX_LOOKED_AT`
per round. What this hub hands to a
peer counts against the peer's estimates until the peer's adverts show it (the placer's correction for jobs
not seen yet), and at most `max_per_peer` jobs go to one peer per round. A peer that fails or refuses
`breaker_failures` hand-offs in a row is left alone for `breaker_cooldown_s`, then tried with one job.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from federation.config import BalanceConfig
from federation.placement import Candidate, Placer


MAX_LOOKED_AT = 200  # jobs looked at per round, longest waits first: a round's cost is bounded


@dataclass(frozen=True, slots=True)
class Waiting:
    """A job waiting in this hub's queue, as the balancer sees it."""

    key: str                           # the job's id
    gpus: int
    walltime_s: float
    wait_s: float                      # expected here, from the hub's queue model
    alternatives: tuple[str, ...] = ()  # the peers its antenna allows


@dataclass(frozen=True, slots=True)
class Move:
    job: Waiting
    peer: str
    wait_there_s: float                # the peer's estimate, corrected for what this hub just sent it


class Breaker:
    """A circuit breaker per peer: closed while hand-offs succeed; open after `failures` failures in a row, for
    `cooldown_s`; then half-open: one job may go, and its outcome closes or opens the breaker again."""

    def __init__(self, failures: int, cooldown_s: float):
        self.failures, self.cooldown_s = failures, cooldown_s
        self._failed: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def allows(self, peer: str, now: float | None = None) -> int:
        """How many jobs may go to `peer` now: 0 while open, 1 when half-open, otherwise no limit (-1)."""
        now = time.monotonic() if now is None else now
        until = self._open_until.get(peer)
        if until is None:
            return -1
        return 0 if now < until else 1

    def is_open(self, peer: str, now: float | None = None) -> bool:
        return self.allows(peer, now) == 0

    def succeeded(self, peer: str) -> None:
        self._failed.pop(peer, None)
        self._open_until.pop(peer, None)

    def failed(self, peer: str, now: float | None = None) -> bool:
        """Count a failure; True if it (re)opens the breaker."""
        now = time.monotonic() if now is None else now
        n = self._failed[peer] = self._failed.get(peer, 0) + 1
        if n >= self.failures or peer in self._open_until:  # a failed trial while half-open opens it again
            self._open_until[peer] = now + self.cooldown_s
            return True
        return False


def plan(waiting: Iterable[Waiting], estimate: Callable[[str, Waiting], Candidate | None], settings: BalanceConfig,
         placer: Placer, breaker: Breaker, now: float, clock: float | None = None,
         soonest: Callable[[str, int], float] | None = None) -> list[Move]:
    """The moves of one round. `estimate(peer, job)`: the peer as a placement candidate for the job (its
    estimated wait for the job's shape), or None if it cannot take it now. `now`: the wall clock the placer's
    correction uses; `clock`: the breaker's (monotonic) clock. `soonest(peer, gpus)`, if given: a wait no job of
    that many GPUs can beat there (a lower bound), which spares estimating jobs no peer could take in time."""
    moves: list[Move] = []
    sent: dict[str, int] = {}
    eligible = (w for w in waiting if w.alternatives and w.wait_s > settings.threshold_s)
    for job in heapq.nsmallest(MAX_LOOKED_AT, eligible, key=lambda w: (-w.wait_s, w.key)):
        if soonest is not None and not any(settings.worth_moving(job.wait_s, soonest(peer, job.gpus))
                                           for peer in job.alternatives):
            continue
        candidates = []
        for peer in job.alternatives:
            room = breaker.allows(peer, clock)
            cap = settings.max_per_peer if room < 0 else min(room, settings.max_per_peer)
            if sent.get(peer, 0) >= cap:
                continue
            if (candidate := estimate(peer, job)) is not None:
                candidates.append(candidate)
        if not candidates:
            continue
        best = placer.order(candidates, job.gpus, job.walltime_s, now)[0]
        if not settings.worth_moving(job.wait_s, best.score):
            continue
        placer.sent(best.site, job.key, job.gpus, job.walltime_s, now)
        sent[best.site] = sent.get(best.site, 0) + 1
        moves.append(Move(job, best.site, best.score))
    return moves
